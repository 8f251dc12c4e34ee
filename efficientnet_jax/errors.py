"""Errors a user can fix: a config value, a dataset, a checkpoint, a batch that does not divide.

`python -m efficientnet_jax.main` prints such an error's message alone and exits with status 2
(`--traceback` shows the stack); any other exception keeps its full traceback. Each concrete
error also derives from the built-in type it refines (ValueError, FileNotFoundError, ...), so
callers that catch those keep working.
"""


class UserError(Exception):
  """Raised for a problem the message tells the user how to fix."""


class ConfigError(UserError, ValueError):
  """A config value is invalid or inconsistent with the dataset, the mesh or another value."""
