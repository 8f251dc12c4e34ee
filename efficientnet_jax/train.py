"""Training and evaluation: the paper's recipe on a device mesh, from one CPU to a TPU pod.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags. It reads top
to bottom: set up (config, mesh, data, model, shardings; the steps compile in the background),
restore or initialise the state, then the loop. The state is created already sharded
(`jax.eval_shape`, then `jit(init, out_shardings=...)`), the train step is one jitted function
with the state donated, and the global batch is sharded over the mesh's 'data' axis, so
BatchNorm statistics and gradients are reduced over all devices of all hosts.

Nothing is lost: the data a step reads is a pure function of (seed, step, batch size)
(`data/pipeline.py`), so a restart continues exactly; a preemption notice saves at the next step
boundary and stops (`preemption.py`); every exit waits for in-flight saves; a non-finite step is
never applied or saved.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh, NamedSharding

from efficientnet_jax import (checkpointing, compilation, configs_lib, errors, optim, preemption,
                              sharding, transfer, xla_cpu)
from efficientnet_jax.data import pipeline, prefetch, sources
from efficientnet_jax.models import create_model, get_variant

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict):
  """The activations' dtype: config.dtype, with 'auto' decided by this process's backend."""
  return COMPUTE_DTYPES[configs_lib.resolved_dtype(config.dtype)]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. EMA trees are None when EMA is off."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None
  ema_batch_stats: Any = None


def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None):
  """The model a config describes: `config.model` with the coefficients `configs_lib` resolves.

  Width, depth and dropout are the variant's own unless the config sets them, so a new variant
  (another phi, another alpha/beta/gamma) is a config, not a code change.
  """
  configs_lib.check_dtype(config.dtype)
  fields = configs_lib.model_fields(config)
  # A block table replaces the variant's (EfficientNet only); absent from older configs.
  blocks = {'blocks': config.blocks} if config.get('blocks') is not None else {}
  return create_model(
      config.model, num_classes=num_classes or config.num_classes,
      dtype=compute_dtype(config), width=fields['width'], depth=fields['depth'],
      dropout=fields['dropout'], drop_connect_rate=config.drop_connect_rate,
      stem_stride=config.stem_stride, bn_momentum=config.bn_momentum,
      bn_epsilon=config.bn_epsilon, bn_group_size=config.bn_group_size,
      conv_impl=config.conv_impl, remat=config.get('remat', False), **blocks)


def normalize_images(images: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """uint8 -> float, normalised on the device with the variant's mean/std.

  Images cross the host-device boundary as uint8 (4x less traffic than float32).
  """
  spec = get_variant(config.model)
  mean = jnp.asarray(spec.mean_rgb, jnp.float32)
  std = jnp.asarray(spec.stddev_rgb, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(compute_dtype(config))


def create_train_state(rng, *, model, tx, config) -> TrainState:
  size = configs_lib.model_fields(config)['resolution']
  variables = model.init(rng, jnp.zeros((1, size, size, 3), compute_dtype(config)))
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  ema = config.ema_decay > 0
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if ema else None)


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...

  Strided rather than contiguous so every micro-batch spans all devices of the data-sharded
  batch (contiguous blocks would each live on only 1/k of the devices).
  """
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def _all_finite(tree, *, one_reduction: bool = False) -> jax.Array:
  """True when every floating-point leaf of `tree` is free of NaN and Inf.

  `one_reduction`: one reduction over all leaves (per dtype) instead of one per leaf. For an
  unsharded state: a tiny B0's train step compiles ~1,100 fewer XLA:CPU kernels. Not for
  FSDP-sharded leaves, which the concatenation would gather.
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  if one_reduction:
    by_dtype = {}
    for x in leaves:
      by_dtype.setdefault(x.dtype, []).append(jnp.ravel(x))
    checks = [jnp.all(jnp.isfinite(jnp.concatenate(xs))) for xs in by_dtype.values()]
  else:
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves]
  return jnp.all(jnp.stack(checks))


def _computed_once(flag: jax.Array) -> jax.Array:
  """`flag`, materialised once for all its users.

  XLA:CPU fuses a cheap scalar producer into every consumer: the and-chain that `_all_finite`
  becomes was copied into each leaf's `where` below, quadratic in the number of leaves (112k
  ops, 263k lines of HLO and a 51 s compile for a tiny B0 with 335 state leaves; 3 s without).
  A conditional is not fused into its users (an optimization barrier is, as XLA:CPU strips it
  before fusion). CPU only: TPU programs fused the flag once either way, and a GPU conditional
  copies its predicate to the host, a sync every step.
  """
  return jax.lax.cond(flag, lambda: jnp.array(True), lambda: jnp.array(False))


def train_step(state: TrainState, first_bad_step: jax.Array, batch: dict[str, jax.Array], *,
               model, tx, schedule, config: ml_collections.ConfigDict,
               base_rng, for_xla_cpu: bool = False,
               one_finite_reduction: bool = False, gather_params=None,
               scatter_grads=None) -> tuple[TrainState, jax.Array, dict]:
  """One optimizer step on a global batch (averaging `grad_accum_steps` micro-batches).

  `first_bad_step` (int32, -1 while all is well) records on the device the first step whose
  loss or updated state is not finite. That step and every later one leave the state unchanged,
  so the loop can check the flag only at its log and save boundaries, without a per-step host
  sync, and still never apply or save a non-finite update. `for_xla_cpu`: the program is for
  XLA:CPU (see `_computed_once`). `one_finite_reduction`: check the state with one reduction
  (XLA:CPU compiles a kernel per leaf otherwise; only for an unsharded state).
  `gather_params` / `scatter_grads`: FSDP's all-gather of the parameters for the computation and
  reduce-scatter of the gradients (`sharding.fsdp_compute_constraints`).
  """
  rng = jax.random.fold_in(base_rng, state.step)
  num_classes = model.num_classes
  # A frozen backbone runs in inference mode: its BatchNorm normalises with, and keeps, the
  # loaded running statistics (batch statistics of a small new dataset would shift every frozen
  # layer's input), and no gradient flows into it. The head's dropout is then off too.
  frozen = config.get('freeze_backbone', False)

  def loss_and_grads(params, batch_stats, images, labels, key):
    def loss_fn(p):
      if frozen:
        p = optim.stop_backbone_gradient(p)
      if gather_params is not None:
        p = gather_params(p)
      logits, new_vars = model.apply(
          {'params': p, 'batch_stats': batch_stats}, normalize_images(images, config),
          train=not frozen, mutable=['batch_stats'], rngs={'dropout': key})
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.label_smoothing)
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
      return loss, (new_vars['batch_stats'], logits)
    (loss, (new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if scatter_grads is not None:
      grads = scatter_grads(grads)
    top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
    return grads, new_stats, loss, top1

  k = config.grad_accum_steps
  if k == 1:
    grads, new_stats, loss, top1 = loss_and_grads(
        state.params, state.batch_stats, batch['image'], batch['label'], rng)
  else:
    micro = jax.tree.map(lambda x: _micro_batches(x, k), batch)

    def accumulate(carry, inputs):
      grad_sum, stats, loss_sum, top1_sum, i = carry
      g, stats, loss, top1 = loss_and_grads(state.params, stats, inputs['image'],
                                            inputs['label'], jax.random.fold_in(rng, i))
      grad_sum = jax.tree.map(jnp.add, grad_sum, g)
      return (grad_sum, stats, loss_sum + loss, top1_sum + top1, i + 1), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, new_stats, loss, top1, _), _ = jax.lax.scan(
        accumulate, (zeros, state.batch_stats, 0.0, 0.0, 0), micro)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    loss, top1 = loss / k, top1 / k

  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_stats,
                            opt_state=new_opt_state)
  if config.ema_decay > 0:
    new_state = new_state.replace(
        ema_params=optim.update_ema(state.ema_params, new_params, state.step, config.ema_decay),
        ema_batch_stats=optim.update_ema(state.ema_batch_stats, new_stats, state.step,
                                         config.ema_decay))
  # The updated state is checked, not the gradients: an update can overflow (lr * g, coupled
  # weight decay, the RMSProp mean square g^2) even when the loss and gradients are finite, and a
  # non-finite gradient always reaches the new state (every optimizer folds g into its moments or,
  # without state, into the parameters; 0 * Inf is NaN, so a zero learning rate or a clipped
  # norm does not hide it). One check of the state is then enough; on XLA:CPU a check per leaf
  # was half the kernels of a small network's train step (`one_finite_reduction`).
  finite = jnp.isfinite(loss) & _all_finite(new_state, one_reduction=one_finite_reduction)
  if for_xla_cpu:
    finite = _computed_once(finite)
  good = finite & (first_bad_step < 0)
  # Keep the last good state from the first bad step on (the step counter too).
  new_state = jax.tree.map(lambda new, old: jnp.where(good, new, old), new_state, state)
  first_bad_step = jnp.where((first_bad_step < 0) & ~finite, state.step + 1, first_bad_step)
  metrics = {'loss': loss, 'top1': top1, 'learning_rate': schedule(state.step)}
  return new_state, first_bad_step, metrics


def eval_step(params, batch_stats, batch, *, model, config,
              gather_params=None) -> dict[str, jax.Array]:
  """Sums of loss, top-1, top-5 and the example count over the real (mask=1) examples."""
  if gather_params is not None:
    params = gather_params(params)
  logits = model.apply({'params': params, 'batch_stats': batch_stats},
                       normalize_images(batch['image'], config), train=False)
  logits = logits.astype(jnp.float32)
  labels, mask = batch['label'], batch['mask']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top1 = jnp.argmax(logits, -1) == labels
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  return {'loss': jnp.sum(loss * mask), 'top1': jnp.sum(top1 * mask),
          'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}


def evaluate(params, batch_stats, *, eval_fn, dataset, mesh) -> dict[str, float]:
  """Loss, top-1 and top-5 over every example of the eval split."""
  totals = None
  for batch in prefetch.prefetch_to_mesh(dataset.as_numpy_iterator(), mesh, 2):
    sums = eval_fn(params, batch_stats, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise errors.ConfigError('The eval split produced no batches; check config.eval_split.')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'num_examples': count}




def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Fails before anything starts, saying how to fix it, on values the run cannot use."""
  for name in ('batch_size', 'eval_batch_size', 'grad_accum_steps', 'log_every_steps',
               'checkpoint_every_steps', 'keep_checkpoints', 'prefetch_batches'):
    if not isinstance(config[name], int) or config[name] < 1:
      raise errors.ConfigError(f'config.{name}={config[name]!r} must be a whole number >= 1.')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise errors.ConfigError(
        f'config.num_train_steps={config.num_train_steps} and config.num_epochs='
        f'{config.num_epochs}: set one of them to a positive length.')
  if config.checkpoint_every_minutes < 0:
    raise errors.ConfigError(f'config.checkpoint_every_minutes={config.checkpoint_every_minutes} '
                             'must be >= 0 (0 disables time-based checkpoints).')
  configs_lib.check_dtype(config.dtype)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  pipeline.per_process_batch_size(config.batch_size)
  k = config.grad_accum_steps
  if config.batch_size % (mesh.devices.size * k):
    raise errors.ConfigError(
        f'config.grad_accum_steps={k} must split the batch of {config.batch_size} into micro-'
        f'batches that still divide over the {mesh.devices.size} devices: batch_size must be a '
        f'multiple of devices x grad_accum_steps = {mesh.devices.size * k}.')


