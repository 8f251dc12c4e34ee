"""MobileNetV1 (Howard et al., 2017) and MobileNetV2 (Sandler et al., 2018) in Flax Linen.

Both are written as block tables in EfficientNet's block-string notation (`models.variants`), so
the same `round_filters` / `round_repeats` rule scales them (the paper's Table 3). MobileNetV2's
inverted residual is EfficientNet's `MBConvBlock` without squeeze-and-excitation, so it is reused
as is; MobileNetV1's depthwise-separable block has its own small module (an activation after the
pointwise conv and no shortcut). ReLU6 throughout and inputs scaled to [-1, 1], as in the
reference TF-slim and Keras models.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from efficientnet_jax.models import layers
from efficientnet_jax.models.efficientnet import MBConvBlock, block_name
from efficientnet_jax.models.scaling import round_filters, round_repeats
from efficientnet_jax.models.variants import BlockArgs, decode_block_string

STEM_FILTERS = 32
MOBILENET_V2_HEAD_FILTERS = 1280

# MobileNetV1 (paper Table 1): 13 depthwise-separable blocks of 3x3 kernels. A stage's first
# block has the stride; expand ratio 1 and no SE (the notation's fields that V1 does not use).
MOBILENET_V1_BLOCK_STRINGS = (
    'r1_k3_s11_e1_i32_o64',
    'r2_k3_s22_e1_i64_o128',
    'r2_k3_s22_e1_i128_o256',
    'r6_k3_s22_e1_i256_o512',
    'r2_k3_s22_e1_i512_o1024',
)
# MobileNetV2 (paper Table 2, rows t, c, n, s): inverted residuals with linear bottlenecks.
MOBILENET_V2_BLOCK_STRINGS = (
    'r1_k3_s11_e1_i32_o16',
    'r2_k3_s22_e6_i16_o24',
    'r3_k3_s22_e6_i24_o32',
    'r4_k3_s22_e6_i32_o64',
    'r3_k3_s11_e6_i64_o96',
    'r3_k3_s22_e6_i96_o160',
    'r1_k3_s11_e6_i160_o320',
)
MOBILENET_V1_BLOCKS = tuple(decode_block_string(s) for s in MOBILENET_V1_BLOCK_STRINGS)
MOBILENET_V2_BLOCKS = tuple(decode_block_string(s) for s in MOBILENET_V2_BLOCK_STRINGS)


def scaled_blocks(blocks: Sequence[BlockArgs], width: float, depth: float) -> list[BlockArgs]:
  """The block table in real channels and repeats: the rule that scales EfficientNet."""
  return [BlockArgs(round_repeats(b.repeats, depth), b.kernel_size, b.stride, b.expand_ratio,
                    round_filters(b.in_filters, width), round_filters(b.out_filters, width),
                    b.se_ratio)
          for b in blocks]


class DepthwiseSeparableBlock(nn.Module):
  """MobileNetV1's block: 3x3 depthwise -> BN -> ReLU6 -> 1x1 pointwise -> BN -> ReLU6."""
  out_filters: int
  kernel_size: int = 3
  stride: int = 1
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    x = layers.DepthwiseConv2D(self.kernel_size, self.stride, self.conv_impl, self.dtype,
                               name='dwconv')(x)
    x = nn.relu6(bn('dw_bn')(x, train))
    x = layers.Conv2D(self.out_filters, 1, conv_impl=self.conv_impl, dtype=self.dtype,
                      name='pwconv')(x)
    return nn.relu6(bn('pw_bn')(x, train))


