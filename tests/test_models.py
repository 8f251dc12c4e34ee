"""The model zoo against the published architecture: parameter counts, scaling rules, layer
details, initialisers, train-mode behaviour and input validation.

Shapes and counts come from `jax.eval_shape` (nothing runs). Numeric checks use B0 cut down to
its first two stages, which still has every kind of layer (stem, an unexpanded block, an
expanded stride-2 block, an identity skip with stochastic depth, SE, B0's head and classifier)
and compiles in a few seconds on CPU. MAC counts are in test_complexity.py, weight-level parity
with Keras in test_convert_keras.py.
"""
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax.models import (ALL_VARIANTS, B0_BLOCKS, VARIANTS, BlockArgs, MBConvBlock,
                                     compound_coefficients, create_model, decode_block_string,
                                     round_filters, round_repeats)
from efficientnet_jax.models.variants import B0_BLOCK_STRINGS, LITE_BLOCKS

# B0's first two stages: block1a (expand 1, SE), block2a (expand 6, stride 2), block2b (skip).
TINY_BLOCKS = B0_BLOCKS[:2]
LABELS = jnp.array([1, 2, 3, 999])  # for the tiny model's batch of 4


def images(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def abstract_variables(model, size=32, batch=1):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))


@functools.lru_cache(maxsize=None)
def traced(name, **overrides):
  """(parameter shapes by 'module/.../name', [(block name, drop rate)]) of a variant, from one
  abstract trace (nothing runs; cached because tracing B7 or L2 takes seconds)."""
  drop_rates = []

  def record_blocks(next_fun, args, kwargs, context):
    if isinstance(context.module, MBConvBlock) and context.method_name == '__call__':
      drop_rates.append((context.module.name, context.module.drop_rate))
    return next_fun(*args, **kwargs)

  # Shapes do not depend on conv_impl; 'xla' traces one op per conv instead of k*k slices.
  overrides.setdefault('conv_impl', 'xla')
  with nn.intercept_methods(record_blocks):
    variables = abstract_variables(create_model(name, **overrides))
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  return {path: leaf.shape for path, leaf in flat.items()}, drop_rates


def param_shapes(name, **overrides):
  return traced(name, **overrides)[0]


def trainable_params(name, **overrides) -> int:
  return sum(math.prod(shape) for shape in param_shapes(name, **overrides).values())


def cross_entropy(logits, labels):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()


def random_batch_stats(batch_stats, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32), batch_stats)


@pytest.fixture(scope='module')
def tiny():
  """(model, initial variables, a 16 px batch of 4) for the two-stage B0 with 1000 classes."""
  model = create_model('efficientnet-b0', blocks=TINY_BLOCKS)
  x = images(4, 16, 16, 3)
  # An 'rbg' key: XLA:CPU compiles its generator much faster than threefry's.
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)
  return model, variables, x


def _capture_top(module, method_name):
  return module.name in ('top_conv', 'top_bn')


@pytest.fixture(scope='module')
def train_step(tiny):
  """Jitted train-mode loss and gradient (one compile serves every train-mode test).

  (variables, x, labels, rng) -> ((loss, (logits, state)), grads), where state holds the new
  batch_stats and the outputs of top_conv and top_bn.
  """
  model = tiny[0]

  def loss_fn(params, batch_stats, x, labels, rng):
    logits, state = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, rngs={'dropout': rng},
        mutable=['batch_stats', 'intermediates'], capture_intermediates=_capture_top)
    return cross_entropy(logits, labels), (logits, state)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  return lambda variables, x, labels, rng: grad_fn(
      variables['params'], variables['batch_stats'], x, labels, rng)


def train_apply(train_step, variables, x, rng):
  """Train-mode (logits, state) through the shared `train_step`."""
  (_, (logits, state)), _ = train_step(variables, x, LABELS, rng)
  return logits, state


@pytest.fixture(scope='module')
def eval_apply(tiny):
  """Jitted eval-mode apply, returning the same state as `train_apply`."""
  model = tiny[0]
  return jax.jit(lambda variables, x: model.apply(
      variables, x, train=False, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=_capture_top))


# --- parameter counts -----------------------------------------------------------------------------

