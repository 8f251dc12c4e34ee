"""Two processes x 2 CPU devices (jax.distributed over 127.0.0.1, gloo collectives) must train
exactly like one process x 4 devices.

Both runs go through `python -m efficientnet_jax.main`'s code path (tests/mock_main.py wraps it in
`tfds.testing.mock_data`). What a step reads is a function of the global stream position only, so
the global batches are identical in both layouts and the loss curves must agree up to the order of
floating-point reductions. The recipe keeps the
randomness the real smoke run has (Inception crops, flips, AutoAugment, dropout, stochastic
depth), so a process that read, augmented or dropped differently would show.
"""
from __future__ import annotations

import glob
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from support import event_files, read_scalars, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / 'tests' / 'mock_main.py'
TIMEOUT_S = 420
NUM_STEPS = 5

CONFIG_FLAGS = [
    f'--config={ROOT / "configs" / "default.py"}:smoke',
    '--config.resolution=32',
    '--config.width=0.25',
    '--config.depth=0.25',
    '--config.augment=autoaugment',
    '--config.batch_size=16',
    '--config.eval_batch_size=8',
    f'--config.num_train_steps={NUM_STEPS}',
    '--config.log_every_steps=1',
    '--config.eval_every_steps=100',
    '--config.checkpoint_every_steps=100',
    '--config.warmup_epochs=0',
    '--config.learning_rate=0.2',
    '--config.ema_decay=0.9',
]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, log_path, extra):
  command = [sys.executable, str(WORKER), '--mock_num_examples=32', f'--workdir={workdir}',
             *CONFIG_FLAGS, *extra]
  log = open(log_path, 'w')
  return subprocess.Popen(command, cwd=str(ROOT), env=subprocess_env(fast_compile=True),
                          stdout=log,
                          stderr=subprocess.STDOUT), log


def _wait(processes, logs):
  failures = []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for (process, log), log_path in zip(processes, logs):
      try:
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        code = f'a timeout ({TIMEOUT_S} s for all processes)'
      log.close()
      if code != 0:
        failures.append((log_path, code))
  finally:
    for process, _ in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  if failures:
    report = []
    for log_path, code in failures:
      text = pathlib.Path(log_path).read_text()
      report.append(f'--- {log_path} exited with {code}; last output:\n{text[-6000:]}')
    pytest.fail('\n'.join(report))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  # All three processes run at once: the runs are independent, and overlapping them overlaps
  # their (mostly single-threaded) XLA compilations on the two cores.
  single = tmp_path / 'single'
  runs = [_launch(single, tmp_path / 'single.log', ['--local_device_count=4'])]
  logs = [tmp_path / 'single.log']
  multi = tmp_path / 'multi'
  address = f'127.0.0.1:{_free_port()}'
  for process_id in range(2):
    log_path = tmp_path / f'multi{process_id}.log'
    runs.append(_launch(multi, log_path, [
        '--local_device_count=2', f'--coordinator_address={address}', '--num_processes=2',
        f'--process_id={process_id}']))
    logs.append(log_path)
  _wait(runs, logs)

  # Both layouts ran on 4 devices in total, in 1 and 2 processes.
  assert 'JAX process 0/1, 4 local / 4 global devices' in (tmp_path / 'single.log').read_text()
  assert 'JAX process 1/2, 2 local / 4 global devices' in (tmp_path / 'multi1.log').read_text()

  expected, actual = (read_scalars(event_files(single)), read_scalars(event_files(multi)))
  steps = list(range(1, NUM_STEPS + 1))
  for tag in ('train/loss', 'train/top1'):
    assert [s for s, _ in expected[tag]] == steps, tag
    assert [s for s, _ in actual[tag]] == steps, tag
  loss_single = np.array([v for _, v in expected['train/loss']])
  loss_multi = np.array([v for _, v in actual['train/loss']])
  np.testing.assert_allclose(loss_multi, loss_single, rtol=1e-4)
  np.testing.assert_allclose([v for _, v in actual['train/top1']],
                             [v for _, v in expected['train/top1']], atol=1e-6)
  # The curve is not flat (the optimiser is really stepping), so agreement means something.
  assert np.ptp(loss_single) > 1e-2, loss_single
  # The final weights agree too: evaluation of the raw and EMA weights on the same examples.
  for tag in ('eval/loss', 'eval_ema/loss'):
    np.testing.assert_allclose(actual[tag][-1][1], expected[tag][-1][1], rtol=1e-4)
    assert actual[tag][-1][0] == expected[tag][-1][0] == NUM_STEPS
  # Only process 0 writes metrics, and the checkpoint was written once, by both processes.
  assert len(glob.glob(os.path.join(str(multi), 'events.out.tfevents.*'))) == 1
  assert sorted(os.listdir(multi / 'checkpoints')) == [str(NUM_STEPS)]


@pytest.mark.slow  # several minutes of XLA:CPU compiles; in `pytest -m slow` (CI's budget is 20 min)
def test_sigterm_to_one_process_saves_the_same_step_on_both(tmp_path):
  """A preemption notice reaches one host only: JAX's preemption sync point makes both save the
  same step, and both exit 0 (none saves alone, none waits for the other)."""
  workdir = tmp_path / 'run'
  address = f'127.0.0.1:{_free_port()}'
  long_run = ['--config.num_train_steps=100000', '--config.log_input_ids=True',
              '--config.log_every_steps=1000']
  runs, logs = [], []
  for process_id in range(2):
    log_path = tmp_path / f'p{process_id}.log'
    runs.append(_launch(workdir, log_path, [
        '--local_device_count=2', f'--coordinator_address={address}', '--num_processes=2',
        f'--process_id={process_id}', *long_run]))
    logs.append(log_path)
  ids = workdir / 'input_ids' / 'process_1.jsonl'
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline and not (ids.exists() and len(ids.read_text().splitlines()) >= 3):
    time.sleep(0.1)
  runs[1][0].send_signal(signal.SIGTERM)
  _wait(runs, logs)  # both exit 0
  steps = [re.findall(r'preempted at step (\d+); checkpoint saved', p.read_text()) for p in logs]
  assert steps[0] and steps[0] == steps[1], steps
  assert sorted(os.listdir(workdir / 'checkpoints')) == [steps[0][-1]]
