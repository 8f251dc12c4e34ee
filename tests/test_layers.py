"""The CPU fast paths against XLA's own convolutions, TF 'SAME' padding and grouped BatchNorm.

`layers.depthwise_conv_shifted` and `layers.conv_matmul` exist only because XLA:CPU's grouped
convolution is slow; they must be numerically interchangeable with `lax.conv_general_dilated`
(which implements TF 'SAME' by definition), in values and in gradients, or CPU-trained weights
would not transfer to TPU/GPU. Everything runs at a few pixels; the one whole-model check is B0
at 64 px.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from efficientnet_jax.models import B0_BLOCKS, create_model, layers

# B0's stage 2 alone (block2a: expand, stride-2 depthwise, SE gate folded into the projection;
# block2b: the same at stride 1 plus the identity skip with stochastic depth) between the stem
# and the head: every conv path of the network, in a train-mode gradient that compiles fast.
SMALL_BLOCKS = B0_BLOCKS[1:2]


def random_variables(shapes, seed: int):
  """Concrete variables for an abstract variable tree, drawn with NumPy (no XLA RNG to compile).

  Kernels follow the model's own fan-out scaling; BN affines and statistics are randomised away
  from their identity initial values so that a misplaced scale or statistic shows in the output.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if name.endswith("['kernel']"):
      fan_out = np.prod(shape[:-2]) * (1 if shape[-2] == 1 and len(shape) == 4 else shape[-1])
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_out)
    elif name.endswith("['scale']"):
      value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith("['var']"):
      value = rng.uniform(0.2, 1.0, shape)
    else:  # BN bias and mean, conv and dense biases
      value = rng.normal(size=shape) * 0.2
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def assert_close_to_scale(actual, expected, rtol: float, scale=None, err_msg=''):
  """|actual - expected| <= rtol * max|expected| (or `scale`), elementwise."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, err_msg
  scale = np.abs(expected).max() if scale is None else scale
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=err_msg)


# --- TF 'SAME' padding ----------------------------------------------------------------------------


@pytest.mark.parametrize('size, kernel, stride, expected', [
    (224, 3, 2, (0, 1)),  # out 112: (111 * 2 + 3) - 224 = 1 pixel, after (bottom/right)
    (225, 3, 2, (1, 1)),  # out 113: 112 * 2 + 3 - 225 = 2
    (8, 5, 2, (1, 2)),    # out 4: 3 * 2 + 5 - 8 = 3, the odd one after
    (7, 5, 2, (2, 2)),    # out 4: 3 * 2 + 5 - 7 = 4
    (8, 3, 1, (1, 1)),
    (4, 5, 1, (2, 2)),
    (2, 5, 2, (1, 2)),    # out 1: 0 + 5 - 2 = 3
    (8, 1, 2, (0, 0)),    # 1x1 stride 2 on even size: (3 * 2 + 1) - 8 = -1 -> no padding
    (1, 3, 2, (1, 1)),
])
def test_same_padding_hand_cases(size, kernel, stride, expected):
  assert layers.same_padding(size, kernel, stride) == expected
  # XLA's own reading of 'SAME' agrees.
  assert tuple(lax.padtype_to_pads((size,), (kernel,), (stride,), 'SAME')[0]) == expected


# --- depthwise: shifted slices vs XLA's grouped convolution ---------------------------------------


def _values_and_grads(conv_fn, x, kernel, cotangent, stride):
  out, vjp = jax.vjp(lambda x, k: conv_fn(x, k, stride), x, kernel)
  return (out,) + vjp(cotangent)


@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_shifted_equals_xla(kernel_size, stride):
  rng = np.random.default_rng(10 * kernel_size + stride)
  cases = []
  # Odd, even, odd, non-square; then batch 1 with maps smaller than the kernel (the hand-written
  # backward crops and pads the output gradient by the padding the forward pass added).
  for n, h, w in ((2, 7, 7), (2, 8, 8), (2, 9, 9), (2, 8, 11), (1, 1, 1), (1, 2, 5), (1, 6, 3)):
    out_h, out_w = -(-h // stride), -(-w // stride)
    cases.append((normal(rng, n, h, w, 5), normal(rng, kernel_size, kernel_size, 1, 5),
                  normal(rng, n, out_h, out_w, 5)))

  @jax.jit
  def both(cases):
    return [(_values_and_grads(layers.depthwise_conv_shifted, *case, stride),
             _values_and_grads(layers.depthwise_conv_xla, *case, stride)) for case in cases]

  for (x, _, _), (fast, ref) in zip(cases, both(cases)):
    h, w = x.shape[1:3]
    assert fast[0].shape == (x.shape[0], -(-h // stride), -(-w // stride), 5)
    for got, want, what in zip(fast, ref, ('output', 'd/dx', 'd/dkernel')):
      assert_close_to_scale(got, want, 1e-5, err_msg=f'{h}x{w} {what}')


def test_depthwise_shifted_backward_in_bfloat16_and_under_remat():
  # The hand-written backward keeps the input's and the kernel's dtypes, accumulates the kernel
  # gradient in float32, and composes with jax.checkpoint (the model's remat) and vmap.
  rng = np.random.default_rng(3)
  x, kernel, cot = normal(rng, 2, 9, 9, 4), normal(rng, 3, 3, 1, 4), normal(rng, 2, 5, 5, 4)
  ref = _values_and_grads(layers.depthwise_conv_xla, x, kernel, cot, 2)
  half = jax.jit(lambda *a: _values_and_grads(layers.depthwise_conv_shifted, *a, 2))(
      x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), cot.astype(jnp.bfloat16))
  for got, want, dtype in zip(half, ref, (jnp.bfloat16,) * 3):
    assert got.dtype == dtype
    assert_close_to_scale(got.astype(jnp.float32), want, 3e-2)
  remat = jax.checkpoint(lambda x, k: layers.depthwise_conv_shifted(x, k, 2))
  got = jax.jit(lambda *a: _values_and_grads(lambda x, k, _: remat(x, k), *a, 2))(x, kernel, cot)
  for a, b in zip(got, ref):
    assert_close_to_scale(a, b, 1e-5)
  batched = jax.vmap(lambda xi: jax.grad(
      lambda x: jnp.sum(layers.depthwise_conv_shifted(x, kernel, 1) ** 2))(xi[None]))(x)
  want = jax.vmap(lambda xi: jax.grad(
      lambda x: jnp.sum(layers.depthwise_conv_xla(x, kernel, 1) ** 2))(xi[None]))(x)
  assert_close_to_scale(batched, want, 1e-5)


def test_depthwise_shifted_is_not_trivially_equal():
  # The comparison above can fail: a transposed kernel (kw, kh) gives different numbers.
  rng = np.random.default_rng(0)
  x, kernel = normal(rng, 1, 6, 6, 2), normal(rng, 3, 3, 1, 2)
  swapped = jnp.swapaxes(kernel, 0, 1)
  ref = layers.depthwise_conv_xla(x, kernel, 1)
  assert np.abs(layers.depthwise_conv_shifted(x, swapped, 1) - ref).max() > 1e-2


# --- dense convolutions: im2col / matmul vs XLA ---------------------------------------------------


def test_conv_matmul_equals_xla():
  # 1x1 stride 1 (expand, project, head), 1x1 stride 2, 3x3 stride 2 (the stem) and 3x3 stride 1,
  # on even and odd sizes.
  rng = np.random.default_rng(0)
  strides, cases = [], []
  for kernel_size, stride in ((1, 1), (1, 2), (3, 2), (3, 1)):
    for h, w in ((8, 8), (9, 7)):
      strides.append(stride)
      cases.append((normal(rng, 2, h, w, 3), normal(rng, kernel_size, kernel_size, 3, 6),
                    normal(rng, 2, -(-h // stride), -(-w // stride), 6)))

  @jax.jit
  def both(cases):
    return [(_values_and_grads(layers.conv_matmul, *case, stride),
             _values_and_grads(layers.conv_xla, *case, stride))
            for stride, case in zip(strides, cases)]

  for stride, (x, kernel, _), (fast, ref) in zip(strides, cases, both(cases)):
    for got, want, what in zip(fast, ref, ('output', 'd/dx', 'd/dkernel')):
      assert_close_to_scale(got, want, 1e-5,
                            err_msg=f'k{kernel.shape[0]} s{stride} {x.shape} {what}')


def test_resolve_conv_impl():
  # conftest pins the tests to CPU, where 'auto' must pick the shifted-slice / matmul path.
  assert layers.resolve_conv_impl('auto') == ('cpu' if jax.default_backend() == 'cpu' else 'xla')
  assert layers.resolve_conv_impl('xla') == 'xla'
  assert layers.resolve_conv_impl('cpu') == 'cpu'
  with pytest.raises(ValueError, match=r"Unknown conv_impl 'gpu'.*auto, xla, cpu"):
    layers.resolve_conv_impl('gpu')
  with pytest.raises(ValueError, match='Unknown conv_impl'):
    jax.eval_shape(create_model('efficientnet-b0', conv_impl='tpu').init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


# --- the whole model: conv_impl='cpu' vs 'xla' ----------------------------------------------------


def test_b0_logits_cpu_equal_xla():
  x = normal(np.random.default_rng(0), 2, 64, 64, 3)
  cpu = create_model('efficientnet-b0', conv_impl='cpu')
  xla = create_model('efficientnet-b0', conv_impl='xla')
  # The model's own initial values with every 1-D leaf (BN affine and statistics) moved. With
  # `random_variables` the full B0 blows up to logits of ~1e9, where an SE gate's input is a
  # difference of such numbers: on an AVX-512 Xeon one image's gate flipped between the two
  # paths (51% apart at stride 32, the other image 4e-6), rounding, not a wrong convolution.
  variables = jax.jit(xla.init)(jax.random.key(0), x[:1])
  leaves, treedef = jax.tree.flatten(variables)
  rng = np.random.default_rng(1)
  variables = jax.tree.unflatten(treedef, [
      v + 0.2 * rng.uniform(size=v.shape).astype(np.float32) if v.ndim == 1 else v
      for v in leaves])
  got = jax.jit(cpu.apply)(variables, x)
  want = jax.jit(xla.apply)(variables, x)
  assert got.shape == (2, 1000)
  assert np.abs(np.asarray(want)).max() > 0.1  # signal, not a collapsed network
  assert_close_to_scale(got, want, 1e-4)
  # These logits hardly depend on the image (the initial head), so compare every stage's
  # features too: they do (the two images' maps differ by 0.2-120% of their scale).
  got, want = (jax.jit(create_model('efficientnet-b0', conv_impl=impl, features_only=True).apply)(
      variables, x) for impl in ('cpu', 'xla'))
  assert sorted(got) == ['stride_16', 'stride_2', 'stride_32', 'stride_4', 'stride_8']
  for name in got:
    scale = np.abs(np.asarray(want[name])).max()
    assert np.abs(np.asarray(want[name][0] - want[name][1])).max() > 1e-3 * scale, name
    assert_close_to_scale(got[name], want[name], 1e-5, err_msg=name)


def test_train_mode_loss_and_grads_cpu_equal_xla():
  x = normal(np.random.default_rng(0), 4, 32, 32, 3)
  labels = jnp.array([0, 3, 5, 9])
  models = {impl: create_model('efficientnet-b0', num_classes=10, blocks=SMALL_BLOCKS,
                               drop_connect_rate=0.5, conv_impl=impl) for impl in ('cpu', 'xla')}
  variables = random_variables(jax.eval_shape(models['xla'].init, jax.random.key(0), x), seed=1)
  rng = jax.random.key(7, impl='rbg')  # the same stochastic-depth masks for both

  def loss_fn(params, model):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                  train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()
    return loss, updates

  results = {impl: jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)(
      variables['params'], model) for impl, model in models.items()}
  (loss_cpu, stats_cpu), grads_cpu = results['cpu']
  (loss_xla, stats_xla), grads_xla = results['xla']
  np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5)
  # Some gradients are exactly zero in theory (a bias right before a train-mode BatchNorm), so
  # compare each leaf against the largest gradient of the whole tree.
  scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_xla))
  assert scale > 1e-3
  jax.tree_util.tree_map(lambda a, b: assert_close_to_scale(a, b, 1e-4, scale), grads_cpu,
                         grads_xla)
  jax.tree_util.tree_map(lambda a, b: assert_close_to_scale(a, b, 1e-4), stats_cpu, stats_xla)


# --- BatchNorm ------------------------------------------------------------------------------------


def _bn_variables(features, rng):
  return {'params': {'scale': jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32),
                     'bias': jnp.asarray(rng.normal(size=features), jnp.float32)},
          'batch_stats': {'mean': jnp.asarray(rng.normal(size=features), jnp.float32),
                          'var': jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32)}}


def test_batchnorm_defaults_update_running_stats_tf_style():
  bn = layers.BatchNorm()
  assert (bn.momentum, bn.epsilon) == (0.99, 1e-3)
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (6, 3, 3, 4)).astype(np.float32)
  variables = _bn_variables(4, rng)
  y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  old = variables['batch_stats']
  batch_mean, batch_var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(updates['batch_stats']['mean'],
                             0.99 * old['mean'] + 0.01 * batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'],
                             0.99 * old['var'] + 0.01 * batch_var, rtol=1e-5, atol=1e-6)
  scale, bias = variables['params']['scale'], variables['params']['bias']
  np.testing.assert_allclose(y, (x - batch_mean) / np.sqrt(batch_var + 1e-3) * scale + bias,
                             rtol=1e-4, atol=1e-4)
  # Eval mode uses the running statistics and epsilon 1e-3 (it matters for a tiny variance).
  variables['batch_stats']['var'] = jnp.full((4,), 2e-3)
  y = bn.apply(variables, jnp.asarray(x), train=False)
  want = (x - old['mean']) / np.sqrt(2e-3 + 1e-3) * scale + bias
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_batchnorm_group_statistics():
  rng = np.random.default_rng(1)
  # Groups with very different statistics, so per-group and global normalisation differ.
  x = (rng.normal(size=(8, 3, 2, 4)) * np.array([1, 1, 1, 1, 5, 5, 5, 5])[:, None, None, None]
       + np.repeat([[-2.0], [3.0]], 4, axis=0)[:, :, None, None]).astype(np.float32)
  variables = _bn_variables(4, rng)
  bn = layers.BatchNorm(group_size=4)
  y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  scale, bias = np.asarray(variables['params']['scale']), np.asarray(variables['params']['bias'])
  means, variances = [], []
  for g in range(2):
    part = x[4 * g:4 * g + 4].astype(np.float64)
    mean, var = part.mean((0, 1, 2)), part.var((0, 1, 2))
    means.append(mean)
    variances.append(var)
    np.testing.assert_allclose(y[4 * g:4 * g + 4], (part - mean) / np.sqrt(var + 1e-3) * scale
                               + bias, rtol=1e-4, atol=1e-4)
  old = variables['batch_stats']
  np.testing.assert_allclose(updates['batch_stats']['mean'],
                             0.99 * old['mean'] + 0.01 * np.mean(means, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'],
                             0.99 * old['var'] + 0.01 * np.mean(variances, 0), rtol=1e-5,
                             atol=1e-5)
  # Global statistics (group_size 0, or a group at least as large as the batch) differ.
  y_global = layers.BatchNorm().apply(variables, jnp.asarray(x), train=True,
                                      mutable=['batch_stats'])[0]
  assert np.abs(np.asarray(y_global - y)).max() > 0.1
  y_big = layers.BatchNorm(group_size=8).apply(variables, jnp.asarray(x), train=True,
                                               mutable=['batch_stats'])[0]
  np.testing.assert_allclose(y_big, y_global, rtol=1e-6, atol=1e-6)


def test_batchnorm_group_size_must_divide_batch():
  bn = layers.BatchNorm(group_size=3)
  variables = _bn_variables(4, np.random.default_rng(0))
  with pytest.raises(ValueError, match=r'bn_group_size=3 does not divide the batch of 8'):
    bn.apply(variables, jnp.ones((8, 2, 2, 4)), train=True, mutable=['batch_stats'])
  # Eval mode never looks at the batch, so any batch size works.
  assert bn.apply(variables, jnp.ones((8, 2, 2, 4)), train=False).shape == (8, 2, 2, 4)
