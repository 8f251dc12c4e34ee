"""Two worker processes share one search through one SQLite store (efficientnet_jax/search/
driver.py): together they finish the budget, no network is trained twice, and the candidate of
a worker killed with SIGKILL is retried by the other.

The workers are real processes running `driver.run_worker` on the quick config's space
(regularized evolution, so proposals read the stored history). Training is a stand-in that
leaves a marker file when it starts and when it finishes; multiply-adds are counted for real.
So that the order of events does not depend on the machine's load, the first worker (the victim)
finishes one candidate and then hangs in its second, and the other (the survivor) holds its first
candidate until the victim has been killed.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support import ROOT, subprocess_env

optuna = pytest.importorskip('optuna', reason="the search's shared store needs the 'search' "
                             "extra: pip install -e '.[search]'")

BUDGET = 6
WORKER = r'''
import os, pathlib, sys, time, zlib
from efficientnet_jax.search import driver
from efficientnet_jax.study import cli

workdir, marks, role = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[4]
config = cli.load_config(cli.CONFIG_DIR / 'baseline_search.py', 'quick', {
    'num_candidates': int(sys.argv[3]), 'workers.heartbeat_seconds': 1,
    'workers.grace_seconds': 3, 'workers.poll_seconds': 0.5})
storage = driver.open_storage(driver.default_storage_url(workdir), 1, 3, 3)
search = driver.build_search(config, workdir, storage, 'evolution')

def train(train_config, directory):
  name, pid = os.path.basename(directory), os.getpid()
  (marks / f'start.{name}.{pid}').touch()
  if role == 'victim' and len(list(marks.glob(f'start.*.{pid}'))) == 2:
    time.sleep(600)  # killed in here
  while role == 'survivor' and not (marks / 'go').exists():
    time.sleep(0.05)
  time.sleep(0.5)
  (marks / f'finish.{name}.{pid}').touch()
  top1 = zlib.crc32(' '.join(train_config.blocks).encode()) % 1000 / 1000
  return None, {'eval/top1': top1}

driver.run_worker(search, train_fn=train)
'''


def markers(marks, kind):
  """{network name: [pids]} of the marker files of one kind ('start' or 'finish')."""
  found = collections.defaultdict(list)
  for path in marks.glob('*.*.*'):
    k, name, pid = path.name.split('.')
    if k == kind:
      found[name].append(int(pid))
  return found


def test_two_workers_share_a_search_and_retry_a_killed_workers_candidate(tmp_path):
  workdir, marks = tmp_path / 'search', tmp_path / 'marks'
  workdir.mkdir()
  marks.mkdir()
  env = subprocess_env(fast_compile=True)
  launch = lambda role: subprocess.Popen(
      [sys.executable, '-c', WORKER, str(workdir), str(marks), str(BUDGET), role], env=env,
      cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  victim, survivor = launch('victim'), launch('survivor')
  try:
    # Kill the victim in the middle of its second candidate (after it finished one).
    deadline = time.time() + 600
    while True:
      assert time.time() < deadline, 'the first worker never started a second candidate'
      assert victim.poll() is None, victim.stdout.read()[-3000:]
      started = [n for n, pids in markers(marks, 'start').items() if victim.pid in pids]
      finished = [n for n, pids in markers(marks, 'finish').items() if victim.pid in pids]
      unfinished = [n for n in started if n not in finished]
      if finished and unfinished:
        break
      time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    (marks / 'go').touch()
    killed, = unfinished
    output, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, output[-5000:]
  finally:
    for process in (victim, survivor):
      if process.poll() is None:
        process.kill()

  starts, finishes = markers(marks, 'start'), markers(marks, 'finish')
  # The union is the budget, every network finished exactly once, both workers contributed.
  assert len(finishes) == BUDGET and all(len(p) == 1 for p in finishes.values())
  assert {p for pids in finishes.values() for p in pids} == {victim.pid, survivor.pid}
  # Each network started once, but the killed one: by the victim, then by the survivor.
  assert {n: len(p) for n, p in starts.items() if len(p) != 1} == {killed: 2}
  assert starts[killed] == [victim.pid, survivor.pid] or sorted(starts[killed]) == sorted(
      [victim.pid, survivor.pid])
  assert finishes[killed] == [survivor.pid]
  results = {p.parent.name for p in (workdir / 'evolution' / 'candidates').glob('*/result.json')}
  assert results == set(finishes)

  # The store: the stale trial was failed and its retry (same network) completed.
  storage = optuna.storages.RDBStorage(f'sqlite:///{workdir / "search.db"}')
  trials = optuna.load_study(study_name='baseline_search-evolution', storage=storage).trials
  complete = [t for t in trials if t.state.name == 'COMPLETE']
  assert len(complete) == BUDGET and len({t.user_attrs['key'] for t in complete}) == BUDGET
  failed, = [t for t in trials if t.state.name == 'FAIL']
  assert failed.user_attrs['name'] == killed and failed.user_attrs['worker'].endswith(
      f':{victim.pid}')
  retry, = [t for t in complete if t.user_attrs['name'] == killed]
  assert retry.system_attrs['failed_trial'] == failed.number
  assert retry.user_attrs['worker'].endswith(f':{survivor.pid}')
  saved = json.loads((workdir / 'evolution' / 'candidates' / killed / 'result.json').read_text())
  assert saved['reward'] == pytest.approx(retry.value)
