"""Training and evaluation: the paper's recipe on a device mesh, from one CPU to a TPU pod.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags. The state is
created already sharded (`jax.eval_shape`, then `jit(init, out_shardings=...)`), the train step
is one jitted function with the state donated, and the global batch is sharded over the mesh's
'data' axis, so BatchNorm statistics and gradients are reduced over all devices of all hosts.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import threading
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from clu import metric_writers, periodic_actions

from efficientnet_jax import (checkpointing, configs_lib, input_pipeline, optim, sharding, transfer,
                              xla_cpu)
from efficientnet_jax.models import create_model, get_variant

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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
  if config.dtype not in COMPUTE_DTYPES:
    raise ValueError(f'Unknown config.dtype {config.dtype!r}; valid: {", ".join(COMPUTE_DTYPES)}.')
  fields = configs_lib.model_fields(config)
  return create_model(
      config.model, num_classes=num_classes or config.num_classes,
      dtype=COMPUTE_DTYPES[config.dtype], width=fields['width'], depth=fields['depth'],
      dropout=fields['dropout'], drop_connect_rate=config.drop_connect_rate,
      stem_stride=config.stem_stride, bn_momentum=config.bn_momentum,
      bn_epsilon=config.bn_epsilon, bn_group_size=config.bn_group_size,
      conv_impl=config.conv_impl)


def normalize_images(images: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """uint8 -> float, normalised on the device with the variant's mean/std.

  Images cross the host-device boundary as uint8 (4x less traffic than float32).
  """
  spec = get_variant(config.model)
  mean = jnp.asarray(spec.mean_rgb, jnp.float32)
  std = jnp.asarray(spec.stddev_rgb, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(COMPUTE_DTYPES[config.dtype])


def compile_run_once(jitted, *args):
  """Compiles `jitted` for `args`, with cheap code generation on CPU, for a single call."""
  return jitted.lower(*args).compile(compiler_options=xla_cpu.run_once_options())


def dispose_in_background(holder: list) -> None:
  """Drops the objects in `holder` (emptying it) on a daemon thread.

  Deleting a tf.data iterator whose pipeline is autotuned waits for TensorFlow's autotuning
  thread to finish its current optimisation period, which grows to a minute over a run (seen
  with TF 2.21: 25-50 s at the end of 80-step CPU runs). The deletion releases the GIL, so it
  can happen off the caller's path; the caller must hold no other reference.
  """
  threading.Thread(target=holder.clear, name='dispose_tf_data_iterator', daemon=True).start()


def create_train_state(rng, *, model, tx, config) -> TrainState:
  size = configs_lib.model_fields(config)['resolution']
  variables = model.init(rng, jnp.zeros((1, size, size, 3), COMPUTE_DTYPES[config.dtype]))
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


def _all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is free of NaN and Inf."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx, schedule,
               config: ml_collections.ConfigDict, base_rng) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch (averaging `grad_accum_steps` micro-batches).

  A step whose loss, gradients or updated state are not finite leaves the state unchanged and
  reports `finite=False`; the loop then halts, so no NaN ever reaches the parameters or a
  checkpoint.
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
      logits, new_vars = model.apply(
          {'params': p, 'batch_stats': batch_stats}, normalize_images(images, config),
          train=not frozen, mutable=['batch_stats'], rngs={'dropout': key})
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.label_smoothing)
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
      return loss, (new_vars['batch_stats'], logits)
    (loss, (new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
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
  # norm does not hide it). One check per leaf of the state is then enough, and each check costs
  # compile time (they were a fifth of a small network's train step).
  finite = jnp.isfinite(loss) & _all_finite(new_state)
  # Keep the last good state on a non-finite step (the step counter too, so the error names it).
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {'loss': loss, 'top1': top1, 'learning_rate': schedule(state.step), 'finite': finite}
  return new_state, metrics


def eval_step(params, batch_stats, batch, *, model, config) -> dict[str, jax.Array]:
  """Sums of loss, top-1, top-5 and the example count over the real (mask=1) examples."""
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


def _data_shards(config) -> tuple[int, list[int]]:
  """How many contiguous data shards there are, and which ones this process reads."""
  processes = jax.process_count()
  shards = config.data_shards or processes
  if shards % processes:
    raise ValueError(
        f'config.data_shards={shards} must be a multiple of the {processes} processes, so that '
        'every process reads the same number of shards.')
  per_process = shards // processes
  first = jax.process_index() * per_process
  return shards, list(range(first, first + per_process))


def create_input(config, *, train: bool, global_batch_size: int) -> tf.data.Dataset:
  """This process's part of each global batch: its shards' batches, concatenated in order."""
  shards, mine = _data_shards(config)
  if global_batch_size % shards:
    raise ValueError(
        f'The global batch of {global_batch_size} must divide evenly among the {shards} data '
        'shards (one per process unless config.data_shards is set).')
  datasets = [input_pipeline.create_split(
      config, train=train, batch_size=global_batch_size // shards, process_index=s,
      process_count=shards) for s in mine]
  if len(datasets) == 1:
    return datasets[0]
  return tf.data.Dataset.zip(tuple(datasets)).map(
      lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})


def prefetch_to_mesh(iterator: Iterator[dict], mesh, size: int) -> Iterator[dict]:
  """Turns host batches into global device arrays `size` batches ahead of the consumer.

  Pass the source iterator itself (e.g. `dataset.as_numpy_iterator()`), no other reference to it:
  when this generator ends or is dropped, the source is deleted on a background thread
  (`dispose_in_background`), so a tf.data iterator's slow teardown never stalls the caller.
  """
  queue = collections.deque()
  source = [iterator]
  del iterator

  def enqueue(n):
    for batch in source[0]:
      queue.append(sharding.global_batch(batch, mesh))
      if len(queue) >= n:
        return

  try:
    enqueue(max(size, 1))
    while queue:
      yield queue.popleft()
      enqueue(max(size, 1))
  finally:
    dispose_in_background(source)


def evaluate(params, batch_stats, *, eval_fn, dataset, mesh) -> dict[str, float]:
  """Loss, top-1 and top-5 over every example of the eval split."""
  totals = None
  for batch in prefetch_to_mesh(dataset.as_numpy_iterator(), mesh, 2):
    sums = eval_fn(params, batch_stats, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('The eval split produced no batches; check config.eval_split.')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'num_examples': count}


def _check_config(config, mesh) -> None:
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  k = config.grad_accum_steps
  if k < 1 or config.batch_size % (mesh.devices.size * k):
    raise ValueError(
        f'config.grad_accum_steps={k} must split the batch of {config.batch_size} into micro-'
        f'batches that still divide over the {mesh.devices.size} devices: batch_size must be a '
        f'multiple of devices x grad_accum_steps = {mesh.devices.size * max(k, 1)}.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains and evaluates; resumes from `workdir` if it holds a checkpoint.

  Returns:
    (final TrainState, final eval metrics dict with keys like 'eval/top1', 'eval_ema/top1').
  """
  config = configs_lib.resolve(config, log=True)
  checkpointing.check_workdir_writable(workdir)
  mesh = sharding.create_mesh()
  _check_config(config, mesh)
  info = input_pipeline.get_dataset_info(config)
  if info.num_classes > config.num_classes:
    raise ValueError(
        f'{info.name!r} has {info.num_classes} classes but config.num_classes is '
        f'{config.num_classes}. Set --config.num_classes={info.num_classes}.')
  steps_per_epoch = info.num_train_examples / config.batch_size
  num_steps = optim.total_steps(config, steps_per_epoch)
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else max(1, int(math.ceil(steps_per_epoch))))
  logging.info('Dataset %s: %d train / %d eval examples, %d classes; %d steps of batch %d on '
               '%d devices (%d processes).', info.name, info.num_train_examples,
               info.num_eval_examples, info.num_classes, num_steps, config.batch_size,
               jax.device_count(), jax.process_count())

  model = build_model(config)
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch)
  tx = optim.create_optimizer(config, steps_per_epoch)
  init = functools.partial(create_train_state, model=model, tx=tx, config=config)
  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  abstract_state = jax.eval_shape(init, init_rng)
  logging.info('%s: %s trainable parameters at %d px.', config.model,
               f'{sum(x.size for x in jax.tree.leaves(abstract_state.params)):,}',
               config.resolution)
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp,
                                            config.fsdp_min_size)
  replicated = sharding.replicated(mesh)
  data_sharding = sharding.batch_sharding(mesh)

  abstract_sharded_state = checkpointing.abstract_with_shardings(abstract_state, state_sharding)
  p_train_step = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        base_rng=dropout_rng),
      in_shardings=(state_sharding, data_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  p_eval_step = jax.jit(
      functools.partial(eval_step, model=model, config=config),
      in_shardings=(state_sharding.params, state_sharding.batch_stats, data_sharding),
      out_shardings=replicated)
  # The train step compiles on a background thread from the state's and the batch's shapes while
  # the state is restored or initialised and the input pipelines start: on a CPU compiling is
  # most of a short run, on a pod restoring a large state from a bucket takes a while.
  train_ds = create_input(config, train=True, global_batch_size=config.batch_size)
  abstract_batch = {
      k: jax.ShapeDtypeStruct((config.batch_size, *spec.shape[1:]), spec.dtype.as_numpy_dtype,
                              sharding=data_sharding)
      for k, spec in train_ds.element_spec.items()}
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile_train_step')
  compiled_train_step = pool.submit(
      lambda: p_train_step.lower(abstract_sharded_state, abstract_batch).compile())
  pool.shutdown(wait=False)  # the compilation still finishes; nothing else is queued

  checkpointer = checkpointing.Checkpointer(workdir, config)
  state = checkpointer.restore_latest(abstract_sharded_state)
  if state is None:
    state = compile_run_once(jax.jit(init, out_shardings=state_sharding), init_rng)(init_rng)
    if config.get('init_from'):  # transfer learning; a resumed run has its own weights
      state = transfer.init_from_pretrained(state, config, tx=tx)
  elif config.get('init_from'):
    logging.info('Resuming from the workdir\'s checkpoint; config.init_from is not read.')
  start_step = int(state.step)
  logging.info('Starting at step %d of %d.', start_step, num_steps)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
  if config.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5,
                                          first_profile=start_step + 10))
  report = hooks[0]

  eval_ds = create_input(config, train=False, global_batch_size=config.eval_batch_size)

  def run_eval(step) -> dict[str, float]:
    results = {}
    with report.timed('eval'):
      if config.ema_decay > 0:
        ema = evaluate(state.ema_params, state.ema_batch_stats, eval_fn=p_eval_step,
                       dataset=eval_ds, mesh=mesh)
        results.update({f'eval_ema/{k}': v for k, v in ema.items()})
      if config.ema_decay <= 0 or config.eval_raw_weights:
        raw = evaluate(state.params, state.batch_stats, eval_fn=p_eval_step, dataset=eval_ds,
                       mesh=mesh)
        results.update({f'eval/{k}': v for k, v in raw.items()})
    writer.write_scalars(step, {k: v for k, v in results.items() if 'num_examples' not in k})
    logging.info('Eval at step %d: %s', step, results)
    return results

  eval_metrics: dict[str, float] = {}
  train_iter = prefetch_to_mesh(train_ds.as_numpy_iterator(), mesh, config.prefetch_batches)
  train_step_fn = compiled_train_step.result() if start_step < num_steps else None
  pending, window = None, []
  last_log_time, last_log_step = time.time(), start_step

  def check_finite(metrics, step):
    if not bool(metrics['finite']):
      checkpointer.wait_until_finished()
      good = checkpointer.latest_step()
      where = (f'the last good checkpoint is step {good} in {checkpointer.directory}'
               if good is not None else
               f'there is no checkpoint yet in {checkpointer.directory}, so a rerun starts over')
      raise FloatingPointError(
          f'Training stopped: the loss, gradients or updated weights became NaN/Inf at step '
          f'{step}. That update was not applied and no checkpoint was written from it; {where}. '
          'Lower --config.learning_rate, enable --config.grad_clip_norm, or check the data, '
          'then rerun with the same --workdir to resume from the last good checkpoint.')

  def settle(pending):
    """Halts on a non-finite step; otherwise queues its metrics for the next log line."""
    check_finite(*pending)
    window.append(pending[0])

  with metric_writers.ensure_flushes(writer):
    step = start_step
    while step < num_steps:
      state, metrics = train_step_fn(state, next(train_iter))
      # Check the previous step while this one runs, so the host never stalls the device.
      if pending is not None:
        settle(pending)
      pending = (metrics, step + 1)
      step += 1
      for hook in hooks:
        hook(step)
      last = step == num_steps
      log_now = last or step % config.log_every_steps == 0
      eval_now = last or step % eval_every == 0
      save_now = last or step % config.checkpoint_every_steps == 0
      if log_now or eval_now or save_now:
        # Nothing is logged, evaluated or saved past a step that has not been checked.
        settle(pending)
        pending = None
      if log_now:
        summary = jax.device_get(window)
        elapsed = time.time() - last_log_time
        writer.write_scalars(step, {
            'train/loss': float(np.mean([m['loss'] for m in summary])),
            'train/top1': float(np.mean([m['top1'] for m in summary])),
            'train/learning_rate': float(summary[-1]['learning_rate']),
            'train/images_per_second':
                (step - last_log_step) * config.batch_size / max(elapsed, 1e-9)})
        window.clear()
        last_log_time, last_log_step = time.time(), step
      if eval_now:
        eval_metrics = run_eval(step)
      if save_now:
        with report.timed('checkpoint'):
          checkpointer.save(step, state)
    if not eval_metrics:  # resumed at the end: evaluate what was restored
      eval_metrics = run_eval(step)
  checkpointer.close()
  return state, eval_metrics
