"""Input pipeline: TFDS and image-folder datasets -> per-process batches of uint8 images.

Elements are dicts of numpy-convertible tensors

  {'image': uint8 [B, H, W, 3], 'label': int32 [B], 'mask': float32 [B]}

with B the *per-process* batch size. Images cross to the device as uint8; normalising them with
the mean/std (or (x - 127) / 128 for Lite) is the model side's job, not this module's.

Datasets (`config.dataset`):
  * any TFDS name ('imagenet2012', 'cifar10', ...), read from `config.data_dir` (None: TFDS's
    default). A dataset that is not prepared there is prepared with
    `tfds.download.DownloadConfig(manual_dir=config.manual_dir)`; when that fails a
    `DatasetNotFoundError` says what to do (imagenet2012 needs ILSVRC2012_img_train.tar and
    ILSVRC2012_img_val.tar in manual_dir).
  * 'digits': scikit-learn's handwritten digits (`efficientnet_jax.datasets.digits`), prepared
    offline into data_dir on first use (a few seconds). Splits 'train' (1,437) and 'test' (360).
  * 'folder:/path': class-named folders of JPEG/PNG files, with the split level that
    `tfds.folder_dataset.ImageFolder` expects:

        /path/train/<class name>/*.jpg|*.jpeg|*.png
        /path/test/<class name>/...        (any other split names work the same way)

    Labels are the class-folder names, sorted, over all splits. When `config.eval_split` is not
    one of the folder's splits, evaluation falls back to 'test' (then 'validation'), with a
    warning; the same fallback applies to TFDS datasets (cifar10 has no 'validation').
    Files are listed once, sorted and put in a fixed pseudo-random order, so holdout and
    per-process shards are deterministic.

Per-process sharding: each process reads only its own contiguous slice of the split
(`tfds.split_for_jax_process` for TFDS; the same even split arithmetic for folders: slices
differ by at most one example).

Training: files shuffled (TFDS `shuffle_files`, seeded), optional `cache()` of the encoded
examples, `shuffle(config.shuffle_buffer_size)`, `repeat()` forever, preprocessing, batches with
`drop_remainder=True`, prefetch. Every random choice (file order, shuffle, crop, flip,
augmentation) is seeded from `config.seed` and `process_index`, so a run is repeatable and
processes draw different augmentations. The crop is the Inception crop of the official code
(`config.train_crop='inception'`), '+-4 px shifts' ('pad_and_crop', for tiny images: resize to
the resolution, zero-pad 4 px, random crop back) or a plain resize ('none'); then random flip
(`config.random_flip`) and AutoAugment v0 / RandAugment (`config.augment`) on uint8.

Evaluation covers every example exactly once: no repeat; the examples are followed by
zero-filled padding examples with mask 0.0 up to a whole number of batches. Every process
yields the same number of batches, enough for the largest shard (ceil(ceil(N / process_count) /
batch_size) for a one-part split, see `num_eval_batches`), so multi-host evaluation loops stay in
lock step; weight metrics by `mask`.

Holdout: `config.holdout_examples = N > 0` carves the first N examples of `config.train_split`
out as 'minival' (training then reads train[N:]); `config.eval_on_holdout` evaluates on minival.

Corrupt images (folder datasets only): a file that is not a JPEG/PNG/GIF/BMP image, or fails to
decode, is skipped with `tf.data` `ignore_errors(log_warning=True)`, which logs each skipped
element's error (with the file name for files that are not images at all) to stderr through
TensorFlow's C++ logging (hidden when TF_CPP_MIN_LOG_LEVEL >= 2). A warning is logged when the
pipeline is built. In evaluation a skipped file is simply missing: the masks then sum to fewer
than `num_eval_examples`. TFDS datasets were validated when prepared, so their errors stay errors.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from typing import Callable

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import efficientnet_jax.datasets  # noqa: F401  (registers the `digits` builder)
from efficientnet_jax import augment as augment_lib
from efficientnet_jax import configs_lib

__all__ = [
    'DatasetInfo',
    'DatasetNotFoundError',
    'center_crop_window',
    'create_split',
    'get_dataset_info',
    'num_eval_batches',
    'per_process_batch_size',
    'preprocess_for_eval',
    'preprocess_for_train',
]

# tf.data only runs on the CPU; keep TensorFlow off any GPU so it does not take JAX's memory.
try:
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # pragma: no cover - TF already initialised its devices.
  pass

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # What tfds.folder_dataset.ImageFolder lists.
TRAIN_CROPS = ('inception', 'pad_and_crop', 'none')
AUGMENTS = ('autoaugment', 'randaugment', 'none')
RESIZE_METHODS = ('bicubic', 'bilinear', 'nearest', 'area', 'lanczos3', 'lanczos5', 'gaussian',
                  'mitchellcubic')
_EVAL_FALLBACK_SPLITS = ('test', 'validation')
_QUICKSTART_HINT = ('For an offline run that needs no download, use --config=configs/quickstart.py '
                    "(scikit-learn's bundled 'digits' dataset).")


class DatasetNotFoundError(ValueError):
  """The dataset (or its data) is missing: not prepared, unknown name, or an empty folder."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about a dataset, with holdout already applied."""
  name: str
  num_classes: int
  num_train_examples: int  # All processes together.
  num_eval_examples: int  # All processes together; every one of them is evaluated.
  train_split: str  # The resolved split strings, e.g. 'train[25000:]'.
  eval_split: str
  class_names: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)


