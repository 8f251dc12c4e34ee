"""Keras applications EfficientNetB0-B7 -> efficientnet_jax: weight-level parity on logits.

Each variant is built by Keras at a tiny resolution (the network is fully convolutional; weight
shapes do not depend on the input size), its BN statistics/affines and biases are randomised so
that a swapped or mis-laid tensor cannot hide behind identity initial values, and the logits of
both frameworks are compared on the same images. 40 px makes several feature maps odd-sized
(20, 10, 5, 3), which exercises the asymmetric TF 'SAME' padding of the stride-2 layers.
"""
import numpy as np
import pytest

keras = pytest.importorskip('keras')

import jax  # noqa: E402

from efficientnet_jax.convert.keras import (KerasConversionError, convert_keras_model,  # noqa: E402
                                            infer_model_name, keras_normalization,
                                            load_keras_weights)
from efficientnet_jax.models import create_model, get_variant  # noqa: E402
from efficientnet_jax.models.variants import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB  # noqa: E402

RES = 40
VARIANTS = [f'efficientnet-b{i}' for i in range(8)]


@pytest.fixture(autouse=True)
def _fresh_keras_session():
  keras.backend.clear_session()
  yield
  keras.backend.clear_session()


def build_keras(variant, res=RES, **kwargs):
  builder = getattr(keras.applications, f'EfficientNetB{variant[-1]}')
  kwargs.setdefault('input_shape', (res, res, 3))
  return builder(weights=None, classifier_activation=None, **kwargs)


def randomise(keras_model, seed=0):
  """Replaces the constant initial values (BN stats/affines, biases, input normalisation)."""
  rng = np.random.default_rng(seed)
  for layer in keras_model.layers:
    kind = type(layer).__name__
    if kind == 'BatchNormalization':
      c = layer.get_weights()[0].shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),  # gamma, beta
                         rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])  # mean, variance
    elif kind == 'Normalization':
      # What an adapted layer holds: the ImageNet mean and variance (= stddev**2).
      mean, std = np.array(IMAGENET_MEAN_RGB) / 255, np.array(IMAGENET_STDDEV_RGB) / 255
      layer.set_weights([mean, std**2, np.array(0)])
      layer.finalize_state()  # Keras caches the broadcast mean/variance at build time.
    elif layer.name.endswith(('se_reduce', 'se_expand')) or layer.name == 'predictions':
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.2, bias.shape)])


def keras_preprocessed(keras_model, images):
  """The activations Keras feeds to its stem: the output of its preprocessing layers."""
  sub = keras.Model(keras_model.input, keras_model.get_layer('stem_conv_pad').input)
  return np.asarray(sub(images))


def count(tree):
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


def our_logits(name, variables, images, num_classes=1000):
  model = create_model(name, num_classes=num_classes)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


def assert_logits_close(ours, theirs, tol=1e-4):
  rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
  assert rel <= tol, f'max |diff| / max |logit| = {rel:.3g} > {tol}'
  return rel


@pytest.mark.parametrize('name', VARIANTS)
def test_logits_match_keras(name):
  keras_model = build_keras(name)
  randomise(keras_model)
  images = np.random.default_rng(1).uniform(0, 255, (2, RES, RES, 3)).astype(np.float32)
  theirs = np.asarray(keras_model(images, training=False))

  assert infer_model_name(keras_model) == name
  variables = convert_keras_model(keras_model)
  assert set(variables) == {'params', 'batch_stats'}
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))

  # The converted tree fills our model's tree exactly, and both frameworks have the published
  # trainable parameter count.
  model = create_model(name)
  expected = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, RES, RES, 3), np.float32))
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, expected)
  published = get_variant(name).published_params
  assert count(variables['params']) == count(expected['params']) == published
  assert sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights) == published

  normalised = keras_preprocessed(keras_model, images)
  prep = keras_normalization(keras_model)
  np.testing.assert_allclose(prep(images), normalised, rtol=1e-5, atol=1e-5)
  rel = assert_logits_close(our_logits(name, variables, normalised), theirs)
  print(f'{name}: max |diff| / max |logit| = {rel:.2e}')


def test_depthwise_kernel_is_transposed_not_reshaped():
  keras_model = build_keras('efficientnet-b0')
  variables = convert_keras_model(keras_model)
  keras_kernel = keras_model.get_layer('block2a_dwconv').get_weights()[0]  # (3, 3, 96, 1)
  ours = variables['params']['block2a']['dwconv']['kernel']  # (3, 3, 1, 96)
  assert keras_kernel.shape == (3, 3, 96, 1) and ours.shape == (3, 3, 1, 96)
  np.testing.assert_array_equal(ours[:, :, 0, :], keras_kernel[:, :, :, 0])
  gamma, beta, mean, var = keras_model.get_layer('top_bn').get_weights()
  np.testing.assert_array_equal(variables['params']['top_bn']['scale'], gamma)
  np.testing.assert_array_equal(variables['batch_stats']['top_bn']['var'], var)


def test_num_classes_and_renamed_model_are_inferred():
  keras_model = build_keras('efficientnet-b1', classes=10, name='my_backbone')
  assert infer_model_name(keras_model) == 'efficientnet-b1'  # from structure, not the name
  variables = convert_keras_model(keras_model)
  assert variables['params']['predictions']['kernel'].shape == (1280, 10)
  images = np.random.default_rng(2).uniform(0, 255, (1, RES, RES, 3)).astype(np.float32)
  normalised = keras_preprocessed(keras_model, images)
  assert_logits_close(our_logits('efficientnet-b1', variables, normalised, num_classes=10),
                      np.asarray(keras_model(images, training=False)))


