"""Preemption and exact resume, through `python -m efficientnet_jax.main` as a user runs it.

* kill -9 at random moments (once during an asynchronous save), each followed by a restart:
  the final state is bitwise the uninterrupted run's, leaf by leaf, and so is the sequence of
  (example id, stream position) the steps read; on the digits and on an image folder with
  corrupt files;
* SIGTERM: the run saves at the next step boundary, exits 0, and a restart resumes there;
* a NaN halt exits promptly and non-zero, with no non-finite checkpoint;
* user errors exit 2 with their message and no traceback;
* a damaged latest checkpoint is skipped with a warning; a changed batch size is refused;
* resuming at step 10,000 costs what starting at step 0 costs.

All runs share one persistent compilation cache, so a restart loads its executables instead of
compiling them again (what `config.compilation_cache` gives every run).
"""
from __future__ import annotations

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from support import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24  # 6 epochs of the 64 training examples below, at batch 16


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """A TFDS data_dir with digits prepared once, and a compilation cache shared by every run."""
  root = tmp_path_factory.mktemp('resume')
  return {'data_dir': str(root / 'tfds'), 'cache': str(root / 'xla_cache')}


def digits_flags(shared, **overrides) -> list[str]:
  """A tiny digits run: 64 training examples (the rest held out), several epochs, with the
  randomness a real run has (shifts, dropout, stochastic depth, EMA)."""
  fields = dict(width=0.25, depth=0.25, resolution=16, batch_size=16, eval_batch_size=40,
                holdout_examples=1437 - 64, num_train_steps=STEPS, log_every_steps=2,
                checkpoint_every_steps=3, eval_every_steps=12, keep_checkpoints=2,
                drop_connect_rate=0.2, dropout=0.2, ema_decay=0.9, log_input_ids=True,
                data_dir=shared['data_dir'], compilation_cache=shared['cache'],
                # XLA's convolutions: the CPU path's train step compiles ~1.6x slower.
                conv_impl='xla')
  fields.update(overrides)
  return ['--config=configs/quickstart.py', '--local_device_count=2'] + [
      f'--config.{k}={v}' for k, v in fields.items()]


_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_leftover_processes():
  """Kills what a test launched and left running (a failed assertion mid-test), so a stray
  100,000-step run never outlives its test."""
  yield
  while _LAUNCHED:
    process = _LAUNCHED.pop()
    if process.poll() is None:
      process.kill()
      process.wait()


def launch(workdir, flags, log_path) -> subprocess.Popen:
  log = open(log_path, 'a')
  process = subprocess.Popen(
      [sys.executable, '-m', 'efficientnet_jax.main', f'--workdir={workdir}', *flags],
      cwd=str(ROOT), env=subprocess_env(fast_compile=True), stdout=log, stderr=subprocess.STDOUT)
  _LAUNCHED.append(process)
  return process