def best_metric_of(config: ml_collections.ConfigDict) -> tuple[str | None, str]:
  """(eval metric that picks the best checkpoint, 'max' or 'min'); EMA off: its raw twin."""
  name = config.best_checkpoint_metric
  if not name:
    return None, 'max'
  if config.ema_decay <= 0 and name.startswith('eval_ema/'):
    name = 'eval/' + name[len('eval_ema/'):]
  return name, 'min' if name.endswith('loss') else 'max'


def _check_finite(first_bad_step, checkpointer) -> None:
  """Halts, naming the step, if a step's update was not finite (a sync with the devices)."""
  bad = int(jax.device_get(first_bad_step))
  if bad < 0:
    return
  checkpointer.wait_until_finished()
  good = checkpointer.latest_step()
  where = (f'the last good checkpoint is step {good} in {checkpointer.directory}'
           if good is not None else
           f'there is no checkpoint yet in {checkpointer.directory}, so a rerun starts over')
  raise FloatingPointError(
      f'Training stopped: the loss or the updated weights became NaN/Inf at step {bad}. That '
      f'update was not applied and no checkpoint was written from it; {where}. Lower '
      '--config.learning_rate, enable --config.grad_clip_norm, or check the data, then rerun '
      'with the same --workdir to resume from the last good checkpoint.')


