"""ResNet-50/101/152 (He et al., 2016) in Flax Linen, scaled by the same rule as EfficientNet.

Bottleneck v1.5 (torchvision's and NVIDIA's layout): a stage's stride sits on the 3x3 conv, not
on the first 1x1 as in the original v1. It is the network behind the standard figures (25.6M
parameters and 4.1B multiply-adds for ResNet-50 at 224 px; v1 would be 3.9B), which are also the
ones the EfficientNet paper quotes (Table 2). Convolutions have no bias (BN follows each one).

Width and depth multipliers scale it as they scale EfficientNet (`scaling.round_filters` on the
stem and bottleneck widths, `scaling.round_repeats` on each stage's blocks); resolution is the
variant's input size. Submodules carry the Keras applications names (`conv1_conv`,
`conv2_block1_1_conv`, `conv2_block1_0_bn` for the projection shortcut, `predictions`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from efficientnet_jax.models import layers
from efficientnet_jax.models.scaling import round_filters, round_repeats


@dataclasses.dataclass(frozen=True)
class ResNetStage:
  """One stage of bottleneck blocks, in baseline channels and repeats."""
  repeats: int
  filters: int  # the bottleneck (3x3) width; the block outputs EXPANSION times this
  stride: int   # of the stage's first block


EXPANSION = 4
STEM_FILTERS = 64


def resnet_stages(*repeats: int) -> tuple[ResNetStage, ...]:
  """The four stages (widths 64..512, strides 1, 2, 2, 2) with the given block counts."""
  return tuple(ResNetStage(r, f, s) for r, f, s in zip(repeats, (64, 128, 256, 512),
                                                          (1, 2, 2, 2), strict=True))


# He et al. 2016, Table 1: the variants differ only in the blocks per stage.
RESNET_STAGES = {
    'resnet-50': resnet_stages(3, 4, 6, 3),
    'resnet-101': resnet_stages(3, 4, 23, 3),
    'resnet-152': resnet_stages(3, 8, 36, 3),
}


class BottleneckBlock(nn.Module):
  """1x1 reduce -> 3x3 (stride here, v1.5) -> 1x1 expand, plus the shortcut, then ReLU."""
  filters: int
  stride: int
  drop_rate: float  # stochastic-depth drop probability of the residual branch
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, train: bool):
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    conv = lambda features, kernel, name, stride=1: layers.Conv2D(
        features, kernel, stride, conv_impl=self.conv_impl, dtype=self.dtype, name=name)
    out_filters = self.filters * EXPANSION
    x = nn.relu(bn('1_bn')(conv(self.filters, 1, '1_conv')(inputs), train))
    x = nn.relu(bn('2_bn')(conv(self.filters, 3, '2_conv', self.stride)(x), train))
    x = bn('3_bn')(conv(out_filters, 1, '3_conv')(x), train)
    if self.stride != 1 or inputs.shape[-1] != out_filters:
      shortcut = bn('0_bn')(conv(out_filters, 1, '0_conv', self.stride)(inputs), train)
    else:
      shortcut = inputs
    x = layers.stochastic_depth(self, x, self.drop_rate, train)
    return nn.relu(x + shortcut)


class ResNet(nn.Module):
  """ResNet with bottleneck v1.5 blocks for any stage table, width and depth.

  Apply as `model.apply(variables, images, train=False)`; in training pass
  `mutable=['batch_stats']` and a 'dropout' rng. `images` is NHWC float, normalised with the
  variant's mean/std. `stem_stride=1` keeps tiny images (CIFAR, digits) from vanishing; the
  max-pool after the stem stays.
  """
  stages: Sequence[ResNetStage]
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 0.0
  drop_connect_rate: float = 0.0  # the last block's stochastic-depth rate, as in EfficientNet
  num_classes: int = 1000
  stem_stride: int = 2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  def stage_plan(self) -> list[ResNetStage]:
    """The scaled stages, in real channels and repeats."""
    return [ResNetStage(round_repeats(s.repeats, self.depth_coefficient),
                        round_filters(s.filters, self.width_coefficient), s.stride)
            for s in self.stages]

  @property
  def total_stride(self) -> int:
    stride = self.stem_stride * 2  # the stem conv and the max-pool
    for stage in self.stages:
      stride *= stage.stride
    return stride

  @nn.compact
  def __call__(self, images, train: bool = False):
    layers.check_images(images, self.total_stride, 'ResNet')
    bn = lambda name: layers.BatchNorm(self.bn_momentum, self.bn_epsilon, self.bn_group_size,
                                       self.dtype, name=name)
    x = layers.Conv2D(round_filters(STEM_FILTERS, self.width_coefficient), 7, self.stem_stride,
                      conv_impl=self.conv_impl, dtype=self.dtype, name='conv1_conv')(images)
    x = nn.relu(bn('conv1_bn')(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')

    plan = self.stage_plan()
    total_blocks = sum(stage.repeats for stage in plan)
    block_index = 0
    for s, stage in enumerate(plan):
      for i in range(stage.repeats):
        x = layers.block_class(BottleneckBlock, self.remat)(
            stage.filters, stage.stride if i == 0 else 1,
            drop_rate=self.drop_connect_rate * block_index / total_blocks,
            bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
            bn_group_size=self.bn_group_size, conv_impl=self.conv_impl, dtype=self.dtype,
            name=f'conv{s + 2}_block{i + 1}')(x, train)
        block_index += 1

    return layers.classifier_head(x, self.num_classes, self.dropout_rate, train)
