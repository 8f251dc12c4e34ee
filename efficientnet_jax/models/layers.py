"""Convolution and normalisation layers with TF semantics and a platform-chosen implementation.

XLA:CPU lowers a grouped (depthwise) convolution to a slow generic loop: summing the k*k shifted,
scaled copies of the input is about 9x faster there, and a 1x1 convolution runs faster as a
matrix product. On TPU and GPU, XLA's own convolution is best. `conv_impl='auto'` picks by the
backend at trace time; both paths share parameters and are numerically equivalent (tested).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('auto', 'xla', 'cpu')


def resolve_conv_impl(conv_impl: str, platform: str | None = None) -> str:
  """Maps 'auto' to 'cpu' on the CPU and to 'xla' elsewhere (`platform`, default: the backend)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; valid values: {", ".join(CONV_IMPLS)}.')
  if conv_impl == 'auto':
    return 'cpu' if (platform or jax.default_backend()) == 'cpu' else 'xla'
  return conv_impl


def conv_kernel_init(depthwise: bool = False):
  """TF EfficientNet's conv initialiser: untruncated normal, std sqrt(2 / (kh * kw * out)).

  For a depthwise kernel the official code counts one output channel per filter.
  """
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    fan_out = kh * kw * (1 if depthwise else out)
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)
  return init


def dense_kernel_init(key, shape, dtype=jnp.float32):
  """TF EfficientNet's classifier initialiser: uniform in +-1/sqrt(num_classes)."""
  limit = 1.0 / math.sqrt(shape[1])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding along one axis: the odd extra pixel goes after (bottom/right)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


