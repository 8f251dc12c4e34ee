"""Datasets as random-access sources: example i of a split, for any i, in O(1).

Random access is what makes resuming exact and cheap: the pipeline (`pipeline.py`) computes which
example each global position of the training stream reads, so a restart at step s reads exactly
what an uninterrupted run would have read next, without skipping through the examples before it.

`config.dataset` names one of
  * a TFDS dataset ('imagenet2012', 'cifar10', ...) in `config.data_dir`. Prepared in the ArrayRecord
    format, it is read from disk by index (`builder.as_data_source`). TFRecord files cannot be read
    by index: a split that small enough is loaded into memory once (also with `config.cache`), a
    larger one is an error that says how to prepare it again (`python -m
    efficientnet_jax.data.prepare`). A dataset not prepared yet is prepared as ArrayRecord.
  * 'digits': scikit-learn's handwritten digits (`digits.py`), prepared offline on first use.
  * 'folder:/path': class-named folders of images under split folders,
    /path/<split>/<class name>/*.jpg|*.jpeg|*.png; labels are the sorted class names over all
    splits. Files are listed once, sorted, and put in a fixed pseudo-random order.

A split string is a split name with an optional example slice, 'train' or 'train[25000:]' (TFDS
takes its full split syntax). `resolve_splits` applies the holdout ('minival') and the
evaluation fallback ('test', then 'validation', when `config.eval_split` does not exist).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from efficientnet_jax import errors
from efficientnet_jax.data import digits  # noqa: F401  (registers the `digits` builder)

__all__ = ['DatasetInfo', 'DatasetNotFoundError', 'FOLDER_PREFIX', 'Reader', 'Source',
           'get_dataset_info', 'open_source', 'resolve_splits']

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # What tfds.folder_dataset.ImageFolder lists.
# A TFRecord-only TFDS dataset up to this size is loaded into memory instead of read by index.
IN_MEMORY_LIMIT_BYTES = 2 * 2**30
_EVAL_FALLBACK_SPLITS = ('test', 'validation')
_QUICKSTART_HINT = ('For an offline run that needs no download, use --config=configs/quickstart.py '
                    "(scikit-learn's bundled 'digits' dataset).")
_SPLIT_RE = re.compile(r'^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$')


class DatasetNotFoundError(errors.UserError, ValueError):
  """The dataset (or its data) is missing: not prepared, unknown name, or an empty folder."""


class DatasetFormatError(errors.UserError, ValueError):
  """The dataset is prepared in a format that cannot be read by example index."""


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


class Reader:
  """Random access over the examples 0 .. num_examples - 1 of one split, in two graph steps.

  `read(indices)` takes an int64 [k] tensor of example indices and returns a dict of [k] record
  tensors (cheap: file names, serialized records, encoded bytes); `decode(record)` turns one
  record into {'image': encoded bytes or uint8 [H, W, C], 'label': int64}. Splitting the two lets
  the pipeline read in batches (one Python call per batch for ArrayRecord) and decode in parallel.
  `validated` is False where a record may fail to decode (image folders).
  """
  num_examples: int
  validated: bool = True

  def read(self, indices: tf.Tensor) -> dict[str, tf.Tensor]:
    raise NotImplementedError

  def decode(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    raise NotImplementedError


class _NumpyReader(Reader):
  """Examples held in this process's memory as numpy arrays (images encoded or uint8)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, np.asarray(labels, np.int64)
    self.num_examples = len(self.labels)
    self._image_dtype = tf.string if images.dtype == object else tf.as_dtype(images.dtype)

  def read(self, indices):
    images, labels = tf.numpy_function(lambda i: (self.images[i], self.labels[i]), [indices],
                                       (self._image_dtype, tf.int64), stateful=False)
    images.set_shape([None, *self.images.shape[1:]])
    labels.set_shape([None])
    return {'image': images, 'label': labels}

  def decode(self, record):
    return record


