"""Preprocessing of one image, as the official EfficientNet code does it, in TF graph ops.

`preprocess_for_train` (Inception crop or +-4 px shifts, resize, flip, AutoAugment/RandAugment)
and `preprocess_for_eval` (centre crop with `crop_padding`, resize) take a uint8 [H, W, C] image
or encoded image bytes (JPEGs are decoded only inside the crop window) and every random choice
comes from one stateless seed, so an image's augmentation is a pure function of (image, seed).
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from efficientnet_jax.data import augment as augment_lib

__all__ = ['AUGMENTS', 'RESIZE_METHODS', 'TRAIN_CROPS', 'center_crop_window',
           'preprocess_for_eval', 'preprocess_for_train', 'round_to_uint8']

TRAIN_CROPS = ('inception', 'pad_and_crop', 'none')
AUGMENTS = ('autoaugment', 'randaugment', 'none')
RESIZE_METHODS = ('bicubic', 'bilinear', 'nearest', 'area', 'lanczos3', 'lanczos5', 'gaussian',
                  'mitchellcubic')


def center_crop_window(height, width, image_size: int, crop_padding: int = 32) -> tf.Tensor:
  """[offset_y, offset_x, size, size] of the official EfficientNet eval crop.

  size = int(image_size / (image_size + crop_padding) * min(height, width)) with the fraction a
  Python double rounded to float32 and the product in float32, exactly as the official code;
  offsets ((height - size) + 1) // 2 and ((width - size) + 1) // 2. The size is at least 1.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  size = tf.cast((image_size / (image_size + crop_padding)) *
                 tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  size = tf.maximum(size, 1)
  offset_y = ((height - size) + 1) // 2
  offset_x = ((width - size) + 1) // 2
  return tf.stack([offset_y, offset_x, size, size])


def _ensure_rgb(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 3] from uint8 [H, W], [H, W, 1] (grey), [H, W, 3] or [H, W, 4] (alpha dropped)."""
  if image.dtype != tf.uint8:
    raise TypeError(f'Expected a uint8 image (or encoded image bytes), got {image.dtype.name}.')
  if image.shape.rank == 2:
    image = image[:, :, None]
  if image.shape.rank != 3:
    raise ValueError(f'Expected an [H, W, C] image, got shape {image.shape}.')
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels == 1:
    return tf.tile(image, [1, 1, 3])
  if channels is not None:
    return image[:, :, :3]
  image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                  lambda: image[:, :, :3])
  image.set_shape([None, None, 3])
  return image


def _with_image(image, fn: Callable[[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]], tf.Tensor]):
  """Calls fn(shape_hw, crop) on a uint8 image or on encoded image bytes.

  `crop(window)` returns uint8 [h, w, 3] for window [y, x, h, w]. For JPEG bytes only the window
  is decoded (the official code's fused decode-and-crop); other formats are decoded whole.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.string:
    return _with_decoded(_ensure_rgb(image), fn)

  def from_jpeg():
    shape = tf.image.extract_jpeg_shape(image)[:2]
    return fn(shape, lambda window: tf.image.decode_and_crop_jpeg(image, window, channels=3))

  def from_other():
    decoded = tf.io.decode_image(image, channels=3, dtype=tf.uint8, expand_animations=False)
    decoded.set_shape([None, None, 3])
    return _with_decoded(decoded, fn)

  return tf.cond(tf.io.is_jpeg(image), from_jpeg, from_other)


def _with_decoded(image: tf.Tensor, fn):
  def crop(window):
    return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))
  return fn(tf.shape(image)[:2], crop)


def _resize(image: tf.Tensor, image_size: int, interpolation: str) -> tf.Tensor:
  """float32 [image_size, image_size, 3] (values may overshoot 0..255 for bicubic)."""
  if interpolation not in RESIZE_METHODS:
    raise ValueError(f'Unknown interpolation {interpolation!r}; valid: {RESIZE_METHODS}.')
  image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size],
                          method=interpolation, antialias=False)
  image.set_shape([image_size, image_size, 3])
  return image


