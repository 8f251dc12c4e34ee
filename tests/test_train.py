"""End-to-end tests of `train.train_and_evaluate` on 8 fake CPU devices under TFDS mock data.

The machine these run on has two shared CPU cores, so every run is tiny: EfficientNet-B0 with
width and depth 0.25 (one block per stage, the fewest the block table allows) at 32 px, a batch of
16 and a handful of steps. XLA compilation dominates the time, so one training run (a module
fixture) is shared by every test that only reads its results, and a per-module persistent
compilation cache lets restarts of the same run reuse its executables.

Learnable setup: `tfds.testing.mock_data` draws random images and random labels, but it draws the
same `num_examples` examples every epoch. With 16 examples and a batch of 16, no augmentation,
no crop and no flips, every step sees the same 16 images (in a different order, to which the loss
is invariant), so an honest optimiser must drive the training loss down by memorising them.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from efficientnet_jax import checkpointing, errors, optim, sharding, train
from efficientnet_jax.data import prefetch, sources
from efficientnet_jax.models import B0_BLOCKS, create_model
from support import event_files, load_config_module, read_scalars

# One worker runs this module (pytest -n 2 --dist loadgroup), so the module's `trained` run is
# built once, not once per worker.
pytestmark = pytest.mark.xdist_group('train')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 16
TRAIN_TAGS = ('train/loss', 'train/top1', 'train/learning_rate', 'train/images_per_second')
EVAL_TAGS = ('eval/loss', 'eval/top1', 'eval/top5', 'eval_ema/top1', 'eval_ema/top5')


default = load_config_module('default')


def tiny_config(**overrides):
  """configs/default.py:smoke shrunk further, with a recipe that memorises 16 examples fast."""
  config = default.get_config('smoke')
  config.resolution = 32
  config.width = 0.25
  config.depth = 0.25
  config.dropout = 0.0
  config.drop_connect_rate = 0.0
  config.train_crop = 'none'
  config.random_flip = False
  config.augment = 'none'
  config.optimizer = 'adamw'
  config.learning_rate = 1e-2
  config.lr_batch_size = 16
  config.lr_schedule = 'constant'
  config.warmup_epochs = 0.0
  config.weight_decay = 0.0
  config.ema_decay = 0.9
  config.num_train_steps = 6
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.log_every_steps = 1
  config.conv_impl = 'xla'  # compiles faster than the CPU path; these tests are about the loop
  # Shard the larger arrays over FSDP groups of 4 of the 8 devices (the B7 config trains with
  # FSDP), so restoring on another device count really re-shards.
  config.fsdp_axis_size = 4
  config.fsdp_min_size = 1024
  for key, value in overrides.items():
    setattr(config, key, value)  # locked: a typo raises
  return config


def small_model(config, num_classes=None):
  """Only the first two stages of B0: for tests about the loop, not the architecture."""
  return create_model(
      config.model, num_classes=num_classes or config.num_classes, width=config.width,
      depth=config.depth, dropout=config.dropout, drop_connect_rate=config.drop_connect_rate,
      stem_stride=config.stem_stride, bn_momentum=config.bn_momentum,
      bn_epsilon=config.bn_epsilon, blocks=B0_BLOCKS[:2])


def checkpoint_steps(workdir):
  directory = os.path.join(str(workdir), 'checkpoints')
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def abstract_state(config, mesh, model=None):
  """The train state's shapes with the shardings `train_and_evaluate` would give it on `mesh`."""
  model = model or train.build_model(config)
  tx = optim.create_optimizer(config, 1.0)
  init = functools.partial(train.create_train_state, model=model, tx=tx, config=config)
  shapes = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(shapes, mesh, config.fsdp_min_size)
  return checkpointing.abstract_with_shardings(shapes, shardings)


