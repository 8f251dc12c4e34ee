"""Compound scaling (Tan & Le, 2019, section 3.3): small pure functions, no model code.

A baseline network is scaled by one coefficient phi: depth by alpha**phi, width by beta**phi and
resolution by gamma**phi, with alpha * beta**2 * gamma**2 ~= 2 so that FLOPs grow by ~2**phi.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from efficientnet_jax.models.variants import HEAD_FILTERS, STEM_FILTERS, BlockArgs

# The paper's grid-search result at phi = 1 (section 4, step 1).
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
# Every channel count is a multiple of this, as in the official TF code.
CHANNEL_DIVISOR = 8


def round_filters(filters: int, width_coefficient: float, divisor: int = CHANNEL_DIVISOR) -> int:
  """Scales a channel count by the width multiplier and rounds it to a multiple of `divisor`.

  Rounds to the nearest multiple (never below `divisor`), then adds one `divisor` back if the
  rounding removed more than 10% of the scaled count: the official rule, which the published
  parameter counts depend on.
  """
  scaled = filters * width_coefficient
  new_filters = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new_filters < 0.9 * scaled:
    new_filters += divisor
  return int(new_filters)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  """Scales a stage's block count by the depth multiplier, rounding up."""
  return int(math.ceil(depth_coefficient * repeats))


def compound_coefficients(phi: float, alpha: float = ALPHA, beta: float = BETA,
                          gamma: float = GAMMA) -> tuple[float, float, float]:
  """Returns the (depth, width, resolution) multipliers for compound coefficient `phi`.

  Any real phi is allowed: fractional phi interpolates between the B-variants and negative phi
  scales below the B0 baseline. Multiply the resolution multiplier by the baseline's 224 px.
  """
  for name, value in (('alpha', alpha), ('beta', beta), ('gamma', gamma)):
    if value < 1.0:
      raise ValueError(
          f'Compound scaling needs {name} >= 1 (the paper constrains alpha, beta, gamma >= 1 so '
          f'that no dimension shrinks as phi grows); got {name}={value}.')
  return alpha**phi, beta**phi, gamma**phi


def flops_multiplier(alpha: float, beta: float, gamma: float) -> float:
  """The FLOPs growth per unit of phi predicted by the scaling rule: alpha * beta**2 * gamma**2."""
  return alpha * beta**2 * gamma**2


def scaled_resolution(phi: float, base_resolution: int = 224, gamma: float = GAMMA,
                      divisor: int = 1) -> int:
  """Input resolution for `phi`, optionally rounded to a multiple of `divisor` pixels."""
  resolution = base_resolution * gamma**phi
  return max(divisor, int(round(resolution / divisor)) * divisor)


def scaled_stages(blocks: Sequence[BlockArgs], width: float, depth: float,
                  fixed_ends: bool = False) -> list[tuple[int, BlockArgs]]:
  """(repeats, block args in real channels) of each stage of a block table scaled by width/depth.

  `fixed_ends` keeps the first and last stages' repeats unscaled (EfficientNet-Lite).
  """
  plan = []
  for stage, args in enumerate(blocks):
    fixed = fixed_ends and stage in (0, len(blocks) - 1)
    repeats = args.repeats if fixed else round_repeats(args.repeats, depth)
    plan.append((repeats, dataclasses.replace(
        args, repeats=repeats, in_filters=round_filters(args.in_filters, width),
        out_filters=round_filters(args.out_filters, width))))
  return plan


def stem_head_filters(width: float, fixed: bool = False) -> tuple[int, int]:
  """EfficientNet's stem and head channels at `width` (Lite fixes both at 32 and 1280)."""
  if fixed:
    return STEM_FILTERS, HEAD_FILTERS
  return round_filters(STEM_FILTERS, width), round_filters(HEAD_FILTERS, width)
