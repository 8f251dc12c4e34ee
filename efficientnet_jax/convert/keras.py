"""Keras applications EfficientNetB0-B7 -> efficientnet_jax variables.

Our Flax submodules carry the Keras layer names (`stem_conv`, `block2a/expand_conv`, `top_bn`,
`predictions`, ...), so conversion is a name-for-name copy with three layout rules:

* BatchNormalization: gamma/beta -> params scale/bias, moving_mean/moving_variance ->
  batch_stats mean/var. Both use epsilon 1e-3, so inference matches without rescaling anything.
* DepthwiseConv2D: Keras stores (kh, kw, C, 1) (a channel multiplier of 1 in the last axis);
  ours is (kh, kw, 1, C), the HWIO layout of a convolution with C feature groups. We swap the
  last two axes with a transpose (with a size-1 axis a reshape gives the same array; the
  transpose spells out the layout change, and a channel multiplier > 1 fails the shape check).
* Conv2D and Dense: HWIO and (in, out) in both frameworks, copied as they are.

The walk is the one every converter shares (`efficientnet_jax.convert.mapping`): it is driven by
*our* expected variable tree (from `jax.eval_shape` of `model.init`), so every variable we need
is filled exactly once; every weight of every Keras layer must in turn be consumed, except
those of the input preprocessing layers (Rescaling/Normalization), which are no part of our
model: our model takes already-normalised images, and `keras_normalization` tells what
normalisation the Keras model applies. Anything missing, left over or mis-shaped raises
`KerasConversionError` listing the offending tensors in network order.

TensorFlow/Keras are imported lazily, inside the functions that need them, so that importing this
module costs nothing for users who never convert.

Typical use, with Keras's ImageNet file for B0 (`efficientnetb0.h5`, from Keras's download cache):

    variables = load_keras_weights('efficientnetb0.h5', 'efficientnet-b0')
    model = create_model('efficientnet-b0')
    logits = model.apply(variables, images_normalised, train=False)

where `images_normalised = (rgb_0_255 - spec.mean_rgb) / spec.stddev_rgb` with
`spec = get_variant('efficientnet-b0')`: exactly what Keras computes for `weights='imagenet'`.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Mapping

import numpy as np

from efficientnet_jax.convert.mapping import (TF_AXES, TF_BN, TF_DEPTHWISE, TF_PARAM,
                                            ConversionError, SourceLayout, convert_tensors,
                                            resolve_model_name)
from efficientnet_jax.models import naming

# The Keras applications builders, by our variant name. Keras ships B0-B7 only.
KERAS_BUILDERS = {f'efficientnet-b{i}': f'EfficientNetB{i}' for i in range(8)}

# Layers in front of `stem_conv_pad` that implement input preprocessing. They hold no weights of
# our model (Normalization holds its mean/variance/count), so the converter skips them and
# `keras_normalization` folds them into one per-channel affine map.
_PREPROCESSING_CLASSES = ('Rescaling', 'Normalization')

_NAME_RE = re.compile(r'efficientnet[-_]?(b\d|l2|lite\d)$', re.IGNORECASE)


class KerasConversionError(ConversionError):
  """The Keras model's weights do not fit the requested efficientnet_jax variant."""


@dataclasses.dataclass(frozen=True)
class KerasLayerWeights:
  """The weights of one Keras layer as numpy arrays, keyed by their short Keras names.

  Names are canonical: 'kernel', 'bias', 'gamma', 'beta', 'moving_mean', 'moving_variance', and
  'depthwise_kernel' for depthwise convolutions (Keras 3 calls that one 'kernel'; Keras 2 and the
  legacy .h5 format call it 'depthwise_kernel', which is unambiguous, so we use that).
  """
  class_name: str
  weights: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class KerasPreprocessing:
  """Keras's input preprocessing folded into one per-channel affine map: `x * scale + offset`.

  `x` is in the units the Keras model takes (RGB in [0, 255] for keras.applications). Equivalently
  `(x - mean_rgb) / stddev_rgb`, the form `VariantSpec` uses, so the two can be compared directly.
  `layers` names the Keras layers that were folded, in order.
  """
  scale: np.ndarray
  offset: np.ndarray
  layers: tuple[str, ...]

  @property
  def mean_rgb(self) -> np.ndarray:
    return -self.offset / self.scale

  @property
  def stddev_rgb(self) -> np.ndarray:
    return 1.0 / self.scale

  def __call__(self, images):
    """Normalises NHWC images (numpy or jax arrays) as the Keras model's first layers do."""
    return images * self.scale.astype(np.float32) + self.offset.astype(np.float32)


