"""TFDS builder `digits`: scikit-learn's bundled handwritten digits, for offline runs.

The data are the 1,797 real 8x8 images of `sklearn.datasets.load_digits` (the UCI "optical
recognition of handwritten digits" test set), 10 classes, pixel values 0..16. They ship inside
scikit-learn, so building needs no download and takes a few seconds:

  import efficientnet_jax.data.digits  # registers the builder
  builder = tfds.builder('digits', data_dir=...)
  builder.download_and_prepare()

Features: `image` uint8 (8, 8, 3), the grey level x scaled to round(x * 255 / 16) and repeated on
the three channels; `label` ClassLabel(10) (the digit).

Splits (fixed, deterministic, stratified by class): 'train' 1,437 examples and 'test' 360
examples (`NUM_TRAIN_EXAMPLES`, `NUM_TEST_EXAMPLES`). The split is computed here, not by
scikit-learn's splitters: each class gets a test quota by the largest-remainder rule so the
quotas sum to 360 (ties go to the lower class), and the examples of a class are chosen by
`numpy.random.RandomState(SPLIT_SEED).permutation`, whose stream numpy keeps stable across
versions. Example keys are the indices into `load_digits()`.
"""
from __future__ import annotations

import inspect

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
NUM_EXAMPLES = 1797
NUM_TEST_EXAMPLES = 360
NUM_TRAIN_EXAMPLES = NUM_EXAMPLES - NUM_TEST_EXAMPLES  # 1437
SPLIT_SEED = 0

_DESCRIPTION = """\
scikit-learn's copy of the UCI optical recognition of handwritten digits test set: 1,797 8x8
grey images of the digits 0..9 (values 0..16, stored here as uint8 RGB scaled to 0..255), with a
fixed stratified train/test split of 1,437/360 examples.
"""

_CITATION = """\
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49},
}
"""


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [1797, 8, 8, 3] in 0..255, labels int64 [1797]) from scikit-learn."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  gray = np.rint(digits.images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
  images = np.repeat(gray[..., None], 3, axis=-1)
  return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, num_test: int = NUM_TEST_EXAMPLES,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic stratified split: returns sorted (train_indices, test_indices)."""
  labels = np.asarray(labels)
  total = len(labels)
  classes, counts = np.unique(labels, return_counts=True)
  # Largest-remainder quotas in exact integer arithmetic: sum(quota) == num_test.
  quota = counts * num_test // total
  remainder = counts * num_test % total
  missing = num_test - int(quota.sum())
  order = sorted(range(len(classes)), key=lambda i: (-remainder[i], i))
  for i in order[:missing]:
    quota[i] += 1
  rng = np.random.RandomState(seed)
  test = []
  for cls, q in zip(classes, quota):
    members = np.flatnonzero(labels == cls)
    test.extend(members[rng.permutation(len(members))[:q]].tolist())
  test = np.sort(np.asarray(test, np.int64))
  train = np.setdiff1d(np.arange(total, dtype=np.int64), test)
  return train, test


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (8x8, 10 classes), built offline."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: stratified 1,437/360 split with seed 0.'}

  # TFDS 4.9.10 finds a builder's source through `importlib_resources`, a package it does not
  # declare as a dependency; without it `download_and_prepare` fails with ModuleNotFoundError.
  # This builder's source is a plain file, so point at it directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ship with scikit-learn.
    images, labels = load_arrays()
    train, test = split_indices(labels)
    return {
        'train': self._generate_examples(images, labels, train),
        'test': self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for index in indices:
      yield int(index), {'image': images[index], 'label': int(labels[index])}