def _write_pause(writer, step: int, what: str, began: float) -> float:
  """Records the seconds since `began` spent on `what` ('eval', 'checkpoint'); returns them."""
  seconds = time.time() - began
  writer.write_scalars(step, {f'time/{what}_seconds': seconds})
  return seconds


def _write_train_metrics(writer, step: int, window: list, elapsed: float, examples: int):
  """Train loss, top-1 and learning rate over the window; images/s of training time only."""
  summary = jax.device_get(window)
  writer.write_scalars(step, {
      'train/loss': float(np.mean([m['loss'] for m in summary])),
      'train/top1': float(np.mean([m['top1'] for m in summary])),
      'train/learning_rate': float(summary[-1]['learning_rate']),
      'train/images_per_second': examples / max(elapsed, 1e-9)})


@dataclasses.dataclass(frozen=True)
class Steps:
  """A config's model, optimiser and jitted steps on one mesh, with their shardings.

  `train_and_evaluate` runs these; the TPU dry run (`aot.py`) lowers and compiles the very same
  functions for a topology's devices.
  """
  model: Any
  tx: optax.GradientTransformation
  init: Any  # rng -> TrainState, unsharded
  init_rng: jax.Array
  abstract_state: TrainState  # jax.ShapeDtypeStructs carrying the state's shardings
  state_sharding: Any
  replicated: NamedSharding
  data_sharding: NamedSharding
  train_step: Any  # jitted (state, first_bad_step, batch) -> (state, first_bad_step, metrics)
  eval_step: Any  # jitted (params, batch_stats, batch) -> sums
  resolution: int

  def abstract_batch(self, batch_size: int, with_mask: bool) -> dict:
    size = self.resolution
    batch = {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8,
                                           sharding=self.data_sharding),
             'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.data_sharding)}
    if with_mask:
      batch['mask'] = jax.ShapeDtypeStruct((batch_size,), jnp.float32,
                                           sharding=self.data_sharding)
    return batch

  def lower_train(self, batch_size: int):
    flag = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
    return self.train_step.lower(self.abstract_state, flag,
                                 self.abstract_batch(batch_size, False))

  def lower_eval(self, batch_size: int):
    return self.eval_step.lower(self.abstract_state.params, self.abstract_state.batch_stats,
                                self.abstract_batch(batch_size, True))

  def initial_state(self) -> TrainState:
    """The freshly initialised state, created already sharded (never whole on one device)."""
    return compilation.compile_run_once(
        jax.jit(self.init, out_shardings=self.state_sharding), self.init_rng)(self.init_rng)


