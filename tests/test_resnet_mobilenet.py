"""ResNet-50/101/152 and MobileNetV1/V2 against their standard figures, the shared scaling rule,
the model registry, and a tiny model of each family through the real training loop.

Counts come from `jax.eval_shape` and a traced forward pass (nothing runs at 224 px). The
standard figures: trainable parameters as torchvision and Keras report them (ResNet bottleneck
v1.5, no conv biases); multiply-adds from torchvision's model cards (ResNet: 4.09B, 7.80B, 11.51B)
and the MobileNet papers (569M, Howard et al. 2017, Table 8; 300M, Sandler et al. 2018, Table 4).
"""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import train
from efficientnet_jax.complexity import count_madds, model_complexity
from efficientnet_jax.models import (ALL_VARIANTS, CONVNET_VARIANTS, FAMILIES, VARIANTS,
                                     MobileNetV1, MobileNetV2, ResNet, create_model,
                                     get_variant, round_filters)
from support import load_config_module

STANDARD = {  # name: (trainable params, multiply-adds at 224 px)
    'resnet-50': (25_557_032, 4.09e9),
    'resnet-101': (44_549_160, 7.80e9),
    'resnet-152': (60_192_808, 11.51e9),
    'mobilenet-v1': (4_231_976, 569e6),
    'mobilenet-v2': (3_504_872, 300e6),
}


def param_shapes(model, size=32):
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {k: v.shape for k, v in
          flax.traverse_util.flatten_dict(variables['params'], sep='/').items()}


@pytest.mark.parametrize('name', list(STANDARD))
def test_standard_params_and_madds(name):
  params, madds = STANDARD[name]
  result = model_complexity(name)
  assert result['resolution'] == 224
  assert result['params'] == params  # exact
  # Measured: 4,089,184,256; 7,801,405,440; 11,513,626,624; 568,740,352; 300,774,272.
  assert result['madds'] == pytest.approx(madds, rel=0.02)
  spec = get_variant(name)
  assert spec.published_params == params
  if spec.paper_madds:  # the EfficientNet paper rounds: 4.1B, 11B, 0.6B, 0.3B
    assert result['madds'] == pytest.approx(spec.paper_madds, rel=0.06)


def test_resnet50_by_hand():
  # Stem 7x7x3->64 at 112^2 + the 16 bottlenecks at 56^2..7^2 + the classifier 2048x1000,
  # each bottleneck 1x1 (c_in -> w), 3x3 (w -> w), 1x1 (w -> 4w), plus a 1x1 projection in
  # each stage's first block.
  total = 112 * 112 * 7 * 7 * 3 * 64
  c_in = 64
  for repeats, width, size, in_size in ((3, 64, 56, 56), (4, 128, 28, 56), (6, 256, 14, 28),
                                        (3, 512, 7, 14)):
    for i in range(repeats):
      first_size = in_size if i == 0 else size
      total += first_size**2 * c_in * width          # 1x1 reduce, before the stride
      total += size**2 * 9 * width * width           # 3x3, strided in the first block
      total += size**2 * width * 4 * width           # 1x1 expand
      if i == 0:
        total += size**2 * c_in * 4 * width          # projection shortcut
      c_in = 4 * width
  total += 2048 * 1000
  assert count_madds(create_model('resnet-50'), 224) == total == 4_089_184_256


