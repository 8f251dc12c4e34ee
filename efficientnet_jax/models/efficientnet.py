"""EfficientNet in Flax Linen: one module for every variant, configured by data.

Submodule names follow the Keras applications model (`stem_conv`, `block2a/expand_conv`,
`top_bn`, `predictions`, ...), so a weight converter is a readable name-for-name mapping.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from efficientnet_jax.models import layers
from efficientnet_jax.models.scaling import round_filters, round_repeats
from efficientnet_jax.models.variants import HEAD_FILTERS, STEM_FILTERS, BlockArgs


def block_name(stage: int, index: int) -> str:
  """Keras naming: 'block{stage}{letter}', stages counted from 1, repeats lettered from 'a'."""
  letter = chr(ord('a') + index) if index < 26 else f'_{index}'
  return f'block{stage}{letter}'


class MBConvBlock(nn.Module):
  """Inverted residual block: expand 1x1 -> depthwise kxk -> squeeze-excite -> project 1x1."""
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

  @nn.compact
  def __call__(self, inputs, train: bool):
    act = layers.activation_fn(self.activation)
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    conv = lambda features, name, **kw: layers.Conv2D(
        features, conv_impl=self.conv_impl, dtype=self.dtype, name=name, **kw)
    x = inputs
    expanded = self.in_filters * self.expand_ratio
    if self.expand_ratio != 1:
      x = act(bn('expand_bn')(conv(expanded, 'expand_conv')(x), train))
    x = layers.DepthwiseConv2D(self.kernel_size, self.stride, self.conv_impl, self.dtype,
                               name='dwconv')(x)
    x = act(bn('bn')(x, train))
    if 0 < self.se_ratio <= 1:
      # Squeezed from the block's *input* channels, not the expanded ones (official code).
      squeezed = max(1, int(self.in_filters * self.se_ratio))
      s = jnp.mean(x, axis=(1, 2), keepdims=True)
      s = act(conv(squeezed, 'se_reduce', use_bias=True)(s))
      x = x * nn.sigmoid(conv(expanded, 'se_expand', use_bias=True)(s))
    x = bn('project_bn')(conv(self.out_filters, 'project_conv')(x), train)
    if self.stride == 1 and self.in_filters == self.out_filters:
      x = layers.stochastic_depth(self, x, self.drop_rate, train) + inputs
    return x


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

  def stage_plan(self) -> list[tuple[int, BlockArgs]]:
    """The scaled (repeats, block args) of each stage, in real channels."""
    plan = []
    for stage, args in enumerate(self.blocks):
      fixed = self.fix_stem_head and stage in (0, len(self.blocks) - 1)
      repeats = args.repeats if fixed else round_repeats(args.repeats, self.depth_coefficient)
      scaled = BlockArgs(
          repeats, args.kernel_size, args.stride, args.expand_ratio,
          round_filters(args.in_filters, self.width_coefficient),
          round_filters(args.out_filters, self.width_coefficient), args.se_ratio)
      plan.append((repeats, scaled))
    return plan

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
    stem_filters = STEM_FILTERS if self.fix_stem_head else round_filters(
        STEM_FILTERS, self.width_coefficient)
    head_filters = HEAD_FILTERS if self.fix_stem_head else round_filters(
        HEAD_FILTERS, self.width_coefficient)

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
        x = MBConvBlock(
            in_filters=x.shape[-1],
            out_filters=args.out_filters, kernel_size=args.kernel_size,
            stride=args.stride if i == 0 else 1, expand_ratio=args.expand_ratio,
            se_ratio=args.se_ratio,
            drop_rate=self.drop_connect_rate * block_index / total_blocks,
            activation=self.activation, bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon, bn_group_size=self.bn_group_size,
            conv_impl=self.conv_impl, dtype=self.dtype,
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