def run(workdir, flags, log_path, timeout=900) -> int:
  process = launch(workdir, flags, log_path)
  try:
    return process.wait(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()


def steps_read(workdir) -> int:
  """Lines in the input log: the steps this workdir's runs have dispatched so far."""
  path = pathlib.Path(workdir) / 'input_ids' / 'process_0.jsonl'
  return len(path.read_text().splitlines()) if path.exists() else 0


def consumed(workdir) -> dict[int, tuple]:
  """{step: (example ids, positions)} read, the last record of a step winning (a restart reads
  again the steps after its checkpoint)."""
  records = {}
  for line in (pathlib.Path(workdir) / 'input_ids' / 'process_0.jsonl').read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut by kill -9
      continue
    records[record['step']] = (tuple(record['example_id']), tuple(record['position']))
  return records


def checkpoint_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def final_state(workdir, step):
  manager = ocp.CheckpointManager(str(pathlib.Path(workdir) / 'checkpoints'))
  try:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  finally:
    manager.close()


def assert_bitwise_equal(a, b):
  flat_a = ocp.tree.to_flat_dict(a)
  flat_b = ocp.tree.to_flat_dict(b)
  assert sorted(flat_a) == sorted(flat_b)
  assert len(flat_a) > 50  # params, batch_stats, opt_state, EMA, step
  for key in flat_a:
    x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
    assert x.dtype == y.dtype and x.shape == y.shape, key
    assert x.tobytes() == y.tobytes(), key


def wait_until(predicate, timeout, process=None):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if process is not None and process.poll() is not None:
      return False
    time.sleep(0.005)
  return False


def kill_and_resume(tmp_path, flags):
  """The uninterrupted run, then the same run killed twice (once mid-save), restarted each time."""
  straight = tmp_path / 'straight'
  assert run(straight, flags, tmp_path / 'straight.log') == 0, (tmp_path / 'straight.log').read_text()[-3000:]

  workdir, log = tmp_path / 'killed', tmp_path / 'killed.log'
  rng = random.Random(0)
  # Kill 1: a random step, while training.
  target = rng.randint(4, 10)
  process = launch(workdir, flags, log)
  assert wait_until(lambda: steps_read(workdir) >= target, 600, process), log.read_text()[-3000:]
  process.send_signal(signal.SIGKILL)
  process.wait()
  # Kill 2: during an asynchronous save (orbax's temporary directory exists).
  process = launch(workdir, flags, log)

  def saving():
    directory = workdir / 'checkpoints'
    return directory.exists() and any('tmp' in d.name for d in directory.iterdir())
  assert wait_until(lambda: steps_read(workdir) > target + 3 and saving(), 600, process), (
      log.read_text()[-3000:])
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = steps_read(workdir)
  assert run(workdir, flags, log) == 0, log.read_text()[-3000:]
  text = log.read_text()
  assert text.count('Starting at step 0 of') == 1, text[-3000:]  # both restarts resumed
  assert killed_at < 3 * STEPS
  assert checkpoint_steps(straight)[-1] == checkpoint_steps(workdir)[-1] == STEPS
  assert_bitwise_equal(final_state(straight, STEPS), final_state(workdir, STEPS))
  assert consumed(straight) == consumed(workdir)
  assert sorted(consumed(workdir)) == list(range(1, STEPS + 1))
  return straight, workdir


def test_kill_9_twice_ends_bitwise_equal_to_the_uninterrupted_run(tmp_path, shared):
  kill_and_resume(tmp_path, digits_flags(shared))


def _write_folder(root, corrupt_every=9):
  """root/{train,test}/<digit>/<i>.png from the digits, every `corrupt_every`-th file broken."""
  from sklearn.datasets import load_digits
  import tensorflow as tf
  digits = load_digits()
  for i, (image, label) in enumerate(zip(digits.images[:120], digits.target[:120])):
    split = 'train' if i < 80 else 'test'
    directory = root / split / str(label)
    directory.mkdir(parents=True, exist_ok=True)
    pixels = np.repeat((image * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
    data = tf.io.encode_png(pixels).numpy()
    if i % corrupt_every == 4:
      data = data[:30] if i % 2 else b'not an image at all'
    (directory / f'{i}.png').write_bytes(data)


@pytest.mark.slow
def test_kill_9_on_a_folder_dataset_with_corrupt_files(tmp_path, shared):
  root = tmp_path / 'images'
  _write_folder(root)
  flags = digits_flags(shared, dataset=f'folder:{root}', holdout_examples=0, eval_batch_size=40,
                       cache=False)
  straight, _ = kill_and_resume(tmp_path, flags)
  # Corrupt files were never read: their positions read the next example instead.
  ids = {i for ids, _ in consumed(straight).values() for i in ids}
  assert ids and len(ids) < 80


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path, shared):
  flags = digits_flags(shared, num_train_steps=100_000, checkpoint_every_steps=100_000,
                       eval_every_steps=100_000, log_every_steps=1000)
  workdir, log = tmp_path / 'run', tmp_path / 'run.log'
  process = launch(workdir, flags, log)
  assert wait_until(lambda: steps_read(workdir) >= 8, 600, process), log.read_text()[-3000:]
  at_signal = steps_read(workdir)
  sent = time.monotonic()
  process.send_signal(signal.SIGTERM)
  code = process.wait(timeout=60)
  elapsed = time.monotonic() - sent
  text = log.read_text()
  assert code == 0, text[-3000:]
  assert elapsed < 60
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and saved[0] >= at_signal
  assert f'preempted at step {saved[0]}; checkpoint saved' in text
  # A restart resumes there.
  process = launch(workdir, flags, log)
  assert wait_until(lambda: f'Starting at step {saved[0]} of' in log.read_text(), 600, process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=60) == 0


@pytest.mark.slow  # several minutes of XLA:CPU compiles; in `pytest -m slow` (CI's budget is 20 min)
def test_nan_halt_exits_promptly_with_no_bad_checkpoint(tmp_path, shared):
  flags = digits_flags(shared, learning_rate=1e12, checkpoint_every_steps=1, ema_decay=0.0,
                       num_train_steps=200)
  workdir, log = tmp_path / 'run', tmp_path / 'run.log'
  process = launch(workdir, flags, log)
  assert wait_until(lambda: 'NaN/Inf at step' in log.read_text(), 600, process)
  seen = time.monotonic()
  code = process.wait(timeout=30)
  assert time.monotonic() - seen < 30 and code == 1
  text = log.read_text()
  assert 'Traceback' not in text
  for step in checkpoint_steps(workdir):
    for key, leaf in ocp.tree.to_flat_dict(final_state(workdir, step)).items():
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.isfinite(leaf).all(), (step, key)


@pytest.mark.parametrize('override, message', [
    ('--config.batch_size=0', 'config.batch_size=0 must be a whole number >= 1'),
    ('--config.batch_size=15', 'config.batch_size=15 is not divisible by the 2 devices'),
    pytest.param('--config.model=efficientnet-b9', "Unknown model 'efficientnet-b9'. Did you mean",
                 marks=pytest.mark.slow),  # tests/test_configs.py covers both in-process
    pytest.param('--config.learnig_rate=1', 'Did you mean "learning_rate"', marks=pytest.mark.slow),
])
def test_user_errors_print_their_message_alone_and_exit_2(tmp_path, shared, override, message):
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.main', f'--workdir={tmp_path / "w"}',
       *digits_flags(shared), override], cwd=str(ROOT), env=subprocess_env(),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr[-3000:]
  shown = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.main', f'--workdir={tmp_path / "w"}',
       *digits_flags(shared), override, '--traceback'], cwd=str(ROOT), env=subprocess_env(),
      capture_output=True, text=True, timeout=300)
  assert shown.returncode != 0 and 'Traceback' in shown.stderr