def restore(workdir, config, mesh, model=None, step=None):
  """Restores the latest (or a given) checkpoint of `workdir` onto `mesh` via Checkpointer."""
  checkpointer = checkpointing.Checkpointer(str(workdir), config)
  try:
    target = abstract_state(config, mesh, model)
    if step is None:
      return checkpointer.restore_latest(target)
    return checkpointer.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
  finally:
    checkpointer.close()


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for this module only, so a restarted run reuses its executables."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  try:
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):  # pragma: no cover - private API moved
    pass


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One 6-step run: eval and checkpoint every 3 steps, metrics every step."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config()
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    state, metrics = train.train_and_evaluate(config, str(workdir))
  return {'workdir': workdir, 'config': config, 'state': state, 'metrics': metrics,
          'events': event_files(workdir)}


# --- The run itself -----------------------------------------------------------------------------


def test_run_returns_final_state_and_metrics(trained):
  assert int(trained['state'].step) == 6
  metrics = trained['metrics']
  for key in ('eval/loss', 'eval/top1', 'eval/top5', 'eval_ema/loss', 'eval_ema/top1',
              'eval_ema/top5'):
    assert np.isfinite(metrics[key]), key
  # Every one of the 16 mocked validation examples was evaluated exactly once.
  assert metrics['eval/num_examples'] == NUM_EXAMPLES
  assert metrics['eval_ema/num_examples'] == NUM_EXAMPLES
  assert 0 <= metrics['eval/top1'] <= metrics['eval/top5'] <= 1
  # Parameters are really FSDP-sharded over the 8 devices (and still all finite).
  kernel = trained['state'].params['top_conv']['kernel']
  assert len(kernel.sharding.device_set) == 8
  assert not kernel.sharding.is_fully_replicated
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trained['state'].params))


def test_training_loss_decreases(trained):
  scalars = read_scalars(trained['events'])
  steps, losses = zip(*scalars['train/loss'])
  assert steps == (1, 2, 3, 4, 5, 6)
  assert all(np.isfinite(losses))
  # ln(1000) ~ 6.9 at initialisation; memorising the 16 repeated examples must go well below.
  assert losses[0] > 5.0
  assert losses[-1] < 0.5 * losses[0], losses
  assert min(losses[3:]) < min(losses[:3]), losses
  top1 = [v for _, v in scalars['train/top1']]
  assert top1[-1] > top1[0]


def test_tensorboard_tags(trained):
  assert trained['events'], f'no event file in {trained["workdir"]}'
  scalars = read_scalars(trained['events'])
  missing = [tag for tag in TRAIN_TAGS + EVAL_TAGS if tag not in scalars]
  assert not missing, f'missing tags {missing}; found {sorted(scalars)}'
  for tag in TRAIN_TAGS:
    assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4, 5, 6], tag
  for tag in EVAL_TAGS:
    assert [s for s, _ in scalars[tag]] == [3, 6], tag
  assert all(v == pytest.approx(1e-2) for _, v in scalars['train/learning_rate'])
  assert all(v > 0 for _, v in scalars['train/images_per_second'])
  for tag in ('eval/top1', 'eval/top5', 'eval_ema/top1', 'eval_ema/top5', 'train/top1'):
    assert all(0.0 <= v <= 1.0 for _, v in scalars[tag]), tag


def test_checkpoints_written(trained):
  assert checkpoint_steps(trained['workdir']) == [3, 6]


# --- Restarts -----------------------------------------------------------------------------------


def test_restart_with_same_steps_does_not_retrain(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained['workdir'], workdir)
  events = []
  listener = lambda event, **kwargs: events.append(event)
  jax.monitoring.register_event_listener(listener)
  try:
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
      state, metrics = train.train_and_evaluate(trained['config'], str(workdir))
  finally:
    jax.monitoring.unregister_event_listener(listener)
  # The restart loaded its train and eval steps from the persistent compilation cache.
  assert events.count('/jax/compilation_cache/cache_hits') >= 2, sorted(set(events))
  assert int(state.step) == 6
  # It restored the final state exactly, trained nothing and wrote no new checkpoint.
  assert_trees_equal(state.params, trained['state'].params)
  assert_trees_equal(state.ema_params, trained['state'].ema_params)
  new_events = [f for f in event_files(workdir)
                if os.path.basename(f) not in {os.path.basename(e) for e in trained['events']}]
  assert 'train/loss' not in read_scalars(new_events)
  assert checkpoint_steps(workdir) == [3, 6]
  # It still reports (and logs) the evaluation of what it restored.
  assert metrics['eval_ema/top1'] == pytest.approx(trained['metrics']['eval_ema/top1'])
  assert metrics['eval/loss'] == pytest.approx(trained['metrics']['eval/loss'], rel=1e-5)


