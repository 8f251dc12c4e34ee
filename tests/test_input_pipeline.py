"""The tf.data input pipeline: crops, sharded and masked evaluation, datasets and their errors."""
import collections
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from efficientnet_jax.data import pipeline, preprocessing, sources
from support import load_config_module


default = load_config_module('default')


def _digits_config(**overrides):
  config = default.get_config()
  config.dataset = 'digits'
  config.num_classes = 10
  config.train_split = 'train'
  config.eval_split = 'test'
  config.resolution = 16
  config.crop_padding = 0
  config.train_crop = 'pad_and_crop'
  config.random_flip = False
  config.augment = 'none'
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A TFDS data_dir with `digits` prepared once for the module."""
  path = str(tmp_path_factory.mktemp('tfds'))
  sources.get_dataset_info(_digits_config(), data_dir=path)
  return path


def _batches(ds):
  return list(ds.as_numpy_iterator())


def _real_examples(batches):
  """Multiset of (image bytes, label) of the unmasked examples."""
  out = collections.Counter()
  for batch in batches:
    for image, label, mask in zip(batch['image'], batch['label'], batch['mask']):
      if mask:
        out[(image.tobytes(), int(label))] += 1
  return out


# --- Eval preprocessing: the official crop arithmetic. -----------------------------------------

# (height, width, image_size, crop_padding) -> (offset_y, offset_x, size), worked out by hand:
# size = int(float32(S / (S + P)) * min(h, w)), offsets ((h - size) + 1) // 2.
CROP_CASES = [
    ((375, 500, 224, 32), (24, 86, 328)),  # 0.875 * 375 = 328.125; (47 + 1) // 2 = 24.
    ((500, 375, 224, 32), (86, 24, 328)),
    ((3, 5, 224, 32), (1, 2, 2)),  # 0.875 * 3 = 2.625 -> 2 (truncated, not rounded).
    ((33, 47, 16, 16), (9, 16, 16)),  # 0.5 * 33 = 16.5 -> 16; (17 + 1) // 2 = 9.
    ((101, 100, 240, 32), (7, 6, 88)),  # 240 / 272 * 100 = 88.2.
    ((7, 9, 5, 2), (1, 2, 5)),  # float32(5 / 7) * 7 rounds to exactly 5.0.
    ((8, 8, 32, 32), (2, 2, 4)),
    ((8, 8, 32, 0), (0, 0, 8)),
    ((64, 41, 24, 8), (17, 6, 30)),  # 0.75 * 41 = 30.75 -> 30; (34 + 1) // 2 = 17.
]


@pytest.mark.parametrize('args,expected', CROP_CASES)
def test_center_crop_window(args, expected):
  h, w, size, padding = args
  y, x, crop = expected
  np.testing.assert_array_equal(preprocessing.center_crop_window(h, w, size, padding).numpy(),
                                [y, x, crop, crop])


@pytest.mark.parametrize('args,expected', CROP_CASES)
def test_preprocess_for_eval_crops_that_box(args, expected):
  h, w, size, padding = args
  y, x, crop = expected
  image = np.random.RandomState(h * w).randint(0, 256, (h, w, 3)).astype(np.uint8)
  out = preprocessing.preprocess_for_eval(image, size, crop_padding=padding).numpy()
  assert out.dtype == np.float32 and out.shape == (size, size, 3)
  assert out.min() >= 0 and out.max() <= 255
  box = image[y:y + crop, x:x + crop].astype(np.float32)
  want = np.clip(tf.image.resize(box, [size, size], method='bicubic').numpy(), 0, 255)
  np.testing.assert_allclose(out, want, atol=1e-4)


def test_preprocess_for_eval_inputs():
  image = np.random.RandomState(1).randint(0, 256, (30, 40, 3)).astype(np.uint8)
  want = preprocessing.preprocess_for_eval(image, 12, crop_padding=4).numpy()
  # A tf tensor, PNG bytes and JPEG bytes (fused decode-and-crop) give the same result.
  np.testing.assert_array_equal(preprocessing.preprocess_for_eval(tf.constant(image), 12, 4).numpy(), want)
  np.testing.assert_array_equal(preprocessing.preprocess_for_eval(tf.io.encode_png(image), 12, 4).numpy(),
                                want)
  jpeg = tf.io.encode_jpeg(image, quality=95)
  decoded = tf.io.decode_jpeg(jpeg)
  np.testing.assert_array_equal(preprocessing.preprocess_for_eval(jpeg, 12, 4).numpy(),
                                preprocessing.preprocess_for_eval(decoded, 12, 4).numpy())
  # Grey (h, w, 1) becomes three equal channels.
  grey = preprocessing.preprocess_for_eval(image[:, :, :1], 12, 4).numpy()
  assert grey.shape == (12, 12, 3)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  np.testing.assert_allclose(grey[..., 0], want[..., 0])


# --- Train preprocessing. ----------------------------------------------------------------------


@pytest.mark.parametrize('crop', ['inception', 'pad_and_crop', 'none'])
@pytest.mark.parametrize('aug', ['none', 'autoaugment', 'randaugment'])
def test_preprocess_for_train_shapes_and_seeds(crop, aug):
  image = np.random.RandomState(2).randint(0, 256, (40, 56, 3)).astype(np.uint8)
  kwargs = dict(train_crop=crop, augment=aug, random_flip=True)
  out = preprocessing.preprocess_for_train(image, 20, seed=[1, 2], **kwargs).numpy()
  assert out.dtype == np.uint8 and out.shape == (20, 20, 3)
  np.testing.assert_array_equal(preprocessing.preprocess_for_train(image, 20, seed=[1, 2], **kwargs), out)


def test_pad_and_crop_is_a_shift_of_the_resized_image():
  image = np.random.RandomState(3).randint(0, 256, (8, 8, 3)).astype(np.uint8)
  resized = np.round(np.clip(tf.image.resize(image.astype(np.float32), [16, 16], 'bicubic'),
                             0, 255)).astype(np.uint8)
  padded = np.pad(resized, [(4, 4), (4, 4), (0, 0)])
  shifts = set()
  for s in range(12):
    out = preprocessing.preprocess_for_train(image, 16, seed=[s, 0], train_crop='pad_and_crop',
                                  random_flip=False).numpy()
    matches = [(dy, dx) for dy in range(9) for dx in range(9)
               if np.array_equal(padded[dy:dy + 16, dx:dx + 16], out)]
    assert matches, 'output is not a 16x16 window of the zero-padded resized image'
    shifts.add(matches[0])
  assert len(shifts) > 1


def test_inception_crop_varies_with_seed():
  image = np.random.RandomState(4).randint(0, 256, (64, 80, 3)).astype(np.uint8)
  outs = [preprocessing.preprocess_for_train(image, 24, seed=[s, 0], random_flip=False).numpy()
          for s in range(4)]
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])


# --- Digits through create_split. --------------------------------------------------------------


def test_dataset_info_digits(data_dir):
  info = sources.get_dataset_info(_digits_config(), data_dir=data_dir)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (1437, 360, 10)
  assert (info.train_split, info.eval_split) == ('train', 'test')


def test_eval_pads_and_masks_last_batch(data_dir):
  batches = _batches(pipeline.create_split(_digits_config(), train=False, batch_size=64,
                                     process_index=0, process_count=1, data_dir=data_dir))
  assert len(batches) == 6  # ceil(360 / 64).
  for batch in batches:
    assert batch['image'].dtype == np.uint8 and batch['image'].shape == (64, 16, 16, 3)
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == np.float32
  np.testing.assert_array_equal([b['mask'].sum() for b in batches], [64] * 5 + [40])
  last = batches[-1]
  np.testing.assert_array_equal(last['mask'], [1.0] * 40 + [0.0] * 24)
  assert not last['image'][40:].any() and not last['label'][40:].any()
  assert sum(b['mask'].sum() for b in batches) == 360


def test_eval_covers_every_example_once(data_dir):
  """At the native 8x8 resolution the eval images are the stored ones: compare exactly."""
  config = _digits_config(resolution=8)
  stored = collections.Counter(
      (ex['image'].tobytes(), int(ex['label']))
      for ex in tfds.builder('digits', data_dir=data_dir).as_data_source(split='test'))
  single = _real_examples(_batches(pipeline.create_split(
      config, train=False, batch_size=64, process_index=0, process_count=1, data_dir=data_dir)))
  assert single == stored
  parts = []
  for index in range(2):
    batches = _batches(pipeline.create_split(config, train=False, batch_size=64, process_index=index,
                                       process_count=2, data_dir=data_dir))
    assert len(batches) == 3  # Both processes: ceil(180 / 64) batches, in lock step.
    parts.append(_real_examples(batches))
  assert sum(parts[0].values()) == sum(parts[1].values()) == 180
  assert parts[0] + parts[1] == stored


def test_eval_uneven_processes_same_batch_count(data_dir):
  # 360 over 7 processes: shards of 52 and 51 examples, all with ceil(52 / 16) = 4 batches.
  counts = []
  for index in range(7):
    batches = _batches(pipeline.create_split(_digits_config(), train=False, batch_size=16,
                                       process_index=index, process_count=7, data_dir=data_dir))
    assert len(batches) == pipeline.num_eval_batches(360, 16, 7) == 4
    counts.append(sum(b['mask'].sum() for b in batches))
  assert sum(counts) == 360 and set(counts) == {51, 52}


def test_eval_multi_part_split(data_dir):
  # The 22 examples of the two parts are one split, cut evenly: 11 per process, 3 batches each.
  config = _digits_config(eval_split='train[:11]+test[:11]')
  sums = []
  for index in range(2):
    batches = _batches(pipeline.create_split(config, train=False, batch_size=4, process_index=index,
                                       process_count=2, data_dir=data_dir))
    assert len(batches) == 3
    sums.append(sum(b['mask'].sum() for b in batches))
  assert sums == [11, 11]


@pytest.mark.parametrize('aug', ['autoaugment', 'randaugment'])
def test_train_batches(data_dir, aug):
  config = _digits_config(augment=aug, cache=True)
  ds = pipeline.create_split(config, train=True, batch_size=32, process_index=0, process_count=1,
                       data_dir=data_dir)
  it = ds.as_numpy_iterator()
  batch = next(it)
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (32, 16, 16, 3)
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (32,)
  assert batch['example_id'].dtype == np.int64 and batch['position'].tolist() == list(range(32))
  assert set(batch['label'].tolist()) <= set(range(10))
  # Repeats forever: more batches than one epoch (1437 / 32 < 50).
  for _ in range(50):
    next(it)
  # Same seed and process: same data; another process: different data.
  again = next(pipeline.create_split(config, train=True, batch_size=32, process_index=0,
                               process_count=1, data_dir=data_dir).as_numpy_iterator())
  np.testing.assert_array_equal(again['image'], batch['image'])
  other = next(pipeline.create_split(config, train=True, batch_size=32, process_index=1,
                               process_count=2, data_dir=data_dir).as_numpy_iterator())
  assert not np.array_equal(other['image'], batch['image'])


def _stream(config, data_dir, steps, *, start_step=0, batch_size=8, process_index=0,
            process_count=1):
  it = pipeline.create_split(config, train=True, batch_size=batch_size, process_index=process_index,
                             process_count=process_count, data_dir=data_dir,
                             start_step=start_step).as_numpy_iterator()
  return [next(it) for _ in range(steps)]


def test_train_stream_resumes_exactly_at_any_step(data_dir):
  """Starting at step k yields exactly what the uninterrupted stream yields from step k on."""
  config = _digits_config(train_crop='inception', random_flip=True, augment='autoaugment')
  full = _stream(config, data_dir, 6)
  resumed = _stream(config, data_dir, 2, start_step=4)
  for a, b in zip(full[4:], resumed):
    for key in ('image', 'label', 'example_id', 'position'):
      np.testing.assert_array_equal(a[key], b[key])
  # Far into the run (epoch 55 of 1,437 examples) costs the same as step 0.
  far = _stream(config, data_dir, 1, start_step=10_000)[0]
  assert far['position'][0] == 80_000


def test_train_stream_does_not_depend_on_the_process_count(data_dir):
  config = _digits_config(augment='autoaugment', random_flip=True)
  one = _stream(config, data_dir, 2, batch_size=8)
  parts = [_stream(config, data_dir, 2, batch_size=4, process_index=k, process_count=2)
           for k in range(2)]
  for step in range(2):
    for key in ('image', 'example_id', 'position'):
      np.testing.assert_array_equal(
          one[step][key], np.concatenate([parts[0][step][key], parts[1][step][key]]))


def test_every_epoch_is_a_fresh_permutation(data_dir):
  config = _digits_config(holdout_examples=1437 - 40)  # 40 training examples: 5 steps an epoch
  ids = np.concatenate([b['example_id'] for b in _stream(config, data_dir, 10)])
  first, second = ids[:40], ids[40:]
  assert sorted(first) == sorted(second) == list(range(40))
  assert not np.array_equal(first, second)
  other_seed = np.concatenate([
      b['example_id'] for b in _stream(_digits_config(holdout_examples=1397, seed=1), data_dir, 5)])
  assert not np.array_equal(first, other_seed)


def test_holdout(data_dir):
  config = _digits_config(holdout_examples=100)
  info = sources.get_dataset_info(config, data_dir=data_dir)
  assert (info.num_train_examples, info.num_eval_examples) == (1337, 360)
  assert info.train_split == 'train[100:]'
  config.eval_on_holdout = True
  info = sources.get_dataset_info(config, data_dir=data_dir)
  assert (info.num_train_examples, info.num_eval_examples) == (1337, 100)
  assert info.eval_split == 'train[:100]'
  batches = _batches(pipeline.create_split(config, train=False, batch_size=64, process_index=0,
                                     process_count=1, data_dir=data_dir))
  assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 100
  with pytest.raises(ValueError, match='holdout_examples'):
    sources.get_dataset_info(_digits_config(eval_on_holdout=True), data_dir=data_dir)


def test_eval_split_falls_back_to_test(data_dir):
  info = sources.get_dataset_info(_digits_config(eval_split='validation'), data_dir=data_dir)
  assert info.eval_split == 'test' and info.num_eval_examples == 360


def test_num_classes_mismatch(data_dir):
  with pytest.raises(ValueError, match='num_classes'):
    pipeline.create_split(_digits_config(num_classes=5), train=True, batch_size=8, data_dir=data_dir)


def test_per_process_batch_size():
  assert pipeline.per_process_batch_size(4096, 16) == 256
  with pytest.raises(ValueError, match='does not divide evenly among 3 processes'):
    pipeline.per_process_batch_size(64, 3)


# --- TFDS datasets: mocked imagenet2012 and the not-prepared error. ----------------------------


def test_imagenet_mock_data():
  config = default.get_config('smoke')
  config.resolution = 32
  config.augment = 'randaugment'
  with tfds.testing.mock_data(num_examples=20):
    info = sources.get_dataset_info(config)
    assert info.num_classes == 1000
    batch = next(pipeline.create_split(config, train=True, batch_size=8, process_index=0,
                                 process_count=1).as_numpy_iterator())
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and np.all(batch['label'] < 1000)
    batches = _batches(pipeline.create_split(config, train=False, batch_size=8, process_index=0,
                                       process_count=1))
  assert [b['mask'].sum() for b in batches] == [8, 8, 4]


def test_imagenet_not_prepared_message(tmp_path):
  config = default.get_config('smoke')
  with pytest.raises(sources.DatasetNotFoundError) as error:
    pipeline.create_split(config, train=True, batch_size=8, data_dir=str(tmp_path))
  message = str(error.value)
  for needle in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar', '--config.manual_dir',
                 '--config.data_dir', str(tmp_path), 'configs/quickstart.py'):
    assert needle in message
  assert isinstance(error.value, ValueError)


def test_unknown_dataset():
  config = _digits_config(dataset='imagenet2013')
  with pytest.raises(sources.DatasetNotFoundError, match="imagenet2012.*folder:"):
    sources.get_dataset_info(config)


# --- Folder datasets. --------------------------------------------------------------------------

COLOURS = {'blue': 2, 'green': 1, 'red': 0}  # Class name -> the channel that is bright.


def _write_folder(root, counts, corrupt=()):
  """root/<split>/<class>/<i>.png, each image bright in its class's channel."""
  rng = np.random.RandomState(5)
  for split, per_class in counts.items():
    for name, channel in COLOURS.items():
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(per_class):
        image = rng.randint(0, 40, (10 + i, 12, 3)).astype(np.uint8)
        image[..., channel] = 220
        tf.io.write_file(os.path.join(root, split, name, f'{i}.png'), tf.io.encode_png(image))
  for path, content in corrupt:
    with open(os.path.join(root, path), 'wb') as f:
      f.write(content)