def pad_for_depthwise(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """x zero-padded for a kernel_size x kernel_size depthwise conv with TF SAME padding."""
  h, w = x.shape[1:3]
  return jnp.pad(x, ((0, 0), same_padding(h, kernel_size, stride),
                     same_padding(w, kernel_size, stride), (0, 0)))


def average_pool(x: jax.Array, stride: int) -> jax.Array:
  """stride x stride average pooling with that stride and TF 'SAME' padding, as
  `tf.nn.avg_pool2d`: the padding is not counted in a border window's mean."""
  return nn.avg_pool(x, (stride, stride), (stride, stride), padding='SAME',
                     count_include_pad=False)


def tap_slice(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], stride: int) -> jax.Array:
  """The input pixels that kernel tap (i, j) of a VALID conv on padded `xp` meets, one per output
  pixel: rows i, i + stride, ... and columns j, j + stride, ..., out_hw of them."""
  n, _, _, c = xp.shape
  out_h, out_w = out_hw
  return lax.slice(xp, (0, i, j, 0),
                   (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                   (1, stride, stride, 1))


def depthwise_taps(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv of an already padded input (VALID) as a sum of k*k strided slices times taps.

  On `pad_for_depthwise`'s output this is the SAME conv of the unpadded input.
  """
  _, hp, wp, c = xp.shape
  kh, kw = kernel.shape[:2]
  out_h, out_w = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  taps = kernel.reshape(kh, kw, c)
  out = None
  for i in range(kh):
    for j in range(kw):
      term = tap_slice(xp, i, j, (out_h, out_w), stride) * taps[i, j]
      out = term if out is None else out + term
  return out


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv with TF SAME padding as a sum of k*k strided slices times per-channel weights.

  XLA fuses the whole sum (and any following elementwise ops) into one loop over the output, which
  on CPU beats its grouped-convolution kernel by a wide margin. The backward pass is written by
  hand (`_depthwise_shifted_bwd`): autodiff's is a sum of k*k zero-padded copies of the output
  gradient, each index checked against its padding, several times slower on XLA:CPU.
  """
  return _depthwise_shifted_fwd(x, kernel, stride)[0]


def _depthwise_shifted_fwd(x, kernel, stride):
  xp = pad_for_depthwise(x, kernel.shape[0], stride)
  return depthwise_taps(xp, kernel, stride), (xp, kernel, x.shape[1:3])


def depthwise_input_grad(g: jax.Array, kernel: jax.Array, stride: int,
                         in_hw: tuple[int, int]) -> jax.Array:
  """The input gradient of the SAME depthwise conv: a stride-1 conv of the output gradient,
  dilated by the stride and padded, with the spatially flipped kernel (same shift-and-add form).

  With p the conv's padding before an axis, output o reads input rows o*s + i - p, so input row h
  collects g[o] * w[i] over o*s + i = h + p; on g dilated by s and shifted by k - 1 - p that is a
  correlation with the flipped taps. Negative padding crops rows the conv never read.
  """
  kh, kw = kernel.shape[:2]
  config = [(0, 0, 0)]
  for size, out, k in ((in_hw[0], g.shape[1], kh), (in_hw[1], g.shape[2], kw)):
    before = same_padding(size, k, stride)[0]
    low = k - 1 - before
    config.append((low, size + k - 1 - low - ((out - 1) * stride + 1), stride - 1))
  config.append((0, 0, 0))
  # XLA fuses the pad into the taps' loop. Forcing it into memory first with an
  # optimization_barrier was 6% faster on B0's train step but doubled its peak memory (9.3 ->
  # 17.6 GB at batch 32, 224 px): XLA:CPU then kept every layer's buffer alive.
  gp = lax.pad(g, jnp.zeros((), g.dtype), config)
  return depthwise_taps(gp, kernel[::-1, ::-1], 1)


def depthwise_kernel_grad(xp: jax.Array, g: jax.Array, kernel_shape, stride: int) -> jax.Array:
  """The kernel gradient: for each tap, the sum over batch and space of its input slice times g."""
  kh, kw = kernel_shape[:2]
  gf = g.astype(jnp.float32)
  taps = []
  for i in range(kh):
    for j in range(kw):
      patch = tap_slice(xp, i, j, g.shape[1:3], stride)
      taps.append(jnp.sum(patch.astype(jnp.float32) * gf, axis=(0, 1, 2)))
  return jnp.stack(taps).reshape(kernel_shape)


def _depthwise_shifted_bwd(stride, residuals, g):
  xp, kernel, in_hw = residuals
  dx = depthwise_input_grad(g, kernel, stride, in_hw)
  dkernel = depthwise_kernel_grad(xp, g, kernel.shape, stride).astype(kernel.dtype)
  return dx.astype(xp.dtype), dkernel


depthwise_conv_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_conv_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv through XLA's grouped convolution (best on TPU/GPU)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


def conv_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _pixels_matmul(x: jax.Array, weights: jax.Array) -> jax.Array:
  """x (n, h, w, k) times weights (k, c) as one (n*h*w, k) x (k, c) matrix product.

  Flattened to 2-D on purpose: differentiated through a 4-D `dot_general`, XLA:CPU computes the
  weight gradient from a transposed copy of the output gradient (B0's block2a: 154 MB rewritten
  per step, 522 ms against 185 ms for this layer's backward).
  """
  n, h, w, k = x.shape
  y = lax.dot_general(x.reshape(n * h * w, k), weights, (((1,), (0,)), ((), ())))
  return y.reshape(n, h, w, weights.shape[1])


def conv_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A k*k conv as im2col + matrix product (1x1 convs need no im2col at all)."""
  kh, kw, cin, cout = kernel.shape
  if kh == 1 and kw == 1:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return _pixels_matmul(x, kernel.reshape(cin, cout))
  _, h, w, _ = x.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  xp = jnp.pad(x, ((0, 0), same_padding(h, kh, stride), same_padding(w, kw, stride), (0, 0)))
  patches = [tap_slice(xp, i, j, (out_h, out_w), stride) for i in range(kh) for j in range(kw)]
  cols = jnp.concatenate(patches, axis=-1)  # (n, out_h, out_w, kh*kw*cin), HWI order
  return _pixels_matmul(cols, kernel.reshape(kh * kw * cin, cout))


class Conv2D(nn.Module):
  """A dense 2-D convolution with TF SAME padding; kernel layout HWIO as in nn.Conv."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  use_bias: bool = False
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', conv_kernel_init(),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if resolve_conv_impl(self.conv_impl) == 'cpu':
      y = conv_matmul(x, kernel, self.stride)
    else:
      y = conv_xla(x, kernel, self.stride)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return y


class DepthwiseConv2D(nn.Module):
  """A depthwise convolution; kernel layout (kh, kw, 1, C) as nn.Conv with feature groups."""
  kernel_size: int = 3
  stride: int = 1
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', conv_kernel_init(depthwise=True),
                        (self.kernel_size, self.kernel_size, 1, x.shape[-1]), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if resolve_conv_impl(self.conv_impl) == 'cpu':
      return depthwise_conv_shifted(x, kernel, self.stride)
    return depthwise_conv_xla(x, kernel, self.stride)


class BatchNorm(nn.Module):
  """BatchNorm with TF's momentum convention and optional per-group statistics.

  Under `jax.jit` over a data-sharded batch, the mean over the batch axis already spans the global
  batch, so this is synchronised BN with no collective written by hand. `group_size > 0` instead
  normalises each run of `group_size` consecutive examples with its own statistics, as the
  official TF code's per-replica-group BN (useful when the global batch is very large).
  Variables match nn.BatchNorm: params {scale, bias}, batch_stats {mean, var}.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if not train:
      mean, var = ra_mean.value, ra_var.value
      inv = scale * lax.rsqrt(var + self.epsilon)
      return (x * inv.astype(self.dtype) + (bias - mean * inv).astype(self.dtype)).astype(
          self.dtype)
    # Statistics in float32 even for bfloat16 activations.
    xf = x.astype(jnp.float32)
    batch = x.shape[0]
    if self.group_size and self.group_size < batch:
      if batch % self.group_size:
        raise ValueError(
            f'bn_group_size={self.group_size} does not divide the batch of {batch} examples; '
            'choose a group size that divides the per-step batch, or 0 for global batch norm.')
      groups = xf.reshape(batch // self.group_size, self.group_size, *x.shape[1:])
      axes = tuple(range(1, groups.ndim - 1))
      g_mean = groups.mean(axes, keepdims=True)
      g_var = jnp.maximum((groups * groups).mean(axes, keepdims=True) - g_mean * g_mean, 0.0)
      y = ((groups - g_mean) * lax.rsqrt(g_var + self.epsilon)).reshape(x.shape)
      mean, var = g_mean.reshape(-1, features).mean(0), g_var.reshape(-1, features).mean(0)
    else:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.maximum((xf * xf).mean(axes) - mean * mean, 0.0)
      y = (xf - mean) * lax.rsqrt(var + self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return (y * scale + bias).astype(self.dtype)


def block_class(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
  """`cls` (a block called as `block(x, train)`), rematerialised when `remat`.

  A rematerialised block keeps only its input for the backward pass and recomputes its
  activations there: for B7 and up at their resolutions, the expanded activations of every block
  are most of a TPU step's memory. Parameter names are unchanged.
  """
  # static_argnums counts `self`: `train` (argument 2) selects BatchNorm's branch in Python.
  return nn.remat(cls, static_argnums=(2,)) if remat else cls


def activation_fn(name: str):
  """'swish' (SiLU) for EfficientNet, 'relu6' for EfficientNet-Lite."""
  if name == 'swish':
    return nn.swish
  if name == 'relu6':
    return nn.relu6
  if name == 'relu':
    return nn.relu
  raise ValueError(f"Unknown activation {name!r}; valid values: 'swish', 'relu6', 'relu'.")


def check_images(images: jax.Array, total_stride: int, model_name: str) -> None:
  """Raises a ValueError that says how to fix a batch the network cannot take.

  Shared by every model family: a batch of float RGB images in NHWC, at least
  `total_stride` pixels per side.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f'{model_name} expects a batch of RGB images shaped [batch, height, width, 3] (NHWC); '
        f'got shape {tuple(images.shape)}. Add a batch axis with images[None] for a single '
        'image, convert grayscale to RGB by repeating the channel, and drop any alpha channel.')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"{model_name} expects float images already normalised with the variant's mean/std; got "
        f'dtype {images.dtype}. Convert with (images - mean_rgb) / stddev_rgb from the variant '
        'spec (efficientnet_jax.models.get_variant(name)).')
  height, width = images.shape[1:3]
  if min(height, width) < total_stride:
    raise ValueError(
        f'Image of {height}x{width} pixels is too small: {model_name} downsamples by '
        f'{total_stride}, so inputs need at least {total_stride} pixels per side. Resize the '
        'images up, or build the model with stem_stride=1 for tiny images.')