@pytest.mark.slow  # several minutes of XLA:CPU compiles; in `pytest -m slow` (CI's budget is 20 min)
def test_damaged_latest_checkpoint_is_skipped_and_batch_change_refused(tmp_path, shared):
  flags = digits_flags(shared, num_train_steps=6, keep_checkpoints=3)
  workdir, log = tmp_path / 'run', tmp_path / 'run.log'
  assert run(workdir, flags, log) == 0, log.read_text()[-3000:]
  assert checkpoint_steps(workdir) == [3, 6]
  # A lost file in the newest checkpoint: the run warns, resumes from step 3, and completes.
  state_dir = workdir / 'checkpoints' / '6' / 'state'
  victims = sorted(p for p in state_dir.rglob('*') if p.is_file() and p.stat().st_size > 1000)
  victims[0].unlink()
  assert run(workdir, digits_flags(shared, num_train_steps=9, keep_checkpoints=3), log) == 0
  text = log.read_text()
  assert 'checkpoints/6' in text and 'trying an older one' in text, text[-3000:]
  assert 'Starting at step 3 of 9' in text
  assert checkpoint_steps(workdir)[-1] == 9
  # The damaged checkpoint is kept aside, not deleted.
  assert [p.name.split('-')[0] for p in (workdir / 'damaged_checkpoints').iterdir()] == ['6']
  # Another batch size would move the data position and the schedule: refused, nothing written.
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.main', f'--workdir={workdir}',
       *digits_flags(shared, num_train_steps=12, batch_size=32)], cwd=str(ROOT),
      env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'batch_size: checkpoint has 16, config has 32' in result.stderr
  assert 'grad_accum_steps' in result.stderr and 'Traceback' not in result.stderr
  assert checkpoint_steps(workdir)[-1] == 9


