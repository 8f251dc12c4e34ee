"""The search algorithms on a toy reward: a known function of the choices, nothing trained.

The toy is the quick mode's kind of slice (ConvOp, kernel and SE of three blocks: 9 decisions,
4096 networks) with the reward the fraction of decisions set to a hidden best option. Every
proposal is a network not proposed before, as in a real search.
"""
from __future__ import annotations

import numpy as np
import pytest

from efficientnet_jax.models import B0_BLOCKS
from efficientnet_jax.search import algorithms
from efficientnet_jax.search.algorithms import (Observation, PPOSearch, RandomSearch,
                                                RegularizedEvolution, simulate)
from efficientnet_jax.search.space import default_space

SPACE = default_space().slice(B0_BLOCKS, blocks=(2, 3, 4),
                              decisions=('conv_op', 'kernel_size', 'se_ratio'))
COUNTS = SPACE.option_counts
FREE = [d for d, n in enumerate(COUNTS) if n > 1]
BEST = {d: int(np.random.default_rng(0).integers(COUNTS[d])) for d in FREE}
# The number of samples (15 PPO updates of 10) within which the controller must concentrate.
PPO_SAMPLES = 150
TOY_SAMPLES = 200


def toy_reward(choices) -> float:
  return float(np.mean([choices[d] == BEST[d] for d in FREE]))


def is_best(choices) -> bool:
  return all(choices[d] == BEST[d] for d in FREE)


def test_ppo_concentrates_on_the_best_choices():
  """Within 150 samples the policy's greedy network is the best one and holds most of its mass,
  for at least two of three seeds. A single seed is too brittle a test: whether seed 0 gets there
  depends on the last bits of the float arithmetic (XLA:CPU's optimisation level changes it:
  p = 0.997 vs 0.37; seeds 1-4 reach 0.58-0.999)."""
  found = 0
  for seed in range(3):
    ppo = PPOSearch(COUNTS, seed=seed, batch_size=10)
    _, p_start = ppo.favourite([])
    assert p_start < 0.01  # about uniform over 4096 networks
    history = simulate(ppo, toy_reward, PPO_SAMPLES)
    favourite, p = ppo.favourite(history)
    found += is_best(favourite) and p > 0.5
    assert len({o.choices for o in history}) == PPO_SAMPLES  # never the same network twice
    rewards = [o.reward for o in history]
    assert np.mean(rewards[-50:]) > np.mean(rewards[:50]) + 0.05
  assert found >= 2


def test_evolution_and_random_on_the_same_toy():
  evolution = simulate(RegularizedEvolution(COUNTS, seed=0, population_size=20, sample_size=5),
                       toy_reward, TOY_SAMPLES)
  random = simulate(RandomSearch(COUNTS, seed=0), toy_reward, TOY_SAMPLES)
  for history in (evolution, random):
    assert len({o.choices for o in history}) == TOY_SAMPLES
  evolution_late = np.mean([o.reward for o in evolution[-100:]])
  random_late = np.mean([o.reward for o in random[-100:]])
  # Random search samples the prior, 3/9 x (1/4 + 1/2 + 1/2) = 0.42 on average; evolution climbs.
  assert random_late == pytest.approx(0.42, abs=0.06)
  assert evolution_late > random_late + 0.1
  assert max(o.reward for o in evolution) >= 8 / 9


@pytest.mark.parametrize('make', [
    lambda: RandomSearch(COUNTS, seed=3),
    lambda: RegularizedEvolution(COUNTS, seed=3, population_size=8, sample_size=3),
    lambda: PPOSearch(COUNTS, seed=3, batch_size=4),
])
def test_proposals_depend_only_on_the_history(make):
  history = simulate(make(), toy_reward, 24)
  seen = {o.choices for o in history}
  is_new = lambda c: c not in seen
  # A fresh instance (another worker) and the one that replayed a longer history agree.
  used = make()
  used.propose(history + history[:4], 99, is_new)
  for index in (24, 25):
    assert make().propose(history, index, is_new) == used.propose(history, index, is_new)
  assert make().propose(history, 24, is_new) != make().propose(history, 25, is_new)


def test_ppo_weights_stored_log_probabilities():
  # A candidate enters PPO's ratio with the log-probability its proposer recorded, so the same
  # networks with other recorded values give another policy.
  history = simulate(PPOSearch(COUNTS, seed=1, batch_size=4), toy_reward, 8)
  shifted = [Observation(o.choices, o.reward, o.logp - 1.0) for o in history]
  first = PPOSearch(COUNTS, seed=1, batch_size=4).policy(history)
  second = PPOSearch(COUNTS, seed=1, batch_size=4).policy(shifted)
  assert not np.allclose(first['head_kernel'], second['head_kernel'])


def test_evolution_mutates_one_decision():
  evolution = RegularizedEvolution(COUNTS, seed=0)
  rng = np.random.default_rng(0)
  parent = tuple(0 for _ in COUNTS)
  for _ in range(20):
    child = evolution.mutate(parent, rng)
    changed = [d for d in range(len(COUNTS)) if child[d] != parent[d]]
    assert len(changed) == 1 and changed[0] in FREE


def test_exhausted_space_is_a_clear_error():
  tiny = default_space().slice(B0_BLOCKS, blocks=(2,), decisions=('kernel_size',))
  history = simulate(RandomSearch(tiny.option_counts), lambda c: 0.5, 2)
  seen = {o.choices for o in history}
  with pytest.raises(algorithms.SpaceExhaustedError, match='All 2 choice vectors.*num_candidates'):
    RandomSearch(tiny.option_counts).propose(history, 2, lambda c: c not in seen)
  with pytest.raises(ValueError, match='sample_size <= population_size'):
    RegularizedEvolution(COUNTS, population_size=2, sample_size=3)
