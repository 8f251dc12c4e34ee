"""EfficientNet CPU inference as one native call, its 1x1 convs on oneDNN: optional.

XLA:CPU runs an EfficientNet as a chain of ops, each writing its output to memory: the wide
expanded maps, the depthwise convs through XLA's generic convolution, and bfloat16 no faster than
float32 (XLA converts around float32 kernels). `onednn_ffi.cc` runs the whole network in one
`jax.ffi` call instead (`network`): the 1x1 convs as oneDNN products (AMX or AVX512_BF16 units
for bfloat16, AVX-512 for float32), the stem, depthwise convs, activations, squeeze-excite and
pooling as its own loops, block by block, image by image, a strip of the expanded map at a time
in the core's cache. The 1x1 kernels are packed into oneDNN's layout once, by `fold`.

`make_inference_fn` takes this path (`folded_steps`) for a bfloat16 EfficientNet on a CPU with
AMX or AVX512_BF16 and for a float32 one on a CPU with AVX-512 (`unsuited_cpu` says why not
elsewhere), where `load()` succeeds: float32 gives `apply`'s values to float32 rounding,
bfloat16 within bfloat16's.

The extension is optional: `pip install 'efficientnet-jax[onednn]'` installs oneDNN (its CPU-only
OpenMP build and headers), and the first use compiles `onednn_ffi.cc` with the C++ compiler
(`$CXX`, else g++) for this CPU, seconds, into a cache directory (`$EFFICIENTNET_JAX_CACHE`, else
`~/.cache/efficientnet_jax`). Where any of that is missing, or `EFFICIENTNET_JAX_ONEDNN=0`,
`load()` logs one line saying why and returns None, and inference runs on XLA's path. What was
measured is in docs/performance.md.

    python -m efficientnet_jax.models.onednn   # builds it now (e.g. in an image) and says
                                               # where float32 and bfloat16 inference run
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_jax import xla_cpu
from efficientnet_jax.models import folding
from efficientnet_jax.models.efficientnet import EfficientNet, has_residual
from efficientnet_jax.models.naming import block_name

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_ffi.cc')
# Activation codes of onednn_ffi.cc's handlers.
ACTIVATIONS = {'none': 0, 'swish': 1, 'relu6': 2, 'relu': 3}
TARGETS = {'ej_onednn_network': 'EjOnednnNetwork', 'ej_onednn_mbconv': 'EjOnednnMbconv',
           'ej_onednn_pack': 'EjOnednnPack'}

_lock = threading.Lock()
_state: dict = {}


class OnednnUnavailable(RuntimeError):
  """The oneDNN extension cannot be built or loaded here; the message says why."""


def _onednn_prefix() -> str:
  """The prefix (include/, lib/) holding oneDNN's headers and library."""
  candidates = [os.environ.get('EFFICIENTNET_JAX_ONEDNN_PREFIX', ''), sys.prefix,
                sysconfig.get_paths().get('data', ''), sys.base_prefix, '/usr/local', '/usr']
  for prefix in filter(None, candidates):
    header = os.path.join(prefix, 'include', 'oneapi', 'dnnl', 'dnnl.hpp')
    if os.path.isfile(header) and glob.glob(os.path.join(prefix, 'lib*', 'libdnnl.so*')):
      return prefix
  raise OnednnUnavailable(
      "oneDNN's headers and library were not found (looked in "
      f"{', '.join(p for p in candidates if p)}); pip install 'efficientnet-jax[onednn]' "
      '(onednn-cpu-gomp and onednn-devel-cpu-gomp) or set EFFICIENTNET_JAX_ONEDNN_PREFIX')


def cache_dir() -> str:
  root = (os.environ.get('EFFICIENTNET_JAX_CACHE')
          or os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                          'efficientnet_jax'))
  return root