def test_wrong_variant_names_first_mismatched_tensors():
  keras_b0 = build_keras('efficientnet-b0')
  # Wider variant: the very first tensor already differs.
  with pytest.raises(KerasConversionError) as err:
    convert_keras_model(keras_b0, model_name='efficientnet-b4')
  message = str(err.value)
  first = message.splitlines()[1]
  assert "'efficientnetb0' into efficientnet-b4" in message
  assert 'looks like efficientnet-b0, not efficientnet-b4' in message
  assert 'stem_conv/kernel' in first and '(3, 3, 3, 32)' in first and '(3, 3, 3, 48)' in first

  # Same widths, fewer blocks: Keras lacks block1b.
  with pytest.raises(KerasConversionError, match=r'missing: no Keras layer .block1b_dwconv.'):
    convert_keras_model(keras_b0, model_name='efficientnet-b1')

  # Same widths, more blocks: Keras B1's extra layers are reported as unused.
  keras_b1 = build_keras('efficientnet-b1')
  with pytest.raises(KerasConversionError) as err:
    convert_keras_model(keras_b1, model_name='efficientnet-b0')
  first = str(err.value).splitlines()[1]
  assert 'unused' in first and 'block1b_dwconv/depthwise_kernel' in first

  # The classifier size must agree too.
  with pytest.raises(KerasConversionError, match=r'predictions/kernel is \(1280, 1000\).*'
                                                 r'expected \(1280, 10\)'):
    convert_keras_model(keras_b0, num_classes=10)


def test_headless_keras_model_is_rejected():
  keras_model = build_keras('efficientnet-b0', include_top=False)
  with pytest.raises(KerasConversionError, match='include_top=True'):
    convert_keras_model(keras_model)


def test_load_keras3_weights_file(tmp_path):
  keras_model = build_keras('efficientnet-b2')
  randomise(keras_model, seed=3)
  path = str(tmp_path / 'b2.weights.h5')
  keras_model.save_weights(path)
  direct = convert_keras_model(keras_model)
  loaded = load_keras_weights(path, 'efficientnet-b2')
  assert jax.tree.structure(loaded) == jax.tree.structure(direct)
  jax.tree.map(np.testing.assert_array_equal, loaded, direct)

  with pytest.raises(KerasConversionError, match='Could not load'):
    load_keras_weights(path, 'efficientnet-b0')
  with pytest.raises(KerasConversionError, match='no .efficientnet-lite0.'):
    load_keras_weights(path, 'efficientnet-lite0')


def test_imagenet_style_h5_and_preprocessing(tmp_path, monkeypatch):
  """The user path for ImageNet weights, with a stand-in for Keras's (undownloadable) file.

  Keras's ImageNet `.h5` files store the RGB *stddev* in the Normalization variance slot, and a
  model built with weights='imagenet' has an extra Rescaling by 1/sqrt(stddev) to undo that. We
  write such a file, make Keras 'download' it, and check that (1) keras_normalization of the
  ImageNet-built model is exactly the variant spec's mean/std, and (2) load_keras_weights of the
  file plus that normalisation reproduces the ImageNet-built Keras model's logits.
  """
  source = build_keras('efficientnet-b0')
  randomise(source, seed=4)
  source.get_layer('normalization').set_weights(
      [np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]), np.array(0)])
  path = str(tmp_path / 'efficientnetb0.h5')
  source.save(path)  # legacy HDF5, the format of Keras's ImageNet files

  from keras.src.utils import file_utils
  monkeypatch.setattr(file_utils, 'get_file', lambda *args, **kwargs: path)
  imagenet = keras.applications.EfficientNetB0(weights='imagenet', classifier_activation=None)

  spec = get_variant('efficientnet-b0')
  prep = keras_normalization(imagenet)
  assert len(prep.layers) == 3  # Rescaling, Normalization, Rescaling
  np.testing.assert_allclose(prep.mean_rgb, spec.mean_rgb, rtol=1e-6)
  np.testing.assert_allclose(prep.stddev_rgb, spec.stddev_rgb, rtol=1e-6)

  variables = load_keras_weights(path, 'efficientnet-b0')
  images = np.random.default_rng(5).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
  mean, std = np.array(spec.mean_rgb, np.float32), np.array(spec.stddev_rgb, np.float32)
  normalised = (images - mean) / std
  np.testing.assert_allclose(normalised, keras_preprocessed(imagenet, images), rtol=1e-5, atol=1e-5)
  assert_logits_close(our_logits('efficientnet-b0', variables, normalised),
                      np.asarray(imagenet(images, training=False)))


def test_cli_converts_a_keras_weights_file(tmp_path):
  from efficientnet_jax import pretrained
  from efficientnet_jax.convert import __main__ as cli

  keras_model = build_keras('efficientnet-b0')
  randomise(keras_model, seed=6)
  path = str(tmp_path / 'b0.weights.h5')
  keras_model.save_weights(path)
  output = str(tmp_path / 'out')
  assert cli.main(['--source=keras', '--model=efficientnet-b0', f'--weights={path}',
                   f'--output={output}']) == 0
  _, variables, metadata = pretrained.load(output)
  assert metadata['model'] == 'efficientnet-b0' and metadata['source']['format'] == 'keras'
  jax.tree.map(np.testing.assert_array_equal, variables, convert_keras_model(keras_model))