class MobileNetV1(nn.Module):
  """MobileNetV1 for any block table, width and depth (4.2M parameters at width 1).

  Apply as EfficientNet: `model.apply(variables, images, train=False)`, and in training
  `mutable=['batch_stats']` with a 'dropout' rng. No block has a shortcut, so there is no
  stochastic depth: `drop_connect_rate` exists only so that every family takes the training
  loop's options, and must be 0.
  """
  blocks: Sequence[BlockArgs] = MOBILENET_V1_BLOCKS
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 1e-3  # TF-slim's keep probability 0.999
  drop_connect_rate: float = 0.0
  num_classes: int = 1000
  stem_stride: int = 2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  @property
  def total_stride(self) -> int:
    return layers.block_table_stride(self.stem_stride, self.blocks)

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.drop_connect_rate:
      raise ValueError(
          f'MobileNetV1 has no residual shortcuts, so stochastic depth has nothing to drop; got '
          f'drop_connect_rate={self.drop_connect_rate}. Set it to 0 (--config.drop_connect_rate=0'
          ' in training).')
    layers.check_images(images, self.total_stride, 'MobileNetV1')
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    x = layers.Conv2D(round_filters(STEM_FILTERS, self.width_coefficient), 3, self.stem_stride,
                      conv_impl=self.conv_impl, dtype=self.dtype, name='stem_conv')(images)
    x = nn.relu6(bn('stem_bn')(x, train))
    for stage, args in enumerate(
        scaled_blocks(self.blocks, self.width_coefficient, self.depth_coefficient)):
      for i in range(args.repeats):
        x = layers.block_class(DepthwiseSeparableBlock, self.remat)(
            args.out_filters, args.kernel_size, args.stride if i == 0 else 1,
            bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
            bn_group_size=self.bn_group_size, conv_impl=self.conv_impl, dtype=self.dtype,
            name=block_name(stage + 1, i))(x, train)
    return layers.classifier_head(x, self.num_classes, self.dropout_rate, train)


class MobileNetV2(nn.Module):
  """MobileNetV2 for any block table, width and depth (3.5M parameters at width 1).

  The head conv keeps its 1280 channels below width 1 and scales above it, as in the reference
  (Keras `MobileNetV2(alpha=...)`). Stochastic depth, when `drop_connect_rate > 0`, follows
  EfficientNet's linear rule over the blocks with an identity shortcut.
  """
  blocks: Sequence[BlockArgs] = MOBILENET_V2_BLOCKS
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 0.2  # TF-slim's keep probability 0.8
  drop_connect_rate: float = 0.0
  num_classes: int = 1000
  stem_stride: int = 2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  @property
  def total_stride(self) -> int:
    return layers.block_table_stride(self.stem_stride, self.blocks)

  @nn.compact
  def __call__(self, images, train: bool = False):
    layers.check_images(images, self.total_stride, 'MobileNetV2')
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    x = layers.Conv2D(round_filters(STEM_FILTERS, self.width_coefficient), 3, self.stem_stride,
                      conv_impl=self.conv_impl, dtype=self.dtype, name='stem_conv')(images)
    x = nn.relu6(bn('stem_bn')(x, train))
    plan = scaled_blocks(self.blocks, self.width_coefficient, self.depth_coefficient)
    total_blocks = sum(args.repeats for args in plan)
    block_index = 0
    for stage, args in enumerate(plan):
      for i in range(args.repeats):
        x = layers.block_class(MBConvBlock, self.remat)(
            in_filters=x.shape[-1], out_filters=args.out_filters,
            kernel_size=args.kernel_size, stride=args.stride if i == 0 else 1,
            expand_ratio=args.expand_ratio, se_ratio=0.0,
            drop_rate=self.drop_connect_rate * block_index / total_blocks,
            activation='relu6', bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
            bn_group_size=self.bn_group_size, conv_impl=self.conv_impl, dtype=self.dtype,
            name=block_name(stage + 1, i))(x, train)
        block_index += 1
    head = round_filters(MOBILENET_V2_HEAD_FILTERS, max(1.0, self.width_coefficient))
    x = layers.Conv2D(head, 1, conv_impl=self.conv_impl, dtype=self.dtype, name='top_conv')(x)
    x = nn.relu6(bn('top_bn')(x, train))
    return layers.classifier_head(x, self.num_classes, self.dropout_rate, train)