def build() -> str:
  """Compiles `onednn_ffi.cc` (once per source, JAX, oneDNN and CPU) and returns its path.

  Raises OnednnUnavailable, saying what is missing, where it cannot.
  """
  prefix = _onednn_prefix()
  lib_dir = os.path.dirname(sorted(glob.glob(os.path.join(prefix, 'lib*', 'libdnnl.so*')))[0])
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not compiler:
    raise OnednnUnavailable('no C++ compiler (set $CXX or install g++)')
  command = [compiler, '-O3', '-march=native', '-fopenmp', '-std=c++17', '-shared', '-fPIC',
             '-isystem', jax.ffi.include_dir(), '-isystem', os.path.join(prefix, 'include'),
             SOURCE, f'-L{lib_dir}', '-ldnnl', f'-Wl,-rpath,{lib_dir}']
  with open(SOURCE, 'rb') as f:
    digest = hashlib.sha256(f.read())
  libdnnl = os.path.realpath(os.path.join(lib_dir, 'libdnnl.so'))
  # -march=native: the library is for this CPU, so its flags are part of the name (a cache
  # shared between machines never hands one CPU another's instructions).
  digest.update(' '.join(command + [jax.__version__, libdnnl]
                         + sorted(xla_cpu.cpu_flags())).encode())
  path = os.path.join(cache_dir(), f'onednn_ffi-{digest.hexdigest()[:16]}.so')
  if os.path.isfile(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Compiled beside its final name and renamed, so no process ever loads half a library.
  fd, partial = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    done = subprocess.run(command + ['-o', partial], capture_output=True, text=True)
    if done.returncode:
      raise OnednnUnavailable(f'compiling {os.path.basename(SOURCE)} failed:\n'
                              f'{done.stderr[-2000:]}')
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path


def load() -> ctypes.CDLL | None:
  """The extension, built and registered with XLA on first call; None (logged once) if absent."""
  with _lock:
    if 'lib' in _state:
      return _state['lib']
    lib, reason = None, None
    if os.environ.get('EFFICIENTNET_JAX_ONEDNN', '1') == '0':
      reason = 'EFFICIENTNET_JAX_ONEDNN=0'
    else:
      try:
        lib = ctypes.CDLL(build())
        for target, symbol in TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform='cpu')
        lib.EjOnednnVersion.restype = ctypes.c_char_p
        lib.EjOnednnPackedBytes.restype = ctypes.c_int64
        lib.EjOnednnPackedBytes.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
        logger.info('oneDNN %s extension loaded for CPU inference',
                    lib.EjOnednnVersion().decode())
      except (OnednnUnavailable, OSError) as e:
        lib, reason = None, str(e)
    if lib is None:
      logger.warning('efficientnet_jax: the oneDNN extension is not available, so EfficientNet '
                     'CPU inference runs on XLA (slower): %s', reason)
    _state['lib'], _state['reason'] = lib, reason
    return lib


def unsuited_cpu(dtype) -> str | None:
  """Why this CPU would not run `dtype` (bfloat16 or float32) faster on oneDNN than on XLA, or
  None where it would."""
  if jnp.dtype(dtype) == jnp.bfloat16 and not xla_cpu.host_has_bf16_units():
    return 'this CPU has neither AMX nor AVX512_BF16, where oneDNN would not be faster'
  if jnp.dtype(dtype) == jnp.float32 and not xla_cpu.host_has_avx512():
    return 'this CPU has no AVX-512, where this path was not measured against XLA'
  return None


def inference_path(dtype=jnp.bfloat16) -> str:
  """Where an EfficientNet's CPU inference in `dtype` runs here, and why (builds the
  extension)."""
  lib = load()
  if lib is None:
    return f"XLA: the oneDNN extension is not available ({_state['reason']})"
  reason = unsuited_cpu(dtype)
  if reason:
    return f'XLA: {reason}'
  return f'oneDNN {lib.EjOnednnVersion().decode()} through XLA FFI'


def supports(model) -> bool:
  """Whether `model` can run on this path: a bfloat16 or float32 EfficientNet classifier of
  MBConv blocks with a oneDNN activation, on CPU (the extension and the CPU are `load()`'s and
  `unsuited_cpu`'s questions)."""
  return (isinstance(model, EfficientNet) and not model.features_only
          and jnp.dtype(model.dtype) in (jnp.bfloat16, jnp.float32)
          and model.activation in ACTIVATIONS and folding.supports_blocks(model.blocks)
          and jax.default_backend() == 'cpu')