# Trainable parameters with 1000 classes, as published (official TF code, timm and Keras agree).
# B0 by hand (BN = scale + bias, 2 per channel; SE squeezes to max(1, int(block_in * 0.25))):
#   stem   3*3*3*32 + 2*32                                                  =       928
#   block1a (32->16, e1, se 8): dw 9*32 + bn 64 + se (32*8+8 + 8*32+32) + 32*16 + bn 32
#                                                                           =     1,448
#   stage2  6,004 + 10,710    stage3 15,350 + 31,290
#   stage4  37,130 + 2 * 102,900    stage5 126,004 + 2 * 208,572
#   stage6  262,492 + 3 * 587,952    stage7 717,232
#     e.g. block2a (16->24, e6 -> 96, se 4): 16*96 + 2*96 + 9*96 + 2*96 + (96*4+4 + 4*96+96)
#                                            + 96*24 + 2*24 = 6,004
#   blocks total                                                            = 3,594,460
#   head   320*1280 + 2*1280                                                =   412,160
#   predictions 1280*1000 + 1000                                            = 1,281,000
#   total  928 + 3,594,460 + 412,160 + 1,281,000                            = 5,288,548
PUBLISHED_PARAMS = {
    'efficientnet-b0': 5_288_548,
    'efficientnet-b1': 7_794_184,
    'efficientnet-b2': 9_109_994,
    'efficientnet-b3': 12_233_232,
    'efficientnet-b4': 19_341_616,
    'efficientnet-b5': 30_389_784,
    'efficientnet-b6': 43_040_704,
    'efficientnet-b7': 66_347_960,
    # timm's tf_efficientnet_b8 / tf_efficientnet_l2 (no figure in the paper).
    'efficientnet-b8': 87_413_142,
    'efficientnet-l2': 480_309_308,
}
# The Lite models' published sizes are rounded (TF model garden README).
LITE_APPROX_PARAMS = {
    'efficientnet-lite0': 4.7e6,
    'efficientnet-lite1': 5.4e6,
    'efficientnet-lite2': 6.1e6,
    'efficientnet-lite3': 8.2e6,
    'efficientnet-lite4': 13.0e6,
}


@pytest.mark.parametrize('name', list(PUBLISHED_PARAMS))
def test_published_param_counts_exact(name):
  # The variant table carries the paper's B0..B7 figures (B8 and L2 have none).
  in_table = name not in ('efficientnet-b8', 'efficientnet-l2')
  assert VARIANTS[name].published_params == (PUBLISHED_PARAMS[name] if in_table else None)
  assert trainable_params(name) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize('name', list(LITE_APPROX_PARAMS))
def test_lite_param_counts(name):
  assert trainable_params(name) == pytest.approx(LITE_APPROX_PARAMS[name], rel=0.02)


def test_variant_table_is_complete():
  assert set(VARIANTS) == set(PUBLISHED_PARAMS) | set(LITE_APPROX_PARAMS)


# --- scaling rules --------------------------------------------------------------------------------


@pytest.mark.parametrize('filters, width, expected', [
    (32, 1.0, 32),
    (32, 1.1, 32),      # 35.2: int(39.2) // 8 * 8 = 32, and 32 >= 0.9 * 35.2 = 31.68
    (32, 1.2, 40),      # 38.4: int(42.4) // 8 * 8 = 40 (B3's stem)
    (32, 1.4, 48),      # 44.8: int(48.8) // 8 * 8 = 48 (B4's stem)
    (40, 1.1, 48),      # 44.0: int(48.0) // 8 * 8 = 48 (ties round up)
    (112, 1.2, 136),    # 134.4: int(138.4) // 8 * 8 = 136
    (1280, 1.1, 1408),  # 1408 is already a multiple of 8
    (1280, 2.0, 2560),
    (16, 4.3, 72),      # 68.8: int(72.8) // 8 * 8 = 72 (L2's block1 output)
    (16, 0.25, 8),      # 4.0: int(8.0) // 8 * 8 = 8; never below the divisor
    (10, 0.5, 8),       # 5.0: max(8, 8) = 8
    (32, 1.12, 40),     # 35.84: int(39.84) // 8 * 8 = 32 < 0.9 * 35.84 = 32.256, so + 8
    (11, 1.0, 16),      # 11: int(15) // 8 * 8 = 8 < 9.9, so + 8
])
def test_round_filters(filters, width, expected):
  assert round_filters(filters, width) == expected
  assert isinstance(round_filters(filters, width), int)


