"""AutoAugment (policy v0) and RandAugment on uint8 HWC images, in pure TensorFlow ops.

Everything here runs inside `tf.data` map functions: no tensorflow-addons, no Python-side
randomness. The affine ops (Rotate, ShearX/Y, TranslateX/Y) use
`tf.raw_ops.ImageProjectiveTransformV3` with nearest-neighbour sampling and fill value 128, which
is what the official EfficientNet code (tensorflow/tpu, models/official/efficientnet/autoaugment.py)
gets with its wrap/unwrap trick.

Randomness is stateless: every public entry point takes an optional `seed` (a shape-[2] int
tensor); the same image and seed always give the same result. Without a seed one is drawn from
TF's global generator (so `tf.random.set_seed` makes eager runs repeatable).

The magnitude -> argument mappings follow the official code (`_MAX_LEVEL = 10`):

  Rotate          level/10 * 30 degrees, random sign
  ShearX/Y        level/10 * 0.3, random sign
  TranslateX/Y    level/10 * translate_const pixels, random sign (AA: 250, RA: 100)
  Cutout          int(level/10 * cutout_const) half-size in pixels (AA: 100, RA: 40)
  Posterize       int(level/10 * 4) bits
  Solarize        int(level/10 * 256) threshold
  SolarizeAdd     int(level/10 * 110) addition (threshold 128)
  Color, Contrast, Brightness, Sharpness   level/10 * 1.8 + 0.1 blend factor
  AutoContrast, Equalize, Invert           no argument

Known deliberate behaviours (details in the docstrings of the ops):
  * Posterize with 0 bits (policy v0 has ('Posterize', 0.8, 2) -> int(0.8) = 0) keeps 1 bit,
    because TF clamps a uint8 shift of 8 to 7 and the official code relies on it.
  * Contrast blends towards the mean grey level of the image (PIL's definition). The official
    TF code uses `sum(histogram) / 256`, i.e. pixel count / 256, which depends on the image size;
    that is treated as a bug and not reproduced. Contrast is only used by RandAugment.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import tensorflow as tf

__all__ = [
    'POLICY_V0',
    'RANDAUGMENT_OPS',
    'NAME_TO_FUNC',
    'distort_image_with_autoaugment',
    'distort_image_with_randaugment',
    'apply_op',
    'level_to_arg',
    'autocontrast',
    'equalize',
    'invert',
    'rotate',
    'posterize',
    'solarize',
    'solarize_add',
    'color',
    'contrast',
    'brightness',
    'sharpness',
    'shear_x',
    'shear_y',
    'translate_x',
    'translate_y',
    'cutout',
]

_MAX_LEVEL = 10.0
# Grey used for pixels that an affine op or Cutout leaves empty.
FILL_VALUE = 128

AUTOAUGMENT_HPARAMS = {'cutout_const': 100, 'translate_const': 250}
RANDAUGMENT_HPARAMS = {'cutout_const': 40, 'translate_const': 100}

# Policy v0 of the official EfficientNet code: 25 sub-policies of two (op, probability, level).
POLICY_V0: tuple[tuple[tuple[str, float, int], ...], ...] = (
    (('Equalize', 0.8, 1), ('ShearY', 0.8, 4)),
    (('Color', 0.4, 9), ('Equalize', 0.6, 3)),
    (('Color', 0.4, 1), ('Rotate', 0.6, 8)),
    (('Solarize', 0.8, 3), ('Equalize', 0.4, 7)),
    (('Solarize', 0.4, 2), ('Solarize', 0.6, 2)),
    (('Color', 0.2, 0), ('Equalize', 0.8, 8)),
    (('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)),
    (('ShearX', 0.2, 9), ('Rotate', 0.6, 8)),
    (('Color', 0.6, 1), ('Equalize', 1.0, 2)),
    (('Invert', 0.4, 9), ('Rotate', 0.6, 0)),
    (('Equalize', 1.0, 9), ('ShearY', 0.6, 3)),
    (('Color', 0.4, 7), ('Equalize', 0.6, 0)),
    (('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)),
    (('Solarize', 0.6, 8), ('Color', 0.6, 9)),
    (('Solarize', 0.2, 4), ('Rotate', 0.8, 9)),
    (('Rotate', 1.0, 7), ('TranslateY', 0.8, 9)),
    (('ShearX', 0.0, 0), ('Solarize', 0.8, 4)),
    (('ShearY', 0.8, 0), ('Color', 0.6, 4)),
    (('Color', 1.0, 0), ('Rotate', 0.6, 2)),
    (('Equalize', 0.8, 4), ('Equalize', 0.0, 8)),
    (('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)),
    (('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)),
    (('Posterize', 0.8, 2), ('Solarize', 0.6, 10)),
    (('Solarize', 0.6, 8), ('Equalize', 0.6, 1)),
    (('Color', 0.8, 6), ('Rotate', 0.4, 5)),
)

# The ops RandAugment picks from, in the official order.
RANDAUGMENT_OPS: tuple[str, ...] = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
    'Cutout', 'SolarizeAdd')


# ------------------------------------------------------------------------------------------------
# Seeds.


def as_seed(seed) -> tf.Tensor:
  """Returns a shape-[2] int64 seed; draws one from the global generator when `seed` is None."""
  if seed is None:
    return tf.random.uniform([2], minval=0, maxval=2**31 - 1, dtype=tf.int64)
  seed = tf.convert_to_tensor(seed)
  if seed.dtype != tf.int64:
    seed = tf.cast(seed, tf.int64)
  if seed.shape.rank == 0:
    seed = tf.stack([seed, tf.constant(0, tf.int64)])
  return seed


def _split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  seeds = tf.random.experimental.stateless_split(seed, num=num)
  return [seeds[i] for i in range(num)]


def _uniform(seed: tf.Tensor) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed=seed, dtype=tf.float32)



# ------------------------------------------------------------------------------------------------
# Colour ops. All take and return uint8 [H, W, 3].


def truncate_to_uint8(image_float: tf.Tensor) -> tf.Tensor:
  """Clips to [0, 255] and truncates, as the official AutoAugment ops do (not rounding)."""
  return tf.cast(tf.clip_by_value(image_float, 0.0, 255.0), tf.uint8)


def blend(image1: tf.Tensor, image2: tf.Tensor, factor) -> tf.Tensor:
  """image1 + factor * (image2 - image1), clipped to uint8 (factor 0 -> image1, 1 -> image2).

  Factors above 1 extrapolate. Like the official code the result is truncated, not rounded.
  """
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  factor = tf.cast(factor, tf.float32)
  return truncate_to_uint8(image1 + factor * (image2 - image1))


def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - pixel."""
  return 255 - tf.convert_to_tensor(image)


