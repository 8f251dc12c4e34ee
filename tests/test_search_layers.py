"""The layers the search space adds to MBConvBlock: the regular conv and the pooling skip.

Shapes, parameter names and initialisers (REFERENCE.md), multiply-adds against hand counts,
gradients, TF's average pooling, the CPU and XLA convolutions, and the folded inference path's
refusal. Tiny blocks and 7-32 px keep each case under a second or two.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import compilation, complexity
from efficientnet_jax.models import MBConvBlock, create_model, folding, inference, layers
from test_layers import assert_close_to_scale, random_variables

CASES = list(itertools.product(('depthwise', 'regular'), (1, 3), ('identity', 'pool', 'none'),
                               ((1, 8, 8), (2, 8, 16))))


def block(conv_type, expand, skip, stride, cin, cout, se=0.25, **kw):
  return MBConvBlock(cin, cout, 3, stride, expand, se, 0.0, conv_type=conv_type, skip=skip, **kw)


def init(model, shape, seed=0):
  """`model.init`, compiled with cheap code generation (XLA's RNG compiles slowly otherwise)."""
  x = jnp.zeros(shape)
  fn = jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))
  return compilation.compile_run_once(fn, x)(x)


@pytest.mark.parametrize('conv_type, expand, skip, shape', CASES)
def test_shapes_and_names(conv_type, expand, skip, shape):
  stride, cin, cout = shape
  model = block(conv_type, expand, skip, stride, cin, cout, conv_impl='xla')
  x = jax.ShapeDtypeStruct((2, 7, 7, cin), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  y = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert y.shape == (2, 4 if stride == 2 else 7, 4 if stride == 2 else 7, cout)
  params = variables['params']
  expected = {'se_reduce', 'se_expand', 'project_conv', 'project_bn'}
  if expand != 1:
    expected |= {'expand_conv', 'expand_bn'}
  if conv_type == 'depthwise':
    expected |= {'dwconv', 'bn'}
  if skip == 'pool' and (stride, cin) != (1, cout):
    expected |= {'skip_conv', 'skip_bn'}
    assert params['skip_conv']['kernel'].shape == (1, 1, cin, cout)
  assert set(params) == expected
  if conv_type == 'regular':  # the kxk conv: the expand conv, or the project conv at ratio 1
    kxk = params['expand_conv' if expand != 1 else 'project_conv']['kernel']
    assert kxk.shape == (3, 3, cin, cin * expand if expand != 1 else cout)
    # SE squeezes the block input's channels and gates the (expanded) conv input.
    assert params['se_expand']['kernel'].shape[-1] == cin * expand


def test_initialisers_are_tfs():
  # Untruncated normal with std sqrt(2 / (kh * kw * out)) for every conv (REFERENCE.md).
  model = block('regular', 1, 'pool', 2, 64, 96, se=0.0, conv_impl='xla')
  params = init(model, (1, 8, 8, 64), seed=3)['params']
  for name, kernel_size, out in (('project_conv', 3, 96), ('skip_conv', 1, 96)):
    kernel = np.asarray(params[name]['kernel'])
    want = math.sqrt(2.0 / (kernel_size * kernel_size * out))
    assert abs(kernel.std() / want - 1) < 0.05, name
    assert abs(kernel.mean()) < 0.05 * want
  np.testing.assert_array_equal(params['skip_bn']['scale'], 1.0)


@pytest.mark.parametrize('conv_type, expand, skip, stride, cin, cout, madds', [
    # One 3x3 conv 8 -> 8 on 7x7 (49 * 9 * 8 * 8 = 28,224) + SE 8 -> 2 -> 8 (16 + 16).
    ('regular', 1, 'identity', 1, 8, 8, 28_256),
    # The same at stride 2 to 16 channels (4x4 out: 16 * 9 * 8 * 16 = 18,432) + SE 8->2->8; the
    # pooling skip adds its 1x1 conv 8 -> 16 on the pooled 4x4 (2,048). Pooling itself is free.
    ('regular', 1, 'none', 2, 8, 16, 18_464),
    ('regular', 1, 'pool', 2, 8, 16, 20_512),
    # Expand 3x3 8 -> 24 at stride 2 (16 * 9 * 8 * 24 = 27,648), SE 24->2->24 (96), project
    # 24 -> 16 (16 * 24 * 16 = 6,144); + 2,048 for the pooling skip.
    ('regular', 3, 'identity', 2, 8, 16, 33_888),
    ('regular', 3, 'pool', 2, 8, 16, 35_936),
    # MBConv3 for comparison: expand 49*8*24, depthwise 16*9*24, SE 96, project 16*24*16.
    ('depthwise', 3, 'pool', 2, 8, 16, 9_408 + 3_456 + 96 + 6_144 + 2_048),
])
def test_multiply_adds_against_hand_counts(conv_type, expand, skip, stride, cin, cout, madds):
  model = block(conv_type, expand, skip, stride, cin, cout)
  assert complexity.count_madds(model, (1, 7, 7, cin), train=False) == madds


def test_average_pool_is_tfs_same_pooling():
  tf = pytest.importorskip('tensorflow')
  x = np.random.default_rng(0).normal(size=(2, 7, 5, 3)).astype(np.float32)
  want = tf.nn.avg_pool2d(x, 2, 2, 'SAME').numpy()  # the border windows average their pixels
  np.testing.assert_allclose(layers.average_pool(jnp.asarray(x), 2), want, rtol=1e-6, atol=1e-6)


def test_pooling_skip_adds_the_pooled_input():
  # With the main branch's last BN scaled to 0, the block's output is its shortcut alone (the
  # width does not change, so there is no projection).
  model = block('depthwise', 1, 'pool', 2, 4, 4, se=0.0, conv_impl='xla')
  variables = init(model, (1, 6, 6, 4))
  variables['params']['project_bn'] = {'scale': jnp.zeros(4), 'bias': jnp.zeros(4)}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 4)), jnp.float32)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(got, layers.average_pool(x, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('conv_type', ['regular', 'depthwise'])
def test_gradients_reach_every_parameter_and_cpu_equals_xla(conv_type):
  skip = 'pool'
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 7, 7, 8)), jnp.float32)
  models = {impl: MBConvBlock(8, 16, 5, 2, 3, 0.25, 0.3, conv_type=conv_type, skip=skip,
                              conv_impl=impl) for impl in ('cpu', 'xla')}
  variables = init(models['xla'], x.shape)

  def loss(params, model):
    y, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                       train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(4)})
    return jnp.mean(jnp.sin(y))

  grads = {impl: jax.jit(jax.grad(loss), static_argnums=1)(variables['params'], m)
           for impl, m in models.items()}
  kernels = {path: g for path, g in jax.tree_util.tree_leaves_with_path(grads['xla'])
             if 'kernel' in jax.tree_util.keystr(path)}
  assert kernels and all(np.abs(g).max() > 0 and np.isfinite(g).all() for g in kernels.values())
  scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads['xla']))
  jax.tree_util.tree_map(lambda a, b: assert_close_to_scale(a, b, 1e-4, scale), grads['cpu'],
                         grads['xla'])