@pytest.mark.parametrize('repeats, depth, expected', [
    (1, 1.0, 1), (1, 1.1, 2), (2, 1.1, 3), (3, 1.1, 4), (4, 1.8, 8),  # ceil(7.2)
    (4, 3.1, 13),  # ceil(12.4): B7's stage 6
    (3, 0.5, 2), (2, 0.5, 1),
])
def test_round_repeats(repeats, depth, expected):
  assert round_repeats(repeats, depth) == expected


def test_compound_coefficients():
  assert compound_coefficients(1) == (1.2, 1.1, 1.15)
  assert compound_coefficients(0) == (1.0, 1.0, 1.0)
  assert compound_coefficients(-1) == pytest.approx((1 / 1.2, 1 / 1.1, 1 / 1.15))
  assert compound_coefficients(0.5) == pytest.approx((1.2**0.5, 1.1**0.5, 1.15**0.5))
  assert compound_coefficients(2) == pytest.approx((1.44, 1.21, 1.3225))
  assert compound_coefficients(1, alpha=1.0, beta=1.3, gamma=1.0) == (1.0, 1.3, 1.0)
  for bad in ({'alpha': 0.9}, {'beta': 0.5}, {'gamma': 0.99}):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f'{name} >= 1.*got {name}='):
      compound_coefficients(1, **bad)


def test_block_strings_round_trip():
  assert decode_block_string('r2_k5_s22_e6_i24_o40_se0.25') == BlockArgs(
      repeats=2, kernel_size=5, stride=2, expand_ratio=6, in_filters=24, out_filters=40,
      se_ratio=0.25)
  for string, args in zip(B0_BLOCK_STRINGS, B0_BLOCKS):
    assert decode_block_string(string) == args
    assert args.encode() == string
  for args in LITE_BLOCKS + (BlockArgs(3, 7, 1, 4, 64, 96, 0.5),):
    assert decode_block_string(args.encode()) == args
  assert decode_block_string('r1_k3_s11_e1_i32_o16').se_ratio == 0.0  # SE is optional


@pytest.mark.parametrize('bad', [
    'r1_k3_s12_e1_i32_o16_se0.25',  # non-square stride
    'r1_k3_s11_e1_i32_se0.25',      # no output filters
    'k3_r1_s11_e1_i32_o16',         # wrong order
    'r1_k3_s11_e1_i32_o16_se0.25_extra',
    '',
])
def test_bad_block_string(bad):
  with pytest.raises(ValueError, match=r"Cannot parse block string .*for example "
                                       r"'r2_k3_s22_e6_i16_o24_se0.25'"):
    decode_block_string(bad)


@pytest.mark.parametrize('bad', ['r1_k3_s11_e1_i32_o16_se0.2.5', 'r1_k3_s11_e1_i32_o16_se.'])
def test_bad_se_ratio_gets_the_block_string_error(bad):
  with pytest.raises(ValueError, match='Cannot parse block string'):
    decode_block_string(bad)


# --- create_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize('name, suggestion', [
    ('efficientnet-b9', 'efficientnet-b8'),
    ('efficientnet_b0', 'efficientnet-b0'),
    ('resnet50', 'resnet-50'),
    ('vgg16', None),
])
def test_unknown_model_name(name, suggestion):
  with pytest.raises(ValueError, match=f"Unknown model '{name}'") as info:
    create_model(name)
  message = str(info.value)
  for valid in ALL_VARIANTS:  # every family's names
    assert valid in message
  if suggestion:
    assert f"Did you mean '{suggestion}'?" in message
  else:
    assert 'Did you mean' not in message


def test_unknown_override():
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['widht'\].*'width'"):
    create_model('efficientnet-b0', widht=2.0)