def build_steps(config: ml_collections.ConfigDict, mesh: Mesh, steps_per_epoch: float) -> Steps:
  """The jitted train and eval steps of a resolved `config` (`configs_lib.resolve`) on `mesh`."""
  model = build_model(config)
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch)
  tx = optim.create_optimizer(config, steps_per_epoch)
  init = functools.partial(create_train_state, model=model, tx=tx, config=config)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  abstract_state = jax.eval_shape(init, init_rng)
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp_min_size)
  replicated = sharding.replicated(mesh)
  data_sharding = sharding.batch_sharding(mesh)
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  gather, scatter = sharding.fsdp_compute_constraints(state_sharding.params, mesh)
  p_train_step = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        base_rng=dropout_rng, for_xla_cpu=on_cpu,
                        one_finite_reduction=on_cpu and all(
                            s.is_fully_replicated for s in jax.tree.leaves(state_sharding)),
                        gather_params=gather, scatter_grads=scatter),
      in_shardings=(state_sharding, replicated, data_sharding),
      out_shardings=(state_sharding, replicated, replicated), donate_argnums=(0, 1))
  p_eval_step = jax.jit(
      functools.partial(eval_step, model=model, config=config, gather_params=gather),
      in_shardings=(state_sharding.params, state_sharding.batch_stats, data_sharding),
      out_shardings=replicated)
  return Steps(model=model, tx=tx, init=init, init_rng=init_rng,
               abstract_state=checkpointing.abstract_with_shardings(abstract_state,
                                                                    state_sharding),
               state_sharding=state_sharding, replicated=replicated, data_sharding=data_sharding,
               train_step=p_train_step, eval_step=p_eval_step,
               resolution=configs_lib.model_fields(config)['resolution'])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains and evaluates; resumes from `workdir` if it holds a checkpoint.

  Returns:
    (final TrainState, final eval metrics dict with keys like 'eval/top1', 'eval_ema/top1').

  Raises:
    preemption.Preempted: a preemption notice arrived; the checkpoint at its step is saved.
    FloatingPointError: a step's update was not finite (it was not applied or saved).
    errors.UserError: a config value, the dataset or the workdir's checkpoint is unusable.
  """
  # --- Set up -----------------------------------------------------------------------------------
  config = configs_lib.resolve(config, log=True)
  mesh = sharding.create_mesh(fsdp_axis_size=config.fsdp_axis_size)
  check_config(config, mesh)
  checkpointing.check_workdir_writable(workdir)
  checkpointing.save_config(workdir, config)  # what `export --workdir` rebuilds the model from
  compilation.use_persistent_cache(config.compilation_cache, workdir)
  source = sources.open_source(config)
  info = sources.get_dataset_info(config, source=source)
  pipeline.check_num_classes(config, source)
  steps_per_epoch = info.num_train_examples / config.batch_size
  num_steps = optim.total_steps(config, steps_per_epoch)
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else max(1, int(np.ceil(steps_per_epoch))))
  logging.info('Dataset %s: %d train / %d eval examples, %d classes; %d steps of batch %d on '
               '%d devices (%d processes).', info.name, info.num_train_examples,
               info.num_eval_examples, info.num_classes, num_steps, config.batch_size,
               jax.device_count(), jax.process_count())

  steps = build_steps(config, mesh, steps_per_epoch)
  logging.info('%s: %s trainable parameters at %d px, %s activations%s.', config.model,
               f'{sum(x.size for x in jax.tree.leaves(steps.abstract_state.params)):,}',
               config.resolution, config.dtype, ', blocks rematerialised' if config.remat else '')
  summary = sharding.sharding_summary(steps.abstract_state, steps.state_sharding)
  logging.info('Mesh %s; the state is %.1f MiB, %.1f%% of its bytes sharded (FSDP groups of %d), '
               '%.1f MiB per device.', dict(mesh.shape), summary['total_bytes'] / 2**20,
               100 * summary['sharded_fraction'], config.fsdp_axis_size,
               summary['per_device_bytes'] / 2**20)
  options = xla_cpu.short_run_options() if config.get('cpu_fast_compile') else None
  compiled = compilation.compile_in_background([
      ('train', lambda: steps.lower_train(config.batch_size).compile(compiler_options=options)),
      ('eval', lambda: steps.lower_eval(config.eval_batch_size).compile(compiler_options=options)),
  ])
  best_metric, best_mode = best_metric_of(config)
  checkpointer = checkpointing.Checkpointer(workdir, config, best_metric=best_metric,
                                            best_mode=best_mode)
  try:
    # --- Restore or initialise --------------------------------------------------------------------
    state = checkpointer.restore_latest(steps.abstract_state)
    if state is None:
      state = steps.initial_state()
      if config.get('init_from'):  # transfer learning; a resumed run has its own weights
        state = transfer.init_from_pretrained(state, config, tx=steps.tx)
    elif config.get('init_from'):
      logging.info('Resuming from the workdir\'s checkpoint; config.init_from is not read.')
    start_step = int(state.step)
    logging.info('Starting at step %d of %d.', start_step, num_steps)
    state, eval_metrics = _train_loop(
        config, workdir, state, start_step=start_step, num_steps=num_steps,
        eval_every=eval_every, mesh=mesh, source=source, info=info, compiled=compiled,
        checkpointer=checkpointer, replicated=steps.replicated)
  finally:
    checkpointer.close()  # waits for in-flight saves, on every exit
  return state, eval_metrics


def _train_loop(config, workdir, state, *, start_step, num_steps, eval_every, mesh, source,
                info, compiled, checkpointer, replicated):
  """Steps from `start_step` to `num_steps`: log, save, evaluate at their boundaries."""
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  hooks = [report]
  if config.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5,
                                          first_profile=start_step + 10))
  eval_ds = pipeline.create_input(config, source, info, train=False,
                                  global_batch_size=config.eval_batch_size)

  def run_eval(step, state) -> dict[str, float]:
    eval_fn = compiled['eval'].result()
    results = {}
    with report.timed('eval'):
      if config.ema_decay > 0:
        ema = evaluate(state.ema_params, state.ema_batch_stats, eval_fn=eval_fn,
                       dataset=eval_ds, mesh=mesh)
        results.update({f'eval_ema/{k}': v for k, v in ema.items()})
      if config.ema_decay <= 0 or config.eval_raw_weights:
        raw = evaluate(state.params, state.batch_stats, eval_fn=eval_fn, dataset=eval_ds,
                       mesh=mesh)
        results.update({f'eval/{k}': v for k, v in raw.items()})
    writer.write_scalars(step, {k: v for k, v in results.items() if 'num_examples' not in k})
    logging.info('Eval at step %d: %s', step, results)
    return results

  eval_metrics: dict[str, float] = {}
  input_log = (prefetch.InputLog(workdir, config.batch_size) if config.log_input_ids else None)
  train_ds = pipeline.create_input(config, source, info, train=True,
                                   global_batch_size=config.batch_size, start_step=start_step)
  train_iter = prefetch.prefetch_to_mesh(train_ds.as_numpy_iterator(), mesh,
                                         config.prefetch_batches, on_batch=input_log)
  first_bad = jax.device_put(jnp.int32(-1), replicated)
  clock = preemption.SaveClock(config.checkpoint_every_minutes)
  window, last_log_time, last_log_step = [], time.time(), start_step
  paused = 0.0  # seconds spent saving and evaluating since the last log: not training time
  try:
    with metric_writers.ensure_flushes(writer), preemption.PreemptionWatch() as watch:
      step_fn = compiled['train'].result() if start_step < num_steps else None
      step = start_step
      while step < num_steps:
        state, first_bad, metrics = step_fn(state, first_bad, next(train_iter))
        step += 1
        window.append(metrics)
        for hook in hooks:
          hook(step)
        last = step == num_steps
        preempted = watch.reached(step)
        log_now = last or step % config.log_every_steps == 0
        eval_now = last or step % eval_every == 0
        save_now = last or preempted or step % config.checkpoint_every_steps == 0
        if log_now:  # the host syncs with the devices only at these boundaries
          _check_finite(first_bad, checkpointer)
          _write_train_metrics(writer, step, window, time.time() - last_log_time - paused,
                               (step - last_log_step) * config.batch_size)
          window.clear()
          last_log_time, last_log_step, paused = time.time(), step, 0.0
          save_now = save_now or clock.due()
        if save_now:  # saved before the step's evaluation, so a failing evaluation loses nothing
          _check_finite(first_bad, checkpointer)
          began = time.time()
          with report.timed('checkpoint'):
            checkpointer.save(step, state)
          clock.saved()
          paused += _write_pause(writer, step, 'checkpoint', began)
        if preempted:
          checkpointer.wait_until_finished()
          preemption.log_preempted(step, checkpointer.directory)
          raise preemption.Preempted(step, checkpointer.directory)
        if eval_now:
          _check_finite(first_bad, checkpointer)
          began = time.time()
          eval_metrics = run_eval(step, state)
          checkpointer.maybe_save_best(step, state, eval_metrics)
          paused += _write_pause(writer, step, 'eval', began)
      if not eval_metrics:  # resumed at the end: evaluate what was restored
        eval_metrics = run_eval(step, state)
  finally:
    if input_log is not None:
      input_log.close()
  return state, eval_metrics
