"""make_inference_fn: chunked CPU inference gives exactly the whole-batch result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax.models import create_model, make_inference_fn
from efficientnet_jax.models.inference import default_chunk_size


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
  got = make_inference_fn(model, chunk_size=chunk)(variables, images)
  assert got.shape == (batch, 7)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


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
