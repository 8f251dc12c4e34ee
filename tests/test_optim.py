"""Tests for efficientnet_jax.optim against hand-written TF1 formulas in numpy."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientnet_jax import optim
from support import load_config_module

_ROOT = pathlib.Path(__file__).resolve().parents[1]


_DEFAULT = load_config_module('default')


def get_config(**overrides):
  config = _DEFAULT.get_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def fake_params(rng):
  """A params tree shaped like EfficientNet's (names as in the model)."""
  r = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {
      'stem_conv': {'kernel': r(3, 3, 3, 8)},
      'stem_bn': {'scale': r(8), 'bias': r(8)},
      'block1a': {
          'depthwise_conv': {'kernel': r(3, 3, 1, 8)},
          'bn': {'scale': r(8), 'bias': r(8)},
          'se_reduce': {'kernel': r(1, 1, 8, 2), 'bias': r(2)},
          'se_expand': {'kernel': r(1, 1, 2, 8), 'bias': r(8)},
          'project_conv': {'kernel': r(1, 1, 8, 4)},
          'project_bn': {'scale': r(4), 'bias': r(4)},
      },
      'top_conv': {'kernel': r(1, 1, 4, 16)},
      'top_bn': {'scale': r(16), 'bias': r(16)},
      'predictions': {'kernel': r(16, 10), 'bias': r(10)},
  }


def _is_bn_path(path):
  return any(k in ('stem_bn', 'bn', 'project_bn', 'top_bn') for k in path)