# ------------------------------------------------------------------------------------------------
# Preprocessing of single images.


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


# ------------------------------------------------------------------------------------------------
# Dataset sources.


def _cfg(config, name: str, default=None):
  value = getattr(config, name, default)
  return default if value is None else value


def _even_slice(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of part `index` of `count`; the first num_examples % count parts get one more
  (the arithmetic of tfds.even_splits)."""
  per, extra = divmod(num_examples, count)
  start = per * index + min(index, extra)
  return start, start + per + (1 if index < extra else 0)


_SPLIT_RE = re.compile(r'^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$')


def _split_base_name(split: str) -> str | None:
  """'train' for 'train' or 'train[10:]'; None for anything fancier (percent slices, '+')."""
  match = _SPLIT_RE.match(split.strip())
  return match['name'] if match else None


class _Source:
  """A dataset that can be counted and read per process as {'image', 'label'} elements."""
  name: str
  num_classes: int
  class_names: tuple[str, ...] | None
  splits: tuple[str, ...] | None  # None when unknown (e.g. under tfds.testing.mock_data).
  is_folder: bool = False

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  def max_shard_size(self, split: str, process_count: int) -> int:
    """The most examples any process reads of `split`."""
    return -(-self.num_examples(split) // process_count)

  def read(self, split: str, *, process_index: int, process_count: int, shuffle: bool,
           seed: int) -> tf.data.Dataset:
    raise NotImplementedError


class _TfdsSource(_Source):

  def __init__(self, builder: tfds.core.DatasetBuilder):
    self.builder = builder
    self.name = builder.name
    features = builder.info.features
    keys = builder.info.supervised_keys
    if isinstance(keys, (tuple, list)) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
      self.image_key, self.label_key = keys
    else:
      self.image_key, self.label_key = 'image', 'label'
    if self.image_key not in features or self.label_key not in features:
      raise ValueError(
          f'TFDS dataset {self.name!r} has no ({self.image_key!r}, {self.label_key!r}) features '
          f'(it has {sorted(features.keys())}); this pipeline needs an image classification '
          'dataset.')
    label = features[self.label_key]
    self.num_classes = int(label.num_classes)
    names = getattr(label, 'names', None)
    self.class_names = tuple(names) if names else None
    split_names = tuple(builder.info.splits.keys())
    self.splits = split_names or None
    self._skip_decoding = isinstance(features[self.image_key], tfds.features.Image)

  def num_examples(self, split: str) -> int:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except Exception:  # pylint: disable=broad-except
      # Split sizes unknown (mocked data, or an unusual split string): count what TFDS reads.
      cardinality = int(self.builder.as_dataset(split=split).cardinality())
      if cardinality < 0:
        raise ValueError(f'Cannot tell the size of split {split!r} of {self.name!r}.') from None
      return cardinality

  def max_shard_size(self, split: str, process_count: int) -> int:
    # Exact per-process sizes: for a split made of several parts ('a[:11]+b[:11]') each part is
    # divided separately, so a process can get more than ceil(N / process_count).
    try:
      return max(
          int(self.builder.info.splits[tfds.split_for_jax_process(
              split, process_index=i, process_count=process_count)].num_examples)
          for i in range(process_count))
    except Exception:  # pylint: disable=broad-except
      return super().max_shard_size(split, process_count)  # Split sizes unknown (mocked).

  def read(self, split, *, process_index, process_count, shuffle, seed):
    process_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
    decoders = {self.image_key: tfds.decode.SkipDecoding()} if self._skip_decoding else None
    ds = self.builder.as_dataset(
        split=process_split,
        shuffle_files=shuffle,
        decoders=decoders,
        read_config=tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True))
    image_key, label_key = self.image_key, self.label_key
    return ds.map(lambda ex: {'image': ex[image_key], 'label': ex[label_key]},
                  num_parallel_calls=tf.data.AUTOTUNE)


def _image_header_ok(data: tf.Tensor) -> tf.Tensor:
  """True for bytes that start like a JPEG, PNG, GIF or BMP file."""
  head = tf.strings.substr(data, 0, 8)
  return tf.reduce_any(tf.stack([
      tf.io.is_jpeg(data),
      tf.equal(head, b'\x89PNG\r\n\x1a\n'),
      tf.equal(tf.strings.substr(data, 0, 4), b'GIF8'),
      tf.equal(tf.strings.substr(data, 0, 2), b'BM'),
  ]))


class _FolderSource(_Source):
  """Class-named folders under split folders, through tfds.folder_dataset.ImageFolder."""
  is_folder = True

  def __init__(self, root: str):
    self.root = root
    self.name = FOLDER_PREFIX + root
    layout = (f'Expected {root}/<split>/<class name>/<image>.jpg|.jpeg|.png, e.g. '
              f'{root}/train/cat/001.jpg and {root}/test/cat/101.jpg.')
    if not tf.io.gfile.isdir(root):
      raise DatasetNotFoundError(
          f"config.dataset='{FOLDER_PREFIX}{root}' but {root} does not exist or is not a "
          f'directory. {layout} Fix the path (absolute, or relative to the working directory '
          f'{os.getcwd()}).')
    split_dirs = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(root)
                        if tf.io.gfile.isdir(os.path.join(root, d)))
    loose = [d for d in split_dirs if _list_images(os.path.join(root, d))]
    if loose:
      raise DatasetNotFoundError(
          f'{root}/{loose[0]} holds image files directly, so {root} looks like a folder of class '
          f'folders without the split level. {layout} Move the class folders into {root}/train/ '
          f'(and a held-out set into {root}/test/).')
    builder = tfds.folder_dataset.ImageFolder(root)
    self.builder = builder
    names = tuple(builder.info.features['label'].names)
    label_of = {name: index for index, name in enumerate(names)}
    files = {}
    for split in split_dirs:
      paths, labels = [], []
      split_dir = os.path.join(root, split)
      for class_name in sorted(d.rstrip('/') for d in tf.io.gfile.listdir(split_dir)
                               if tf.io.gfile.isdir(os.path.join(split_dir, d))):
        class_paths = sorted(_list_images(os.path.join(split_dir, class_name)))
        paths.extend(class_paths)
        labels.extend([label_of[class_name]] * len(class_paths))
      if not paths:
        continue
      # A fixed pseudo-random order, so that holdout slices and process shards mix classes.
      order = np.random.RandomState(0).permutation(len(paths))
      files[split] = (np.asarray(paths, dtype=object)[order].astype(str),
                      np.asarray(labels, np.int64)[order])
    if not files or not names:
      raise DatasetNotFoundError(
          f"config.dataset='{FOLDER_PREFIX}{root}' has no class folders with images "
          f'(found split folders {split_dirs or "none"}). {layout}')
    self.files = files
    self.num_classes = len(names)
    self.class_names = names
    self.splits = tuple(files)

  def _select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    match = _SPLIT_RE.match(split.strip())
    if not match:
      raise ValueError(f'Split {split!r} of a folder dataset must be a split folder name, '
                       "optionally with an example slice such as 'train[1000:]'.")
    name = match['name']
    if name not in self.files:
      raise ValueError(f'{self.root} has no split folder {name!r} with images; it has '
                       f'{sorted(self.files)}.')
    paths, labels = self.files[name]
    start = int(match['start']) if match['start'] else None
    stop = int(match['stop']) if match['stop'] else None
    return paths[start:stop], labels[start:stop]

  def num_examples(self, split: str) -> int:
    return len(self._select(split)[0])

  def read(self, split, *, process_index, process_count, shuffle, seed):
    paths, labels = self._select(split)
    start, stop = _even_slice(len(paths), process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices((paths[start:stop], labels[start:stop]))
    if shuffle and stop > start:
      ds = ds.shuffle(stop - start, seed=seed, reshuffle_each_iteration=True)

    def load(path, label):
      data = tf.io.read_file(path)
      check = tf.debugging.Assert(
          _image_header_ok(data),
          ['Skipping a file that is not a JPEG/PNG/GIF/BMP image:', path], summarize=1)
      with tf.control_dependencies([check]):
        data = tf.identity(data)
      return {'image': data, 'label': label}

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)


def _list_images(directory: str) -> list[str]:
  return [os.path.join(directory, f) for f in tf.io.gfile.listdir(directory)
          if f.lower().endswith(IMAGE_EXTENSIONS)
          and not tf.io.gfile.isdir(os.path.join(directory, f))]


def _not_prepared_message(name: str, builder, manual_dir, data_dir, error: BaseException | None):
  where = f'data_dir={data_dir!r}' if data_dir else "TFDS's default data_dir"
  cause = ''
  if error is not None:
    first_line = (str(error).strip().splitlines() or [''])[0][:300]
    cause = f' (TFDS: {type(error).__name__}: {first_line})'
  if name.split('/')[0].split(':')[0] == 'imagenet2012':
    return (
        f"Dataset 'imagenet2012' is not prepared in {where} (looked in {builder.data_dir}) and "
        'could not be prepared from manual_dir='
        f'{manual_dir!r}{cause}. TFDS cannot download ImageNet: get ILSVRC2012_img_train.tar '
        'and ILSVRC2012_img_val.tar from the ImageNet website, place both in one folder and '
        'pass it with --config.manual_dir=/path/to/that/folder (TFDS then prepares the dataset '
        'into data_dir once, which takes hours), or point --config.data_dir at a TFDS '
        'directory where imagenet2012 is already prepared (it contains '
        f'imagenet2012/{builder.version}/dataset_info.json). {_QUICKSTART_HINT}')
  manual = ''
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    manual = (f' {name!r} needs files downloaded by hand into --config.manual_dir: '
              f'{" ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())[:400]}')
  return (
      f'Dataset {name!r} is not prepared in {where} (looked in {builder.data_dir}) and preparing '
      f'it failed{cause}.{manual} Prepare it on a machine with network access (e.g. '
      f'`tfds build {name} --data_dir=DIR`) and point --config.data_dir at DIR. '
      f'{_QUICKSTART_HINT}')


def _open_source(config, data_dir=None) -> _Source:
  name = str(_cfg(config, 'dataset', ''))
  if name.startswith(FOLDER_PREFIX):
    root = os.path.expanduser(name[len(FOLDER_PREFIX):])
    if not root:
      raise DatasetNotFoundError(
          f"config.dataset={name!r} names no folder: use 'folder:/path/to/images' with "
          '/path/to/images/<split>/<class>/<image>.')
    return _FolderSource(root.rstrip('/') or '/')

  data_dir = data_dir if data_dir is not None else _cfg(config, 'data_dir')
  manual_dir = _cfg(config, 'manual_dir')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    known = sorted(set(tfds.list_builders()) | {'digits'})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
    raise DatasetNotFoundError(
        f'Unknown dataset {name!r}.{hint} config.dataset takes a TFDS dataset name (see '
        "tfds.list_builders(), e.g. 'imagenet2012' or 'cifar10'), 'digits' (the offline "
        "quickstart dataset) or 'folder:/path' for class-named folders of images.") from e

  if not builder.is_prepared():
    if (getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) and manual_dir
        and not tf.io.gfile.isdir(manual_dir)):
      raise DatasetNotFoundError(_not_prepared_message(
          name, builder, manual_dir, data_dir,
          FileNotFoundError(f'manual_dir {manual_dir} does not exist')))
    logging.info('Dataset %s is not prepared in %s; preparing it.', name, builder.data_dir)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetNotFoundError(
          _not_prepared_message(name, builder, manual_dir, data_dir, e)) from e
  return _TfdsSource(builder)


def _resolve_splits(config, source: _Source, quiet: bool = False) -> tuple[str, str]:
  """Returns the (train, eval) split strings with the holdout applied."""
  holdout = int(_cfg(config, 'holdout_examples', 0))
  train_split = str(_cfg(config, 'train_split', 'train'))
  base = _split_base_name(train_split)
  if source.splits is not None and base is not None and base not in source.splits:
    raise ValueError(f'config.train_split={train_split!r}, but {source.name!r} has splits '
                     f'{list(source.splits)}.')
  minival = None
  if holdout > 0:
    if base != train_split.strip():
      raise ValueError(
          f'config.holdout_examples={holdout} needs a plain split name in config.train_split, '
          f'got {train_split!r}; use e.g. "train" (the holdout takes its first examples).')
    total = source.num_examples(base)
    if holdout >= total:
      raise ValueError(f'config.holdout_examples={holdout} leaves nothing to train on: split '
                       f'{base!r} of {source.name!r} has {total} examples.')
    minival = f'{base}[:{holdout}]'
    train_split = f'{base}[{holdout}:]'
  elif holdout < 0:
    raise ValueError(f'config.holdout_examples must be >= 0, got {holdout}.')

  if _cfg(config, 'eval_on_holdout', False):
    if minival is None:
      raise ValueError('config.eval_on_holdout=True needs config.holdout_examples > 0 '
                       '(the number of training examples to hold out as minival).')
    return train_split, minival

  eval_split = str(_cfg(config, 'eval_split', 'validation'))
  eval_base = _split_base_name(eval_split)
  if source.splits is not None and eval_base is not None and eval_base not in source.splits:
    fallback = [s for s in _EVAL_FALLBACK_SPLITS if s in source.splits]
    if not fallback or eval_base != eval_split.strip():
      raise ValueError(f'config.eval_split={eval_split!r}, but {source.name!r} has splits '
                       f'{list(source.splits)}.')
    if not quiet:
      logging.warning('%s has no split %r; evaluating on %r instead.', source.name, eval_split,
                      fallback[0])
    eval_split = fallback[0]
  return train_split, eval_split


def get_dataset_info(config, data_dir=None) -> DatasetInfo:
  """Sizes and class count of the configured dataset (prepares 'digits' if needed)."""
  source = _open_source(config, data_dir)
  return _dataset_info(source, config)


def _dataset_info(source: _Source, config) -> DatasetInfo:
  train_split, eval_split = _resolve_splits(config, source)
  return DatasetInfo(
      name=source.name,
      num_classes=source.num_classes,
      num_train_examples=source.num_examples(train_split),
      num_eval_examples=source.num_examples(eval_split),
      train_split=train_split,
      eval_split=eval_split,
      class_names=source.class_names)


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  """global_batch_size / process_count, or a ValueError saying how to fix an uneven split."""
  process_count = jax.process_count() if process_count is None else int(process_count)
  global_batch_size = int(global_batch_size)
  if global_batch_size <= 0 or global_batch_size % process_count:
    lower = max(process_count, global_batch_size // process_count * process_count)
    raise ValueError(
        f'Batch size {global_batch_size} does not divide evenly among {process_count} processes '
        f'(hosts): every process must load the same number of examples per step. Use a multiple '
        f'of {process_count}, e.g. {lower} or {lower + process_count} (and a multiple of the '
        'total device count for the training step).')
  return global_batch_size // process_count


def num_eval_batches(num_eval_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Batches each process yields in evaluation: ceil(ceil(N / processes) / batch_size).

  Exact for a split with one part ('validation', 'train[:25000]'); for a '+' of several parts a
  process can get a few more examples, and `create_split` accounts for that.
  """
  per_process = -(-int(num_eval_examples) // int(process_count))
  return -(-per_process // int(batch_size))


def _derive_seeds(seed: int, process_index: int) -> list[int]:
  """Four 31-bit seeds from (config.seed, process_index)."""
  state = np.random.SeedSequence([int(seed) % 2**32, int(process_index)]).generate_state(4)
  return [int(s) % (2**31 - 1) for s in state]


def create_split(config, *, train: bool, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, data_dir=None) -> tf.data.Dataset:
  """The train (infinite) or eval (finite, padded and masked) tf.data pipeline of this process.

  Args:
    config: the experiment config (configs/default.py fields: dataset, data_dir, manual_dir,
      train_split, eval_split, holdout_examples, eval_on_holdout, resolution, train_crop,
      crop_padding, interpolation, random_flip, augment, randaugment_*, shuffle_buffer_size,
      cache, seed, num_classes).
    train: training pipeline (shuffled, augmented, repeated) or evaluation pipeline.
    batch_size: examples per batch *of this process* (see `per_process_batch_size`).
    process_index, process_count: this process and the number of processes; default to
      `jax.process_index()` and `jax.process_count()` (read at call time).
    data_dir: overrides config.data_dir.

  Returns:
    A dataset of {'image': uint8 [B, R, R, 3], 'label': int32 [B], 'mask': float32 [B]}.
  """
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  if int(batch_size) <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  batch_size = int(batch_size)

  source = _open_source(config, data_dir)
  model_classes = _cfg(config, 'num_classes')
  if model_classes is not None and source.num_classes > int(model_classes):
    raise ValueError(
        f'{source.name!r} has {source.num_classes} classes but config.num_classes is '
        f'{model_classes}: labels would fall outside the classifier. Set '
        f'--config.num_classes={source.num_classes}.')
  train_split, eval_split = _resolve_splits(config, source, quiet=train)
  image_size = configs_lib.model_fields(config)['resolution']
  crop_padding = int(_cfg(config, 'crop_padding', 32))
  interpolation = str(_cfg(config, 'interpolation', 'bicubic'))
  if source.is_folder:
    logging.warning(
        'Folder dataset %s: images that cannot be decoded are skipped (tf.data ignore_errors); '
        'each skip is logged by TensorFlow as a warning naming the error.', source.name)

  options = tf.data.Options()
  options.deterministic = True

  if train:
    train_crop = str(_cfg(config, 'train_crop', 'inception'))
    augment = str(_cfg(config, 'augment', 'none'))
    if train_crop not in TRAIN_CROPS:
      raise ValueError(f'Unknown config.train_crop {train_crop!r}; valid: {TRAIN_CROPS}.')
    if augment not in AUGMENTS:
      raise ValueError(f'Unknown config.augment {augment!r}; valid: {AUGMENTS}.')
    total = source.num_examples(train_split)
    if total < process_count:
      raise ValueError(f'Split {train_split!r} of {source.name!r} has {total} examples, fewer '
                       f'than the {process_count} processes that each need some.')
    files_seed, shuffle_seed, augment_seed, _ = _derive_seeds(
        _cfg(config, 'seed', 0), process_index)
    random_flip = bool(_cfg(config, 'random_flip', True))
    num_layers = int(_cfg(config, 'randaugment_num_layers', 2))
    magnitude = float(_cfg(config, 'randaugment_magnitude', 9))

    @tf.autograph.experimental.do_not_convert
    def prepare(index, example):
      seed = tf.stack([tf.constant(augment_seed, tf.int64), index])
      image = preprocess_for_train(
          example['image'], image_size, seed=seed, train_crop=train_crop,
          random_flip=random_flip, augment=augment, randaugment_num_layers=num_layers,
          randaugment_magnitude=magnitude, crop_padding=crop_padding,
          interpolation=interpolation)
      return {'image': image, 'label': tf.cast(example['label'], tf.int32),
              'mask': tf.constant(1.0, tf.float32)}

    ds = source.read(train_split, process_index=process_index, process_count=process_count,
                     shuffle=True, seed=files_seed)
    if source.is_folder:
      ds = ds.ignore_errors(log_warning=True)
    if _cfg(config, 'cache', False):
      ds = ds.cache()
    ds = ds.shuffle(int(_cfg(config, 'shuffle_buffer_size', 16_384)), seed=shuffle_seed,
                    reshuffle_each_iteration=True)
    ds = ds.repeat()
    ds = ds.enumerate()
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if source.is_folder:
      ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

  # Every process yields the same number of batches, enough for the largest shard.
  num_batches = -(-source.max_shard_size(eval_split, process_count) // batch_size)

  @tf.autograph.experimental.do_not_convert
  def prepare_eval(example):
    image = preprocess_for_eval(example['image'], image_size, crop_padding, interpolation)
    return {'image': round_to_uint8(image), 'label': tf.cast(example['label'], tf.int32),
            'mask': tf.constant(1.0, tf.float32)}

  ds = source.read(eval_split, process_index=process_index, process_count=process_count,
                   shuffle=False, seed=0)
  if source.is_folder:
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.map(prepare_eval, num_parallel_calls=tf.data.AUTOTUNE)
  if source.is_folder:
    ds = ds.ignore_errors(log_warning=True)
  if _cfg(config, 'cache', False):
    ds = ds.cache()
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([image_size, image_size, 3], tf.uint8),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0, tf.float32),
  }).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

