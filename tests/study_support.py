"""What the study tests share: running an experiments/ script's quick mode, once per session."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

from support import ROOT, subprocess_env


# The quick studies as shipped train each network for 80 steps. The tests keep every network and
# every step of the study but train 10 steps each, with XLA's own convolutions: on a CPU,
# compiling each network already costs most of a quick run, XLA's grouped convolution compiles
# ~4 s faster per network (its slower steps pay off only over many steps), and the tests check
# the machinery, not the accuracy.
QUICK_TEST_OVERRIDES = {'train.num_train_steps': 10, 'train.conv_impl': 'xla'}
QUICK_TEST_ARGS = tuple(f'--config.{k}={v}' for k, v in QUICK_TEST_OVERRIDES.items())


def load_experiment(name: str):
  """Imports experiments/<name>.py by path (experiments/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f'_test_experiments_{name}',
                                                ROOT / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def shared_xla_cache(tmp_path_factory) -> pathlib.Path:
  """A persistent compilation cache all study tests of this session share, across xdist
  workers: the quick studies train several of the same tiny networks, which then compile once."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  path = base / 'study_xla_cache'
  path.mkdir(exist_ok=True)
  return path


def run_quick(name: str, workdir, xla_cache, *args: str) -> tuple[float, str]:
  """Runs `python experiments/<name>.py --quick --workdir=...` as a user would; returns
  (wall seconds, combined output). One CPU device and cheap XLA code generation, as the quick
  mode itself asks for."""
  env = subprocess_env(fast_compile=True)
  env['JAX_COMPILATION_CACHE_DIR'] = str(xla_cache)
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  start = time.time()
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / f'{name}.py'), '--quick',
       f'--workdir={workdir}', *args],
      env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=1800)
  seconds = time.time() - start
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-5000:]
  return seconds, output


def result_mtimes(workdir) -> dict[str, float]:
  """{candidate directory: mtime of its result.json}."""
  return {p.parent.name: p.stat().st_mtime
          for p in pathlib.Path(workdir, 'candidates').glob('*/result.json')}