class _ArrayRecordReader(Reader):
  """A TFDS split in ArrayRecord files, read by index: serialized records, parsed in the graph."""

  def __init__(self, builder, split: str, image_key: str, label_key: str,
               in_memory: bool = False):
    self.source = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    self.num_examples = len(self.source)
    if in_memory:  # every serialized record read once, then indexed in memory
      records = np.empty(self.num_examples, dtype=object)
      records[:] = [self.source[i] for i in range(self.num_examples)]
      self.source = records
    # Only the two features the pipeline uses are parsed: a record's other features (bounding
    # boxes, segmentation masks, captions) are skipped by the proto parser instead of decoded.
    features = builder.info.features
    self.features = tfds.features.FeaturesDict(
        {image_key: features[image_key], label_key: features[label_key]})
    self.image_key, self.label_key = image_key, label_key
    self._decoders = ({image_key: tfds.decode.SkipDecoding()}
                      if isinstance(self.features[image_key], tfds.features.Image) else None)

  def _records(self, indices):
    # Item by item: as fast as __getitems__ here (~15 us a record), and the only access
    # tfds.testing.mock_data mocks correctly.
    records = np.empty(len(indices), dtype=object)
    records[:] = [self.source[int(i)] for i in indices]
    return records

  def read(self, indices):
    records = tf.numpy_function(self._records, [indices], tf.string, stateful=False)
    records.set_shape([None])
    return {'serialized': records}

  def decode(self, record):
    example = self.features.deserialize_example(record['serialized'], decoders=self._decoders)
    return {'image': example[self.image_key], 'label': tf.cast(example[self.label_key], tf.int64)}


class _FolderReader(Reader):
  """Image files by index; a file that is not an image fails to decode (see the pipeline)."""
  validated = False

  def __init__(self, paths: np.ndarray, labels: np.ndarray):
    self.paths = tf.constant(paths.astype(str))
    self.labels = tf.constant(np.asarray(labels, np.int64))
    self.num_examples = len(paths)

  def read(self, indices):
    return {'path': tf.gather(self.paths, indices), 'label': tf.gather(self.labels, indices)}

  def decode(self, record):
    data = tf.io.read_file(record['path'])
    check = tf.debugging.Assert(_image_header_ok(data), [
        'Not a JPEG/PNG/GIF/BMP image:', record['path']], summarize=1)
    with tf.control_dependencies([check]):
      data = tf.identity(data)
    return {'image': data, 'label': record['label']}


def _image_header_ok(data: tf.Tensor) -> tf.Tensor:
  """True for bytes that start like a JPEG, PNG, GIF or BMP file."""
  head = tf.strings.substr(data, 0, 8)
  return tf.reduce_any(tf.stack([
      tf.io.is_jpeg(data),
      tf.equal(head, b'\x89PNG\r\n\x1a\n'),
      tf.equal(tf.strings.substr(data, 0, 4), b'GIF8'),
      tf.equal(tf.strings.substr(data, 0, 2), b'BM'),
  ]))


class Source:
  """A dataset: its classes, its splits and a `Reader` per split string."""
  name: str
  num_classes: int
  class_names: tuple[str, ...] | None
  splits: tuple[str, ...] | None  # None when unknown (e.g. under tfds.testing.mock_data).
  is_folder: bool = False

  def reader(self, split: str) -> Reader:
    raise NotImplementedError

  def num_examples(self, split: str) -> int:
    return self.reader(split).num_examples


class _TfdsSource(Source):

  def __init__(self, builder: tfds.core.DatasetBuilder, cache: bool):
    self.builder = builder
    self.name = builder.name
    self.cache = cache
    features = builder.info.features
    keys = builder.info.supervised_keys
    if isinstance(keys, (tuple, list)) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
      self.image_key, self.label_key = keys
    else:
      self.image_key, self.label_key = 'image', 'label'
    if self.image_key not in features or self.label_key not in features:
      raise DatasetNotFoundError(
          f'TFDS dataset {self.name!r} has no ({self.image_key!r}, {self.label_key!r}) features '
          f'(it has {sorted(features.keys())}); this pipeline needs an image classification '
          'dataset.')
    label = features[self.label_key]
    self.num_classes = int(label.num_classes)
    names = getattr(label, 'names', None)
    self.class_names = tuple(names) if names else None
    self.splits = tuple(builder.info.splits.keys()) or None
    self._readers: dict[str, Reader] = {}

  def reader(self, split):
    if split not in self._readers:
      self._readers[split] = self._open(split)
    return self._readers[split]

  def _open(self, split: str) -> Reader:
    try:
      return _ArrayRecordReader(self.builder, split, self.image_key, self.label_key,
                                in_memory=self.cache)
    except Exception as err:  # pylint: disable=broad-except  (TFDS raises several types)
      size = int(getattr(self.builder.info, 'dataset_size', 0) or 0)
      if not self.cache and (not size or size > IN_MEMORY_LIMIT_BYTES):
        raise DatasetFormatError(_not_random_access_message(self.builder, err)) from err
      logging.info('%s is not in ArrayRecord format (%s); its %.0f MB are loaded into memory.',
                   self.name, type(err).__name__, size / 2**20)
    return self._in_memory(split)

  def _in_memory(self, split: str) -> Reader:
    """Every example of a TFRecord `split`, encoded, in numpy arrays: read once, in file order."""
    skip = isinstance(self.builder.info.features[self.image_key], tfds.features.Image)
    ds = self.builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={self.image_key: tfds.decode.SkipDecoding()} if skip else None)
    images, labels = [], []
    for example in tfds.as_numpy(ds):
      images.append(example[self.image_key])
      labels.append(example[self.label_key])
    array = np.empty(len(images), dtype=object) if skip else None
    if skip:
      array[:] = images
    else:
      array = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    return _NumpyReader(array, np.asarray(labels, np.int64))


