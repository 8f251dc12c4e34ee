"""The search algorithms. Each proposes the next candidate from the stored history alone.

`propose(history, index, is_new)` is a pure function of its arguments: `history` is the finished
candidates in the order they finished, `index` numbers the proposal (the driver passes how many
trials the store holds), and `is_new(choices)` says whether that network was never proposed
before. Any worker that reads the same store therefore proposes the same network, and none
keeps state that another would lack (an algorithm may cache work for a history it has seen).

* `RandomSearch`: uniform over the space; the baseline every NAS method must beat.
* `RegularizedEvolution` (Real et al. 2019): the population is the last `population_size`
  finished candidates (so the oldest dies); the parent is the best of `sample_size` of them drawn
  at random; the child changes one decision of the parent to another of its options.
* `PPOSearch`: MnasNet's controller (`controller.py`), retrained from the history in batches of
  `batch_size` finished candidates, then sampled.

`simulate` runs an algorithm against a known reward function with no training and no store: the
toy problems of the tests and docs/search.md.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from efficientnet_jax import errors
from efficientnet_jax.search.controller import Controller, ControllerConfig

__all__ = ['ALGORITHMS', 'Observation', 'PPOSearch', 'Proposal', 'RandomSearch',
           'RegularizedEvolution', 'SpaceExhaustedError', 'simulate']

Choices = tuple[int, ...]
IsNew = Callable[[Choices], bool]
# Draws before giving up on a proposal policy that keeps hitting seen networks.
_ATTEMPTS = 200
# The controller draws this many networks per call (at rising temperatures).
_DRAWS_PER_ROUND = 16
# Spaces up to this many choice vectors are enumerated when random draws find nothing new.
_ENUMERABLE = 200_000


class SpaceExhaustedError(errors.UserError, ValueError):
  """Every network of the space was proposed already."""


@dataclasses.dataclass(frozen=True)
class Observation:
  """A finished candidate: its choice vector, its reward and, for PPO's proposals, the
  log-probability of the policy that proposed it."""
  choices: Choices
  reward: float
  logp: float | None = None


@dataclasses.dataclass(frozen=True)
class Proposal:
  """The next candidate and what to store with it (e.g. 'logp', 'origin')."""
  choices: Choices
  attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(index), int(stream)])


def _random_choices(counts: Sequence[int], rng: np.random.Generator) -> Choices:
  return tuple(int(rng.integers(n)) for n in counts)


def unseen_random(counts: Sequence[int], rng: np.random.Generator, is_new: IsNew) -> Choices:
  """A uniformly random choice vector that `is_new` accepts (enumerating small spaces)."""
  for _ in range(_ATTEMPTS):
    choices = _random_choices(counts, rng)
    if is_new(choices):
      return choices
  if math.prod(counts) <= _ENUMERABLE:
    for choices in itertools.product(*(range(n) for n in counts)):
      if is_new(choices):
        return choices
    raise SpaceExhaustedError(
        f'All {math.prod(counts)} choice vectors of the space were proposed already. Lower '
        '--config.num_candidates or search a larger slice (--config.space.blocks / decisions).')
  raise SpaceExhaustedError(
      f'{_ATTEMPTS} random draws found no network that was not proposed before; the space is '
      'nearly exhausted. Lower --config.num_candidates or search a larger slice.')


class RandomSearch:
  """Uniform random search over the space."""
  name = 'random'

  def __init__(self, option_counts: Sequence[int], seed: int = 0):
    self.option_counts, self.seed = tuple(option_counts), seed

  def propose(self, history: Sequence[Observation], index: int, is_new: IsNew) -> Proposal:
    del history  # random search ignores it
    return Proposal(unseen_random(self.option_counts, _rng(self.seed, index, 0), is_new),
                    {'origin': 'random'})


class RegularizedEvolution:
  """Aging evolution: tournament selection on the newest `population_size` candidates."""
  name = 'evolution'

  def __init__(self, option_counts: Sequence[int], seed: int = 0, population_size: int = 100,
               sample_size: int = 25):
    if not 1 <= sample_size <= population_size:
      raise ValueError(f'Evolution needs 1 <= sample_size <= population_size; got '
                       f'{sample_size} and {population_size}.')
    self.option_counts, self.seed = tuple(option_counts), seed
    self.population_size, self.sample_size = population_size, sample_size
    self._mutable = [d for d, n in enumerate(self.option_counts) if n > 1]

  def mutate(self, choices: Choices, rng: np.random.Generator) -> Choices:
    """`choices` with one decision (of those with a choice) set to another of its options."""
    if not self._mutable:
      return choices
    d = self._mutable[int(rng.integers(len(self._mutable)))]
    other = int(rng.integers(self.option_counts[d] - 1))
    child = list(choices)
    child[d] = other if other < choices[d] else other + 1
    return tuple(child)

  def propose(self, history: Sequence[Observation], index: int, is_new: IsNew) -> Proposal:
    rng = _rng(self.seed, index, 1)
    if len(history) < self.population_size:  # the initial population is random
      return Proposal(unseen_random(self.option_counts, rng, is_new), {'origin': 'random'})
    population = history[-self.population_size:]
    for _ in range(_ATTEMPTS):
      sample = rng.choice(len(population), self.sample_size, replace=False)
      parent = max(sample, key=lambda i: (population[i].reward, i))  # ties: the younger
      child = self.mutate(population[parent].choices, rng)
      if is_new(child):
        return Proposal(child, {'origin': 'mutation'})
    return Proposal(unseen_random(self.option_counts, rng, is_new), {'origin': 'random'})


class PPOSearch:
  """MnasNet's PPO controller, replayed from the history.

  The policy after a history of n finished candidates is the initial policy (from `seed`)
  updated by PPO on candidates [0, B), [B, 2B), ... in the order they finished (B =
  `batch_size`); an incomplete last batch waits. Each candidate enters the update with the
  log-probability its proposer recorded, so a candidate proposed by an older policy is weighted
  correctly (PPO's ratio). The last replayed state is cached: a growing history costs one update
  per new batch.
  """
  name = 'ppo'

  def __init__(self, option_counts: Sequence[int], seed: int = 0, batch_size: int = 10,
               config: ControllerConfig = ControllerConfig()):
    if batch_size < 2:
      raise ValueError(f'PPO needs batches of at least 2 candidates; got {batch_size}.')
    self.option_counts, self.seed, self.batch_size = tuple(option_counts), seed, batch_size
    with _on_cpu():
      self.controller = Controller(self.option_counts, config)
    self._reset()

  def _reset(self):
    with _on_cpu():
      self._params = self.controller.init(self.seed)
      self._opt_state = self.controller.init_optimizer(self._params)
    self._baseline: float | None = None
    self._consumed: list[Observation] = []

  def policy(self, history: Sequence[Observation]):
    """The controller's parameters after replaying `history`."""
    history = list(history)
    if history[:len(self._consumed)] != self._consumed:
      self._reset()
    with _on_cpu():
      while len(history) - len(self._consumed) >= self.batch_size:
        batch = history[len(self._consumed):len(self._consumed) + self.batch_size]
        self._update(batch)
        self._consumed.extend(batch)
    return self._params

  def _update(self, batch: Sequence[Observation]) -> None:
    rewards = np.asarray([o.reward for o in batch], np.float64)
    if self._baseline is None:
      self._baseline = float(rewards.mean())
    choices = [o.choices for o in batch]
    current = self.controller.log_prob(self._params, choices)
    logp_old = [current[i] if o.logp is None else o.logp for i, o in enumerate(batch)]
    self._params, self._opt_state = self.controller.ppo_update(
        self._params, self._opt_state, choices, rewards, logp_old, self._baseline)
    decay = self.controller.config.baseline_decay
    for r in rewards:
      self._baseline = decay * self._baseline + (1 - decay) * float(r)

  def propose(self, history: Sequence[Observation], index: int, is_new: IsNew) -> Proposal:
    params = self.policy(history)
    with _on_cpu():
      # A converged policy keeps drawing networks trained already: draw in rounds with the
      # policy flattened step by step, so the proposal stays near its favourites rather than
      # jumping to random search. The first new one in draw order is the proposal.
      for start in range(0, _ATTEMPTS, _DRAWS_PER_ROUND):
        temperatures = [1.0 + 0.1 * a for a in range(start, start + _DRAWS_PER_ROUND)]
        for choices, logp in self.controller.sample(params, (self.seed, index, start),
                                                    temperatures):
          if is_new(choices):
            return Proposal(choices, {'origin': 'controller', 'logp': logp})
      choices = unseen_random(self.option_counts, _rng(self.seed, index, 2), is_new)
      logp = float(self.controller.log_prob(params, [choices])[0])
    return Proposal(choices, {'origin': 'random', 'logp': logp})

  def favourite(self, history: Sequence[Observation]) -> tuple[Choices, float]:
    """The policy's greedy choice vector after `history`, and its probability."""
    params = self.policy(history)
    with _on_cpu():
      return self.controller.mode(params)


def _on_cpu():
  return jax.default_device(jax.devices('cpu')[0])


ALGORITHMS = {cls.name: cls for cls in (PPOSearch, RegularizedEvolution, RandomSearch)}


def simulate(algorithm, reward_fn: Callable[[Choices], float], num_candidates: int,
             unique: bool = True) -> list[Observation]:
  """Runs `algorithm` sequentially against a known `reward_fn`: propose, score, record.

  With `unique`, a network is never proposed twice (as in a real search). Returns the history.
  """
  history: list[Observation] = []
  seen: set[Choices] = set()
  for index in range(num_candidates):
    proposal = algorithm.propose(history, index,
                                 (lambda c: c not in seen) if unique else (lambda c: True))
    seen.add(proposal.choices)
    history.append(Observation(proposal.choices, float(reward_fn(proposal.choices)),
                               proposal.attrs.get('logp')))
  return history
