"""tcmalloc for the command-line jobs: the CPU train step runs ~1.9x faster under it.

With glibc's malloc, XLA:CPU's large per-step buffers are mapped fresh and page-faulted on every
step: the quickstart's B0 train step (32 px, batch 64) on the 2-core Zen 3 VM took 994-1,154 ms
with 337k minor page faults and about as much system time as user time per step; with tcmalloc
(Debian/Ubuntu package `libtcmalloc-minimal4`) 622 ms and no faults. glibc's own knobs
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_) and jemalloc's defaults did not change it.

A process cannot swap its allocator once it runs, so `python -m efficientnet_jax.main` and the
studies (`experiments/*_search.py`, `scale_baselines.py`, `single_dimension_scaling.py`)
re-execute themselves once, at start (before JAX is imported), with tcmalloc in
LD_PRELOAD, where the library is installed and not already loaded. One log line says so.
EFFICIENTNET_JAX_TCMALLOC=0 turns this off; EFFICIENTNET_JAX_TCMALLOC=/path/to/libtcmalloc.so
names the library. Not for processes that load OpenVINO (`predict`, the export benchmarks, the
test workers): its `compile_model` aborts under a preloaded tcmalloc (OpenVINO 2026.4).
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Callable, Mapping

__all__ = ['ENV', 'LIBRARY_PATHS', 'MARKER', 'find_tcmalloc', 'reexec_with_tcmalloc',
           'tcmalloc_command']

ENV = 'EFFICIENTNET_JAX_TCMALLOC'
MARKER = 'EFFICIENTNET_JAX_TCMALLOC_PRELOADED'
LIBRARY_PATHS = (
    '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
    '/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4',
    '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
    '/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4',
    '/usr/lib64/libtcmalloc_minimal.so.4',
    '/usr/lib64/libtcmalloc.so.4',
)


def find_tcmalloc(exists: Callable[[str], bool] = os.path.exists) -> str | None:
  """The path of an installed tcmalloc, or None."""
  for path in LIBRARY_PATHS:
    if exists(path):
      return path
  name = ctypes.util.find_library('tcmalloc_minimal') or ctypes.util.find_library('tcmalloc')
  return name if name and exists(name) else None


def tcmalloc_command(env: Mapping[str, str], argv: list[str], platform: str = sys.platform,
                     find: Callable[[], str | None] = find_tcmalloc
                     ) -> tuple[list[str], dict[str, str]] | None:
  """(argv, env) to re-execute this process with tcmalloc preloaded, or None to go on as is."""
  setting = env.get(ENV, '1')
  if setting == '0' or platform != 'linux' or env.get(MARKER):
    return None
  if 'tcmalloc' in env.get('LD_PRELOAD', ''):
    return None
  library = setting if setting not in ('', '1') else find()
  if not library or not os.path.exists(library):
    return None
  preload = ' '.join(p for p in (library, env.get('LD_PRELOAD', '')) if p)
  return list(argv), {**env, 'LD_PRELOAD': preload, MARKER: library}


def reexec_with_tcmalloc() -> None:
  """Re-executes the running command with tcmalloc preloaded (see the module docstring)."""
  argv = getattr(sys, 'orig_argv', None)
  if not argv:
    return
  command = tcmalloc_command(os.environ, [sys.executable, *argv[1:]])
  if command is None:
    return
  sys.stderr.write(f'efficientnet_jax: restarting with {command[1][MARKER]} preloaded (faster '
                   f'CPU steps; {ENV}=0 turns this off).\n')
  sys.stderr.flush()
  try:
    os.execve(sys.executable, command[0], command[1])
  except OSError:
    return  # go on with the default allocator