def test_folder_dataset_with_corrupt_files(tmp_path):
  root = str(tmp_path / 'images')
  good = tf.io.encode_png(np.zeros((9, 9, 3), np.uint8)).numpy()
  _write_folder(root, {'train': 4, 'test': 3}, corrupt=[
      ('train/red/bad.png', b'this is not an image'),
      ('test/green/broken.jpg', b'\xff\xd8\xff\xe0' + b'\x00' * 20),  # A JPEG header, no data.
      ('test/blue/truncated.png', good[:40]),  # A PNG header, cut short.
  ])
  config = _digits_config(dataset=f'folder:{root}', num_classes=3, eval_split='validation',
                          resolution=8, crop_padding=0, train_crop='inception', augment='none')
  info = sources.get_dataset_info(config)
  # The listing counts every file; the eval split fell back to 'test'.
  assert (info.num_train_examples, info.num_eval_examples) == (13, 11)
  assert info.eval_split == 'test' and info.class_names == ('blue', 'green', 'red')

  it = pipeline.create_split(config, train=True, batch_size=8, process_index=0,
                       process_count=1).as_numpy_iterator()
  for _ in range(4):  # More than an epoch: the corrupt file is skipped every time.
    batch = next(it)
    assert batch['image'].shape == (8, 8, 8, 3) and batch['image'].dtype == np.uint8
    bright = batch['image'].reshape(8, -1, 3).mean(axis=1).argmax(axis=-1)
    np.testing.assert_array_equal(bright, [COLOURS[info.class_names[l]] for l in batch['label']])

  # The corrupt file is never read: its position reads the next example of the same order, the
  # same one in every run, so a resumed stream is exactly the uninterrupted one.
  source = sources.open_source(config)
  paths = source.files['train'][0]
  bad = [i for i, p in enumerate(paths) if p.endswith('bad.png')]
  full = _stream(config, None, 6)
  ids = np.concatenate([b['example_id'] for b in full])
  assert bad and not set(bad) & set(ids.tolist())
  for a, b in zip(full[3:], _stream(config, None, 3, start_step=3)):
    for key in ('image', 'example_id', 'position'):
      np.testing.assert_array_equal(a[key], b[key])

  batches = _batches(pipeline.create_split(config, train=False, batch_size=4, process_index=0,
                                     process_count=1))
  assert len(batches) == 3
  assert sum(b['mask'].sum() for b in batches) == 9  # 11 files, 2 undecodable.
  for batch in batches:
    for image, label, mask in zip(batch['image'], batch['label'], batch['mask']):
      if mask:
        assert image.reshape(-1, 3).mean(axis=0).argmax() == COLOURS[info.class_names[label]]