@pytest.mark.slow  # tests/test_resume.py checks the same bitwise, through main
def test_restart_with_more_steps_resumes_exactly(trained, tmp_path):
  """6 steps, a restart, 2 more: bitwise the state of 8 uninterrupted steps (data, dropout,
  optimizer and EMA all continue where they stopped)."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained['workdir'], workdir)
  config = tiny_config(num_train_steps=8)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    state, _ = train.train_and_evaluate(config, str(workdir))
    straight, _ = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert int(state.step) == int(straight.step) == 8
  assert_trees_equal(state, straight)
  new_events = [f for f in event_files(workdir)
                if os.path.basename(f) not in {os.path.basename(e) for e in trained['events']}]
  resumed = read_scalars(new_events)
  assert [s for s, _ in resumed['train/loss']] == [7, 8]
  assert resumed['train/loss'] == read_scalars(event_files(tmp_path / 'straight'))['train/loss'][6:]
  assert checkpoint_steps(workdir) == [3, 6, 8]


@pytest.mark.parametrize('fsdp', [2, 1])
def test_restore_on_fewer_devices(trained, fsdp):
  """A checkpoint written FSDP-sharded over 8 devices restores onto a 4-device mesh."""
  mesh = sharding.create_mesh(jax.devices()[:4], fsdp)
  config = tiny_config(fsdp_axis_size=fsdp)
  state = restore(trained['workdir'], config, mesh)
  assert int(state.step) == 6
  assert_trees_equal(state.params, trained['state'].params)
  assert_trees_equal(state.opt_state, trained['state'].opt_state)
  assert_trees_equal(state.ema_batch_stats, trained['state'].ema_batch_stats)
  kernel = state.params['top_conv']['kernel']
  assert kernel.sharding.device_set == set(jax.devices()[:4])
  assert kernel.sharding.is_fully_replicated == (fsdp == 1)


def test_host_runs_ahead_of_a_slow_device(tmp_path, monkeypatch):
  """The loop syncs with the devices only at log, save and eval boundaries: with a step that
  takes 0.3 s on the device, the host has dispatched step s + 2 before step s finishes."""
  finished, dispatched = {}, {}
  original = train.train_step

  def slow_step(state, first_bad_step, batch, **kwargs):
    new_state, first_bad_step, metrics = original(state, first_bad_step, batch, **kwargs)

    def record(step):
      time.sleep(0.3)
      finished.setdefault(int(step), time.monotonic())
    jax.debug.callback(record, new_state.step)
    return new_state, first_bad_step, metrics

  def record_dispatch(self, host_batch):
    dispatched[int(host_batch['position'][0]) // self.global_batch_size + 1] = time.monotonic()

  monkeypatch.setattr(train, 'train_step', slow_step)
  monkeypatch.setattr(prefetch.InputLog, '__call__', record_dispatch)
  config = tiny_config(num_train_steps=8, log_every_steps=100, eval_every_steps=100,
                       checkpoint_every_steps=100, log_input_ids=True, ema_decay=0.0,
                       fsdp_axis_size=1)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert sorted(finished) == sorted(dispatched) == list(range(1, 9))
  ahead = [s for s in range(1, 7) if dispatched[s + 2] < finished[s]]
  assert ahead == list(range(1, 7)), (dispatched, finished)


# --- Errors users will hit ----------------------------------------------------------------------


def test_imagenet_not_prepared(tmp_path):
  config = tiny_config(data_dir=str(tmp_path / 'tfds'))
  os.makedirs(config.data_dir)
  with pytest.raises(sources.DatasetNotFoundError,
                     match=r'(?s)imagenet2012.*--config\.manual_dir.*configs/quickstart\.py'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))


def test_batch_size_not_divisible_by_devices(tmp_path):
  config = tiny_config(batch_size=12)
  with pytest.raises(ValueError, match=r'batch_size=12 is not divisible by the 8 devices.*'
                     r'--config\.batch_size=8 or 16'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))


def test_grad_accum_steps_must_split_the_batch(tmp_path):
  config = tiny_config(grad_accum_steps=4)
  with pytest.raises(ValueError, match=r'grad_accum_steps=4.*multiple of devices x '
                     r'grad_accum_steps = 32'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))


def test_workdir_not_writable(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  workdir = blocker / 'workdir'  # Its parent is a regular file: not creatable, even by root.
  # A user error (exit 2 with the message alone through main).
  with pytest.raises(errors.UserError, match=r'workdir .*a_file/workdir.* is not writable.*'
                     r'--workdir'):
    train.train_and_evaluate(tiny_config(), str(workdir))


def test_checkpoint_from_other_model(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained['workdir'], workdir)
  config = tiny_config(width=0.5)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r'step 6.*width: checkpoint has 0\.25, config has 0\.5.*new '
                       r'--workdir'):
      train.train_and_evaluate(config, str(workdir))
  # Nothing was written into the other experiment's workdir.
  assert checkpoint_steps(workdir) == [3, 6]
  assert len(event_files(workdir)) == len(trained['events'])


def test_checkpoint_from_other_optimizer_structure(trained, tmp_path):
  """A change outside the fingerprint that changes the state's structure is still caught."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained['workdir'], workdir)
  config = tiny_config(grad_clip_norm=1.0)  # adds a clip state to the optimizer chain
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    with pytest.raises(checkpointing.CheckpointRestoreError,
                       match=r'(?s)None of the 2 checkpoint.*step 6.*structure'):
      train.train_and_evaluate(config, str(workdir))


