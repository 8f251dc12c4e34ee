"""Fast batched inference: one jitted function, with cache-sized chunks on CPU.

A CPU is memory-bound on EfficientNet's wide expanded activations (at batch 32 and 224 px one
expand conv's output is ~150 MB), so the batch runs as a sequence of small chunks (`lax.map`
inside one program) that keep each chunk's activations in cache. On CPU an EfficientNet also runs
with BatchNorm folded into its convs (`folding.py`), chunked per resolution: the high-resolution
steps two images at a time, the rest eight. TPUs and GPUs take the whole batch at once. In
inference every example is independent, so chunking changes no result.

Where JAX has one CPU device per core (`xla_cpu.use_one_device_per_core()`, which the `predict`
CLI calls), a CPU batch is split across them: each core runs its share as a stream of its own
(`shard_map`), which beats one stream whose every op is split across the cores.

Where the optional `onednn` extra's extension loads, an EfficientNet runs folded the same way but
as one native call for the whole batch (`onednn.py`): float32 on a CPU with AVX-512, bfloat16 on
one with AMX or AVX512_BF16, its 1x1 convs on oneDNN. What was measured, and what was rejected,
is in docs/performance.md.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficientnet_jax import xla_cpu
from efficientnet_jax.models import folding, layers, onednn
from efficientnet_jax.models.efficientnet import EfficientNet

# Examples per chunk on CPU: measured best for B0 at 224 px (experiments/benchmark.py).
CPU_CHUNK_SIZE = 8
# Per-resolution chunks of the folded EfficientNet path: (minimum output side in pixels, chunk).
# The first row whose side a step's output reaches applies.
CPU_STAGE_CHUNKS = ((28, 2), (0, CPU_CHUNK_SIZE))
# The same where each core runs its own stream (the batch split across one CPU device per core):
# one image at a time through the high-resolution steps. B0, batch 32, 224 px, two streams on the
# 2-core Xeon VM: 152-157 img/s against 143-150 with the table above.
CPU_STAGE_CHUNKS_PER_CORE = ((28, 1), (0, CPU_CHUNK_SIZE))


def default_chunk_size() -> int | None:
  return CPU_CHUNK_SIZE if jax.default_backend() == 'cpu' else None


def can_fold(model: nn.Module) -> bool:
  """Whether the folded-BN CPU path applies: a float32 EfficientNet classifier on CPU convs, made
  of MBConv blocks (a searched network's regular convs and pooling skips run unfolded)."""
  return (isinstance(model, EfficientNet) and not model.features_only
          and jnp.dtype(model.dtype) == jnp.float32
          and layers.resolve_conv_impl(model.conv_impl) == 'cpu'
          and folding.supports_blocks(model.blocks))


def uses_onednn(model: nn.Module) -> bool:
  """Whether inference runs `model` on oneDNN (`onednn.py`): a bfloat16 EfficientNet on a CPU
  with AMX or AVX512_BF16, or a float32 one with CPU convs on a CPU with AVX-512, where the
  optional extension loads (else it logs once why not)."""
  if not onednn.supports(model) or onednn.unsuited_cpu(model.dtype):
    return False
  if (jnp.dtype(model.dtype) == jnp.float32
      and layers.resolve_conv_impl(model.conv_impl) != 'cpu'):
    return False
  return onednn.load() is not None


def stage_chunk(side: int, per_core: bool = False) -> int:
  table = CPU_STAGE_CHUNKS_PER_CORE if per_core else CPU_STAGE_CHUNKS
  return next(chunk for min_side, chunk in table if side >= min_side)


def cpu_core_devices(cores: int | str = 'auto') -> list:
  """The CPU devices a batch is split across, one stream each; empty for a single stream.

  'auto' takes one per core this process may run on (`xla_cpu.usable_cores()`), as far as JAX
  has CPU devices (by default it has one: `xla_cpu.use_one_device_per_core()` gives one per
  core); an int asks for that many. Empty off CPU.
  """
  if isinstance(cores, bool) or not (cores == 'auto' or isinstance(cores, int) and cores >= 1):
    raise ValueError(f"cores must be 'auto' or a positive int, got {cores!r}")
  if jax.default_backend() != 'cpu':
    return []
  devices = jax.local_devices(backend='cpu')
  wanted = xla_cpu.usable_cores() if cores == 'auto' else cores
  return devices[:wanted] if min(wanted, len(devices)) > 1 else []


def _map_chunks(fn, x, chunk: int):
  """fn over `x` in sequential chunks along axis 0 (`chunk` divides the batch)."""
  batch = x.shape[0]
  if chunk >= batch:
    return fn(x)
  out = jax.lax.map(fn, x.reshape(batch // chunk, chunk, *x.shape[1:]))
  return jax.tree.map(lambda y: y.reshape(batch, *y.shape[2:]), out)


class _SameArrays:
  """`compute(tree)`, remembered for the next call with the very same arrays.

  Only trees of `jax.Array`s (immutable) are remembered, one at a time; anything else is
  computed afresh. Holds the last tree and its result alive.
  """

  def __init__(self, compute: Callable[[Any], Any]):
    self.compute, self.leaves, self.value = compute, None, None

  def __call__(self, tree):
    leaves = jax.tree.leaves(tree)
    if not all(isinstance(leaf, jax.Array) for leaf in leaves):
      return self.compute(tree)
    if self.leaves is None or len(leaves) != len(self.leaves) or any(
        a is not b for a, b in zip(leaves, self.leaves)):
      self.leaves, self.value = leaves, self.compute(tree)
    return self.value


def make_inference_fn(model: nn.Module, chunk_size: int | None | str = 'auto',
                      fold_bn: bool | str = 'auto',
                      cores: int | str = 'auto') -> Callable[[Any, jax.Array], jax.Array]:
  """Returns `fn(variables, images) -> outputs`, compiled, for `model.apply(..., train=False)`.

  Args:
    model: any Flax module taking (images, train=False).
    chunk_size: examples per sequential chunk; 'auto' picks by backend (on CPU per-resolution
      chunks for the folded EfficientNet path, else 8; the whole batch elsewhere); None or 0 runs
      the whole batch at once. A batch that is not a multiple of the chunk is padded and the
      padding dropped from the outputs.
    fold_bn: run an EfficientNet with BatchNorm folded into its convs (`folding.py`) and, with
      chunk_size 'auto', per-resolution chunks; 'auto' does so where `can_fold(model)` (CPU
      convs, float32, logits) with chunk_size 'auto'. Same values as `apply`. Where
      `uses_onednn(model)` (the optional extension; float32 on a CPU with AVX-512, bfloat16 on
      one with AMX or AVX512_BF16) the folded network runs as one native call (`onednn.py`):
      `apply`'s values to float32's rounding, or bfloat16's. The folded weights are kept for the
      next call with the same variables (the same arrays), so serving folds once.
    cores: on CPU, a batch of at least as many images is split across this many CPU devices, one
      stream each (`cpu_core_devices`); 'auto' takes one per usable core where JAX has that
      many CPU devices (`xla_cpu.use_one_device_per_core()`), 1 keeps a single stream. The
      batch is padded to a multiple of the streams and the padding dropped. Same values.
  """
  dnnl = fold_bn in ('auto', True) and uses_onednn(model)
  if fold_bn is True and not (can_fold(model) or dnnl):
    raise ValueError(
        f'fold_bn=True needs a float32 EfficientNet classifier with CPU convs, or a bfloat16 one '
        f'with the oneDNN extension on a CPU with AMX or AVX512_BF16; got '
        f'{type(model).__name__} ({jnp.dtype(getattr(model, "dtype", jnp.float32)).name}). '
        f'Use fold_bn=False (or "auto").')
  auto_fold = fold_bn == 'auto' and chunk_size == 'auto' and (can_fold(model) or dnnl)
  per_stage = chunk_size == 'auto' and jax.default_backend() == 'cpu'
  if chunk_size == 'auto':
    chunk_size = default_chunk_size()

  def pad_batch(images, multiple):
    batch = images.shape[0]
    padded = -(-batch // multiple) * multiple
    return jnp.pad(images, [(0, padded - batch)] + [(0, 0)] * (images.ndim - 1))

  def unfolded(variables, images):
    apply = lambda x: model.apply(variables, x, train=False)
    batch = images.shape[0]
    if not chunk_size or batch <= chunk_size:
      return apply(images)
    out = _map_chunks(apply, pad_batch(images, chunk_size), chunk_size)
    return jax.tree.map(lambda y: y[:batch], out)

  steps = None
  if fold_bn is True or auto_fold:
    steps = onednn.folded_steps(model) if dnnl else folding.folded_steps(model)
  dnnl = dnnl and steps is not None  # unfolded (a chunk size given), XLA runs it
  devices = cpu_core_devices(cores)
  if dnnl:  # one call for the whole batch, which blocks for the cache and threads itself
    devices = []
  # Folding rescales every kernel (1.6 ms for B0, more than a tenth of a batch of one), so it
  # runs as a program of its own, once per set of variables.
  fold = (_SameArrays(jax.jit(functools.partial(onednn.fold if dnnl else
                                                folding.fold_batch_norm, model)))
          if steps else None)

  def folded_fn(folded, images, per_core=False):
    batch = images.shape[0]
    # Group consecutive steps that share a chunk size: [(chunk, [step fns]), ...].
    groups, side = [], images.shape[1]
    for _, stride, step in steps:
      side = -(-side // stride)
      chunk = (batch if dnnl else stage_chunk(side, per_core) if per_stage
               else (chunk_size or batch))
      if groups and groups[-1][0] == chunk:
        groups[-1][1].append(step)
      else:
        groups.append((chunk, [step]))
    largest = max(chunk for chunk, _ in groups)
    x = images if batch <= largest else pad_batch(images, largest)
    for chunk, group in groups:
      def run(x, group=group):
        for step in group:
          x = step(folded, x)
        return x
      # gcd: a chunk that does not divide a small (unpadded) batch shrinks until it does.
      x = _map_chunks(run, x, math.gcd(min(chunk, x.shape[0]), x.shape[0]))
    return x[:batch]

  def body(variables, images, per_core=False):
    if steps:  # `variables` are the folded weights
      return folded_fn(variables, images, per_core)
    return unfolded(variables, images)

  single = jax.jit(body, compiler_options=xla_cpu.wide_vector_options())
  if not devices and fold is None:
    return single

  if devices:
    # One stream per core: each CPU device runs `body` on its share of the batch.
    mesh = Mesh(np.array(devices), ('cores',))
    split = NamedSharding(mesh, PartitionSpec('cores'))
    streams = jax.jit(
        jax.shard_map(functools.partial(body, per_core=True), mesh=mesh,
                      in_specs=(PartitionSpec(), PartitionSpec('cores')),
                      out_specs=PartitionSpec('cores')),
        compiler_options=xla_cpu.wide_vector_options())
    # The weights on every stream's device, kept for the next call: copying B0's weights on
    # each call cost 8% of a batch of 32.
    place = _SameArrays(
        lambda variables: jax.device_put(variables, NamedSharding(mesh, PartitionSpec())))

  def fn(variables, images):
    if fold is not None:
      variables = fold(variables)
    batch = images.shape[0]
    if not devices or batch < len(devices):  # one stream, or fewer images than streams
      return single(variables, images)
    if batch % len(devices):
      images = pad_batch(jnp.asarray(images), len(devices))
    out = streams(place(variables), jax.device_put(images, split))
    return jax.tree.map(lambda y: y[:batch], out) if batch % len(devices) else out

  return fn
