"""Model zoo: EfficientNet B0-B8, L2 and Lite0-4, built from data by one Flax module.

    model = create_model('efficientnet-b0')
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images, train=False)
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from efficientnet_jax.models.efficientnet import EfficientNet, MBConvBlock
from efficientnet_jax.models.inference import make_inference_fn
from efficientnet_jax.models.layers import CONV_IMPLS
from efficientnet_jax.models.scaling import (ALPHA, BETA, GAMMA, compound_coefficients,
                                             round_filters, round_repeats)
from efficientnet_jax.models.variants import (B0_BLOCKS, VARIANTS, BlockArgs, VariantSpec,
                                              decode_block_string, get_variant)

__all__ = [
    'ALPHA', 'BETA', 'GAMMA', 'B0_BLOCKS', 'VARIANTS', 'BlockArgs', 'CONV_IMPLS', 'EfficientNet',
    'MBConvBlock', 'VariantSpec', 'compound_coefficients', 'create_model', 'decode_block_string',
    'get_variant', 'make_inference_fn', 'round_filters', 'round_repeats',
]


def create_model(name: str, num_classes: int = 1000, dtype: Any = jnp.float32,
                 **overrides) -> EfficientNet:
  """Builds a named variant with the published coefficients.

  `overrides` replace any `EfficientNet` field, e.g. `width_coefficient=0.5`, `stem_stride=1`,
  `drop_connect_rate=0.0`, `features_only=True`, `conv_impl='xla'`. The aliases `width`,
  `depth` and `dropout` are accepted for the three scaled coefficients.
  """
  spec = get_variant(name)
  aliases = {'width': 'width_coefficient', 'depth': 'depth_coefficient',
             'dropout': 'dropout_rate'}
  overrides = {aliases.get(k, k): v for k, v in overrides.items()}
  fields = dict(
      blocks=spec.blocks, width_coefficient=spec.width, depth_coefficient=spec.depth,
      dropout_rate=spec.dropout, activation=spec.activation, fix_stem_head=spec.lite,
      num_classes=num_classes, dtype=dtype)
  valid = set(EfficientNet.__dataclass_fields__) - {'parent', 'name'}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    raise TypeError(
        f'create_model got unknown option(s) {unknown}; valid options are '
        f'{sorted(valid | set(aliases))}.')
  fields.update(overrides)
  return EfficientNet(**fields)