def _flat(tree):
  return {tuple(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------
# Reference schedule: a numpy transcription of the official utils.build_learning_rate.
# ------------------------------------------------------------------------------------------


def tf_reference_lr(step, peak, steps_per_epoch, warmup_epochs=5.0, decay_epochs=2.4, rate=0.97,
                    staircase=True):
  warmup_steps = int(warmup_epochs * steps_per_epoch)
  if step < warmup_steps:
    return peak * step / warmup_steps
  p = step / (steps_per_epoch * decay_epochs)
  if staircase:
    p = math.floor(p)
  return peak * rate**p


# ------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------


def test_peak_learning_rate_scales_with_batch():
  config = get_config(lr_schedule='constant', warmup_epochs=0.0)
  assert config.batch_size == 4096
  sched = optim.create_learning_rate_schedule(config, steps_per_epoch=100)
  np.testing.assert_allclose(sched(0), 0.256, rtol=1e-6)
  np.testing.assert_allclose(sched(12345), 0.256, rtol=1e-6)


def test_exponential_staircase_schedule_matches_tf():
  config = get_config()  # batch 4096 -> peak 0.256, warmup 5, x0.97 every 2.4 epochs.
  spe = 100  # warmup_steps = 500, decay_steps = 240.
  sched = jax.jit(optim.create_learning_rate_schedule(config, spe))
  peak = 0.256
  expected = {
      0: 0.0,                       # warmup start
      250: peak * 0.5,              # warmup middle
      499: peak * 499 / 500,        # last warmup step
      500: peak * 0.97**2,          # decay counted from step 0: floor(500/240) = 2 already
      719: peak * 0.97**2,          # just before a staircase boundary
      720: peak * 0.97**3,          # exactly on it
      721: peak * 0.97**3,
      959: peak * 0.97**3,
      960: peak * 0.97**4,
      35_000: peak * 0.97**145,
  }
  for step, want in expected.items():
    np.testing.assert_allclose(sched(step), want, rtol=1e-5, atol=1e-9, err_msg=f'step {step}')
    np.testing.assert_allclose(tf_reference_lr(step, peak, spe), want, rtol=1e-9, atol=1e-12)


def test_exponential_schedule_with_fractional_steps_per_epoch():
  # The official code uses steps_per_epoch = num_train_images / batch (a float) and a float
  # decay_steps; the schedule must agree step by step.
  config = get_config()
  spe = 1281167 / 4096
  sched = jax.jit(jax.vmap(optim.create_learning_rate_schedule(config, spe)))
  steps = np.concatenate([np.arange(0, 3000), np.arange(100_000, 100_050)])
  got = np.asarray(sched(jnp.asarray(steps)))
  want = np.array([tf_reference_lr(int(s), 0.256, spe) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_exponential_schedule_continuous():
  config = get_config(lr_staircase=False)
  sched = optim.create_learning_rate_schedule(config, 100)
  for step in (500, 600, 721, 5000):
    np.testing.assert_allclose(sched(step), 0.256 * 0.97**(step / 240), rtol=1e-5)


def test_cosine_schedule():
  config = get_config(lr_schedule='cosine', num_train_steps=1500)
  sched = optim.create_learning_rate_schedule(config, 100)  # warmup 500, cosine over 1000.
  np.testing.assert_allclose(sched(250), 0.128, rtol=1e-6)
  np.testing.assert_allclose(sched(500), 0.256, rtol=1e-6)
  np.testing.assert_allclose(sched(1000), 0.128, rtol=1e-5)
  np.testing.assert_allclose(sched(750), 0.128 * (1 + math.cos(math.pi / 4)), rtol=1e-5)
  np.testing.assert_allclose(sched(1500), 0.0, atol=1e-7)
  np.testing.assert_allclose(sched(2000), 0.0, atol=1e-7)
  # Without num_train_steps the length comes from num_epochs.
  config = get_config(lr_schedule='cosine', num_epochs=10.0, warmup_epochs=0.0)
  sched = optim.create_learning_rate_schedule(config, 100)
  np.testing.assert_allclose(sched(500), 0.128, rtol=1e-5)


def test_unknown_schedule_raises():
  match = "Unknown lr_schedule 'linear'.*exponential, cosine, constant"
  with pytest.raises(ValueError, match=match):
    optim.create_learning_rate_schedule(get_config(lr_schedule='linear'), 100)


# ------------------------------------------------------------------------------------------
# Weight-decay mask
# ------------------------------------------------------------------------------------------


def test_weight_decay_mask_matches_official_selection():
  params = fake_params(np.random.default_rng(0))
  mask = _flat(optim.weight_decay_mask(params))
  assert jax.tree.structure(optim.weight_decay_mask(params)) == jax.tree.structure(params)
  for path, decayed in mask.items():
    # Official: every trainable variable except BatchNorm's (SE and classifier biases included).
    assert bool(decayed) == (not _is_bn_path(path)), path
  assert mask[('block1a', 'se_reduce', 'bias')]
  assert mask[('predictions', 'bias')]
  assert not mask[('stem_bn', 'scale')]
  assert not mask[('block1a', 'bn', 'bias')]


def test_weight_decay_mask_name_variants():
  x = np.zeros(3, np.float32)
  params = {
      'BatchNorm_0': {'scale': x, 'bias': x},
      'bn0': {'scale': x},
      'tpu_batch_normalization': {'gamma': x},
      'subnet': {'Dense_0': {'kernel': x, 'bias': x}},
      'Conv_0': {'kernel': x},
      'counter': np.zeros((), np.int32),
  }
  mask = _flat(optim.weight_decay_mask(params))
  assert not mask[('BatchNorm_0', 'scale')] and not mask[('BatchNorm_0', 'bias')]
  assert not mask[('bn0', 'scale')]
  assert not mask[('tpu_batch_normalization', 'gamma')]
  assert mask[('subnet', 'Dense_0', 'kernel')] and mask[('subnet', 'Dense_0', 'bias')]
  assert mask[('Conv_0', 'kernel')]
  assert not mask[('counter',)]


# ------------------------------------------------------------------------------------------
# Optimizers against numpy references
# ------------------------------------------------------------------------------------------


def _run(tx, params, grads_seq):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_seq:
    params, state = step(params, state, grads)
  return params


def _random_grads(rng, params, n):
  return [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
          for _ in range(n)]


def test_rmsprop_matches_tf1_with_weight_decay():
  # Short warmup so the rate changes from step to step, and a large decay so its effect shows.
  config = get_config(weight_decay=1e-2, warmup_epochs=1.0)
  spe = 4  # warmup_steps = 4, decay_steps = 9.6
  rng = np.random.default_rng(1)
  params = fake_params(rng)
  n_steps = 7
  grads_seq = _random_grads(rng, params, n_steps)
  got = _flat(_run(optim.create_optimizer(config, spe), params, grads_seq))

  rho, momentum, eps, wd = 0.9, 0.9, 1e-3, 1e-2
  w = {k: v.astype(np.float64) for k, v in _flat(params).items()}
  ms = {k: np.ones_like(v) for k, v in w.items()}
  mom = {k: np.zeros_like(v) for k, v in w.items()}
  for t, grads in enumerate(grads_seq):
    lr = tf_reference_lr(t, 0.256, spe, warmup_epochs=1.0)
    for k, g in _flat(grads).items():
      g = g.astype(np.float64)
      if not _is_bn_path(k):
        g = g + wd * w[k]  # d/dw of wd * 1/2 ||w||^2, the official loss term.
      ms[k] = rho * ms[k] + (1 - rho) * g * g
      mom[k] = momentum * mom[k] + lr * g / np.sqrt(ms[k] + eps)
      w[k] = w[k] - mom[k]
  for k in w:
    np.testing.assert_allclose(got[k], w[k], rtol=2e-5, atol=2e-6, err_msg=str(k))
  # Decay really matters here: a run without it differs on kernels only.
  no_wd = _flat(_run(optim.create_optimizer(get_config(weight_decay=0.0, warmup_epochs=1.0), spe),
                     params, grads_seq))
  assert not np.allclose(no_wd[('stem_conv', 'kernel')], got[('stem_conv', 'kernel')], atol=1e-6)
  np.testing.assert_allclose(no_wd[('stem_bn', 'scale')], got[('stem_bn', 'scale')], rtol=1e-6)


def test_sgd_nesterov_matches_tf_momentum():
  config = get_config(optimizer='sgd', lr_schedule='constant', warmup_epochs=0.0,
                      learning_rate=0.1, lr_batch_size=4096, weight_decay=1e-3)
  rng = np.random.default_rng(2)
  params = fake_params(rng)
  grads_seq = _random_grads(rng, params, 4)
  got = _flat(_run(optim.create_optimizer(config, 10), params, grads_seq))
  w = {k: v.astype(np.float64) for k, v in _flat(params).items()}
  accum = {k: np.zeros_like(v) for k, v in w.items()}
  for grads in grads_seq:
    for k, g in _flat(grads).items():
      g = g + (0 if _is_bn_path(k) else 1e-3 * w[k])
      # tf.train.MomentumOptimizer(use_nesterov=True).
      accum[k] = 0.9 * accum[k] + g
      w[k] = w[k] - 0.1 * (g + 0.9 * accum[k])
  for k in w:
    np.testing.assert_allclose(got[k], w[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_adamw_decoupled_decay_on_mask():
  lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
  config = get_config(optimizer='adamw', lr_schedule='constant', warmup_epochs=0.0,
                      learning_rate=lr, lr_batch_size=4096, weight_decay=wd)
  rng = np.random.default_rng(3)
  params = fake_params(rng)
  grads_seq = _random_grads(rng, params, 3)
  got = _flat(_run(optim.create_optimizer(config, 10), params, grads_seq))
  w = {k: v.astype(np.float64) for k, v in _flat(params).items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  v = {k: np.zeros_like(v) for k, v in w.items()}
  for t, grads in enumerate(grads_seq, start=1):
    for k, g in _flat(grads).items():
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      update = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
      if not _is_bn_path(k):
        update = update + wd * w[k]  # decoupled: not seen by the moments
      w[k] = w[k] - lr * update
  for k in w:
    np.testing.assert_allclose(got[k], w[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_grad_clipping():
  config = get_config(optimizer='sgd', lr_schedule='constant', warmup_epochs=0.0, momentum=0.0,
                      learning_rate=1.0, lr_batch_size=4096, weight_decay=0.0, grad_clip_norm=1.0)
  params = {'dense': {'kernel': jnp.zeros(4)}}
  grads = {'dense': {'kernel': jnp.full(4, 10.0)}}  # norm 20 -> clipped to 1
  new = _run(optim.create_optimizer(config, 10), params, [grads])
  np.testing.assert_allclose(new['dense']['kernel'], -0.5 * np.ones(4), rtol=1e-6)


def test_unknown_optimizer_raises():
  with pytest.raises(ValueError, match="Unknown optimizer 'lamb'.*rmsprop, sgd, adamw"):
    optim.create_optimizer(get_config(optimizer='lamb'), 100)


# ------------------------------------------------------------------------------------------
# Gradient accumulation
# ------------------------------------------------------------------------------------------




# ------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------


def test_ema_decay_schedule():
  np.testing.assert_allclose(optim.ema_decay_schedule(0, 0.9999), 0.1, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay_schedule(10, 0.9999), 0.55, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay_schedule(1_000_000, 0.9999), 0.9999, rtol=1e-7)
  np.testing.assert_allclose(optim.ema_decay_schedule(5, 0.0), 0.0)


def test_update_ema_formula_and_jit():
  rng = np.random.default_rng(5)
  ema = {'params': {'kernel': rng.normal(size=(3, 4)).astype(np.float32)},
         'batch_stats': {'bn': {'mean': rng.normal(size=4).astype(np.float32)}}}
  new = jax.tree.map(lambda a: a + 1.0, ema)
  update = jax.jit(optim.update_ema)
  for step, decay in ((0, 0.1), (10, 0.55), (1_000_000, 0.9999)):
    out = update(ema, new, jnp.asarray(step, jnp.int32), 0.9999)
    jax.tree.map(lambda o, e, n: np.testing.assert_allclose(o, decay * e + (1 - decay) * n,
                                                           rtol=1e-6), out, ema, new)
    jax.tree.map(lambda o, e: (o.dtype == e.dtype) or pytest.fail('dtype changed'), out, ema)
  # max_decay = 0 disables the average.
  out = optim.update_ema(ema, new, 100, 0.0)
  jax.tree.map(np.testing.assert_allclose, out, new)
