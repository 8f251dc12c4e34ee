"""What several test modules share: loading configs by path, reading TensorBoard scalars, and the
environment for subprocesses that run the real entry point."""
from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs'


def load_config_module(name: str):
  """Imports configs/<name>.py by path, as config_flags does (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f'_test_configs_{name}', CONFIG_DIR / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def event_files(workdir) -> list[str]:
  return sorted(glob.glob(os.path.join(str(workdir), 'events.out.tfevents.*')))


def read_scalars(paths) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from TensorBoard event files, in file order."""
  scalars = {}
  for path in paths:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor'):
          array = tf.make_ndarray(value.tensor)
          if array.size != 1:
            continue
          number = float(array.reshape(()))
        else:
          number = float(value.simple_value)
        scalars.setdefault(value.tag, []).append((int(event.step), number))
  return scalars


# Cheaper XLA:CPU code generation: compiling dominates tests of tiny models, most of it in LLVM's
# optimisation passes. The conftest sets these for in-process tests; children get them only when
# asked (`subprocess_env(fast_compile=True)`).
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0',
                          '--xla_llvm_disable_expensive_passes=true')


def subprocess_env(fast_compile: bool = False) -> dict[str, str]:
  """Environment for a child running efficientnet_jax on the CPU.

  The conftest forces 8 host devices through XLA_FLAGS; in a child, --local_device_count decides.
  `fast_compile` asks XLA:CPU for cheaper code generation: compiling dominates tiny runs.
  """
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['CUDA_VISIBLE_DEVICES'] = ''
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')
           and f not in FAST_COMPILE_XLA_FLAGS]
  if fast_compile:
    flags += list(FAST_COMPILE_XLA_FLAGS)
  env['XLA_FLAGS'] = ' '.join(flags)
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env