def test_overrides():
  b0 = create_model('efficientnet-b0')
  assert (b0.width_coefficient, b0.depth_coefficient, b0.dropout_rate) == (1.0, 1.0, 0.2)
  assert create_model('efficientnet-b0', width=0.5).width_coefficient == 0.5
  shapes = param_shapes('efficientnet-b0', width=0.5)
  assert shapes['stem_conv/kernel'] == (3, 3, 3, 16)      # round_filters(32, 0.5)
  assert shapes['top_conv/kernel'] == (1, 1, 160, 640)    # 320 and 1280 halved
  assert trainable_params('efficientnet-b0', width=0.5) < PUBLISHED_PARAMS['efficientnet-b0'] / 2
  deeper = create_model('efficientnet-b0', depth=2.0, dropout=0.5, num_classes=7)
  assert (deeper.depth_coefficient, deeper.dropout_rate) == (2.0, 0.5)
  shapes = param_shapes('efficientnet-b0', depth=2.0, num_classes=7)
  assert 'block6h/dwconv/kernel' in shapes and 'block6i/dwconv/kernel' not in shapes  # 4 * 2
  assert shapes['predictions/kernel'] == (1280, 7)


def test_stem_stride_override_changes_feature_sizes():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

  def feature_shapes(**overrides):
    model = create_model('efficientnet-b0', features_only=True, **overrides)
    return {k: v.shape for k, v in jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], x).items()}

  assert feature_shapes() == {
      'stride_2': (1, 16, 16, 16), 'stride_4': (1, 8, 8, 24), 'stride_8': (1, 4, 4, 40),
      'stride_16': (1, 2, 2, 112), 'stride_32': (1, 1, 1, 320)}
  assert feature_shapes(stem_stride=1) == {
      'stride_1': (1, 32, 32, 16), 'stride_2': (1, 16, 16, 24), 'stride_4': (1, 8, 8, 40),
      'stride_8': (1, 4, 4, 112), 'stride_16': (1, 2, 2, 320)}


def test_features_only():
  model = create_model('efficientnet-b0', features_only=True)
  variables, features = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x)[::-1],
      jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  # H/2 .. H/32 with B0's stage widths (pytrees sort dict keys, so compare as a dict).
  assert {k: f.shape for k, f in features.items()} == {
      'stride_2': (2, 32, 32, 16), 'stride_4': (2, 16, 16, 24), 'stride_8': (2, 8, 8, 40),
      'stride_16': (2, 4, 4, 112), 'stride_32': (2, 2, 2, 320)}
  # No head: the backbone alone.
  assert not {'top_conv', 'top_bn', 'predictions'} & set(variables['params'])
  assert 'block7a' in variables['params']


# --- architecture details -------------------------------------------------------------------------


def test_batchnorm_defaults():
  for name in ('efficientnet-b0', 'efficientnet-lite0'):
    model = create_model(name)
    assert (model.bn_momentum, model.bn_epsilon) == (0.99, 1e-3)