def round_to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Clips a resized float image to [0, 255] and rounds it to the nearest uint8."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def preprocess_for_eval(image, image_size: int, crop_padding: int = 32,
                        interpolation: str = 'bicubic') -> tf.Tensor:
  """The official eval preprocessing: center crop (`center_crop_window`), then resize.

  `image` is a uint8 [H, W, C] tf or numpy image (grey is made RGB, alpha is dropped) or a
  scalar string tensor of encoded image bytes. Returns float32 [image_size, image_size, 3] in
  [0, 255] (the resize's overshoot is clipped).
  """
  def fn(shape, crop):
    window = center_crop_window(shape[0], shape[1], image_size, crop_padding)
    return _resize(crop(window), image_size, interpolation)

  image = tf.clip_by_value(_with_image(image, fn), 0.0, 255.0)
  image.set_shape([image_size, image_size, 3])
  return image


def preprocess_for_train(image, image_size: int, *, seed=None, train_crop: str = 'inception',
                         random_flip: bool = True, augment: str = 'none',
                         randaugment_num_layers: int = 2, randaugment_magnitude: float = 9,
                         crop_padding: int = 32, interpolation: str = 'bicubic',
                         pad_pixels: int = 4, pad_mode: str = 'CONSTANT') -> tf.Tensor:
  """Training preprocessing; returns uint8 [image_size, image_size, 3].

  Args:
    image: uint8 [H, W, C] image (tf or numpy) or a scalar string tensor of encoded bytes.
    image_size: output resolution.
    seed: shape-[2] int seed; every random choice is derived from it (None: drawn from TF's
      global generator).
    train_crop: 'inception': `stateless_sample_distorted_bounding_box` with min object covered
      0.1, aspect ratio 3/4..4/3, area 0.08..1.0, 10 attempts; when it returns the whole image
      (all attempts failed), the eval center crop is used instead, as in the official code.
      'pad_and_crop': resize the whole image to image_size, pad `pad_pixels` on each side
      (`pad_mode` 'CONSTANT' = zeros, or 'REFLECT'), random crop back (shifts of +-pad_pixels).
      'none': resize the whole image (aspect ratio not kept).
    random_flip: random horizontal flip after the crop.
    augment: 'autoaugment' (policy v0), 'randaugment' or 'none', applied on uint8 last.
    randaugment_num_layers, randaugment_magnitude: RandAugment's N and M.
    crop_padding: the eval crop's padding, for the Inception crop's fallback.
    interpolation: resize method ('bicubic', as the official code).
    pad_pixels, pad_mode: for 'pad_and_crop'.
  """
  if train_crop not in TRAIN_CROPS:
    raise ValueError(f'Unknown train_crop {train_crop!r}; valid: {TRAIN_CROPS}.')
  augment = augment or 'none'
  if augment not in AUGMENTS:
    raise ValueError(f'Unknown augment {augment!r}; valid: {AUGMENTS}.')
  crop_seed, flip_seed, augment_seed = tf.unstack(
      tf.random.experimental.stateless_split(augment_lib.as_seed(seed), num=3))

  if train_crop == 'inception':
    def fn(shape, crop):
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.concat([shape, [3]], axis=0),
          bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
          seed=crop_seed,
          min_object_covered=0.1,
          aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
          area_range=(0.08, 1.0),
          max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      window = tf.stack([begin[0], begin[1], size[0], size[1]])
      # The sampler returns the whole image when every attempt failed: use the eval crop.
      whole = tf.logical_and(tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1]))
      window = tf.where(whole, center_crop_window(shape[0], shape[1], image_size, crop_padding),
                        window)
      return _resize(crop(window), image_size, interpolation)
  else:
    def fn(shape, crop):
      return _resize(crop(tf.stack([0, 0, shape[0], shape[1]])), image_size, interpolation)

  image = _with_image(image, fn)
  if train_crop == 'pad_and_crop':
    image = tf.pad(image, [[pad_pixels, pad_pixels], [pad_pixels, pad_pixels], [0, 0]],
                   mode=pad_mode)
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_seed)
  image = round_to_uint8(image)
  if random_flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  if augment == 'autoaugment':
    image = augment_lib.distort_image_with_autoaugment(image, 'v0', seed=augment_seed)
  elif augment == 'randaugment':
    image = augment_lib.distort_image_with_randaugment(
        image, randaugment_num_layers, randaugment_magnitude, seed=augment_seed)
  image.set_shape([image_size, image_size, 3])
  return image