def solarize(image: tf.Tensor, threshold=128) -> tf.Tensor:
  """Inverts every pixel at or above `threshold` (256 and above: no change)."""
  image = tf.convert_to_tensor(image)
  below = tf.cast(image, tf.int32) < tf.cast(threshold, tf.int32)
  return tf.where(below, image, 255 - image)


def solarize_add(image: tf.Tensor, addition=0, threshold=128) -> tf.Tensor:
  """Adds `addition` (clipped to 0..255) to every pixel below `threshold`."""
  image = tf.convert_to_tensor(image)
  as_int = tf.cast(image, tf.int32)
  added = tf.cast(tf.clip_by_value(as_int + tf.cast(addition, tf.int32), 0, 255), tf.uint8)
  return tf.where(as_int < tf.cast(threshold, tf.int32), added, image)


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the top `bits` bits of every pixel.

  The shift 8 - bits is clamped to 0..7, as TF's bitwise shifts clamp for uint8: 0 bits keeps
  1 bit, exactly like the official code (policy v0 asks for 0 bits once).
  """
  image = tf.convert_to_tensor(image)
  shift = tf.clip_by_value(8 - tf.cast(bits, tf.int32), 0, 7)
  shift = tf.cast(shift, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 1] grey level (ITU-R 601 weights, as tf.image.rgb_to_grayscale)."""
  return tf.image.rgb_to_grayscale(image)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend between the grey version (factor 0) and the image (1)."""
  degenerate = tf.image.grayscale_to_rgb(_grayscale(image))
  return blend(degenerate, image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend between a flat image at the mean grey level and the image."""
  gray = tf.cast(_grayscale(image), tf.float32)
  mean = tf.reduce_mean(gray)
  # PIL rounds the mean to an integer grey level.
  degenerate = tf.fill(tf.shape(image), tf.cast(tf.round(mean), tf.uint8))
  return blend(degenerate, image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness: blend between black (factor 0) and the image (1)."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Sharpness: blend between a smoothed image (factor 0) and the image (1).

  The smoothing is PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior; the
  one-pixel border keeps the original values, as PIL does.
  """
  image = tf.convert_to_tensor(image)
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.cast(tf.clip_by_value(tf.round(smooth), 0.0, 255.0), tf.uint8)
  # Put the smoothed interior back into a copy of the original (borders unchanged).
  interior = tf.pad(tf.ones_like(smooth, dtype=tf.bool), [[1, 1], [1, 1], [0, 0]])
  padded_smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior, padded_smooth, image)
  return blend(degenerate, image, factor)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.autocontrast (no cutoff): stretches each channel to span 0..255."""
  image = tf.convert_to_tensor(image)
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  flat = hi <= lo
  # (x - lo) * 255 / (hi - lo) maps hi to exactly 255 (a precomputed scale can give 254.99..).
  stretched = truncate_to_uint8((x - lo) * 255.0 / tf.maximum(hi - lo, 1.0))
  return tf.where(tf.broadcast_to(flat, tf.shape(x)), image, stretched)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's equalize on one uint8 [H, W] channel."""
  values = tf.cast(channel, tf.int32)
  histogram = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(histogram, histogram > 0)
  # PIL: step = (number of pixels - count of the last used level) // 255.
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

  def equalized():
    lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
    lut = tf.concat([[0], lut[:-1]], axis=0)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.cast(tf.gather(lut, values), tf.uint8)

  return tf.cond(step > 0, equalized, lambda: tf.cast(values, tf.uint8))


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize, per channel."""
  image = tf.convert_to_tensor(image)
  return tf.stack([_equalize_channel(image[:, :, c]) for c in range(3)], axis=-1)


# ------------------------------------------------------------------------------------------------
# Geometric ops. The 8-vector transform maps *output* pixel (x, y) to the *input* location
# ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k) with k = c0 x + c1 y + 1.


def _transform(image: tf.Tensor, transform: Sequence) -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  transform = tf.reshape(tf.cast(tf.stack(transform), tf.float32), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=transform,
      output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(float(FILL_VALUE), tf.float32),
      interpolation='NEAREST',
      fill_mode='CONSTANT')[0]
  out.set_shape(image.shape)
  return out


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates by `degrees` about the image centre; positive is counter-clockwise as displayed.

  (For a square image, 90 degrees equals `np.rot90(image)`.) Empty corners are filled with 128.
  """
  image = tf.convert_to_tensor(image)
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  shape = tf.cast(tf.shape(image), tf.float32)
  height, width = shape[0], shape[1]
  cos, sin = tf.cos(radians), tf.sin(radians)
  # input = R (output - centre) + centre, centre = ((w - 1) / 2, (h - 1) / 2).
  x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
  y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
  zero = tf.constant(0.0)
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, zero, zero])


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """output[y, x] = input[y, x + pixels]: positive `pixels` moves the content left."""
  p = tf.cast(pixels, tf.float32)
  return _transform(image, [1.0, 0.0, p, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """output[y, x] = input[y + pixels, x]: positive `pixels` moves the content up."""
  p = tf.cast(pixels, tf.float32)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, p, 0.0, 0.0])


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
  """output[y, x] = input[y, x + level * y]."""
  s = tf.cast(level, tf.float32)
  return _transform(image, [1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
  """output[y, x] = input[y + level * x, x]."""
  s = tf.cast(level, tf.float32)
  return _transform(image, [1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0])


def cutout(image: tf.Tensor, pad_size, seed=None) -> tf.Tensor:
  """Fills a (2 pad_size) x (2 pad_size) square, centred uniformly in the image, with 128.

  The square is clipped at the image border, as in the official code.
  """
  image = tf.convert_to_tensor(image)
  seed = as_seed(seed)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  center = tf.random.stateless_uniform(
      [2], seed=seed, minval=0, maxval=tf.int32.max, dtype=tf.int32) % tf.stack([height, width])
  pad_size = tf.cast(pad_size, tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = ((rows >= center[0] - pad_size) & (rows < center[0] + pad_size) &
            (cols >= center[1] - pad_size) & (cols < center[1] + pad_size))
  return tf.where(inside[:, :, None], tf.constant(FILL_VALUE, tf.uint8), image)


NAME_TO_FUNC: dict[str, Callable] = {
    'AutoContrast': autocontrast,
    'Equalize': equalize,
    'Invert': invert,
    'Rotate': rotate,
    'Posterize': posterize,
    'Solarize': solarize,
    'SolarizeAdd': solarize_add,
    'Color': color,
    'Contrast': contrast,
    'Brightness': brightness,
    'Sharpness': sharpness,
    'ShearX': shear_x,
    'ShearY': shear_y,
    'TranslateX': translate_x,
    'TranslateY': translate_y,
    'Cutout': cutout,
}


# ------------------------------------------------------------------------------------------------
# Level -> argument mapping and application.

# Ops whose argument gets a random sign.
_SIGNED_OPS = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'})


def level_to_arg(name: str, level: float, hparams: dict | None = None) -> float:
  """The official argument of op `name` at `level` (0..10), before any random sign.

  Computed in Python double precision with the official truncations (`int(...)`), so the
  thresholds and bit counts are exactly those of the reference code.
  """
  hparams = AUTOAUGMENT_HPARAMS if hparams is None else hparams
  level = float(level)
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return 0.0
  if name == 'Rotate':
    return level / _MAX_LEVEL * 30.0
  if name == 'Posterize':
    return float(int(level / _MAX_LEVEL * 4))
  if name == 'Solarize':
    return float(int(level / _MAX_LEVEL * 256))
  if name == 'SolarizeAdd':
    return float(int(level / _MAX_LEVEL * 110))
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return level / _MAX_LEVEL * 1.8 + 0.1
  if name in ('ShearX', 'ShearY'):
    return level / _MAX_LEVEL * 0.3
  if name in ('TranslateX', 'TranslateY'):
    return level / _MAX_LEVEL * float(hparams['translate_const'])
  if name == 'Cutout':
    return float(int(level / _MAX_LEVEL * hparams['cutout_const']))
  raise ValueError(f'Unknown augmentation op {name!r}; valid ops: {sorted(NAME_TO_FUNC)}.')


def _apply_with_arg(image: tf.Tensor, name: str, arg, seed: tf.Tensor) -> tf.Tensor:
  """Applies op `name` with (unsigned) argument `arg`, a float scalar that may be a tensor."""
  arg = tf.cast(arg, tf.float32)
  sign_seed, op_seed = _split_seed(seed, 2)
  if name in _SIGNED_OPS:
    arg = tf.where(_uniform(sign_seed) < 0.5, -arg, arg)
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    out = NAME_TO_FUNC[name](image)
  elif name in ('Posterize', 'Solarize', 'SolarizeAdd', 'Cutout'):
    int_arg = tf.cast(tf.round(arg), tf.int32)
    if name == 'Cutout':
      out = cutout(image, int_arg, seed=op_seed)
    else:
      out = NAME_TO_FUNC[name](image, int_arg)
  else:
    out = NAME_TO_FUNC[name](image, arg)
  out.set_shape(image.shape)
  return out


def apply_op(image: tf.Tensor, name: str, level: float, seed=None,
             hparams: dict | None = None) -> tf.Tensor:
  """Applies op `name` at `level` (0..10 in the official scale) with the official argument mapping.

  `hparams` holds `cutout_const` and `translate_const` (AutoAugment's values by default).
  `seed` drives the random sign of the geometric ops and the Cutout position.
  """
  image = _check_image(image)
  return _apply_with_arg(image, name, level_to_arg(name, level, hparams), as_seed(seed))


def _check_image(image) -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'Augmentations expect a uint8 image, got {image.dtype.name}.')
  if image.shape.rank != 3 or (image.shape[-1] is not None and image.shape[-1] != 3):
    raise ValueError(f'Augmentations expect an [H, W, 3] image, got shape {image.shape}.')
  return image


def _switch_op(image: tf.Tensor, names: Sequence[str], index: tf.Tensor, arg: tf.Tensor,
               seed: tf.Tensor) -> tf.Tensor:
  """Applies `names[index]` with argument `arg`; index == len(names) leaves the image as is.

  One branch per op *name* (the argument is a tensor), which keeps the graph small: tracing a
  branch per (op, level) pair of the policy is several times slower.
  """
  branches = [(lambda n=name: _apply_with_arg(image, n, arg, seed)) for name in names]
  branches.append(lambda: image)
  out = tf.switch_case(index, branches)
  out.set_shape(image.shape)
  return out


def distort_image_with_autoaugment(image, augmentation_name: str = 'v0', seed=None) -> tf.Tensor:
  """AutoAugment: picks one of the policy's sub-policies uniformly and applies it.

  Each op of the sub-policy is applied with its probability. Only policy 'v0' (the EfficientNet
  one, 25 sub-policies) is available. `image` is uint8 [H, W, 3]; so is the result.
  """
  policies = {'v0': POLICY_V0}
  if augmentation_name not in policies:
    raise ValueError(f'Unknown AutoAugment policy {augmentation_name!r}; available: '
                     f'{sorted(policies)}.')
  image = _check_image(image)
  policy = policies[augmentation_name]
  names = sorted({name for sub in policy for name, _, _ in sub})
  identity = len(names)
  length = max(len(sub) for sub in policy)
  seeds = _split_seed(as_seed(seed), 1 + 2 * length)
  choice = tf.random.stateless_uniform(
      [], seed=seeds[0], minval=0, maxval=len(policy), dtype=tf.int32)
  out = image
  for k in range(length):
    # Tables over sub-policies for the k-th op; sub-policies that are shorter do nothing.
    ops = [sub[k] if k < len(sub) else ('', 0.0, 0) for sub in policy]
    op_index = tf.constant([names.index(n) if n else identity for n, _, _ in ops], tf.int32)
    prob = tf.constant([p for _, p, _ in ops], tf.float32)
    arg = tf.constant([level_to_arg(n, l, AUTOAUGMENT_HPARAMS) if n else 0.0
                       for n, _, l in ops], tf.float32)
    coin_seed, op_seed = seeds[1 + 2 * k], seeds[2 + 2 * k]
    # Applied with probability p: u < p for u uniform in [0, 1) (never for p = 0, always for 1).
    applied = _uniform(coin_seed) < tf.gather(prob, choice)
    index = tf.where(applied, tf.gather(op_index, choice), identity)
    out = _switch_op(out, names, index, tf.gather(arg, choice), op_seed)
  return out


def distort_image_with_randaugment(image, num_layers: int, magnitude: float, seed=None) -> tf.Tensor:
  """RandAugment: `num_layers` times, applies one op chosen uniformly from `RANDAUGMENT_OPS`.

  Every op uses the same `magnitude` (official scale: 10 is the top of the range; larger values
  extrapolate). As in the official code the chosen op is always applied. uint8 in, uint8 out.
  """
  image = _check_image(image)
  num_layers = int(num_layers)
  args = tf.constant([level_to_arg(n, magnitude, RANDAUGMENT_HPARAMS) for n in RANDAUGMENT_OPS],
                     tf.float32)
  seeds = _split_seed(as_seed(seed), 2 * max(num_layers, 1))
  out = image
  for layer in range(num_layers):
    index = tf.random.stateless_uniform(
        [], seed=seeds[2 * layer], minval=0, maxval=len(RANDAUGMENT_OPS), dtype=tf.int32)
    out = _switch_op(out, RANDAUGMENT_OPS, index, tf.gather(args, index), seeds[2 * layer + 1])
  return out