def test_nan_loss_stops_at_last_good_checkpoint(tmp_path, monkeypatch):
  """Divergence raises FloatingPointError naming the step and the last good checkpoint."""
  monkeypatch.setattr(train, 'build_model', small_model)
  # SGD without momentum at an absurd rate: the first update blows the weights up to ~1e30 or
  # beyond, and the activations overflow soon after.
  config = tiny_config(optimizer='sgd', momentum=0.0, learning_rate=1e30, ema_decay=0.0,
                       num_train_steps=6, checkpoint_every_steps=1, eval_every_steps=100,
                       fsdp_axis_size=1)
  workdir = tmp_path / 'run'
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    with pytest.raises(FloatingPointError) as error:
      train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  match = re.search(r'NaN/Inf at step (\d+)\..*last good checkpoint is step (\d+) in (\S+)\.',
                    message)
  assert match, message
  bad_step, good_step = int(match[1]), int(match[2])
  assert match[3] == os.path.join(str(workdir), 'checkpoints')
  assert '--config.learning_rate' in message and 'same --workdir' in message
  assert 1 <= good_step < bad_step <= 6
  assert checkpoint_steps(workdir)[-1] == good_step
  # No checkpoint holds a NaN or Inf: the latest one (which a rerun resumes from) and every
  # other one still kept.
  mesh = sharding.create_mesh()
  for step in checkpoint_steps(workdir):
    state = restore(workdir, config, mesh, model=small_model(config), step=step)
    assert int(state.step) == step
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert np.isfinite(np.asarray(leaf)).all(), (step, jax.tree_util.keystr(path))


class _RecordingSource:
  """A batch iterator that records which thread deletes it."""

  def __init__(self, num_batches, deleted):
    self.batches = iter([{'x': np.full((8, 2), i, np.float32)} for i in range(num_batches)])
    self.deleted = deleted

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.batches)

  def __del__(self):
    self.deleted.append(threading.current_thread().name)
    self.deleted_event.set()