def _not_random_access_message(builder, err: BaseException) -> str:
  return (
      f'{builder.name!r} in {builder.data_dir} cannot be read by example index ('
      f'{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ""}'
      '). Training reads examples by index so that a resumed run continues exactly where it '
      'stopped; that needs the ArrayRecord file format, and this copy is probably TFRecord. '
      'Prepare it again as ArrayRecord: python -m efficientnet_jax.data.prepare '
      f'--dataset={builder.name} --data_dir=DIR [--manual_dir=...] (then pass '
      '--config.data_dir=DIR), or, if the split fits in memory, set --config.cache=True to load '
      'it once at start.')


class _FolderSource(Source):
  """Class-named folders under split folders."""
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
    class_dirs = {split: sorted(d.rstrip('/') for d in tf.io.gfile.listdir(os.path.join(root, split))
                                if tf.io.gfile.isdir(os.path.join(root, split, d)))
                  for split in split_dirs}
    names = tuple(sorted({name for dirs in class_dirs.values() for name in dirs}))
    label_of = {name: index for index, name in enumerate(names)}
    files = {}
    for split, dirs in class_dirs.items():
      paths, labels = [], []
      for class_name in dirs:
        class_paths = sorted(_list_images(os.path.join(root, split, class_name)))
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
      raise errors.ConfigError(
          f'Split {split!r} of a folder dataset must be a split folder name, optionally with an '
          "example slice such as 'train[1000:]'.")
    name = match['name']
    if name not in self.files:
      raise errors.ConfigError(f'{self.root} has no split folder {name!r} with images; it has '
                               f'{sorted(self.files)}.')
    paths, labels = self.files[name]
    start = int(match['start']) if match['start'] else None
    stop = int(match['stop']) if match['stop'] else None
    return paths[start:stop], labels[start:stop]

  def reader(self, split):
    return _FolderReader(*self._select(split))

  def num_examples(self, split):
    return len(self._select(split)[0])


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
        f'could not be prepared from manual_dir={manual_dir!r}{cause}. TFDS cannot download '
        'ImageNet: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from the ImageNet '
        'website, place both in one folder and pass it with --config.manual_dir=/path/to/it '
        '(the dataset is then prepared into data_dir once, which takes hours), or point '
        '--config.data_dir at a TFDS directory where imagenet2012 is already prepared as '
        f'ArrayRecord (it contains imagenet2012/{builder.version}/dataset_info.json). '
        f'{_QUICKSTART_HINT}')
  manual = ''
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    manual = (f' {name!r} needs files downloaded by hand into --config.manual_dir: '
              f'{" ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())[:400]}')
  return (
      f'Dataset {name!r} is not prepared in {where} (looked in {builder.data_dir}) and preparing '
      f'it failed{cause}.{manual} Prepare it on a machine with network access (`python -m '
      f'efficientnet_jax.data.prepare --dataset={name} --data_dir=DIR`) and point '
      f'--config.data_dir at DIR. {_QUICKSTART_HINT}')


