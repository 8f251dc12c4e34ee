"""The README's main job: configs/quickstart.py reaches >= 97% top-1 on the digits test split.

Slow (minutes on 2 cores): run with `python -m pytest -m slow`. The wall time is reported in the
README from a run on a quiet machine; this test checks the accuracy, not the speed.
"""
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_reaches_97_percent(tmp_path):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the real job runs on the real (single) CPU device
  start = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.main', '--config=configs/quickstart.py',
       f'--workdir={tmp_path}'], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=1800)
  elapsed = time.time() - start
  assert result.returncode == 0, result.stderr[-5000:]
  match = re.search(r'Final top-1: ([0-9.]+) \((\d+) eval examples\)', result.stdout)
  assert match, result.stdout[-2000:]
  top1, count = float(match.group(1)), int(match.group(2))
  print(f'quickstart: top-1 {top1:.4f} on {count} examples in {elapsed:.0f} s')
  assert count == 360
  assert top1 >= 0.97
