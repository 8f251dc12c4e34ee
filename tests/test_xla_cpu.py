"""The per-compilation XLA:CPU options: accepted by this XLA, CPU-only, and value-preserving."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import xla_cpu


def _program(x):
  return jnp.sum(x * jax.nn.sigmoid(x) @ x.T, axis=0)


@pytest.mark.parametrize('options', [xla_cpu.RUN_ONCE_OPTIONS, xla_cpu.WIDE_VECTOR_OPTIONS])
def test_options_compile_and_keep_values(options):
  """A renamed or removed XLA option would raise 'No such compile option' here."""
  x = jnp.asarray(np.random.RandomState(0).randn(64, 48), jnp.float32)
  expected = jax.jit(_program)(x)
  with_options = jax.jit(_program, compiler_options=options)(x)
  np.testing.assert_allclose(np.asarray(with_options), np.asarray(expected), rtol=1e-5,
                             atol=1e-5)
  lowered = jax.jit(_program).lower(x).compile(compiler_options=options)
  np.testing.assert_allclose(np.asarray(lowered(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_options_only_on_cpu(monkeypatch):
  assert xla_cpu.run_once_options() == xla_cpu.RUN_ONCE_OPTIONS
  assert xla_cpu.wide_vector_options() == (
      xla_cpu.WIDE_VECTOR_OPTIONS if xla_cpu.host_has_avx512() else None)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert xla_cpu.run_once_options() is None
  assert xla_cpu.wide_vector_options() is None


def test_avx512_read_from_cpuinfo():
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = next((line.split() for line in f if line.startswith('flags')), [])
  except OSError:
    flags = []
  assert xla_cpu.host_has_avx512() == ('avx512f' in flags)
