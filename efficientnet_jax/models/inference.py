"""Fast batched inference: one jitted function, with cache-sized chunks on CPU.

A CPU is memory-bound on EfficientNet's wide, expanded activations: at batch 32 and 224 px a
single expand conv's output is ~150 MB, far beyond the caches, so each elementwise pass streams
from DRAM. Running the batch as a sequence of small chunks (`lax.map`, inside one compiled
program) keeps each chunk's activations in cache and is several times faster there. TPUs and
GPUs want the whole batch at once, so the chunking is CPU-only by default. In inference mode
every example is independent (BN uses its running statistics), so chunking changes no result.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Examples per chunk on CPU: measured best for B0 at 224 px (experiments/benchmark.py).
CPU_CHUNK_SIZE = 8


def default_chunk_size() -> int | None:
  return CPU_CHUNK_SIZE if jax.default_backend() == 'cpu' else None


def make_inference_fn(model: nn.Module, chunk_size: int | None | str = 'auto'
                      ) -> Callable[[Any, jax.Array], jax.Array]:
  """Returns jitted `fn(variables, images) -> outputs` for `model.apply(..., train=False)`.

  Args:
    model: any Flax module taking (images, train=False).
    chunk_size: examples per sequential chunk; 'auto' picks by backend (8 on CPU, the whole batch
      elsewhere); None or 0 runs the whole batch at once. A batch that is not a multiple of the
      chunk is padded and the padding dropped from the outputs.
  """
  if chunk_size == 'auto':
    chunk_size = default_chunk_size()

  def apply(variables, images):
    return model.apply(variables, images, train=False)

  @jax.jit
  def fn(variables, images):
    batch = images.shape[0]
    if not chunk_size or batch <= chunk_size:
      return apply(variables, images)
    chunks = -(-batch // chunk_size)
    padded = jnp.pad(images, [(0, chunks * chunk_size - batch)] + [(0, 0)] * (images.ndim - 1))
    out = jax.lax.map(lambda x: apply(variables, x),
                      padded.reshape(chunks, chunk_size, *images.shape[1:]))
    return jax.tree.map(lambda y: y.reshape(chunks * chunk_size, *y.shape[2:])[:batch], out)

  return fn
