"""XLA:CPU compiler options: cheap code for programs that run once, wide vectors for hot loops.

They are passed per compilation (`jax.jit(..., compiler_options=...)` or
`Lowered.compile(compiler_options=...)`), so they change only the program they are given to, and
they are None on any backend but CPU:

    jax.jit(fn, compiler_options=xla_cpu.wide_vector_options())
"""
from __future__ import annotations

import functools
import logging
import os

import jax

__all__ = ['RUN_ONCE_OPTIONS', 'SHORT_RUN_OPTIONS', 'WIDE_VECTOR_OPTIONS', 'cpu_flags',
           'host_has_avx512', 'host_has_bf16_units',
           'run_once_options', 'short_run_options', 'usable_cores', 'use_one_device_per_core',
           'wide_vector_options']

# For a program that runs once, such as creating the train state: at full optimisation compiling
# the initialisers and the init forward pass of a small network takes longer than anything the
# program then does (tiny B0: 8 s against 3 s; the run itself is ~0 s).
RUN_ONCE_OPTIONS = {'xla_backend_optimization_level': 0,
                    'xla_llvm_disable_expensive_passes': True}
# For steps that run only a few dozen times (the studies' quick proxies): optimisation level 1.
# A tiny B0's train step at 24 px on the 2-core Zen 3 VM: level 0 compiles in 10.8 s and steps
# in 260 ms, level 1 in 16.3 s and 89 ms, the default (2) in 20.5 s and 77 ms; for 60 steps
# level 1 is the cheapest (21.6 s, against 26.4 s and 25.1 s).
SHORT_RUN_OPTIONS = {'xla_backend_optimization_level': 1}
# 512-bit vectors for the elementwise and depthwise loops where the CPU has AVX-512 (LLVM keeps
# to 256 bits by default). On a 2-core AMD EPYC (Zen 4) this made B0 inference at batch 32 and
# 224 px 1.04-1.08x faster.
WIDE_VECTOR_OPTIONS = {'xla_cpu_prefer_vector_width': 512}


@functools.cache
def cpu_flags() -> frozenset[str]:
  """The CPU's feature flags as this (Linux) host reports them; empty where they cannot be read."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[-1].split())
  except OSError:
    pass
  return frozenset()


def host_has_avx512() -> bool:
  """Whether this host's CPU reports AVX-512F; False where that cannot be read."""
  return 'avx512f' in cpu_flags()


def host_has_bf16_units() -> bool:
  """Whether the CPU has AMX or AVX512_BF16, where oneDNN runs bfloat16 natively."""
  return bool({'amx_bf16', 'avx512_bf16'} & cpu_flags())


def _on_cpu() -> bool:
  return jax.default_backend() == 'cpu'


def run_once_options() -> dict | None:
  return dict(RUN_ONCE_OPTIONS) if _on_cpu() else None


def short_run_options() -> dict | None:
  return dict(SHORT_RUN_OPTIONS) if _on_cpu() else None


def wide_vector_options() -> dict | None:
  return dict(WIDE_VECTOR_OPTIONS) if _on_cpu() and host_has_avx512() else None


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity; `os.cpu_count()` where unknown)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def use_one_device_per_core() -> bool:
  """Gives JAX one CPU device per usable core, so that `models.make_inference_fn` can split a
  batch into one stream per core. Call it before JAX starts its backends (before any array is
  made); afterwards it changes nothing and returns False (True if JAX already has one device
  per core), as it does where the user already chose a device count (`jax_num_cpu_devices` or
  `--xla_force_host_platform_device_count`).

  One stream per core beats one stream whose every op is split across the cores: B0 at batch
  32 and 224 px on the 2-core Xeon VM, 126 -> 152 img/s (docs/performance.md). It changes what
  `jax.devices('cpu')` returns, so a program that assumes one CPU device should not call it.
  """
  cores = usable_cores()
  if cores < 2 or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return False
  if jax.config.jax_num_cpu_devices not in (-1, 1, cores):
    return False
  try:
    jax.config.update('jax_num_cpu_devices', cores)
  except RuntimeError as error:  # the backends already started
    logging.info('Keeping JAX\'s CPU devices as they are (%s).', error)
    return False
  return True