def test_width_and_depth_scale_every_family():
  shapes = param_shapes(create_model('resnet-50', width=2.0, depth=2.0))
  assert shapes['conv1_conv/kernel'] == (7, 7, 3, 128)
  assert shapes['conv5_block1/2_conv/kernel'] == (3, 3, 1024, 1024)
  assert shapes['predictions/kernel'] == (4096, 1000)
  # Repeats (3, 4, 6, 3) doubled.
  assert 'conv4_block12/1_conv/kernel' in shapes and 'conv4_block13/1_conv/kernel' not in shapes
  assert 'conv5_block6/1_conv/kernel' in shapes and 'conv5_block7/1_conv/kernel' not in shapes

  shapes = param_shapes(create_model('mobilenet-v1', width=0.5, depth=1.4))
  assert shapes['stem_conv/kernel'] == (3, 3, 3, 16)
  assert shapes['block5b/pwconv/kernel'] == (1, 1, 512, 512)  # 1024 halved
  assert 'block4i/dwconv/kernel' in shapes and 'block4j/dwconv/kernel' not in shapes  # ceil(8.4)

  # MobileNetV2's head keeps 1280 channels below width 1 and scales above it (Keras's rule).
  half = param_shapes(create_model('mobilenet-v2', width=0.5))
  assert half['stem_conv/kernel'] == (3, 3, 3, 16)
  assert half['top_conv/kernel'] == (1, 1, 160, 1280)
  wide = param_shapes(create_model('mobilenet-v2', width=1.4))
  assert wide['top_conv/kernel'] == (1, 1, round_filters(320, 1.4), 1792)


def test_mobilenet_v2_width_1_4_matches_the_paper():
  # Sandler et al. 2018, Table 4: MobileNetV2 (1.4) has 6.9M parameters and 585M multiply-adds
  # (measured: 6,108,776 trainable and 582M; the paper's 6.9M counts differently).
  result = model_complexity('mobilenet-v2', width=1.4)
  assert result['madds'] == pytest.approx(585e6, rel=0.02)


@pytest.mark.parametrize('resolution, width, params, madds', [
    (192, 1.0, 4.2e6, 418e6), (160, 1.0, 4.2e6, 291e6), (224, 0.75, 2.6e6, 325e6)])
def test_mobilenet_v1_resolution_and_width_multipliers(resolution, width, params, madds):
  # Howard et al. 2017, Tables 6 and 7 (measured: 418.1M, 290.7M; 2,585,560 and 325.4M).
  result = model_complexity('mobilenet-v1', resolution, width=width)
  assert result['params'] == pytest.approx(params, rel=0.02)
  assert result['madds'] == pytest.approx(madds, rel=0.01)


def test_summary_cli_takes_every_family(capsys):
  from efficientnet_jax import summary
  assert summary.main(['--model=resnet-50', '--json']) == 0
  row = json.loads(capsys.readouterr().out)
  assert (row['params'], row['published_params'], row['madds']) == (25_557_032, 25_557_032,
                                                                    4_089_184_256)
  assert (row['paper_madds'], row['paper_top1']) == (4_100_000_000, 76.0)
  assert summary.main(['--model=mobilenet-v2']) == 0
  assert 'trainable params: 3,504,872 (published 3,504,872)' in capsys.readouterr().out


def test_registry_and_preprocessing_metadata():
  assert set(ALL_VARIANTS) == set(VARIANTS) | set(CONVNET_VARIANTS)
  assert {spec.family for spec in ALL_VARIANTS.values()} == set(FAMILIES)
  assert not set(VARIANTS) & set(CONVNET_VARIANTS)
  families = {'resnet-50': ResNet, 'resnet-101': ResNet, 'resnet-152': ResNet,
              'mobilenet-v1': MobileNetV1, 'mobilenet-v2': MobileNetV2}
  assert set(families) == set(CONVNET_VARIANTS)
  for name, module in families.items():
    model = create_model(name, num_classes=7, width=0.5, depth=2.0, dropout=0.3)
    assert type(model) is module
    assert (model.width_coefficient, model.depth_coefficient, model.dropout_rate) == (0.5, 2.0,
                                                                                       0.3)
    spec = get_variant(name)
    assert (spec.resolution, spec.crop_fraction, spec.interpolation) == (224, 0.875, 'bilinear')
  assert create_model('resnet-101').stages[2].repeats == 23
  assert get_variant('resnet-50').mean_rgb == get_variant('efficientnet-b0').mean_rgb
  assert get_variant('mobilenet-v2').mean_rgb == (127.5, 127.5, 127.5)
  assert create_model('mobilenet-v1').dropout_rate == 1e-3
  assert create_model('mobilenet-v2').dropout_rate == 0.2


