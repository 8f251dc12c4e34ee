"""The search objective, as the paper states it: ACC(m) x [FLOPS(m) / T]^w.

EfficientNet (Tan & Le 2019, section 4) optimises multiply-adds, not latency, with T = 400M
multiply-adds at 224 px and w = -0.07: a network twice as expensive must be 5% more accurate
(2^-0.07 = 0.953) to score the same. MnasNet's second form is a hard constraint: w = 0 at or
below T and -1 above it.

At a proxy resolution the target scales with the area of the feature maps: T x (r / 224)^2, where
r counts a stride-1 stem as twice the pixels (it computes what a stride-2 stem does at 2r). In the
soft form T only rescales every reward by the same factor, so the ranking does not depend on it;
in the hard form it decides which networks are penalised.
"""
from __future__ import annotations

FORMS = ('soft', 'hard')
PAPER_TARGET_MADDS = 400e6
PAPER_TARGET_RESOLUTION = 224
PAPER_W = -0.07

__all__ = ['FORMS', 'PAPER_TARGET_MADDS', 'PAPER_TARGET_RESOLUTION', 'PAPER_W', 'exponent',
           'reward', 'target_madds']


def target_madds(resolution: int, stem_stride: int = 2, target: float = PAPER_TARGET_MADDS,
                 target_resolution: int = PAPER_TARGET_RESOLUTION) -> float:
  """T at the search resolution: `target` at `target_resolution` px, scaled by the area of the
  stem's output (a stride-1 stem at r px has the feature maps of a stride-2 stem at 2r px)."""
  if resolution <= 0 or stem_stride not in (1, 2) or target <= 0:
    raise ValueError(f'target_madds needs resolution > 0, stem_stride 1 or 2 and target > 0; got '
                     f'{resolution}, {stem_stride}, {target}.')
  effective = resolution * 2 / stem_stride
  return target * (effective / target_resolution) ** 2


def exponent(madds: float, target: float, w: float = PAPER_W, form: str = 'soft') -> float:
  """The exponent applied to madds / T: `w` (soft), or 0 at or below T and -1 above (hard)."""
  if form == 'soft':
    return w
  if form == 'hard':
    return 0.0 if madds <= target else -1.0
  raise ValueError(f'Unknown objective form {form!r}; valid: {", ".join(FORMS)}.')


def reward(top1: float, madds: float, target: float, w: float = PAPER_W,
           form: str = 'soft') -> float:
  """ACC x (MAdds / T)^w, the reward of a network with accuracy `top1` and `madds` multiply-adds."""
  if madds <= 0 or target <= 0:
    raise ValueError(f'The reward needs madds > 0 and a target > 0; got {madds}, {target}.')
  return float(top1) * (float(madds) / float(target)) ** exponent(madds, target, w, form)
