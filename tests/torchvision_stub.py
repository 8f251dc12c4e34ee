"""A stand-in for the few torchvision names timm touches when it is imported, for tests only.

timm imports torchvision at module load (`torchvision.ops.misc.FrozenBatchNorm2d` for its norm
layers, `torchvision.transforms` for its data pipeline), but building and running a model needs
none of it. No torchvision build works against the CPU PyTorch here (the PyPI wheel is a CUDA
build that fails with "operator torchvision::nms does not exist"), so `installed()` puts these
modules in `sys.modules` for the duration of a test. Anything beyond what timm's import needs is
a placeholder class that raises if it is ever instantiated, so a test cannot silently depend on
fake torchvision behaviour.
"""
from __future__ import annotations

import contextlib
import enum
import sys
import types


class InterpolationMode(enum.Enum):
  """The names timm reads from torchvision.transforms(.functional) at import time."""
  NEAREST = 'nearest'
  NEAREST_EXACT = 'nearest-exact'
  BILINEAR = 'bilinear'
  BICUBIC = 'bicubic'
  BOX = 'box'
  HAMMING = 'hamming'
  LANCZOS = 'lanczos'


def _module(name: str, **attributes) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__dict__.update(attributes)

  def __getattr__(attribute: str):
    if attribute.startswith('__'):
      raise AttributeError(attribute)

    def unavailable(*args, **kwargs):
      raise RuntimeError(f'{name}.{attribute} is only a test stub of torchvision '
                         '(tests/torchvision_stub.py); the test must not use it.')
    return type(attribute, (), {'__init__': unavailable})

  module.__getattr__ = __getattr__
  return module


def _stub_modules() -> dict[str, types.ModuleType]:
  import torch

  class FrozenBatchNorm2d(torch.nn.Module):
    """Only for timm's isinstance checks; the tests never freeze BatchNorm."""

    def __init__(self, *args, **kwargs):
      raise RuntimeError('FrozenBatchNorm2d is only a test stub (tests/torchvision_stub.py).')

  modules = {
      'torchvision': _module('torchvision', __version__='0.0+test-stub'),
      'torchvision.ops': _module('torchvision.ops'),
      'torchvision.ops.misc': _module('torchvision.ops.misc', FrozenBatchNorm2d=FrozenBatchNorm2d),
      'torchvision.transforms': _module('torchvision.transforms',
                                        InterpolationMode=InterpolationMode),
      'torchvision.transforms.functional': _module('torchvision.transforms.functional',
                                                   InterpolationMode=InterpolationMode),
      'torchvision.datasets': _module('torchvision.datasets'),
      'torchvision.utils': _module('torchvision.utils'),
  }
  for name, module in modules.items():  # parents expose their children as attributes
    parent, _, child = name.rpartition('.')
    if parent:
      setattr(modules[parent], child, module)
  return modules


def real_torchvision_works() -> bool:
  """Whether a real torchvision imports (then no stub is needed)."""
  try:
    import torchvision  # noqa: F401
    return True
  except Exception:  # missing, or a build that does not match this torch
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
    return False


@contextlib.contextmanager
def installed():
  """Makes `import timm` work without torchvision, inside the `with` block only."""
  if real_torchvision_works():
    yield
    return
  stubs = _stub_modules()
  saved = {name: sys.modules.get(name) for name in stubs}
  sys.modules.update(stubs)
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
