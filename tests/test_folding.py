"""BatchNorm folding and the per-stage chunked CPU inference path.

The folded network must give `model.apply(train=False)`'s values (and gradients with respect to
the unfolded variables), for both SE/swish EfficientNets and the Lite family (relu6, no SE), and
`make_inference_fn`'s default must agree with the unfolded model and with XLA's convolutions.
Small widths and 32-64 px keep every case to a few seconds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax.models import create_model, folding, inference, make_inference_fn
from test_layers import assert_close_to_scale, random_variables


def small_model(name='efficientnet-b0'):
  # Depth 0.25 keeps one block per stage (every kernel size, stride and the skip), compiles fast.
  return create_model(name, num_classes=5, width=0.5, depth=0.25)


def model_and_variables(name='efficientnet-b0', seed=0):
  model = small_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # Random BN scale/bias/mean/var far from identity, so a misplaced fold shows in the output.
  return model, random_variables(shapes, seed)


def tame_variables(model, seed):
  """The initial variables with every 1-D leaf (BN scale, bias, statistics; conv biases) moved.

  `random_variables` blows activations up to ~1e5-1e6, where even XLA's own convolution and the
  CPU path differ by ~10% in the gradient (and ~1e-3 in deep logits); these keep outputs of
  order 1 while still testing every folded scale and shift.
  """
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [
      v + 0.2 * jax.random.uniform(k, v.shape) if v.ndim == 1 else v
      for v, k in zip(leaves, keys)])


def images(batch, size=32, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


@pytest.mark.parametrize('name', ['efficientnet-b0', 'efficientnet-lite0'])
def test_folded_forward_equals_apply(name):
  model, variables = model_and_variables(name)
  x = images(3)
  want = model.apply(variables, x, train=False)
  got = jax.jit(lambda v, x: folding.folded_forward(model, folding.fold_batch_norm(model, v), x))(
      variables, x)
  assert_close_to_scale(got, want, 1e-4)


@pytest.mark.slow
def test_folded_gradients_equal_apply():
  model = small_model()
  variables = tame_variables(model, seed=3)
  x = images(2, seed=4)
  cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5)), jnp.float32)

  @jax.jit
  def grads(variables):
    ref = jax.grad(lambda v: jnp.vdot(model.apply(v, x, train=False), cotangent))(variables)
    got = jax.grad(lambda v: jnp.vdot(
        folding.folded_forward(model, folding.fold_batch_norm(model, v), x), cotangent))(variables)
    return ref, got

  ref, got = grads(variables)
  for (path, want), have in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
    assert_close_to_scale(have, want, 1e-3, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_default_inference_equals_unfolded():
  # 64 px gives feature maps of 32, 16, 8, ... px, so with this test's thresholds every chunk
  # size (1, 2, 8) is in use; a batch of 10 (over 8, so 'auto' folds) is padded to 16.
  # (CPU vs XLA convolutions is tested in test_layers.py.)
  model = small_model()
  variables = tame_variables(model, seed=6)
  assert inference.can_fold(model)
  x = images(10, size=64, seed=7)
  want = model.apply(variables, x, train=False)
  orig = inference.CPU_STAGE_CHUNKS, inference.CPU_STAGE_CHUNKS_PER_CORE
  inference.CPU_STAGE_CHUNKS = ((16, 1), (8, 2), (0, 8))
  inference.CPU_STAGE_CHUNKS_PER_CORE = ((16, 2), (8, 1), (0, 4))
  try:
    # One stream, and the batch split across two CPU devices (5 images each).
    got = [make_inference_fn(model, cores=cores)(variables, x) for cores in (1, 2)]
  finally:
    inference.CPU_STAGE_CHUNKS, inference.CPU_STAGE_CHUNKS_PER_CORE = orig
  for out in got:
    assert out.shape == (10, 5)
    assert_close_to_scale(out, want, 1e-5)
  # An explicit chunk size folds too, with one uniform chunk.
  got = make_inference_fn(model, chunk_size=2, fold_bn=True)(variables, x)
  assert_close_to_scale(got, want, 1e-5)


def test_folded_weights_follow_the_variables():
  # The default folds at every batch size and keeps the folded weights for the same arrays only:
  # new variables (or numpy ones, which could change in place) are folded afresh.
  model = small_model()
  first, second = tame_variables(model, seed=8), tame_variables(model, seed=9)
  x = images(1, size=64, seed=10)
  fn = make_inference_fn(model, cores=1)
  apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
  for variables in (first, second, first, jax.tree.map(np.asarray, second)):
    assert_close_to_scale(fn(variables, x), apply(variables, x), 1e-5)


def test_fold_only_where_it_applies():
  assert inference.stage_chunk(112) == 2 and inference.stage_chunk(28) == 2
  assert inference.stage_chunk(14) == inference.CPU_CHUNK_SIZE
  assert inference.stage_chunk(112, per_core=True) == 1
  assert inference.stage_chunk(14, per_core=True) == inference.CPU_CHUNK_SIZE
  assert not inference.can_fold(create_model('efficientnet-b0', conv_impl='xla'))
  assert not inference.can_fold(create_model('efficientnet-b0', features_only=True))
  assert not inference.can_fold(create_model('efficientnet-b0', dtype=jnp.bfloat16))
  with pytest.raises(ValueError, match='fold_bn'):
    make_inference_fn(create_model('efficientnet-b0', features_only=True), fold_bn=True)