def block_table_stride(stem_stride: int, blocks) -> int:
  """How much a stem plus a table of stages (each with a `stride`) downsamples its input."""
  stride = stem_stride
  for args in blocks:
    stride *= args.stride
  return stride


def classifier_head(features: jax.Array, num_classes: int, dropout_rate: float,
                    train: bool) -> jax.Array:
  """Global average pool -> dropout -> dense 'predictions', shared by every model family.

  Call it inside a module's compact `__call__`: its layers become that module's submodules. The
  classifier and the logits stay float32 even under bfloat16 compute.
  """
  x = jnp.mean(features, axis=(1, 2))
  x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  return nn.Dense(num_classes, kernel_init=dense_kernel_init,
                  name='predictions')(x.astype(jnp.float32))


def stochastic_depth(module: nn.Module, branch: jax.Array, drop_rate: float,
                     train: bool) -> jax.Array:
  """Drops a residual branch per example with probability `drop_rate` in training, rescaling the
  kept ones by 1/survival so inference needs no change. Draws from `module`'s 'dropout' rng."""
  if not train or drop_rate <= 0:
    return branch
  survival = 1.0 - drop_rate
  keep = jax.random.bernoulli(module.make_rng('dropout'), survival, (branch.shape[0], 1, 1, 1))
  return jnp.where(keep, branch / survival, jnp.zeros_like(branch))
