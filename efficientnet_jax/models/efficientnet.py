"""EfficientNet in Flax Linen: one module for every variant, configured by data.

Submodule names follow the Keras applications model (`stem_conv`, `block2a/expand_conv`,
`top_bn`, `predictions`, ...), so a weight converter is a readable name-for-name mapping.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet_jax.models import layers
from efficientnet_jax.models.naming import block_name
from efficientnet_jax.models.scaling import scaled_stages, stem_head_filters
from efficientnet_jax.models.variants import CONV_TYPES, SKIPS, BlockArgs

__all__ = ['EfficientNet', 'MBConvBlock', 'MBConvOps', 'block_name', 'has_residual', 'mbconv']

Op = Callable[[jax.Array], jax.Array]


def has_residual(stride: int, in_filters: int, out_filters: int) -> bool:
  """The identity skip (and so stochastic depth) exists only where the shapes allow it."""
  return stride == 1 and in_filters == out_filters


class MBConvOps(NamedTuple):
  """The weight-bearing steps of one MBConv block, each `x -> pre-activation output`.

  The Flax module binds them to conv + BatchNorm submodules; the folded inference path
  (`folding.py`) to convs with BatchNorm folded into a bias. `mbconv` is the one forward pass.
  A regular-conv block (conv_type 'regular') has no depthwise step: its expand conv, or at expand
  ratio 1 its project conv, is the kxk conv with the block's stride.
  """
  expand: Op | None  # 1x1 conv + BN; None when the expand ratio is 1
  depthwise: Op | None  # kxk depthwise conv (the block's stride) + BN; None for a regular conv
  se_reduce: Op | None  # 1x1 conv with bias on the pooled features; None without SE
  se_expand: Op | None
  project: Op  # 1x1 conv + BN, no activation after it (except as a regular conv's only conv)
  shortcut: Op | None = None  # the pooling skip's branch (skip 'pool')


def mbconv(inputs: jax.Array, ops: MBConvOps, *, stride: int, act: Op,
           drop_path: Op = lambda x: x, skip: str = 'identity') -> jax.Array:
  """Inverted residual block: expand 1x1 -> depthwise kxk -> squeeze-excite -> project 1x1.

  `drop_path` is applied to the residual branch (stochastic depth in training). `skip` is the
  block's SkipOp (`variants.SKIPS`): 'pool' adds `ops.shortcut(inputs)` on every block.
  """
  x = inputs
  if ops.expand is not None:
    x = act(ops.expand(x))
  if ops.depthwise is not None:
    x = act(ops.depthwise(x))
  if ops.se_reduce is not None:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = x * nn.sigmoid(ops.se_expand(act(ops.se_reduce(s))))
  x = ops.project(x)
  if ops.expand is None and ops.depthwise is None:
    # A regular conv at expand ratio 1 is a single kxk conv, activated like the convs it stands
    # for (EfficientNetV2's fused block, where SE also acts on the block's input).
    x = act(x)
  if skip == 'pool':
    x = drop_path(x) + ops.shortcut(inputs)
  elif skip == 'identity' and has_residual(stride, inputs.shape[-1], x.shape[-1]):
    x = drop_path(x) + inputs
  return x


class MBConvBlock(nn.Module):
  """One MBConv block (`mbconv`) with TF-named conv and BatchNorm submodules.

  `conv_type='regular'` replaces the expand and depthwise convs by one kxk conv (named
  'expand_conv', or 'project_conv' at expand ratio 1, as Keras names EfficientNetV2's fused
  block); `skip='pool'` adds the input average-pooled by the stride (TF SAME, padding not
  counted) and, where the width changes, projected by 'skip_conv' (1x1) + 'skip_bn'.
  """
  in_filters: int
  out_filters: int
  kernel_size: int
  stride: int
  expand_ratio: int
  se_ratio: float
  drop_rate: float  # stochastic-depth drop probability of this block
  activation: str = 'swish'
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  conv_type: str = 'depthwise'  # variants.CONV_TYPES
  skip: str = 'identity'  # variants.SKIPS

  @nn.compact
  def __call__(self, inputs, train: bool):
    if self.conv_type not in CONV_TYPES or self.skip not in SKIPS:
      raise ValueError(f'MBConvBlock got conv_type={self.conv_type!r}, skip={self.skip!r}; valid: '
                       f'conv_type in {CONV_TYPES}, skip in {SKIPS}.')
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    conv = lambda features, name, **kw: layers.Conv2D(
        features, conv_impl=self.conv_impl, dtype=self.dtype, name=name, **kw)
    expanded = self.in_filters * self.expand_ratio
    # Squeezed from the block's *input* channels, not the expanded ones (official code).
    squeezed = max(1, int(self.in_filters * self.se_ratio))
    has_se = 0 < self.se_ratio <= 1
    k, e = self.kernel_size, self.expand_ratio
    if self.conv_type == 'regular':
      # The kxk conv with the stride is the expand conv, or at expand ratio 1 the project conv.
      expand_conv = dict(kernel_size=k, stride=self.stride)
      project_conv = expand_conv if e == 1 else {}
      depthwise = None
    else:
      expand_conv, project_conv = {}, {}
      dwconv = layers.DepthwiseConv2D(k, self.stride, self.conv_impl, self.dtype, name='dwconv')
      depthwise = lambda x: bn('bn')(dwconv(x), train)
    ops = MBConvOps(
        expand=((lambda x: bn('expand_bn')(conv(expanded, 'expand_conv', **expand_conv)(x), train))
                if e != 1 else None),
        depthwise=depthwise,
        se_reduce=(lambda s: conv(squeezed, 'se_reduce', use_bias=True)(s)) if has_se else None,
        se_expand=(lambda s: conv(expanded, 'se_expand', use_bias=True)(s)) if has_se else None,
        project=lambda x: bn('project_bn')(
            conv(self.out_filters, 'project_conv', **project_conv)(x), train),
        shortcut=self._pooled_shortcut(bn, conv, train) if self.skip == 'pool' else None)
    return mbconv(inputs, ops, stride=self.stride, act=layers.activation_fn(self.activation),
                  drop_path=lambda x: layers.stochastic_depth(self, x, self.drop_rate, train),
                  skip=self.skip)

  def _pooled_shortcut(self, bn, conv, train: bool) -> Op:
    """The pooling skip: average-pool by the stride, then 1x1 conv + BN where the width changes."""
    def shortcut(x):
      if self.stride > 1:
        x = layers.average_pool(x, self.stride)
      if x.shape[-1] != self.out_filters:
        x = bn('skip_bn')(conv(self.out_filters, 'skip_conv')(x), train)
      return x
    return shortcut


class EfficientNet(nn.Module):
  """EfficientNet (Tan & Le, 2019) for any width, depth and block table.

  Apply as `model.apply(variables, images, train=False)`; in training pass
  `mutable=['batch_stats']` and a 'dropout' rng. `images` is NHWC float, already normalised with
  the variant's mean/std (see `VariantSpec`). With `features_only=True` the call returns a dict
  of multi-scale feature maps keyed 'stride_2' ... 'stride_32' instead of logits.
  """
  blocks: Sequence[BlockArgs]
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  num_classes: int = 1000
  activation: str = 'swish'
  fix_stem_head: bool = False  # Lite: stem/head widths and first/last stage depths unscaled
  stem_stride: int = 2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  conv_impl: str = 'auto'
  features_only: bool = False
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  def stage_plan(self) -> list[tuple[int, BlockArgs]]:
    """The scaled (repeats, block args) of each stage, in real channels."""
    return scaled_stages(self.blocks, self.width_coefficient, self.depth_coefficient,
                         fixed_ends=self.fix_stem_head)

  @property
  def total_stride(self) -> int:
    return layers.block_table_stride(self.stem_stride, self.blocks)

  @nn.compact
  def __call__(self, images, train: bool = False):
    layers.check_images(images, self.total_stride, 'EfficientNet')
    act = layers.activation_fn(self.activation)
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    plan = self.stage_plan()
    stem_filters, head_filters = stem_head_filters(self.width_coefficient, self.fix_stem_head)

    x = layers.Conv2D(stem_filters, 3, self.stem_stride, conv_impl=self.conv_impl,
                      dtype=self.dtype, name='stem_conv')(images)
    x = act(bn('stem_bn')(x, train))

    features, stride = {}, self.stem_stride
    total_blocks = sum(repeats for repeats, _ in plan)
    block_index = 0
    for stage, (repeats, args) in enumerate(plan):
      if args.stride > 1 and self.features_only:
        features[f'stride_{stride}'] = x
      for i in range(repeats):
        # The true input width: for Lite the fixed stem can differ from the table's in_filters.
        x = layers.block_class(MBConvBlock, self.remat)(
            in_filters=x.shape[-1],
            out_filters=args.out_filters, kernel_size=args.kernel_size,
            stride=args.stride if i == 0 else 1, expand_ratio=args.expand_ratio,
            se_ratio=args.se_ratio,
            drop_rate=self.drop_connect_rate * block_index / total_blocks,
            activation=self.activation, bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon, bn_group_size=self.bn_group_size,
            conv_impl=self.conv_impl, dtype=self.dtype,
            conv_type=args.conv_type, skip=args.skip,
            name=block_name(stage + 1, i))(x, train)
        block_index += 1
      stride *= args.stride
    if self.features_only:
      features[f'stride_{stride}'] = x
      return features

    x = layers.Conv2D(head_filters, 1, conv_impl=self.conv_impl, dtype=self.dtype,
                      name='top_conv')(x)
    x = act(bn('top_bn')(x, train))
    return layers.classifier_head(x, self.num_classes, self.dropout_rate, train)
