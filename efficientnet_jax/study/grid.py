"""The compound-scaling grid (Tan & Le 2019, section 3.3, step 1) as pure functions.

Step 1 fixes phi = 1 and searches alpha, beta, gamma >= 1 with alpha * beta**2 * gamma**2 ~= 2,
so that every candidate costs about twice the baseline's FLOPs; step 2 fixes the winner and
scales phi. `compound_grid` is step 1's candidate set, `scale` turns coefficients and phi into a
network's width, depth and resolution.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

from efficientnet_jax.models.scaling import flops_multiplier, scaled_resolution

__all__ = ['compound_grid', 'frange', 'satisfies_flops_constraint', 'scale']


def satisfies_flops_constraint(alpha: float, beta: float, gamma: float, target: float = 2.0,
                               tolerance: float = 0.05) -> bool:
  """alpha, beta, gamma >= 1 and alpha * beta**2 * gamma**2 within `tolerance` (relative) of target.

  Depth costs FLOPs linearly, width and resolution quadratically, hence the squares.
  """
  if min(alpha, beta, gamma) < 1.0:
    return False
  return abs(flops_multiplier(alpha, beta, gamma) / target - 1.0) <= tolerance + 1e-12


def compound_grid(alphas: Iterable[float], betas: Iterable[float], gammas: Iterable[float],
                  target: float = 2.0, tolerance: float = 0.05,
                  ) -> list[tuple[float, float, float]]:
  """Every (alpha, beta, gamma) of the grid that satisfies the FLOPs constraint.

  Sorted by closeness to the target, then by (alpha, beta, gamma), so the order is deterministic.
  """
  grid = {(float(a), float(b), float(g)) for a, b, g in itertools.product(alphas, betas, gammas)
          if satisfies_flops_constraint(a, b, g, target, tolerance)}
  return sorted(grid, key=lambda c: (round(abs(flops_multiplier(*c) - target), 9), c))


def frange(start: float, stop: float, step: float) -> tuple[float, ...]:
  """start, start + step, ..., stop (inclusive), rounded to 6 decimals: float-safe grid axes."""
  count = int(round((stop - start) / step))
  return tuple(round(start + i * step, 6) for i in range(count + 1))


def scale(width: float, depth: float, resolution: int, *, alpha: float, beta: float,
          gamma: float, phi: float = 1.0) -> tuple[float, float, int]:
  """A baseline's (width, depth, resolution) scaled by alpha**phi, beta**phi, gamma**phi.

  Width and depth stay real multipliers (the model rounds channels and repeats); the
  resolution is rounded to whole pixels.
  """
  return (round(width * beta**phi, 6), round(depth * alpha**phi, 6),
          scaled_resolution(phi, resolution, gamma))