SEARCHED = ('r1_k3_s11_e1_i32_o16_c1_se0.25', 'r1_k5_s22_e3_i16_o24_poolskip',
            'r1_k3_s22_e6_i24_o40_c1_se0.25_poolskip', 'r1_k3_s11_e1_i40_o40_noskip')


def test_a_searched_network_runs_unfolded_and_mbconv_blocks_fold():
  model = create_model('efficientnet-b0', num_classes=5, width=0.25, blocks=SEARCHED,
                       stem_stride=1, conv_impl='cpu')
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), x[:1]), seed=0)
  assert not inference.can_fold(model)
  with pytest.raises(ValueError, match='regular conv or a pooling skip.*fold_bn=False'):
    folding.fold_batch_norm(model, variables)
  with pytest.raises(ValueError, match='fold_bn=True needs'):
    inference.make_inference_fn(model, fold_bn=True)
  # MBConv blocks without a skip (MnasNet-A1's first) fold, with the same values.
  plain = model.clone(blocks=tuple(dataclasses.replace(b, conv_type='depthwise', skip='none')
                                   for b in model.blocks))
  assert inference.can_fold(plain)
  variables = random_variables(jax.eval_shape(plain.init, jax.random.key(0), x[:1]), seed=1)
  folded = jax.jit(lambda v, x: folding.folded_forward(plain, folding.fold_batch_norm(plain, v),
                                                       x))(variables, x)
  assert_close_to_scale(folded, jax.jit(plain.apply)(variables, x), 1e-4)


def test_mbconv_block_rejects_unknown_types():
  with pytest.raises(ValueError, match=r"conv_type='grouped'.*valid: conv_type in"):
    block('grouped', 1, 'identity', 1, 8, 8).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)),
                                                  train=False)
