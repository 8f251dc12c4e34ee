"""make_inference_fn: chunked CPU inference, and a batch split into one stream per CPU device,
give exactly the whole-batch result."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import xla_cpu
from efficientnet_jax.models import create_model, make_inference_fn, onednn
from efficientnet_jax.models.inference import cpu_core_devices, default_chunk_size


@pytest.fixture(scope='module')
def model_and_variables():
  model = create_model('efficientnet-b0', num_classes=7, width=0.5, depth=0.5)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # Non-trivial BN statistics, so a chunk that wrongly used batch statistics would differ.
  stats = jax.jit(lambda s: jax.tree.map(
      lambda v: v + 0.1 * jax.random.uniform(jax.random.key(1), v.shape), s))(
          variables['batch_stats'])
  return model, {'params': variables['params'], 'batch_stats': stats}


@pytest.mark.parametrize('batch, chunk', [
    (7, 3), pytest.param(8, 2, marks=pytest.mark.slow), pytest.param(5, 8, marks=pytest.mark.slow),
    (6, None)])
def test_chunked_equals_whole_batch(model_and_variables, batch, chunk):
  model, variables = model_and_variables
  images = jax.random.normal(jax.random.key(2), (batch, 32, 32, 3))
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  got = make_inference_fn(model, chunk_size=chunk, cores=1)(variables, images)
  assert got.shape == (batch, 7)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def xla_path(monkeypatch):
  """Streams are the XLA path's: where the oneDNN extension loads, float32 runs on it instead
  (one stream that oneDNN threads), so these tests turn it off."""
  monkeypatch.setattr(onednn, '_state', {'lib': None, 'reason': 'off: the XLA path under test'})


@pytest.mark.parametrize('batch, cores', [(7, 2), (8, 4), (3, 8), (1, 2)])
def test_streams_per_core_equal_whole_batch(model_and_variables, batch, cores, xla_path):
  # The tests' 8 fake CPU devices stand in for cores: a batch of 7 over 2 streams is padded to 8,
  # one of 3 over 8 runs as one stream (fewer images than streams), as does batch 1.
  model, variables = model_and_variables
  images = jax.random.normal(jax.random.key(4), (batch, 32, 32, 3))
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  fn = make_inference_fn(model, cores=cores)
  got = fn(variables, images)
  assert got.shape == (batch, 7)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  if batch >= cores:
    assert len(got.sharding.device_set) == cores
  # Committed inputs on some other device, and numpy inputs, are placed for the streams.
  moved = jax.device_put((variables, images), jax.devices()[5])
  np.testing.assert_allclose(fn(*moved), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fn(variables, np.asarray(images)), expected, rtol=1e-5, atol=1e-5)


def test_streams_follow_new_variables(model_and_variables, xla_path):
  # The placed copy of the variables is reused only for the very same arrays.
  model, variables = model_and_variables
  images = jax.random.normal(jax.random.key(5), (4, 32, 32, 3))
  fn = make_inference_fn(model, cores=2)
  first = fn(variables, images)
  other = {**variables, 'params': jax.tree.map(lambda v: v * 1.1, variables['params'])}
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_allclose(fn(other, images), apply(other, images), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fn(variables, images), first, rtol=0, atol=0)
  assert not np.allclose(first, apply(other, images))


def test_cores_argument():
  assert cpu_core_devices(1) == []
  assert cpu_core_devices(3) == jax.devices()[:3]
  assert len(cpu_core_devices('auto')) in (0, *range(2, 9))
  for bad in (0, -2, 'all', True, 1.5):
    with pytest.raises(ValueError, match='cores'):
      cpu_core_devices(bad)


def test_one_device_per_core_before_jax_starts():
  # In a fresh process: as many CPU devices as usable cores; too late once JAX has started.
  code = ('from efficientnet_jax import xla_cpu; import jax; '
          'print(xla_cpu.use_one_device_per_core(), len(jax.devices("cpu")), '
          'xla_cpu.use_one_device_per_core())')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       check=True, timeout=300).stdout.split()
  cores = xla_cpu.usable_cores()
  assert out == ([str(cores > 1), str(max(cores, 1)), str(cores > 1)])
  # Here JAX already runs with the tests' 8 fake devices: nothing changes.
  assert not xla_cpu.use_one_device_per_core()
  assert len(jax.devices()) == 8


@pytest.mark.slow
def test_chunking_works_for_feature_dicts():
  model = create_model('efficientnet-b0', width=0.25, depth=0.25, features_only=True)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  images = jax.random.normal(jax.random.key(3), (5, 32, 32, 3))
  got = make_inference_fn(model, chunk_size=2)(variables, images)
  want = model.apply(variables, images, train=False)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_auto_chunk_size_is_cpu_only():
  assert jax.default_backend() == 'cpu'
  assert default_chunk_size() == 8
