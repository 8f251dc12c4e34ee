"""What the command-line entry points share (`main`, `aot`): loading --config from the checkout,
and turning an outcome into an exit status that a scheduler can act on.

* An error in the config file or a --config.* override, raised while the flags are parsed, prints
  its message alone and exits 2 (`--traceback` shows the stack).
* A failure after the entry point started prints its traceback and exits 1, at once: no daemon or
  library thread (tf.data, metric writers, a background compile) may keep a stopped job alive.
"""
from __future__ import annotations

import os
import pathlib
import sys
import traceback
from typing import Callable

from absl import app, logging

__all__ = ['exit_now', 'run', 'with_repo_config_path']

# The checkout's configs/, for `--config=configs/b7.py` typed in another working directory.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def with_repo_config_path(argv: list[str]) -> list[str]:
  """`argv` with a relative --config path that is missing here taken from the checkout instead.

  config_flags reads the path relative to the working directory; a path such as
  configs/b7.py that only exists relative to the repository then still loads.
  """
  result = []
  for arg in argv:
    if arg.startswith('--config='):
      path, sep, rest = arg[len('--config='):].partition(':')
      if (path and not os.path.isabs(path) and not os.path.exists(path)
          and (_REPO_ROOT / path).is_file()):
        arg = f'--config={_REPO_ROOT / path}{sep}{rest}'
    result.append(arg)
  return result


def exit_now(status: int, message: str) -> None:
  """Prints `message` to stderr and ends the process now, whatever threads are still running."""
  print(message, file=sys.stderr, flush=True)
  logging.flush()
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access


def run(main_fn: Callable[[list[str]], None]) -> None:
  """`app.run(main_fn)`; an error in the config file or its overrides prints its message alone."""
  started = []

  def started_main(argv):
    started.append(True)
    return main_fn(argv)

  argv = with_repo_config_path(sys.argv)
  try:
    app.run(started_main, argv=argv)
  except Exception as e:  # pylint: disable=broad-except
    if started:  # an unexpected failure: its traceback, then out, on every host
      traceback.print_exc()
      exit_now(1, f'error: failed ({type(e).__name__}); the traceback is above.')
    if '--traceback' in argv:  # raised while parsing the flags: the config or an override
      raise
    exit_now(2, f'error: {_config_message(e)}')


def _config_message(error: Exception) -> str:
  """An exception from loading a config or applying an override, as one readable message."""
  text = str(error)
  if isinstance(error, (AttributeError, KeyError)) and len(text) > 1 and text[0] == text[-1] == "'":
    text = text[1:-1].encode().decode('unicode_escape')  # ml_collections quotes its message
  return f'{text} (in --config or a --config.* override)'.replace("\\'", "'")
