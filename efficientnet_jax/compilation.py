"""Compiling off the critical path: the train and eval steps compile while the state is restored.

On a CPU compiling is most of a short run; on a pod, restoring a large state from a bucket takes
a while, and compiling B7's eval step takes minutes. `compile_in_background` lowers and compiles
on a daemon thread (a failing run never waits for a compile to finish before it exits) and
returns a future for the executable.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable

import jax
from absl import logging

from efficientnet_jax import xla_cpu

__all__ = ['compile_in_background', 'compile_run_once', 'use_persistent_cache']


def use_persistent_cache(setting: str, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache, so a restarted job does not recompile.

  `setting` is config.compilation_cache: 'workdir' (workdir/compilation_cache), a directory
  (local or gs://, e.g. one shared by many runs), or '' to leave the cache off. A cache directory
  the process already set (JAX_COMPILATION_CACHE_DIR, jax.config) is kept. Returns the directory.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not setting:
    return None
  path = os.path.join(workdir, 'compilation_cache') if setting == 'workdir' else setting
  jax.config.update('jax_compilation_cache_dir', path)
  logging.info('Persistent compilation cache: %s', path)
  return path


def compile_run_once(jitted, *args):
  """Compiles `jitted` for `args`, with cheap code generation on CPU, for a single call."""
  return jitted.lower(*args).compile(compiler_options=xla_cpu.run_once_options())


def compile_in_background(jobs: list[tuple[str, Callable[[], Any]]]
                          ) -> dict[str, concurrent.futures.Future]:
  """Runs each (name, compile_fn) in turn on one daemon thread; returns {name: future}."""
  futures = {name: concurrent.futures.Future() for name, _ in jobs}

  def run():
    for name, fn in jobs:
      future = futures[name]
      if not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(fn())
      except BaseException as e:  # pylint: disable=broad-except  (re-raised by .result())
        future.set_exception(e)

  threading.Thread(target=run, name='compile_steps', daemon=True).start()
  return futures