def _write_checkpoint_at(workdir, config, step):
  """A checkpoint at `step` of `config`'s run, as train_and_evaluate would write it."""
  import functools

  import jax

  from efficientnet_jax import checkpointing, configs_lib, optim, train
  config = configs_lib.resolve(config)
  model = train.build_model(config)
  tx = optim.create_optimizer(config, 1.0)
  state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx,
                                    config=config))(jax.random.key(0))
  checkpointer = checkpointing.Checkpointer(str(workdir), config)
  checkpointer.save(step, state.replace(step=jax.numpy.asarray(step, jax.numpy.int32)))
  checkpointer.close()


@pytest.mark.slow  # several minutes of XLA:CPU compiles; in `pytest -m slow` (CI's budget is 20 min)
def test_resume_cost_does_not_grow_with_the_step(tmp_path, shared):
  """Launch to first step, at step 0 and resumed at step 10,000 of an ImageNet-sized stream
  (1,281,167 mocked examples): the same work, so within 20% (both launched together, so machine
  load slows them alike)."""
  from efficientnet_jax import configs_lib
  overrides = dict(resolution=32, width=0.25, depth=0.25, batch_size=8, eval_batch_size=8,
                   log_every_steps=1000, checkpoint_every_steps=100_000,
                   eval_every_steps=100_000, log_input_ids=True, compilation_cache='',
                   best_checkpoint_metric='', conv_impl='xla')
  resumed = tmp_path / 'resumed'
  config = configs_lib.default_config('smoke')
  for key, value in {**overrides, 'num_train_steps': 10_001}.items():
    setattr(config, key, value)
  _write_checkpoint_at(resumed, config, 10_000)

  def start(workdir, steps):
    flags = [f'--config.{k}={v}' for k, v in {**overrides, 'num_train_steps': steps}.items()]
    return subprocess.Popen(
        [sys.executable, str(ROOT / 'tests' / 'mock_main.py'), '--mock_num_examples=1281167',
         '--config=configs/default.py:smoke', f'--workdir={workdir}', '--local_device_count=1',
         *flags], cwd=str(ROOT), env=subprocess_env(fast_compile=True),
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / f'{workdir.name}.log', 'w'))

  begin = time.monotonic()
  runs = {'fresh': (tmp_path / 'fresh', 1), 'resumed': (resumed, 10_001)}
  processes = {name: start(workdir, steps) for name, (workdir, steps) in runs.items()}
  elapsed = {}
  try:
    while len(elapsed) < 2 and time.monotonic() - begin < 900:
      for name, (workdir, _) in runs.items():
        if name not in elapsed and steps_read(workdir) >= 1:
          elapsed[name] = time.monotonic() - begin
      time.sleep(0.05)
  finally:
    for process in processes.values():
      process.kill()
      process.wait()
  assert len(elapsed) == 2, {n: (tmp_path / f'{n}.log').read_text()[-2000:] for n in runs}
  record = json.loads((resumed / 'input_ids' / 'process_0.jsonl').read_text().splitlines()[0])
  assert record['step'] == 10_001 and record['position'][0] == 10_000 * 8
  ratio = elapsed['resumed'] / elapsed['fresh']
  print(f'launch to first step: fresh {elapsed["fresh"]:.1f} s, resumed at 10,000 '
        f'{elapsed["resumed"]:.1f} s, ratio {ratio:.2f}')
  assert 0.8 <= ratio <= 1.2, elapsed