def test_batchnorm_momentum_numerically(tiny, train_step):
  model, variables, x = tiny
  old = random_batch_stats(variables['batch_stats'])
  _, state = train_apply(train_step, {'params': variables['params'], 'batch_stats': old}, x,
                         jax.random.key(1, impl='rbg'))
  z = np.asarray(state['intermediates']['top_conv']['__call__'][0], np.float64)
  new = state['batch_stats']['top_bn']
  # TF convention: new = momentum * old + (1 - momentum) * batch, momentum 0.99.
  np.testing.assert_allclose(new['mean'], 0.99 * old['top_bn']['mean'] + 0.01 * z.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['var'], 0.99 * old['top_bn']['var'] + 0.01 * z.var((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  # Train mode normalises with the batch statistics and epsilon 1e-3.
  y = state['intermediates']['top_bn']['__call__'][0]
  np.testing.assert_allclose(y, (z - z.mean((0, 1, 2))) / np.sqrt(z.var((0, 1, 2)) + 1e-3),
                             rtol=1e-3, atol=1e-3)


def test_batchnorm_epsilon_in_eval_mode(tiny, eval_apply):
  model, variables, x = tiny
  stats = dict(variables['batch_stats'])
  # A variance comparable to epsilon makes 1e-3 and Flax's default 1e-5 far apart.
  stats['top_bn'] = {'mean': jnp.full((1280,), 0.01), 'var': jnp.full((1280,), 1e-3)}
  _, state = eval_apply({'params': variables['params'], 'batch_stats': stats}, x)
  z = np.asarray(state['intermediates']['top_conv']['__call__'][0], np.float64)
  y = state['intermediates']['top_bn']['__call__'][0]
  np.testing.assert_allclose(y, (z - 0.01) / np.sqrt(1e-3 + 1e-3), rtol=1e-4, atol=1e-4)


def test_se_squeeze_uses_block_input_channels():
  shapes = param_shapes('efficientnet-b0')
  # int(in * 0.25) of the *input* channels, expanded channels on the other side.
  assert shapes['block1a/se_reduce/kernel'] == (1, 1, 32, 8)      # in 32, no expansion
  assert shapes['block2a/se_reduce/kernel'] == (1, 1, 96, 4)      # in 16 -> 4
  assert shapes['block2a/se_reduce/bias'] == (4,)
  assert shapes['block2a/se_expand/kernel'] == (1, 1, 4, 96)
  assert shapes['block2a/se_expand/bias'] == (96,)
  assert shapes['block2b/se_reduce/kernel'] == (1, 1, 144, 6)     # in 24 -> 6
  assert shapes['block6a/se_reduce/kernel'] == (1, 1, 672, 28)    # in 112 -> 28
  assert shapes['block6b/se_reduce/kernel'] == (1, 1, 1152, 48)   # in 192 -> 48
  # Scaled width: B4's block2a gets round_filters(16, 1.4) = 24 inputs -> 6.
  assert param_shapes('efficientnet-b4')['block2a/se_reduce/kernel'] == (1, 1, 144, 6)
  # Among convs only the SE ones have a bias (besides BN, only the classifier has one).
  biased = {name.split('/')[-2] for name in shapes if name.endswith('/bias')}
  assert {layer for layer in biased if not layer.endswith('bn')} == {
      'se_reduce', 'se_expand', 'predictions'}


def test_lite_family():
  lite4 = create_model('efficientnet-lite4')
  assert lite4.activation == 'relu6'
  shapes, b4_shapes = param_shapes('efficientnet-lite4'), param_shapes('efficientnet-b4')
  assert not any('/se_' in name for name in shapes)
  assert any('/se_' in name for name in b4_shapes)
  # Stem and head fixed at 32 / 1280 (B4 scales them to 48 / 1792).
  assert shapes['stem_conv/kernel'] == (3, 3, 3, 32)
  assert b4_shapes['stem_conv/kernel'] == (3, 3, 3, 48)
  assert shapes['top_conv/kernel'] == (1, 1, 448, 1280)
  assert b4_shapes['top_conv/kernel'] == (1, 1, 448, 1792)
  assert shapes['predictions/kernel'] == (1280, 1000)
  # block1a runs on the real 32-channel stem output.
  assert shapes['block1a/dwconv/kernel'] == (3, 3, 1, 32)
  # First and last stages keep one block; the others scale by depth 1.8 as in B4.
  stages = lambda shapes, stage: sorted(  # noqa: E731
      {n.split('/')[0] for n in shapes if n.startswith(f'block{stage}')})
  assert stages(shapes, 1) == ['block1a'] and stages(b4_shapes, 1) == ['block1a', 'block1b']
  assert stages(shapes, 7) == ['block7a'] and len(stages(b4_shapes, 7)) == 2
  assert len(stages(shapes, 2)) == 4 and len(stages(shapes, 6)) == 8
  assert VARIANTS['efficientnet-lite4'].mean_rgb == (127.0, 127.0, 127.0)
  assert VARIANTS['efficientnet-lite4'].stddev_rgb == (128.0, 128.0, 128.0)


@pytest.mark.parametrize('name, activation', [
    ('efficientnet-b0', nn.swish), ('efficientnet-lite0', nn.relu6)])
def test_activation_after_stem(name, activation):
  blocks = (LITE_BLOCKS if 'lite' in name else B0_BLOCKS)[:1]
  model = create_model(name, blocks=blocks, num_classes=4)
  x = images(2, 8, 8, 3)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32), variables)
  # A wide stem output, so that relu6's clip at 6 and swish's dip below 0 both show.
  variables['params']['stem_bn']['scale'] = jnp.full((32,), 20.0)
  variables['params']['stem_bn']['bias'] = jnp.full((32,), -3.0)

  def stem_and_block_input(variables, x):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name == '__call__' and context.module.name == 'block1a':
        captured['block_input'] = args[0]
      out = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and context.module.name == 'stem_bn':
        captured['stem_bn'] = out
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, x)
    return captured

  got = jax.jit(stem_and_block_input)(variables, x)
  stem = np.asarray(got['stem_bn'])
  assert stem.max() > 6 and stem.min() < -1
  np.testing.assert_allclose(got['block_input'], activation(stem), rtol=1e-5, atol=1e-5)


