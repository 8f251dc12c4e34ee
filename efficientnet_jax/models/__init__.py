"""Model zoo: EfficientNet B0-B8, L2 and Lite0-4, plus ResNet-50/101/152 and MobileNetV1/V2
under the same scaling rule, each family one Flax module configured by data.

    model = create_model('efficientnet-b0')          # or 'resnet-50', 'mobilenet-v2', ...
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images, train=False)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from efficientnet_jax.models.efficientnet import EfficientNet, MBConvBlock
from efficientnet_jax.models.inference import make_inference_fn
from efficientnet_jax.models.layers import CONV_IMPLS
from efficientnet_jax.models.mobilenet import MobileNetV1, MobileNetV2
from efficientnet_jax.models.resnet import RESNET_STAGES, ResNet
from efficientnet_jax.models.scaling import (ALPHA, BETA, GAMMA, compound_coefficients,
                                             round_filters, round_repeats)
from efficientnet_jax.models.variants import (ALL_VARIANTS, B0_BLOCKS, CONVNET_VARIANTS,
                                              VARIANTS, BlockArgs, VariantSpec,
                                              decode_block_string, decode_blocks, get_variant)

__all__ = [
    'ALPHA', 'BETA', 'GAMMA', 'ALL_VARIANTS', 'B0_BLOCKS', 'CONVNET_VARIANTS', 'FAMILIES',
    'VARIANTS', 'BlockArgs', 'CONV_IMPLS', 'EfficientNet', 'MBConvBlock', 'MobileNetV1',
    'MobileNetV2', 'ResNet', 'VariantSpec', 'compound_coefficients', 'create_model',
    'decode_block_string', 'decode_blocks', 'get_variant', 'make_inference_fn', 'round_filters',
    'round_repeats',
]


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its Flax module and the module fields that make a named variant."""
  module: type[nn.Module]
  variant_fields: Callable[[VariantSpec], dict[str, Any]]


def _scaled(spec: VariantSpec) -> dict[str, Any]:
  return dict(width_coefficient=spec.width, depth_coefficient=spec.depth,
              dropout_rate=spec.dropout)


# Keyed by `VariantSpec.family`. Every module takes the same training options (stem_stride,
# bn_momentum, bn_epsilon, bn_group_size, conv_impl, drop_connect_rate, dtype), so
# `train.build_model` builds any family the same way.
FAMILIES: dict[str, Family] = {
    'efficientnet': Family(EfficientNet, lambda spec: dict(
        _scaled(spec), blocks=spec.blocks, activation=spec.activation,
        fix_stem_head=spec.lite)),
    'resnet': Family(ResNet, lambda spec: dict(_scaled(spec), stages=RESNET_STAGES[spec.name])),
    'mobilenet-v1': Family(MobileNetV1, _scaled),
    'mobilenet-v2': Family(MobileNetV2, _scaled),
}


def create_model(name: str, num_classes: int = 1000, dtype: Any = jnp.float32,
                 **overrides) -> nn.Module:
  """Builds a named variant of any family with its published configuration.

  `overrides` replace any field of the family's module, e.g. `width_coefficient=0.5`,
  `stem_stride=1`, `drop_connect_rate=0.0`, `conv_impl='xla'` (EfficientNet also takes
  `features_only=True`, and `blocks=` a block table as block strings or `BlockArgs`, e.g. an
  architecture search's result). The aliases `width`, `depth` and `dropout` are accepted for the
  three scaled coefficients of every family.
  """
  spec = get_variant(name)
  family = FAMILIES[spec.family]
  aliases = {'width': 'width_coefficient', 'depth': 'depth_coefficient',
             'dropout': 'dropout_rate'}
  overrides = {aliases.get(k, k): v for k, v in overrides.items()}
  fields = dict(family.variant_fields(spec), num_classes=num_classes, dtype=dtype)
  valid = set(family.module.__dataclass_fields__) - {'parent', 'name'}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    raise TypeError(
        f'create_model got unknown option(s) {unknown} for {name} ({family.module.__name__}); '
        f'valid options are {sorted(valid | set(aliases))}.')
  fields.update(overrides)
  if 'blocks' in overrides:
    fields['blocks'] = decode_blocks(fields['blocks'])
  return family.module(**fields)