@pytest.mark.parametrize('consume', ['all', 'some'])
def test_prefetch_deletes_its_source_off_the_callers_thread(consume):
  """A tf.data iterator can take up to a minute to delete (TF's autotuner); prefetch_to_mesh
  hands its source to a background thread when it ends (eval) or is dropped (training)."""
  deleted = []
  source = _RecordingSource(5, deleted)
  source.deleted_event = done = threading.Event()
  batches = prefetch.prefetch_to_mesh(source, sharding.create_mesh(), 2)
  del source
  if consume == 'all':
    assert [float(b['x'][0, 0]) for b in batches] == [0.0, 1.0, 2.0, 3.0, 4.0]
  else:
    assert float(next(batches)['x'][0, 0]) == 0.0
  del batches
  assert done.wait(10)
  assert deleted == ['dispose_tf_data_iterator']


# --- Gradient accumulation ----------------------------------------------------------------------


def test_micro_batches_are_strided():
  x = jnp.arange(16 * 3).reshape(16, 3)
  micro = train._micro_batches(x, 2)  # pylint: disable=protected-access
  assert micro.shape == (2, 8, 3)
  np.testing.assert_array_equal(micro[0], x[0::2])
  np.testing.assert_array_equal(micro[1], x[1::2])
  micro4 = train._micro_batches(jnp.arange(16), 4)  # pylint: disable=protected-access
  np.testing.assert_array_equal(micro4, np.arange(16).reshape(4, 4).T)