def test_drop_connect_rates():
  rates = traced('efficientnet-b0')[1]
  assert [name for name, _ in rates] == [
      'block1a', 'block2a', 'block2b', 'block3a', 'block3b', 'block4a', 'block4b', 'block4c',
      'block5a', 'block5b', 'block5c', 'block6a', 'block6b', 'block6c', 'block6d', 'block7a']
  # Block i of N = 16 drops with probability 0.2 * i / N: 0 for block1a, 0.1875 for block7a.
  assert [rate for _, rate in rates] == pytest.approx([0.2 * i / 16 for i in range(16)])
  b4 = [rate for _, rate in traced('efficientnet-b4')[1]]
  assert b4 == pytest.approx([0.2 * i / 32 for i in range(32)])


def test_stochastic_depth_is_per_example():
  x = images(256, 4, 4, 8)
  blocks = [MBConvBlock(in_filters=8, out_filters=8, kernel_size=3, stride=1, expand_ratio=2,
                        se_ratio=0.25, drop_rate=rate) for rate in (0.0, 0.25)]
  shapes = jax.eval_shape(functools.partial(blocks[0].init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5 + 1.0, jnp.float32), shapes)

  @jax.jit
  def residual_branches(variables, x):
    return [block.apply(variables, x, train=True, mutable=['batch_stats'],
                        rngs={'dropout': jax.random.key(3, impl='rbg')})[0] - x
            for block in blocks]

  branch, delta = map(np.asarray, residual_branches(variables, x))
  assert np.abs(branch).min(axis=(1, 2, 3)).max() > 1e-3
  dropped = np.all(np.abs(delta) < 1e-6, axis=(1, 2, 3))
  kept = np.all(np.abs(delta - branch / 0.75) < 1e-4 * np.abs(branch).max(), axis=(1, 2, 3))
  assert np.all(dropped ^ kept)  # each example is either skipped whole or kept and rescaled
  assert 0.6 < kept.mean() < 0.9  # survival 0.75 (binomial sd 0.027 for 256 examples)


# --- initialisers ---------------------------------------------------------------------------------


def test_initialisers(tiny):
  model, variables, _ = tiny
  params = variables['params']
  # Conv: untruncated normal, std sqrt(2 / (kh * kw * out)). top_conv is B0's (1280 outputs).
  top = np.asarray(params['top_conv']['kernel'])
  assert top.shape == (1, 1, 24, 1280)
  std = math.sqrt(2 / 1280)
  assert top.std() == pytest.approx(std, rel=0.03)
  assert abs(top.mean()) < 0.03 * std
  assert np.abs(top).max() > 3.5 * std  # not truncated at 2 sigma (30,720 samples)
  # Depthwise: out_channels counts as 1, so std sqrt(2 / (3 * 3)).
  dw = np.concatenate([np.asarray(params[b]['dwconv']['kernel']).ravel()
                       for b in ('block1a', 'block2a', 'block2b')])
  assert dw.std() == pytest.approx(math.sqrt(2 / 9), rel=0.06)
  # Dense: uniform in +-1/sqrt(num_classes), zero bias.
  dense = np.asarray(params['predictions']['kernel'])
  limit = 1 / math.sqrt(1000)
  assert dense.shape == (1280, 1000)
  assert np.abs(dense).max() <= limit and np.abs(dense).max() > 0.999 * limit
  assert dense.std() == pytest.approx(limit / math.sqrt(3), rel=0.01)
  assert not np.any(params['predictions']['bias'])
  # BN starts as identity with unit running variance.
  assert np.all(params['top_bn']['scale'] == 1) and not np.any(params['top_bn']['bias'])
  assert not np.any(variables['batch_stats']['top_bn']['mean'])
  assert np.all(variables['batch_stats']['top_bn']['var'] == 1)


# --- train mode -----------------------------------------------------------------------------------


