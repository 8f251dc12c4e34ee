"""Fast batched inference: one jitted function, with cache-sized chunks on CPU.

A CPU is memory-bound on EfficientNet's wide expanded activations (at batch 32 and 224 px one
expand conv's output is ~150 MB), so the batch runs as a sequence of small chunks (`lax.map`
inside one program) that keep each chunk's activations in cache. On CPU an EfficientNet also runs
with BatchNorm folded into its convs (`folding.py`), chunked per resolution: the high-resolution
steps two images at a time, the rest eight. TPUs and GPUs take the whole batch at once. In
inference every example is independent, so chunking changes no result. What was measured, and
what was rejected, is in docs/performance.md.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet_jax import xla_cpu
from efficientnet_jax.models import folding, layers
from efficientnet_jax.models.efficientnet import EfficientNet

# Examples per chunk on CPU: measured best for B0 at 224 px (experiments/benchmark.py).
CPU_CHUNK_SIZE = 8
# Per-resolution chunks of the folded EfficientNet path: (minimum output side in pixels, chunk).
# The first row whose side a step's output reaches applies.
CPU_STAGE_CHUNKS = ((28, 2), (0, CPU_CHUNK_SIZE))


def default_chunk_size() -> int | None:
  return CPU_CHUNK_SIZE if jax.default_backend() == 'cpu' else None


def can_fold(model: nn.Module) -> bool:
  """Whether the folded-BN CPU path applies: a float32 EfficientNet classifier on CPU convs, made
  of MBConv blocks (a searched network's regular convs and pooling skips run unfolded)."""
  return (isinstance(model, EfficientNet) and not model.features_only
          and jnp.dtype(model.dtype) == jnp.float32
          and layers.resolve_conv_impl(model.conv_impl) == 'cpu'
          and folding.supports_blocks(model.blocks))


def stage_chunk(side: int) -> int:
  return next(chunk for min_side, chunk in CPU_STAGE_CHUNKS if side >= min_side)


def _map_chunks(fn, x, chunk: int):
  """fn over `x` in sequential chunks along axis 0 (`chunk` divides the batch)."""
  batch = x.shape[0]
  if chunk >= batch:
    return fn(x)
  out = jax.lax.map(fn, x.reshape(batch // chunk, chunk, *x.shape[1:]))
  return jax.tree.map(lambda y: y.reshape(batch, *y.shape[2:]), out)


def make_inference_fn(model: nn.Module, chunk_size: int | None | str = 'auto',
                      fold_bn: bool | str = 'auto') -> Callable[[Any, jax.Array], jax.Array]:
  """Returns jitted `fn(variables, images) -> outputs` for `model.apply(..., train=False)`.

  Args:
    model: any Flax module taking (images, train=False).
    chunk_size: examples per sequential chunk; 'auto' picks by backend (on CPU per-resolution
      chunks for the folded EfficientNet path, else 8; the whole batch elsewhere); None or 0 runs
      the whole batch at once. A batch that is not a multiple of the chunk is padded and the
      padding dropped from the outputs.
    fold_bn: run an EfficientNet with BatchNorm folded into its convs (`folding.py`) and, with
      chunk_size 'auto', per-resolution chunks; 'auto' does so where `can_fold(model)` (CPU
      convs, float32, logits) for batches over 8 with chunk_size 'auto'. Same values as `apply`.
  """
  if fold_bn is True and not can_fold(model):
    raise ValueError(
        f'fold_bn=True needs a float32 EfficientNet classifier with CPU convs; got '
        f'{type(model).__name__}. Use fold_bn=False (or "auto").')
  # 'auto' folds only where it pays: batches the CPU would chunk anyway. Folding rescales every
  # kernel on each call, which costs more than it saves on a handful of small images.
  auto_fold = fold_bn == 'auto' and chunk_size == 'auto' and can_fold(model)
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

  steps = folding.folded_steps(model) if (fold_bn is True or auto_fold) else None

  def folded_fn(variables, images):
    # Folding is a few per-channel products on the weights, done once per call outside the map.
    folded = folding.fold_batch_norm(model, variables)
    batch = images.shape[0]
    # Group consecutive steps that share a chunk size: [(chunk, [step fns]), ...].
    groups, side = [], images.shape[1]
    for _, stride, step in steps:
      side = -(-side // stride)
      chunk = stage_chunk(side) if per_stage else (chunk_size or batch)
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

  @functools.partial(jax.jit, compiler_options=xla_cpu.wide_vector_options())
  def fn(variables, images):
    if fold_bn is True or (auto_fold and images.shape[0] > CPU_CHUNK_SIZE):
      return folded_fn(variables, images)
    return unfolded(variables, images)

  return fn