def _short_name(variable) -> str:
  # Keras 3: 'kernel'; Keras 2 / tf.keras: 'block1a_dwconv/depthwise_kernel:0'.
  return variable.name.split('/')[-1].split(':')[0]


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'numpy'):
    value = value.numpy()
  return np.asarray(value)


def _preprocessing_layers(keras_model) -> list:
  """The leading Rescaling/Normalization layers, in order, up to the first other layer."""
  found = []
  for layer in keras_model.layers:
    kind = type(layer).__name__
    if kind == 'InputLayer':
      continue
    if kind not in _PREPROCESSING_CLASSES:
      break
    found.append(layer)
  return found


def keras_layer_weights(keras_model) -> dict[str, KerasLayerWeights]:
  """Every weight-bearing Keras layer except the input preprocessing ones, in model order."""
  skip = {layer.name for layer in _preprocessing_layers(keras_model)}
  result = {}
  for layer in keras_model.layers:
    if layer.name in skip or not layer.weights:
      continue
    kind = type(layer).__name__
    arrays = layer.get_weights()  # same order as layer.weights
    weights = {}
    for variable, array in zip(layer.weights, arrays):
      name = _short_name(variable)
      if kind == 'DepthwiseConv2D' and name == 'kernel':
        name = 'depthwise_kernel'
      weights[name] = np.asarray(array)
    result[layer.name] = KerasLayerWeights(kind, weights)
  return result


def _our_path(layer_name: str) -> tuple[str, ...]:
  """Our module path of a Keras layer name: 'block2a_expand_conv' -> ('block2a', 'expand_conv')."""
  block, _, inner = layer_name.partition('_')
  return (block, inner) if inner and naming.parse_block_name(block) else (layer_name,)


def _keras_position(layer_name: str, modules) -> tuple:
  """Sort key of a Keras layer name in network order: stem -> blocks -> head."""
  del modules  # Keras names say their stage and repeat
  return naming.path_order(_our_path(layer_name))


# Keras layer names are our module paths joined by '_': ('block1a', 'dwconv') -> 'block1a_dwconv'.
KERAS_LAYOUT = SourceLayout(
    framework='Keras', separator='/',
    layer_name=lambda module: '_'.join(module.path),
    weight_names={'conv': TF_PARAM, 'depthwise': TF_DEPTHWISE, 'bn': TF_BN, 'dense': TF_PARAM},
    axes=TF_AXES, position=_keras_position)


def convert_keras_weights(layers: Mapping[str, KerasLayerWeights], model_name: str,
                          num_classes: int, source: str = 'Keras model',
                          hint: str = '') -> dict[str, Any]:
  """Maps per-layer Keras weights (see `keras_layer_weights`) onto our variable tree.

  Pure numpy: usable on weights read from anywhere (e.g. an .h5 file opened with h5py) as long as
  they are keyed by Keras layer name. Returns {'params': ..., 'batch_stats': ...} of float32
  numpy arrays. Raises `KerasConversionError` naming every missing, mis-shaped or unused tensor;
  `source` and `hint` only word that error.
  """
  tensors = {f'{layer}/{weight}': value for layer, source_layer in layers.items()
             for weight, value in source_layer.weights.items()}
  return convert_tensors(
      tensors, KERAS_LAYOUT, model_name, num_classes, source=source, error=KerasConversionError,
      hint=(f'{hint}Keras variants map by name: EfficientNetB0..B7 <-> '
            "'efficientnet-b0'..'efficientnet-b7'; the Keras model must be built with "
            'include_top=True. '))


