"""Learning-rate schedule, optimizer and weight EMA for the EfficientNet recipe.

Everything here follows the official TensorFlow implementation
(tensorflow/tpu, models/official/efficientnet: `utils.build_learning_rate`,
`utils.build_optimizer` and the `model_fn` in `main.py`), expressed with optax pieces:

* Learning rate: `learning_rate * batch_size / lr_batch_size`, linear warmup from 0, then an
  exponential staircase (x0.97 every 2.4 epochs), cosine or constant schedule.
* RMSProp in the TF1 form (epsilon inside the square root, mean-square accumulator starting at
  1.0, momentum applied to the already learning-rate-scaled step).
* L2 weight decay `weight_decay * 1/2 ||w||^2` on every non-BatchNorm parameter. The official
  code adds it to the loss; adding `weight_decay * w` to the gradient before the optimizer is the
  same thing and keeps the loss function free of optimizer concerns.
* EMA of parameters and BatchNorm statistics with decay `min(max_decay, (1+t)/(10+t))`, as
  `tf.train.ExponentialMovingAverage(decay, num_updates=global_step)` computes it.

All step counts are *optimizer* steps (one parameter update each). With gradient accumulation,
`steps_per_epoch` must therefore be `num_train_examples // config.batch_size`, the number of
updates per epoch, not the number of micro-batches.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from efficientnet_jax.models import naming

VALID_SCHEDULES = ('exponential', 'cosine', 'constant')
VALID_OPTIMIZERS = ('rmsprop', 'sgd', 'adamw')


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  steps_per_epoch: float) -> optax.Schedule:
  """Returns the learning rate as a function of the optimizer step.

  The peak rate is `config.learning_rate * config.batch_size / config.lr_batch_size` (0.256 for
  the paper's batch of 4096). For the first `int(config.warmup_epochs * steps_per_epoch)` steps
  the rate rises linearly from 0 (`peak * step / warmup_steps`); afterwards `config.lr_schedule`
  applies:

  * 'exponential': `peak * lr_decay_rate ** (step / decay_steps)` with
    `decay_steps = steps_per_epoch * lr_decay_epochs`, the exponent floored when
    `config.lr_staircase`. As in the official code the exponent is counted from step 0, not from
    the end of warmup: right after the default 5 warmup epochs the rate is already
    `peak * 0.97 ** floor(5 / 2.4) = peak * 0.97**2`.
  * 'cosine': half-cosine from `peak` at the end of warmup down to 0 at the last training step
    (`config.num_train_steps` if > 0, else `config.num_epochs * steps_per_epoch`).
  * 'constant': `peak`.

  Args:
    config: the experiment config (see configs/default.py).
    steps_per_epoch: optimizer updates per epoch (`num_train_examples / config.batch_size`).
      A float is accepted, as the official code uses the exact ratio.

  Returns:
    An optax schedule: `step (int, may be traced) -> float32 learning rate`.

  Raises:
    ValueError: for an unknown `config.lr_schedule` or non-positive sizes.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}.')
  if config.lr_batch_size <= 0:
    raise ValueError(f'config.lr_batch_size must be positive, got {config.lr_batch_size}.')
  name = config.lr_schedule
  if name not in VALID_SCHEDULES:
    raise ValueError(
        f'Unknown lr_schedule {name!r}. Valid schedules: {", ".join(VALID_SCHEDULES)}.')

  # Linear scaling rule: the base rate refers to `lr_batch_size` examples per step.
  peak = config.learning_rate * config.batch_size / config.lr_batch_size
  # `int(...)` truncation is what the official build_learning_rate does.
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)

  if name == 'exponential':
    # Deliberately not rounded to an integer: the official code passes the float
    # `steps_per_epoch * decay_epochs` to tf.train.exponential_decay.
    decay_steps = steps_per_epoch * config.lr_decay_epochs
    if decay_steps <= 0:
      raise ValueError(f'lr_decay_epochs must be positive, got {config.lr_decay_epochs}.')
    decay_rate = config.lr_decay_rate
    staircase = bool(config.lr_staircase)

    def after_warmup(step):
      # The official TF code: tf.train.exponential_decay(peak, global_step, decay_steps, rate,
      # staircase=True) evaluated on the *global* step, with warmup simply overriding the value
      # while global_step < warmup_steps. So the decay clock starts at step 0, not at the end of
      # warmup; we keep that so published hyperparameters reproduce the published curve.
      exponent = step / decay_steps
      if staircase:
        exponent = jnp.floor(exponent)
      return peak * jnp.power(decay_rate, exponent)

  elif name == 'cosine':
    num_steps = total_steps(config, steps_per_epoch)
    # Cosine over the steps left after warmup, so the curve is continuous at the end of warmup
    # and reaches exactly 0 at the last step. (The official code instead evaluates
    # 0.5 * peak * (1 + cos(pi * step / total)) from step 0, which starts the cosine slightly
    # below peak after warmup; the difference is negligible for long runs.)
    decay_steps = max(num_steps - warmup_steps, 1)

    def after_warmup(step):
      progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
      return 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))

  else:  # constant

    def after_warmup(step):
      return jnp.full_like(step, peak)

  def schedule(step):
    step = jnp.asarray(step).astype(jnp.float32)
    lr = after_warmup(step)
    if warmup_steps > 0:
      lr = jnp.where(step < warmup_steps, peak * step / warmup_steps, lr)
    return lr.astype(jnp.float32)

  return schedule


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: float) -> int:
  """Optimizer steps in the whole run: `num_train_steps` if set, else whole epochs rounded up."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch))


# --------------------------------------------------------------------------------------------
# Weight-decay mask
# --------------------------------------------------------------------------------------------

# A module is treated as a normalisation layer when one of the lower-case alphabetic tokens of its
# name is 'bn', 'normalization' or ends in 'norm'. Tokenising (rather than a substring test)
# keeps names like 'subnet' from matching 'bn' while catching 'stem_bn', 'bn0', 'project_bn',
# Flax's default 'BatchNorm_0' and TF's 'tpu_batch_normalization'.
_TOKEN_SPLIT = re.compile(r'[^a-z]+')


def _is_norm_module(name: str) -> bool:
  tokens = [t for t in _TOKEN_SPLIT.split(name.lower()) if t]
  return any(t == 'bn' or t == 'normalization' or t.endswith('norm') for t in tokens)


def weight_decay_mask(params: Any) -> Any:
  """Returns a pytree of bools, True for the parameters that get weight decay.

  Matches the official code, which adds `weight_decay * tf.nn.l2_loss(v)` for every trainable
  variable whose name does not contain 'batch_normalization'. So conv and dense kernels are
  decayed, *and so are the biases* of the squeeze-excitation convs and of the classifier; only
  BatchNorm's scale (gamma) and bias (beta) are exempt.

  A leaf is a BatchNorm parameter when any module on its path (every path entry but the leaf
  name itself) is a normalisation module by name, e.g. 'stem_bn', 'expand_bn', 'bn',
  'project_bn', 'top_bn', 'BatchNorm_0' (see `_is_norm_module`). Non-floating leaves are never
  decayed. Works on nested dicts, FrozenDicts and boxed (e.g. `nn.Partitioned`) parameters.
  """

  def decay(path, leaf) -> bool:
    names = naming.key_names(path)
    # Boxed metadata (nn.Partitioned) adds a trailing 'value' attribute; it is not a module.
    modules = names[:-1]
    if any(_is_norm_module(m) for m in modules):
      return False
    dtype = getattr(leaf, 'dtype', None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)

  return jax.tree_util.tree_map_with_path(decay, params)


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: float) -> optax.GradientTransformation:
  """Builds the optimizer of `config.optimizer` with the recipe's schedule and weight decay.

  The chain, in order:
    1. `clip_by_global_norm(config.grad_clip_norm)` when > 0, on the raw loss gradient (the
       official recipe has no clipping; clipping before the decay term keeps the threshold about
       the data gradient alone).
    2. Coupled L2 decay for 'rmsprop' and 'sgd': `add_decayed_weights(weight_decay,
       weight_decay_mask)` adds `wd * w`, the gradient of `wd * 1/2 ||w||^2`, so the decay goes
       through RMSProp's preconditioning exactly as it did in TF, where it was part of the loss.
    3. The optimizer:
       * 'rmsprop': TF1 RMSProp, `ms = rho*ms + (1-rho)*g^2` with `ms` initialised to 1.0,
         `mom = momentum*mom + lr*g/sqrt(ms + eps)`, `w -= mom`. optax.rmsprop with
         `initial_scale=1.0, eps_in_sqrt=True` scales by the rate *before* its momentum trace,
         which is exactly that form (a changing rate only affects new contributions).
       * 'sgd': Nesterov momentum (`config.momentum`), same update as TF's MomentumOptimizer
         with use_nesterov=True.
       * 'adamw': optax.adamw with b1=`config.momentum`, b2=`config.adam_b2` and decoupled
         decay `config.weight_decay` on the same mask. optax multiplies the decay by the
         learning rate (`w -= lr * (adam_step + wd * w)`), so typical values are ~0.05, not the
         RMSProp recipe's 1e-5.
    4. Transfer learning (`_for_transfer_learning`): `config.freeze_backbone` updates only the
       classifier head; `config.backbone_learning_rate_multiplier` scales the backbone's updates.
  Gradient accumulation (`config.grad_accum_steps`) is not an optimizer wrapper here: the train
  step averages the micro-batch gradients itself, so one `update` is one optimizer step.

  Args:
    config: the experiment config (see configs/default.py).
    steps_per_epoch: optimizer updates per epoch (`num_train_examples / config.batch_size`).

  Returns:
    An optax GradientTransformation.

  Raises:
    ValueError: for an unknown `config.optimizer` or `config.lr_schedule`.
  """
  name = config.optimizer
  if name not in VALID_OPTIMIZERS:
    raise ValueError(
        f'Unknown optimizer {name!r}. Valid optimizers: {", ".join(VALID_OPTIMIZERS)}.')
  schedule = create_learning_rate_schedule(config, steps_per_epoch)
  momentum = config.momentum if config.momentum > 0 else None

  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))

  if name == 'adamw':
    parts.append(
        optax.adamw(
            schedule,
            b1=config.momentum,
            b2=config.adam_b2,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask))
  else:
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
    if name == 'rmsprop':
      parts.append(
          optax.rmsprop(
              schedule,
              decay=config.rmsprop_decay,
              eps=config.rmsprop_epsilon,
              initial_scale=1.0,  # TF1 initialises the mean square to ones, not zeros.
              eps_in_sqrt=True,  # TF1: 1/sqrt(ms + eps), not 1/(sqrt(ms) + eps).
              momentum=momentum))
    else:  # sgd
      parts.append(optax.sgd(schedule, momentum=momentum, nesterov=momentum is not None))

  tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
  return _for_transfer_learning(tx, config)


# --------------------------------------------------------------------------------------------
# Transfer learning: the classifier head and the backbone
# --------------------------------------------------------------------------------------------

# The classifier: the only parameters a pretrained backbone does not provide for a new task.
HEAD_MODULE = 'predictions'


def head_mask(params: Any) -> Any:
  """A pytree of bools: True for the classifier head's parameters (`params['predictions']`)."""
  return {name: jax.tree.map(lambda _, head=(name == HEAD_MODULE): head, subtree)
          for name, subtree in params.items()}