def test_normalize_images_uses_each_familys_statistics():
  config = load_config_module('quickstart').get_config()
  pixels = jnp.array([[[[0, 127, 255]]]], jnp.uint8)
  config.model = 'mobilenet-v2'
  np.testing.assert_allclose(train.normalize_images(pixels, config)[0, 0, 0],
                             [-1.0, -0.003922, 1.0], atol=1e-5)
  config.model = 'resnet-50'
  np.testing.assert_allclose(train.normalize_images(pixels, config)[0, 0, 0, 0],
                             -0.485 / 0.229, rtol=1e-6)


def test_unknown_option_names_the_family():
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['features_only'\] for resnet-50 "
                                      r"\(ResNet\); valid options are .*'stages'.*'width'"):
    create_model('resnet-50', features_only=True)


def test_spec_blocks_is_efficientnet_only():
  with pytest.raises(ValueError, match='resnet-50 is a resnet model: `blocks` describes '
                                       'EfficientNet only'):
    get_variant('resnet-50').blocks


def test_mobilenet_v1_refuses_stochastic_depth():
  model = create_model('mobilenet-v1', drop_connect_rate=0.2)
  with pytest.raises(ValueError, match='MobileNetV1 has no residual shortcuts.*'
                                       r'drop_connect_rate=0.2. Set it to 0'):
    param_shapes(model)


@pytest.mark.parametrize('name, shape, dtype, message', [
    ('resnet-50', (1, 16, 16, 3), jnp.float32,
     'Image of 16x16 pixels is too small: ResNet downsamples by 32.*stem_stride=1'),
    ('mobilenet-v2', (16, 16, 3), jnp.float32, r'MobileNetV2 expects .*got shape \(16, 16, 3\)'),
    ('mobilenet-v1', (1, 32, 32, 3), jnp.uint8, 'MobileNetV1 expects float images.*uint8'),
])
def test_input_errors(name, shape, dtype, message):
  model = create_model(name)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


def test_stem_stride_one_halves_the_total_stride():
  assert create_model('resnet-50').total_stride == 32
  assert create_model('resnet-50', stem_stride=1).total_stride == 16
  assert create_model('mobilenet-v2', stem_stride=1).total_stride == 16
  param_shapes(create_model('mobilenet-v1', stem_stride=1), size=16)  # 16 px is enough


def digits_config(name, data_dir):
  """The quickstart recipe shrunk to two steps of a tiny model of the family at 16 px."""
  config = load_config_module('quickstart').get_config()
  config.model = name
  config.width = 0.25
  config.depth = 0.1  # one block per stage
  config.resolution = 16
  config.data_dir = str(data_dir)
  config.batch_size = 16
  config.eval_batch_size = 360
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.drop_connect_rate = 0.0 if name == 'mobilenet-v1' else 0.1
  config.dropout = 0.1
  config.cache = False
  # XLA's own convolutions: one op per conv compiles faster than the CPU path's k*k slices
  # (the two are tested equal elsewhere), and compiling dominates a two-step run.
  config.conv_impl = 'xla'
  return config


# ResNet runs by default; the MobileNets (about 30 s each on 2 quiet cores, mostly compiling)
# with -m slow. Their blocks' train mode is EfficientNet's MBConvBlock (tested in test_models.py)
# and the same layers.
@pytest.mark.parametrize('name', [
    pytest.param('resnet-50', marks=pytest.mark.slow),
    pytest.param('mobilenet-v2', marks=pytest.mark.slow),
    pytest.param('mobilenet-v1', marks=pytest.mark.slow)])
def test_trains_through_the_training_loop(name, tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / 'tfds_digits'
  config = digits_config(name, data_dir)
  state, metrics = train.train_and_evaluate(config, str(tmp_path_factory.mktemp(name)))
  assert int(state.step) == 2
  assert metrics['eval/num_examples'] == 360
  assert np.isfinite(metrics['eval/loss'])
  # Train mode moved the BN running means off their initial zeros.
  means = [v for k, v in flax.traverse_util.flatten_dict(state.batch_stats).items()
           if k[-1] == 'mean']
  assert means and all(np.any(np.asarray(m) != 0) for m in means)
