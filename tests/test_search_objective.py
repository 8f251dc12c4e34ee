"""The search objective (efficientnet_jax/search/objective.py) against hand-computed values."""
from __future__ import annotations

import pytest

from efficientnet_jax.search import objective


def test_soft_form_the_papers_objective():
  # ACC x (MAdds / T)^-0.07 with T = 400M.
  assert objective.reward(0.77, 400e6, 400e6) == pytest.approx(0.77)
  # Twice T: 0.8 x 2^-0.07 = 0.8 x 0.952638 = 0.762110.
  assert objective.reward(0.8, 800e6, 400e6) == pytest.approx(0.762110, abs=1e-6)
  # Half T: 0.7 x 0.5^-0.07 = 0.7 x 1.049717 = 0.734802.
  assert objective.reward(0.7, 200e6, 400e6) == pytest.approx(0.734802, abs=1e-6)
  # B0 (0.386B, 77.1%) against B1 (0.687B, 79.1%): B0 scores higher.
  # 0.771 x 0.9645^-0.07 = 0.771 x exp(0.07 x 0.036147) = 0.771 x 1.002534 = 0.772953;
  # 0.791 x 1.7175^-0.07 = 0.791 x exp(-0.07 x 0.540911) = 0.791 x 0.962844 = 0.761610.
  assert objective.reward(0.771, 385.8e6, 400e6) == pytest.approx(0.772953, abs=1e-5)
  assert objective.reward(0.791, 687e6, 400e6) == pytest.approx(0.761610, abs=1e-5)
  # w is a field: w = -0.15 at twice T gives 0.8 x 2^-0.15 = 0.8 x 0.901250 = 0.721000.
  assert objective.reward(0.8, 800e6, 400e6, w=-0.15) == pytest.approx(0.721000, abs=1e-6)


def test_hard_form_mnasnets_constraint():
  # w = 0 at or below T (the accuracy itself), -1 above: ACC x T / MAdds.
  assert objective.reward(0.7, 200e6, 400e6, form='hard') == 0.7
  assert objective.reward(0.7, 400e6, 400e6, form='hard') == 0.7
  assert objective.reward(0.8, 500e6, 400e6, form='hard') == pytest.approx(0.64)
  assert objective.exponent(500e6, 400e6, form='hard') == -1.0


def test_target_scales_with_the_feature_map_area():
  assert objective.target_madds(224) == 400e6
  assert objective.target_madds(112) == pytest.approx(100e6)
  # A stride-1 stem at 24 px has the feature maps of a stride-2 stem at 48 px.
  assert objective.target_madds(24, stem_stride=1) == pytest.approx(400e6 * (48 / 224) ** 2)
  assert objective.target_madds(24, stem_stride=1) == pytest.approx(18.367e6, rel=1e-4)


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"Unknown objective form 'latency'; valid: soft, hard"):
    objective.reward(0.5, 1e6, 1e6, form='latency')
  with pytest.raises(ValueError, match='madds > 0 and a target > 0'):
    objective.reward(0.5, 0, 1e6)
  with pytest.raises(ValueError, match='stem_stride 1 or 2'):
    objective.target_madds(224, stem_stride=4)