def backbone_mask(params: Any) -> Any:
  """A pytree of bools: True for every parameter except the classifier head's."""
  return jax.tree.map(lambda head: not head, head_mask(params))


def stop_backbone_gradient(params: Any) -> Any:
  """`params` with the backbone behind `lax.stop_gradient`, for a frozen-backbone step.

  Its gradients are then symbolic zeros, so autodiff never runs the backward pass through the
  backbone: a linear probe costs about one forward pass per step.
  """
  return {name: subtree if name == HEAD_MODULE else jax.lax.stop_gradient(subtree)
          for name, subtree in params.items()}


def _for_transfer_learning(tx: optax.GradientTransformation,
                           config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Applies `config.freeze_backbone` and `config.backbone_learning_rate_multiplier`.

  * freeze_backbone: only the head gets `tx`'s updates; the backbone's are zero and it keeps no
    optimizer state (no RMSProp/Adam moments for millions of frozen weights).
  * backbone_learning_rate_multiplier m != 1: the backbone's updates are scaled by m. Every
    optimizer here produces updates linear in the learning rate (RMSProp's and SGD's momentum
    accumulate lr-scaled steps; AdamW's decoupled decay is multiplied by the rate too), so this
    is exactly a backbone learning rate of m times the schedule, warmup and decay included.
  """
  if config.get('freeze_backbone', False):
    labels = lambda params: jax.tree.map(lambda head: 'head' if head else 'backbone',
                                         head_mask(params))
    # optax.multi_transform is called optax.partition in newer optax; both names work.
    return optax.multi_transform({'head': tx, 'backbone': optax.set_to_zero()}, labels)
  multiplier = config.get('backbone_learning_rate_multiplier', 1.0)
  if multiplier < 0:
    raise ValueError(f'config.backbone_learning_rate_multiplier must be >= 0, got {multiplier}.')
  if multiplier != 1.0:
    return optax.chain(tx, optax.masked(optax.scale(multiplier), backbone_mask))
  return tx


# --------------------------------------------------------------------------------------------
# Exponential moving average of the weights
# --------------------------------------------------------------------------------------------


def ema_decay_schedule(step, max_decay):
  """Returns `min(max_decay, (1 + step) / (10 + step))`, the EMA decay at `step`.

  This is `tf.train.ExponentialMovingAverage(max_decay, num_updates=step)`'s ramp: early on the
  average follows the fast-moving weights closely (0.1 at step 0, 0.55 at step 10) instead of
  being dominated by the random initialisation. `step` may be a traced integer.
  """
  step = jnp.asarray(step).astype(jnp.float32)
  return jnp.minimum(jnp.asarray(max_decay, jnp.float32), (1.0 + step) / (10.0 + step))


def update_ema(ema_tree: Any, new_tree: Any, step, max_decay) -> Any:
  """Returns `decay * ema + (1 - decay) * new` leaf-wise, with `decay = ema_decay_schedule`.

  A pure, jit-friendly function; the trainer applies it to both the parameters and the
  BatchNorm statistics after each optimizer update (TF's `ema.apply(ema_vars)` ran after the
  train op on the trainable variables and the moving mean/variance). With `max_decay=0` it
  returns `new_tree`, i.e. EMA disabled. Leaves keep their dtype.
  """
  decay = ema_decay_schedule(step, max_decay)

  def mix(ema, new):
    d = decay.astype(ema.dtype)
    return d * ema + (1 - d) * new.astype(ema.dtype)

  return jax.tree.map(mix, ema_tree, new_tree)
