"""MnasNet's controller: an autoregressive policy over the factorised choices, trained with PPO.

No library ships a MnasNet controller, so it is written here in JAX and optax. The policy is a
small LSTM that emits the decisions one by one: at step d it reads the embedding of decision
d - 1's choice (a start token at d = 0) and a per-decision linear head gives the logits of
decision d's options (options beyond a decision's count are masked). `sample` draws a choice
vector and its log-probability; `log_prob` scores given vectors (teacher forcing).

`ppo_update` is PPO's clipped surrogate (Schulman et al. 2017) on one batch of sampled networks,
with the advantage taken against a moving-average baseline of the rewards (as MnasNet and NASNet
do) and divided by the batch's reward spread, plus a small entropy bonus.

Everything runs on the host CPU (the controller is tiny), so every worker of a search computes
bit-identical proposals whatever accelerator it trains candidates on.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ['ControllerConfig', 'Controller']

_MASKED = -1e9


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
  """The policy's size and PPO's hyperparameters."""
  hidden: int = 64
  init_scale: float = 0.1  # parameters start uniform in +-init_scale (NASNet's controller)
  learning_rate: float = 0.05
  clip: float = 0.2  # PPO's epsilon
  epochs: int = 2  # optimisation passes over each batch
  entropy_coef: float = 1e-3
  baseline_decay: float = 0.95


def _lstm_step(params, carry, x):
  h, c = carry
  z = jnp.concatenate([x, h], axis=-1) @ params['lstm_kernel'] + params['lstm_bias']
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)  # forget-gate bias 1
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return (h, c), h


class Controller:
  """The policy for a space with `option_counts[d]` options at decision d, and its PPO step."""

  def __init__(self, option_counts: Sequence[int], config: ControllerConfig = ControllerConfig()):
    self.option_counts = tuple(int(n) for n in option_counts)
    if not self.option_counts or min(self.option_counts) < 1:
      raise ValueError(f'Every decision needs at least one option; got {self.option_counts}.')
    self.config = config
    counts = np.asarray(self.option_counts)
    # The embedding row of (decision d, option a) is 1 + offsets[d] + a; row 0 is the start.
    self._offsets = jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32)
    self._mask = jnp.asarray(np.arange(counts.max())[None, :] < counts[:, None])
    self.optimizer = optax.adam(config.learning_rate)

  # Controllers of the same space and config are equal, so they share compiled functions (the
  # jitted methods below take `self` as a static argument).
  def __hash__(self):
    return hash((self.option_counts, self.config))

  def __eq__(self, other):
    return (isinstance(other, Controller) and
            (self.option_counts, self.config) == (other.option_counts, other.config))

  def init(self, seed: int) -> dict:
    """The initial parameters (drawn with NumPy: the same on every host, nothing to compile)."""
    d, h, n = len(self.option_counts), self.config.hidden, max(self.option_counts)
    rng = np.random.default_rng(seed)
    uniform = lambda shape: jnp.asarray(
        rng.uniform(-self.config.init_scale, self.config.init_scale, shape), jnp.float32)
    return {'embed': uniform((1 + sum(self.option_counts), h)),
            'lstm_kernel': uniform((2 * h, 4 * h)),
            'lstm_bias': jnp.zeros((4 * h,)),
            'head_kernel': uniform((d, h, n)),
            'head_bias': jnp.zeros((d, n))}

  def init_optimizer(self, params):
    return self.optimizer.init(params)

  def _logits(self, params, h, d):
    logits = h @ params['head_kernel'][d] + params['head_bias'][d]
    return jnp.where(self._mask[d], logits, _MASKED)

  def _sample_impl(self, params, key, temperature=1.0, greedy: bool = False):
    h0 = jnp.zeros((self.config.hidden,))

    def step(carry, xs):
      state, token = carry
      d, key = xs
      state, h = _lstm_step(params, state, params['embed'][token])
      logits = self._logits(params, h, d)
      choice = (jnp.argmax(logits) if greedy else
                jax.random.categorical(key, logits / temperature))
      logp = jax.nn.log_softmax(logits)[choice]  # under the policy itself
      return (state, 1 + self._offsets[d] + choice), (choice, logp)

    steps = len(self.option_counts)
    xs = (jnp.arange(steps), jax.random.split(key, steps))
    _, (choices, logps) = jax.lax.scan(step, ((h0, h0), jnp.int32(0)), xs)
    return choices, logps.sum()

  @functools.partial(jax.jit, static_argnums=0)
  def _sample_many(self, params, stream, temperatures):
    key = jax.random.key(stream[0])
    for i in range(1, stream.shape[0]):
      key = jax.random.fold_in(key, stream[i])
    keys = jax.random.split(key, temperatures.shape[0])
    return jax.vmap(self._sample_impl, in_axes=(None, 0, 0))(params, keys, temperatures)

  @functools.partial(jax.jit, static_argnums=0)
  def _greedy(self, params):
    return self._sample_impl(params, jax.random.key(0), greedy=True)  # the key is unused

  @functools.partial(jax.jit, static_argnums=0)
  def _log_prob(self, params, choices):
    return self._log_prob_impl(params, choices)

  def _log_prob_impl(self, params, choices):
    """(log-probability, entropy) per row of a batch of choice vectors (teacher forcing)."""
    batch, steps = choices.shape
    tokens = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), 1 + self._offsets[None, :-1] + choices[:, :-1]], axis=1)
    h0 = jnp.zeros((batch, self.config.hidden))

    def step(state, xs):
      d, token, choice = xs
      state, h = _lstm_step(params, state, params['embed'][token])
      log_probs = jax.nn.log_softmax(self._logits(params, h, d), axis=-1)
      logp = jnp.take_along_axis(log_probs, choice[:, None], axis=1)[:, 0]
      entropy = -jnp.sum(jnp.where(self._mask[d], jnp.exp(log_probs) * log_probs, 0.0), axis=-1)
      return state, (logp, entropy)

    _, (logps, entropies) = jax.lax.scan(step, (h0, h0),
                                         (jnp.arange(steps), tokens.T, choices.T))
    return logps.sum(0), entropies.sum(0)

  @functools.partial(jax.jit, static_argnums=0)
  def _update(self, params, opt_state, choices, logp_old, advantages):
    def loss_fn(p):
      logp, entropy = self._log_prob_impl(p, choices)
      ratio = jnp.exp(logp - logp_old)
      clipped = jnp.clip(ratio, 1 - self.config.clip, 1 + self.config.clip)
      surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
      return -surrogate.mean() - self.config.entropy_coef * entropy.mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # --- The host API (numpy in, Python numbers out) -------------------------------------------

  def sample(self, params, stream: Sequence[int], temperatures: Sequence[float]
             ) -> list[tuple[tuple[int, ...], float]]:
    """One choice vector per temperature, drawn from the policy with its logits divided by the
    temperature, each with its log-probability under the policy itself. `stream` (e.g. seed,
    proposal index, round) names the random numbers: the same stream, the same draws."""
    choices, logps = self._sample_many(params, jnp.asarray(stream, jnp.uint32),
                                       jnp.asarray(temperatures, jnp.float32))
    return [(tuple(int(c) for c in row), float(lp))
            for row, lp in zip(np.asarray(choices), np.asarray(logps))]

  def log_prob(self, params, choices: Sequence[Sequence[int]]) -> np.ndarray:
    logp, _ = self._log_prob(params, jnp.asarray(np.asarray(choices, np.int32)))
    return np.asarray(logp, np.float64)

  def mode(self, params) -> tuple[tuple[int, ...], float]:
    """The most likely option at each step given the previous ones (greedy decoding), and the
    probability the policy gives that whole vector."""
    choices, logp = self._greedy(params)
    return tuple(int(c) for c in np.asarray(choices)), float(np.exp(logp))

  def ppo_update(self, params, opt_state, choices, rewards, logp_old, baseline: float):
    """PPO epochs on one batch; returns (params, opt_state). Advantages are the rewards minus
    `baseline`, divided by the batch's reward spread (the scale of accuracies is arbitrary)."""
    rewards = np.asarray(rewards, np.float64)
    advantages = (rewards - baseline) / (rewards.std() + 1e-8)
    choices = jnp.asarray(np.asarray(choices, np.int32))
    logp_old = jnp.asarray(np.asarray(logp_old, np.float32))
    advantages = jnp.asarray(advantages, jnp.float32)
    for _ in range(self.config.epochs):
      params, opt_state = self._update(params, opt_state, choices, logp_old, advantages)
    return params, opt_state
