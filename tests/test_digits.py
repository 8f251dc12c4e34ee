"""The offline `digits` TFDS builder: builds without network, fixed split, exact pixel values."""
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from efficientnet_jax.data import sources  # noqa: F401  (opening datasets registers it)
from efficientnet_jax.data import digits


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Builds `digits` into a fresh data_dir with every socket connection refused."""
  data_dir = tmp_path_factory.mktemp('tfds')

  def no_network(*args, **kwargs):
    raise OSError('network access attempted while building digits')

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket, 'create_connection', no_network)
    mp.setattr(socket.socket, 'connect', no_network)
    builder = tfds.builder('digits', data_dir=str(data_dir))
    builder.download_and_prepare()
  return builder


def _read(builder, split):
  examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
  images = np.stack([e['image'] for e in examples])
  labels = np.array([e['label'] for e in examples])
  return images, labels


def test_registered_where_datasets_are_opened():
  assert 'digits' in tfds.list_builders(with_community_datasets=False)


def test_split_indices_fixed_and_stratified():
  _, labels = digits.load_arrays()
  train, test = digits.split_indices(labels)
  assert (len(train), len(test)) == (1437, 360)
  assert (digits.NUM_TRAIN_EXAMPLES, digits.NUM_TEST_EXAMPLES) == (1437, 360)
  assert not set(train) & set(test)
  assert sorted(set(train) | set(test)) == list(range(1797))
  # Stratified: each class's test share is its proportional quota, rounded down or up.
  counts = np.bincount(labels, minlength=10)
  test_counts = np.bincount(labels[test], minlength=10)
  assert np.all(np.abs(test_counts - counts * 360 / 1797) < 1)
  # Deterministic.
  train2, test2 = digits.split_indices(labels)
  np.testing.assert_array_equal(test, test2)
  np.testing.assert_array_equal(train, train2)


def test_builds_offline_with_documented_counts(built):
  assert built.info.splits['train'].num_examples == 1437
  assert built.info.splits['test'].num_examples == 360
  assert built.info.features['label'].num_classes == 10
  assert built.info.features['image'].shape == (8, 8, 3)


def test_values_and_labels(built):
  images, labels = _read(built, 'test')
  assert images.dtype == np.uint8 and images.shape == (360, 8, 8, 3)
  assert images.min() == 0 and images.max() == 255
  # Grey replicated on the channels; only the 17 levels round(k * 255 / 16) occur.
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  levels = set(np.rint(np.arange(17) * 255 / 16).astype(int))
  assert set(np.unique(images).tolist()) <= levels
  assert set(labels.tolist()) == set(range(10))


def test_examples_are_sklearns(built):
  """Train + test together are exactly scikit-learn's 1,797 images with their labels."""
  sk_images, sk_labels = digits.load_arrays()
  train_images, train_labels = _read(built, 'train')
  test_images, test_labels = _read(built, 'test')

  def keyed(images, labels):
    return sorted(im.tobytes() + bytes([int(lab)]) for im, lab in zip(images, labels))

  assert keyed(np.concatenate([train_images, test_images]),
               np.concatenate([train_labels, test_labels])) == keyed(sk_images, sk_labels)
  _, test_idx = digits.split_indices(sk_labels)
  assert keyed(test_images, test_labels) == keyed(sk_images[test_idx], sk_labels[test_idx])