def prepare_tfds(name: str, data_dir: str | None = None, manual_dir: str | None = None):
  """Prepares TFDS dataset `name` in `data_dir` as ArrayRecord; returns its builder."""
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  if (getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) and manual_dir
      and not tf.io.gfile.isdir(manual_dir)):
    raise DatasetNotFoundError(_not_prepared_message(
        name, builder, manual_dir, data_dir,
        FileNotFoundError(f'manual_dir {manual_dir} does not exist')))
  logging.info('Preparing dataset %s in %s as ArrayRecord.', name, builder.data_dir)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(
        _not_prepared_message(name, builder, manual_dir, data_dir, e)) from e
  return builder


def _cfg(config, name: str, default=None):
  value = getattr(config, name, default)
  return default if value is None else value


def open_source(config, data_dir=None) -> Source:
  """The dataset `config.dataset` names (prepared on first use where that is possible)."""
  name = str(_cfg(config, 'dataset', ''))
  if name.startswith(FOLDER_PREFIX):
    root = os.path.expanduser(name[len(FOLDER_PREFIX):])
    if not root:
      raise DatasetNotFoundError(
          f"config.dataset={name!r} names no folder: use 'folder:/path/to/images' with "
          '/path/to/images/<split>/<class>/<image>.')
    return _FolderSource(root.rstrip('/') or '/')

  data_dir = data_dir if data_dir is not None else _cfg(config, 'data_dir')
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
    builder = prepare_tfds(name, data_dir, _cfg(config, 'manual_dir'))
  return _TfdsSource(builder, cache=bool(_cfg(config, 'cache', False)))


def _split_base_name(split: str) -> str | None:
  """'train' for 'train' or 'train[10:]'; None for anything fancier (percent slices, '+')."""
  match = _SPLIT_RE.match(split.strip())
  return match['name'] if match else None


def resolve_splits(config, source: Source, quiet: bool = False) -> tuple[str, str]:
  """Returns the (train, eval) split strings with the holdout applied."""
  holdout = int(_cfg(config, 'holdout_examples', 0))
  train_split = str(_cfg(config, 'train_split', 'train'))
  base = _split_base_name(train_split)
  if source.splits is not None and base is not None and base not in source.splits:
    raise errors.ConfigError(f'config.train_split={train_split!r}, but {source.name!r} has '
                             f'splits {list(source.splits)}.')
  minival = None
  if holdout > 0:
    if base != train_split.strip():
      raise errors.ConfigError(
          f'config.holdout_examples={holdout} needs a plain split name in config.train_split, '
          f'got {train_split!r}; use e.g. "train" (the holdout takes its first examples).')
    total = source.num_examples(base)
    if holdout >= total:
      raise errors.ConfigError(
          f'config.holdout_examples={holdout} leaves nothing to train on: split {base!r} of '
          f'{source.name!r} has {total} examples.')
    minival = f'{base}[:{holdout}]'
    train_split = f'{base}[{holdout}:]'
  elif holdout < 0:
    raise errors.ConfigError(f'config.holdout_examples must be >= 0, got {holdout}.')

  if _cfg(config, 'eval_on_holdout', False):
    if minival is None:
      raise errors.ConfigError('config.eval_on_holdout=True needs config.holdout_examples > 0 '
                               '(the number of training examples to hold out as minival).')
    return train_split, minival

  eval_split = str(_cfg(config, 'eval_split', 'validation'))
  eval_base = _split_base_name(eval_split)
  if source.splits is not None and eval_base is not None and eval_base not in source.splits:
    fallback = [s for s in _EVAL_FALLBACK_SPLITS if s in source.splits]
    if not fallback or eval_base != eval_split.strip():
      raise errors.ConfigError(f'config.eval_split={eval_split!r}, but {source.name!r} has '
                               f'splits {list(source.splits)}.')
    if not quiet:
      logging.warning('%s has no split %r; evaluating on %r instead.', source.name, eval_split,
                      fallback[0])
    eval_split = fallback[0]
  return train_split, eval_split


def get_dataset_info(config, data_dir=None, source: Source | None = None) -> DatasetInfo:
  """Sizes and class count of the configured dataset (prepares 'digits' if needed)."""
  source = source or open_source(config, data_dir)
  train_split, eval_split = resolve_splits(config, source)
  return DatasetInfo(
      name=source.name,
      num_classes=source.num_classes,
      num_train_examples=source.num_examples(train_split),
      num_eval_examples=source.num_examples(eval_split),
      train_split=train_split,
      eval_split=eval_split,
      class_names=source.class_names)