# ----------------------------------------------------------------------------- the operations
def pack(kernel: jax.Array) -> jax.Array:
  """A (k, n) bfloat16 or float32 kernel in oneDNN's blocked layout for products (uint8 bytes):
  what `network` and `mbconv` take, packed once when the parameters are folded."""
  k, n = kernel.shape
  lib = load()
  if lib is None:
    raise OnednnUnavailable(f"the oneDNN extension is not available: {_state['reason']}")
  size = lib.EjOnednnPackedBytes(k, n, int(kernel.dtype == jnp.bfloat16))
  if size < 0:
    raise ValueError(f'oneDNN has no product for a {k}x{n} {kernel.dtype} kernel')
  return jax.ffi.ffi_call('ej_onednn_pack', jax.ShapeDtypeStruct((size,), jnp.uint8),
                          vmap_method='sequential')(kernel)


# ----------------------------------------------------------------------------- the network
def fold(model: EfficientNet, variables: Any) -> dict:
  """`folding.fold_batch_norm`'s parameters for this path: the stem kernel in the model's dtype
  (bfloat16 or float32), every 1x1 kernel also packed for oneDNN ('packed', `pack`), the
  depthwise kernels, biases, SE and the classifier (packed too) in float32. Raises
  OnednnUnavailable, saying why, without the extension."""
  folded = folding.fold_batch_norm(model, variables)
  dtype = jnp.dtype(model.dtype)

  def one_by_one(p):
    kernel = p['kernel'].astype(dtype)
    return {'kernel': kernel, 'bias': p['bias'],
            'packed': pack(kernel.reshape(kernel.shape[-2:]))}
  out = {}
  for name, p in folded.items():
    if name == 'stem_conv':
      out[name] = {'kernel': p['kernel'].astype(dtype), 'bias': p['bias']}
    elif name == 'top_conv':
      out[name] = one_by_one(p)
    elif name == 'predictions':  # the classifier stays float32
      out[name] = {**p, 'packed': pack(p['kernel'].astype(jnp.float32))}
    else:
      out[name] = {k: (one_by_one(v) if k in ('expand_conv', 'project_conv') else v)
                   for k, v in p.items()}
  return out


