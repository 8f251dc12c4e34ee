"""The per-compilation XLA:CPU options: accepted by this XLA, CPU-only, and value-preserving."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import xla_cpu


def _program(x):
  return jnp.sum(x * jax.nn.sigmoid(x) @ x.T, axis=0)


@pytest.mark.parametrize('options', [xla_cpu.RUN_ONCE_OPTIONS, xla_cpu.SHORT_RUN_OPTIONS,
                                     xla_cpu.WIDE_VECTOR_OPTIONS])
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
  assert xla_cpu.short_run_options() == xla_cpu.SHORT_RUN_OPTIONS
  assert xla_cpu.wide_vector_options() == (
      xla_cpu.WIDE_VECTOR_OPTIONS if xla_cpu.host_has_avx512() else None)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert xla_cpu.run_once_options() is None
  assert xla_cpu.short_run_options() is None
  assert xla_cpu.wide_vector_options() is None


def test_avx512_read_from_cpuinfo():
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = next((line.split() for line in f if line.startswith('flags')), [])
  except OSError:
    flags = []
  assert xla_cpu.host_has_avx512() == ('avx512f' in flags)
  assert xla_cpu.cpu_flags() == frozenset(flags[2:])  # after 'flags' and ':'
  assert xla_cpu.host_has_bf16_units() == bool({'amx_bf16', 'avx512_bf16'} & set(flags))


def test_train_step_program_grows_linearly_with_the_state():
  """The finiteness flag is computed once, not fused into every leaf's update.

  XLA:CPU had copied the and-chain over all state leaves into each leaf's `where`: quadratic in
  the leaves (a tiny B0 with 335 leaves: 112k `and`s, a 51 s compile instead of 12 s)."""
  import re
  from efficientnet_jax import configs_lib, sharding, train
  config = configs_lib.default_config('smoke')
  for key, value in dict(width=0.25, depth=0.25, resolution=16, stem_stride=1, num_classes=10,
                         blocks=('r1_k3_s11_e1_i32_o16_se0.25',
                                 'r1_k3_s22_e6_i16_o24_se0.25')).items():
    setattr(config, key, value)
  config = configs_lib.resolve(config)
  steps = train.build_steps(config, sharding.create_mesh(jax.devices()[:1]), 10.0)
  hlo = steps.lower_train(8).compile(compiler_options=xla_cpu.run_once_options()).as_text()
  leaves = len(jax.tree.leaves(steps.abstract_state))
  assert leaves > 40
  ands = len(re.findall(r' and\(', hlo))
  assert ands < 4 * leaves, (ands, leaves)