def infer_model_name(keras_model) -> str:
  """Our variant name for a Keras EfficientNet, from its name or else its structure.

  keras.applications names the models 'efficientnetb0'..'efficientnetb7'; a renamed model is
  matched by its structure (`naming.infer_model_name`).
  """
  match = _NAME_RE.search(keras_model.name)
  if match:
    return f'efficientnet-{match.group(1).lower()}'
  repeats: dict[int, int] = {}
  for layer in keras_model.layers:
    path = _our_path(layer.name)
    if path[-1] == 'project_conv' and len(path) == 2:
      stage = naming.parse_block_name(path[0])[0]
      repeats[stage] = repeats.get(stage, 0) + 1
  try:
    stem = keras_model.get_layer('stem_conv').get_weights()[0].shape[-1]
    head_in, head = keras_model.get_layer('top_conv').get_weights()[0].shape[-2:]
  except ValueError:
    stem = head = head_in = None
  has_se = any(layer.name.endswith('_se_reduce') for layer in keras_model.layers)
  return naming.infer_model_name(
      stem_filters=stem, head_filters=head, head_in_filters=head_in,
      repeats=[repeats[s] for s in sorted(repeats)], has_se=has_se,
      source=f'the Keras model {keras_model.name!r} (its name is not efficientnetb0..b7)',
      error=KerasConversionError)


def convert_keras_model(keras_model, model_name: str | None = None,
                        num_classes: int | None = None) -> dict[str, Any]:
  """Converts a `keras.applications.EfficientNetB0..B7` model into our variables.

  Args:
    keras_model: the Keras model, built with include_top=True (its input size is irrelevant).
    model_name: our variant name, e.g. 'efficientnet-b0'; inferred from the Keras model if None.
    num_classes: inferred from the 'predictions' layer if None.

  Returns:
    {'params': ..., 'batch_stats': ...} with float32 numpy arrays, ready for
    `create_model(model_name, num_classes).apply(variables, x, train=False)`. Our model returns
    logits; a Keras model built with the default classifier_activation='softmax' returns
    probabilities from the same logits.
  """
  model_name, hint = resolve_model_name(model_name, lambda: infer_model_name(keras_model),
                                       KerasConversionError)
  layers = keras_layer_weights(keras_model)
  if num_classes is None:
    if 'predictions' not in layers or 'kernel' not in layers['predictions'].weights:
      raise KerasConversionError(
          f'The Keras model {keras_model.name!r} has no "predictions" Dense layer; build it with '
          'include_top=True (our model always has a classifier), or pass num_classes=.')
    num_classes = int(layers['predictions'].weights['kernel'].shape[-1])
  return convert_keras_weights(layers, model_name, num_classes,
                               source=f'Keras model {keras_model.name!r}', hint=hint)