def mbconv(x: jax.Array, p: dict, stride: int, activation: str, residual: bool,
           strip_bytes: int = 0) -> jax.Array:
  """One MBConv block on NHWC `x` (bfloat16 or float32) as one call (`onednn_ffi.cc`): expand,
  depthwise, squeeze-excite, project and the residual, image by image, with `fold`'s
  parameters `p` ('expand_conv' and 'se_*' where the block has them; 1x1 kernels not yet
  'packed' are packed here). `strip_bytes` overrides the cache budget for a strip of the
  expanded map (0: the default, 512 KiB)."""
  n, h, w, _ = x.shape
  out = p['project_conv']['kernel'].shape[-1]
  oh, ow = -(-h // stride), -(-w // stride)
  call = jax.ffi.ffi_call('ej_onednn_mbconv', jax.ShapeDtypeStruct((n, oh, ow, out), x.dtype),
                          vmap_method='sequential')
  return call(x, *_block_args(p, x.dtype), stride=np.int64(stride),
              activation=np.int64(ACTIVATIONS[activation]), expand='expand_conv' in p,
              squeeze='se_reduce' in p, residual=residual, strip_bytes=np.int64(strip_bytes))


# Expand convs with at most this many input channels run on the extension's own loop (the float32
# kernel), fused with their activation; wider ones as oneDNN products (their packed kernel).
# B0's first two expands (16 and 24 channels in) measured faster that way: see docs/performance.md.
OWN_EXPAND_CHANNELS = 24


def _block_args(p: dict, dtype) -> list[jax.Array]:
  """One block's 10 parameters for `onednn_ffi.cc` (its kBlockArgs), from `fold`'s `p`: the
  expand kernel (packed, or float32 for the extension's own loop, see OWN_EXPAND_CHANNELS) and
  bias, the depthwise kernel (k, k, e) and bias, SE's two kernels and biases, the project kernel
  (packed) and bias; empty arrays where the block has no expand or SE. 1x1 kernels not yet
  packed are packed here, in `dtype`."""
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  empty = jnp.zeros((0,), jnp.float32)
  matrix = lambda q: q['kernel'].reshape(q['kernel'].shape[-2:])
  packed = lambda q: q['packed'] if 'packed' in q else pack(matrix(q).astype(dtype))
  k, e = p['dwconv']['kernel'].shape[0], p['dwconv']['kernel'].shape[-1]
  args = []
  if 'expand_conv' in p:
    q = p['expand_conv']
    own = matrix(q).shape[0] <= OWN_EXPAND_CHANNELS
    args += [f32(matrix(q)) if own else packed(q), f32(q['bias'])]
  else:
    args += [jnp.zeros((0,), jnp.uint8), empty]
  args += [f32(p['dwconv']['kernel']).reshape(k, k, e), f32(p['dwconv']['bias'])]
  if 'se_reduce' in p:
    args += [f32(matrix(p['se_reduce'])), f32(p['se_reduce']['bias']),
             f32(matrix(p['se_expand'])), f32(p['se_expand']['bias'])]
  else:
    args += [empty] * 4
  return args + [packed(p['project_conv']), f32(p['project_conv']['bias'])]


def network(model: EfficientNet, folded: dict, images: jax.Array,
            strip_bytes: int = 0) -> jax.Array:
  """Logits (N, classes) float32 of `model` from `fold`'s parameters on float32 NHWC images: the
  stem, every block, the head's 1x1 conv with its pooling and the classifier as one call
  (`onednn_ffi.cc`), the convolutions in the model's dtype."""
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  config, params = [], []
  channels = folded['stem_conv']['kernel'].shape[-1]
  for stage, (repeats, args) in enumerate(model.stage_plan()):
    for i in range(repeats):
      p = folded[block_name(stage + 1, i)]
      stride = args.stride if i == 0 else 1
      k = p['dwconv']['kernel'].shape[0]
      e, out = p['project_conv']['kernel'].shape[-2:]
      squeeze, expand = 'se_reduce' in p, 'expand_conv' in p
      residual = args.skip == 'identity' and has_residual(stride, channels, out)
      ses = p['se_reduce']['kernel'].shape[-1] if squeeze else 0
      config += [channels, e, out, k, stride, int(expand), int(squeeze), int(residual), ses]
      params += _block_args(p, model.dtype)
      channels = out
  top, classifier = folded['top_conv'], folded['predictions']
  call = jax.ffi.ffi_call(
      'ej_onednn_network',
      jax.ShapeDtypeStruct((images.shape[0], classifier['kernel'].shape[-1]), jnp.float32),
      vmap_method='sequential')
  return call(f32(images), f32(folded['stem_conv']['kernel']), f32(folded['stem_conv']['bias']),
              top['packed'], f32(top['bias']), classifier['packed'], f32(classifier['bias']),
              *params, blocks=np.asarray(config, np.int64),
              stem_stride=np.int64(model.stem_stride),
              activation=np.int64(ACTIVATIONS[model.activation]),
              strip_bytes=np.int64(strip_bytes),
              bf16=jnp.dtype(model.dtype) == jnp.bfloat16)


def folded_steps(model: EfficientNet) -> list[folding.Step]:
  """The network as one step (name, stride, fn(folded, x) -> logits) on `fold`'s parameters, for
  `make_inference_fn`: `network`."""
  total = model.stem_stride * math.prod(args.stride for _, args in model.stage_plan())
  return [('network', total, lambda f, x: network(model, f, x))]


def folded_forward(model: EfficientNet, folded: dict, images: jax.Array) -> jax.Array:
  """Logits of `model` from `fold`'s parameters, every conv on oneDNN (needs `load()`)."""
  return folding.run_steps(folded_steps(model), folded, images)


def main() -> int:
  """Builds and loads the extension now; prints where CPU inference will run per dtype."""
  paths = {name: inference_path(name) for name in ('float32', 'bfloat16')}
  lib = _state['lib']
  if lib is not None:
    print(f'oneDNN {lib.EjOnednnVersion().decode()} extension loaded from {lib._name}')
  for name, path in paths.items():
    print(f'{name} CPU inference of an EfficientNet runs on {path}')
  return 0 if lib is not None else 1


if __name__ == '__main__':
  sys.exit(main())