def test_train_mode_updates_batch_stats(tiny, train_step, eval_apply):
  model, variables, x = tiny
  # Random running statistics: at init some batch means are exactly the initial 0 (a conv of a
  # freshly batch-normalised input has zero mean), which would hide a missing update.
  variables = {'params': variables['params'],
               'batch_stats': random_batch_stats(variables['batch_stats'])}
  _, state = train_apply(train_step, variables, x, jax.random.key(0, impl='rbg'))
  old = flax.traverse_util.flatten_dict(variables['batch_stats'], sep='/')
  new = flax.traverse_util.flatten_dict(state['batch_stats'], sep='/')
  assert old.keys() == new.keys()
  assert len(old) == 2 * 10  # mean and var of stem_bn, 2 + 3 + 3 in the blocks, top_bn
  for key in old:
    assert np.abs(np.asarray(old[key] - new[key])).max() > 1e-4, key
  # Eval mode changes nothing.
  _, eval_state = eval_apply(variables, x)
  for key, value in flax.traverse_util.flatten_dict(eval_state['batch_stats'], sep='/').items():
    np.testing.assert_array_equal(value, old[key])


def test_train_mode_needs_a_dropout_rng(tiny):
  model, variables, x = tiny
  with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
                   variables, x)


def test_dropout_rngs(tiny, train_step, eval_apply):
  model, variables, x = tiny
  a = train_apply(train_step, variables, x, jax.random.key(1, impl='rbg'))[0]
  a_again = train_apply(train_step, variables, x, jax.random.key(1, impl='rbg'))[0]
  b = train_apply(train_step, variables, x, jax.random.key(2, impl='rbg'))[0]
  np.testing.assert_array_equal(a, a_again)
  assert np.abs(np.asarray(a - b)).max() > 1e-6
  np.testing.assert_array_equal(eval_apply(variables, x)[0], eval_apply(variables, x)[0])


def test_gradients_are_finite(tiny, train_step):
  model, variables, x = tiny
  (loss, _), grads = train_step(variables, x, LABELS, jax.random.key(0, impl='rbg'))
  assert np.isfinite(loss) and loss > 0
  leaves = flax.traverse_util.flatten_dict(grads, sep='/')
  assert leaves.keys() == flax.traverse_util.flatten_dict(variables['params'], sep='/').keys()
  for name, grad in leaves.items():
    assert np.all(np.isfinite(grad)), name
  # Biases right before a train-mode BN get exactly zero gradient; nearly all others do not.
  nonzero = [name for name, grad in leaves.items() if np.abs(grad).max() > 0]
  assert len(nonzero) > 0.8 * len(leaves)


# --- input validation -----------------------------------------------------------------------------


@pytest.mark.parametrize('shape, dtype, message', [
    ((2, 32, 32, 1), jnp.float32, r'\[batch, height, width, 3\].*got shape \(2, 32, 32, 1\).*'
                                  'grayscale'),
    ((2, 32, 32, 4), jnp.float32, r'got shape \(2, 32, 32, 4\).*alpha channel'),
    ((32, 32, 3), jnp.float32, r'got shape \(32, 32, 3\).*images\[None\]'),
    ((2, 32, 32, 3), jnp.uint8, 'float images.*got dtype uint8'),
    ((2, 32, 32, 3), jnp.int32, 'got dtype int32'),
    ((2, 16, 16, 3), jnp.float32, r'16x16 pixels is too small.*at least 32 pixels.*stem_stride=1'),
    ((2, 64, 16, 3), jnp.float32, r'64x16 pixels is too small.*at least 32 pixels'),
])
def test_bad_inputs(shape, dtype, message):
  model = create_model('efficientnet-b0')
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


def test_bad_inputs_on_apply_and_small_images_with_stem_stride_1(tiny):
  model, variables, _ = tiny
  with pytest.raises(ValueError, match='got shape'):
    model.apply(variables, jnp.zeros((2, 16, 16, 4)))
  # The tiny model downsamples by 4 only, so 4 px is enough and 3 px is not.
  with pytest.raises(ValueError, match='at least 4 pixels'):
    model.apply(variables, jnp.zeros((1, 3, 3, 3)))
  # 16 px is fine for B0 once the stem keeps the resolution (total stride 16).
  model = create_model('efficientnet-b0', stem_stride=1)
  out = jax.eval_shape(model.init_with_output, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))[0]
  assert out.shape == (1, 1000)
