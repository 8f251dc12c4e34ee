"""Test configuration: JAX runs on 8 fake CPU devices so sharding code is really exercised.

The flags must be set before JAX initialises its backends, which is why this happens at import
time of the conftest, before any test module imports jax.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
# tf.data must not grab the (nonexistent) GPU or all memory.
try:
  import tensorflow as tf  # noqa: E402

  tf.config.set_visible_devices([], 'GPU')
except Exception:  # pragma: no cover - TF missing or already initialised
  pass
