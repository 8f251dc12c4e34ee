"""Compound scaling (Tan & Le, 2019, section 3.3): small pure functions, no model code.

A baseline network is scaled by one coefficient phi: depth by alpha**phi, width by beta**phi and
resolution by gamma**phi, with alpha * beta**2 * gamma**2 ~= 2 so that FLOPs grow by ~2**phi.
"""
from __future__ import annotations

import math

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