def test_grad_accum_equals_average_of_half_batches():
  """k=2 averages the gradients of the strided half-batches (each with its own BN statistics)."""
  # Plain SGD at rate 1: the parameter update is exactly minus the (averaged) gradient.
  config_k2 = tiny_config(optimizer='sgd', momentum=0.0, learning_rate=1.0, lr_batch_size=16,
                          weight_decay=0.0, ema_decay=0.0, num_classes=10, grad_accum_steps=2,
                          fsdp_axis_size=1)
  config_k1 = tiny_config(optimizer='sgd', momentum=0.0, learning_rate=1.0, lr_batch_size=16,
                          weight_decay=0.0, ema_decay=0.0, num_classes=10, fsdp_axis_size=1)
  model = small_model(config_k2)
  tx = optim.create_optimizer(config_k2, 1.0)
  schedule = optim.create_learning_rate_schedule(config_k2, 1.0)
  mesh = sharding.create_mesh()
  init = functools.partial(train.create_train_state, model=model, tx=tx, config=config_k2)
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))

  rng = np.random.RandomState(0)
  host = {'image': rng.randint(0, 256, (16, 32, 32, 3)).astype(np.uint8),
          'label': rng.randint(0, 10, (16,)).astype(np.int32)}
  put = lambda b: {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in b.items()}

  def step_fn(config):
    return jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                     config=config, base_rng=jax.random.key(1)))

  ok = jnp.int32(-1)
  accumulated, bad, metrics = step_fn(config_k2)(state, ok, put(host))
  assert int(bad) == -1 and np.isfinite(float(metrics['loss']))
  assert int(accumulated.step) == 1

  one_step = step_fn(config_k1)
  even, _, m_even = one_step(state, ok, put({k: v[0::2] for k, v in host.items()}))
  # The second micro-batch sees the BN running statistics the first one left (same params).
  odd, _, m_odd = one_step(state.replace(batch_stats=even.batch_stats), ok,
                           put({k: v[1::2] for k, v in host.items()}))

  np.testing.assert_allclose(float(metrics['loss']),
                             (float(m_even['loss']) + float(m_odd['loss'])) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['top1']),
                             (float(m_even['top1']) + float(m_odd['top1'])) / 2, rtol=1e-6)
  for path, p0 in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    get = lambda tree: np.asarray(functools.reduce(lambda t, k: t[k.key], path, tree))
    expected = ((get(even.params) - np.asarray(p0)) + (get(odd.params) - np.asarray(p0))) / 2
    actual = get(accumulated.params) - np.asarray(p0)
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))
  for a, b in zip(jax.tree.leaves(accumulated.batch_stats), jax.tree.leaves(odd.batch_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('overrides', [
    dict(optimizer='adamw'), dict(optimizer='rmsprop'), dict(optimizer='sgd', momentum=0.9),
    dict(optimizer='sgd', momentum=0.0), dict(optimizer='sgd', momentum=0.0, learning_rate=0.0),
    dict(optimizer='rmsprop', grad_clip_norm=1.0), dict(optimizer='adamw', weight_decay=0.0),
])
@pytest.mark.parametrize('bad', [np.nan, np.inf])
@pytest.mark.parametrize('one_reduction', [False, True])
def test_non_finite_gradient_always_reaches_the_state(overrides, bad, one_reduction):
  """train_step checks the new state, not the gradients: that is enough only if a NaN or Inf in
  any gradient leaf makes the updated parameters or optimizer state non-finite, for every
  optimizer (with or without momentum, clipping, a zero learning rate)."""
  config = tiny_config(**{'weight_decay': 1e-5, 'lr_schedule': 'constant', **overrides})
  tx = optim.create_optimizer(config, 1.0)
  params = {'a': jnp.ones((3, 2)), 'b': jnp.full((4,), 0.5)}
  opt_state = tx.init(params)
  grads = {'a': jnp.full((3, 2), 0.1), 'b': jnp.full((4,), 0.1).at[2].set(bad)}
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  all_finite = functools.partial(train._all_finite,  # pylint: disable=protected-access
                                 one_reduction=one_reduction)
  assert not bool(all_finite((new_params, new_opt_state)))
  finite_updates, finite_state = tx.update(jax.tree.map(jnp.zeros_like, grads), opt_state, params)
  assert bool(all_finite((optax.apply_updates(params, finite_updates), finite_state)))


@pytest.mark.parametrize('one_finite_reduction', [False, True])
def test_overflowing_update_is_not_applied(one_finite_reduction):
  """Finite loss and gradients, but an update that overflows: the step must still be refused.

  The classifier bias holds 1e37, so the loss (~1e37) and its gradients are finite, but the
  coupled weight decay adds 40 * 1e37 > float32 max to the gradient inside the optimizer.
  """
  config = tiny_config(optimizer='sgd', momentum=0.0, learning_rate=1e-3, weight_decay=40.0,
                       ema_decay=0.0, num_classes=10, resolution=8, stem_stride=1, fsdp_axis_size=1)
  model = create_model(config.model, num_classes=10, width=0.25, depth=0.25, dropout=0.0,
                       drop_connect_rate=0.0, stem_stride=1, blocks=B0_BLOCKS[:1])
  tx = optim.create_optimizer(config, 1.0)
  schedule = optim.create_learning_rate_schedule(config, 1.0)
  state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx,
                                    config=config))(jax.random.key(0))
  bias = state.params['predictions']['bias']
  params = {**state.params, 'predictions': {**state.params['predictions'],
                                            'bias': bias.at[0].set(1e37)}}
  state = state.replace(params=params)
  rng = np.random.RandomState(0)
  batch = {'image': rng.randint(0, 256, (4, 8, 8, 3)).astype(np.uint8),
           'label': np.ones((4,), np.int32)}
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                   config=config, base_rng=jax.random.key(1),
                                   for_xla_cpu=one_finite_reduction,
                                   one_finite_reduction=one_finite_reduction))
  new_state, bad, metrics = step(state, jnp.int32(-1), batch)
  assert np.isfinite(float(metrics['loss']))
  assert int(bad) == 1  # recorded on the device: the first bad step
  assert int(new_state.step) == 0
  assert_trees_equal(new_state.params, state.params)
  assert_trees_equal(new_state.opt_state, state.opt_state)
  # Every later step leaves the state alone too, good batch or not.
  again, bad, _ = step(new_state, bad, {**batch, 'label': np.zeros((4,), np.int32)})
  assert int(bad) == 1 and int(again.step) == 0
