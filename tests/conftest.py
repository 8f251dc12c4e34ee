"""Test configuration: JAX runs on 8 fake CPU devices so sharding code is really exercised.

The flags must be set before JAX initialises its backends, which is why this happens at import
time of the conftest, before any test module imports jax.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

from support import FAST_COMPILE_XLA_FLAGS  # noqa: E402

_flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
# Cheaper code generation cuts the time of compile-bound tests by about a third. The HLO is the
# same, but results can differ in the last bits (fewer fused multiply-adds). Set
# EFFICIENTNET_JAX_TEST_FULL_OPT=1 to test with the optimisation users get.
if os.environ.get('EFFICIENTNET_JAX_TEST_FULL_OPT', '') in ('', '0'):
  _flags += ' ' + ' '.join(FAST_COMPILE_XLA_FLAGS)
os.environ['XLA_FLAGS'] = _flags.strip()

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
# tf.data must not grab the (nonexistent) GPU or all memory.
try:
  import tensorflow as tf  # noqa: E402

  tf.config.set_visible_devices([], 'GPU')
except Exception:  # pragma: no cover - TF missing or already initialised
  pass


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_code():
  """Drops JAX's compiled executables and traces after each test module.

  A worker runs hundreds of tests, each compiling its own small programs; kept for the whole
  session they grew one worker past 9 GB, and two workers plus a test's subprocesses then swapped
  on a 24 GB machine.
  """
  yield
  jax.clear_caches()
  gc.collect()


def pytest_runtest_logreport(report):
  """With EFFICIENTNET_JAX_TEST_LOG=FILE, appends each phase's duration as it ends (a suite that
  is killed or times out still tells where its time went)."""
  path = os.environ.get('EFFICIENTNET_JAX_TEST_LOG')
  # Under xdist the controller sees every worker's report again (with `node` set): skip those.
  if path and report.duration >= 1.0 and not hasattr(report, 'node'):
    import time
    with open(path, 'a') as log:
      log.write(f'{time.strftime("%H:%M:%S")} {report.duration:8.1f}s {report.when:8} '
                f'{report.outcome:7} {report.nodeid}\n')