def test_folder_substitutes_follow_the_rule_exactly(tmp_path):
  """The fast path (parallel decode, failures dropped, then repaired) reads what the rule says:
  position p reads the first decodable of perm(p), perm(p) + 1, ..., over runs of bad files,
  chunk boundaries, several processes and a resumed start."""
  root = str(tmp_path / 'images')
  _write_folder(root, {'train': 7, 'test': 1}, corrupt=[
      (f'train/{c}/bad{i}.png', b'not an image') for c in ('blue', 'red') for i in range(3)])
  config = _digits_config(dataset=f'folder:{root}', num_classes=3, resolution=8)
  source = sources.open_source(config)
  paths, _ = source.files['train']
  n = len(paths)
  bad = {i for i, path in enumerate(paths) if 'bad' in os.path.basename(path)}
  assert len(bad) == 6 and n == 27
  permutation_seed, _ = pipeline.stream_seeds(config.seed)

  def expected(position):
    first = int(pipeline.example_id(tf.constant(position, tf.int64), n, permutation_seed))
    return next((first + k) % n for k in range(n) if (first + k) % n not in bad)

  for start_step, process_index in ((0, 0), (5, 1)):
    batches = _stream(config, None, 14, start_step=start_step, batch_size=5,
                      process_index=process_index, process_count=2)
    positions = np.concatenate([b['position'] for b in batches])
    np.testing.assert_array_equal(
        positions, [(start_step + c // 5) * 10 + process_index * 5 + c % 5 for c in range(70)])
    np.testing.assert_array_equal(np.concatenate([b['example_id'] for b in batches]),
                                  [expected(p) for p in positions])


def test_folder_with_no_decodable_file(tmp_path):
  root = tmp_path / 'images'
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      (root / split / name).mkdir(parents=True)
      (root / split / name / '0.jpg').write_bytes(b'not a jpeg')
  config = _digits_config(dataset=f'folder:{root}', num_classes=2, resolution=8)
  with pytest.raises(sources.DatasetFormatError, match='decodes as an image'):
    pipeline.create_split(config, train=True, batch_size=2, process_index=0, process_count=1)


def test_folder_holdout_and_processes(tmp_path):
  root = str(tmp_path / 'images')
  _write_folder(root, {'train': 5, 'test': 1})
  config = _digits_config(dataset=f'folder:{root}', num_classes=3, holdout_examples=6,
                          eval_on_holdout=True, resolution=8)
  info = sources.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (9, 6)
  seen = collections.Counter()
  for index in range(2):
    batches = _batches(pipeline.create_split(config, train=False, batch_size=2, process_index=index,
                                       process_count=2))
    assert len(batches) == 2
    seen += _real_examples(batches)
  assert sum(seen.values()) == 6


def test_folder_errors(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(sources.DatasetNotFoundError, match='does not exist'):
    sources.get_dataset_info(_digits_config(dataset=f'folder:{missing}'))
  empty = tmp_path / 'empty'
  (empty / 'train').mkdir(parents=True)
  with pytest.raises(sources.DatasetNotFoundError, match='no class folders'):
    sources.get_dataset_info(_digits_config(dataset=f'folder:{empty}'))
  flat = tmp_path / 'flat'
  (flat / 'cat').mkdir(parents=True)
  tf.io.write_file(str(flat / 'cat' / '0.png'), tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)))
  with pytest.raises(sources.DatasetNotFoundError, match='without the split level'):
    sources.get_dataset_info(_digits_config(dataset=f'folder:{flat}'))