def keras_normalization(keras_model) -> KerasPreprocessing:
  """The input preprocessing of a Keras EfficientNet as one per-channel affine map.

  keras.applications EfficientNets take RGB in [0, 255] and normalise inside the model:
  Rescaling(1/255), then Normalization with the layer's own mean/variance
  (`(x - mean) / max(sqrt(variance), epsilon)`), and, only when built with weights='imagenet',
  a further Rescaling by 1/sqrt(stddev). That last layer exists because Keras's ImageNet files
  store the *standard deviation* in the Normalization variance slot; dividing by its square root
  twice makes the whole chain `(x / 255 - mean) / stddev`, the official normalisation. A model
  built with weights=None has no such layer and, un-adapted, Normalization is the identity (mean
  0, variance 1), so its chain is just x / 255.

  This reads whatever layers the given model really has (every leading Rescaling/Normalization
  layer) and returns their composition, so `prep(x)` equals the activations the Keras model feeds
  to 'stem_conv_pad', which are our model's expected input.
  """
  import keras

  scale = np.ones(3, np.float64)
  offset = np.zeros(3, np.float64)
  names = []
  for layer in _preprocessing_layers(keras_model):
    kind = type(layer).__name__
    if kind == 'Rescaling':
      s = np.broadcast_to(np.asarray(layer.scale, np.float64).reshape(-1), (3,))
      o = np.broadcast_to(np.asarray(layer.offset, np.float64).reshape(-1), (3,))
    else:  # Normalization
      axis = tuple(np.atleast_1d(layer.axis)) if layer.axis is not None else ()
      if axis not in ((-1,), (3,)):
        raise KerasConversionError(
            f'Normalization layer {layer.name!r} normalises over axis {layer.axis}; only the '
            'channels-last axis (-1) is supported.')
      mean = layer.mean if layer.mean is not None else layer.input_mean
      variance = layer.variance if layer.variance is not None else layer.input_variance
      mean = np.broadcast_to(_to_numpy(mean).astype(np.float64).reshape(-1), (3,))
      std = np.sqrt(np.broadcast_to(_to_numpy(variance).astype(np.float64).reshape(-1), (3,)))
      std = np.maximum(std, keras.config.epsilon())  # as Normalization.call does
      if getattr(layer, 'invert', False):
        s, o = std, mean
      else:
        s, o = 1.0 / std, -mean / std
    # Compose y = s * (scale * x + offset) + o.
    scale, offset = s * scale, s * offset + o
    names.append(layer.name)
  return KerasPreprocessing(scale=scale, offset=offset, layers=tuple(names))


def load_keras_weights(path: str, model_name: str, num_classes: int = 1000) -> dict[str, Any]:
  """Builds the Keras architecture of `model_name`, loads a weights file into it and converts it.

  Args:
    path: a Keras weights file: Keras 3 `.weights.h5` (from `model.save_weights`) or a legacy
      `.h5` such as Keras's ImageNet files `efficientnetb0.h5` .. `efficientnetb7.h5`. It must
      hold the full model with its classifier (not a `_notop` file).
    model_name: 'efficientnet-b0' .. 'efficientnet-b7'.
    num_classes: the size of the classifier stored in the file.

  Returns:
    Our variables {'params': ..., 'batch_stats': ...}. For Keras's ImageNet files the expected
    input is `(rgb_0_255 - mean_rgb) / stddev_rgb` with the variant spec's ImageNet constants;
    the Keras model built here (weights=None) lacks the ImageNet-only Rescaling layer, so do not
    take the preprocessing of an ImageNet file from `keras_normalization` of that model.
  """
  if model_name not in KERAS_BUILDERS:
    raise KerasConversionError(
        f'Keras applications have no {model_name!r}; Keras ships '
        f'{", ".join(KERAS_BUILDERS)} only.')
  import keras

  builder = getattr(keras.applications, KERAS_BUILDERS[model_name])
  # The weights do not depend on the input size; the smallest size Keras accepts keeps the
  # throwaway Keras model cheap to build.
  keras_model = builder(weights=None, input_shape=(32, 32, 3), classes=num_classes,
                        classifier_activation=None)
  try:
    with warnings.catch_warnings():
      # Keras 3.15 warns once per layer that it skips '_operations_by_depth/container_N' when
      # loading a .weights.h5 into a functional model: those containers alias the layers it
      # already loaded under 'layers/', so the warning is noise here (the tests check that every
      # converted tensor equals the saved one).
      warnings.filterwarnings('ignore', message='Skipping nested container',
                              category=UserWarning)
      keras_model.load_weights(path)
  except Exception as err:  # Keras raises a mix of ValueError/KeyError/OSError here.
    raise KerasConversionError(
        f'Could not load {path!r} into a Keras {KERAS_BUILDERS[model_name]} with '
        f'{num_classes} classes: {err}. The file must hold the full model (include_top=True, '
        'not a _notop file) of that variant with that many classes.') from err
  return convert_keras_model(keras_model, model_name=model_name, num_classes=num_classes)
