"""Prediction: the shipped ImageNet names, the CLI on real photos with the real Lite0 weights, and
its per-file errors.

The outside references: TFDS's own imagenet2012 label file (the synset order), and two
scikit-image photos whose classes a person can check: `chelsea()` is a tabby cat (ImageNet's cat
classes are 281-285) and `coffee()` a cup of espresso (967).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from efficientnet_jax import labels, predict
from pretrained_fixtures import lite0_dir  # noqa: F401  (a pytest fixture)
from support import ROOT, subprocess_env

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


# --- Class names --------------------------------------------------------------------------------


def test_imagenet_names():
  names = labels.imagenet2012_names()
  assert len(names) == 1000
  assert (names[0], names[281], names[967], names[999]) == (
      'tench', 'tabby', 'espresso', 'toilet tissue')
  assert labels.imagenet2012_lemmas()[281] == 'tabby, tabby cat'
  assert all(name and '\t' not in name for name in names)


def test_imagenet_order_is_tfds():
  """Our label i is TFDS imagenet2012's label i: the synsets equal TFDS's own label file."""
  import tensorflow_datasets as tfds
  path = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'labels.txt')
  if not os.path.exists(path):
    pytest.skip(f'this tensorflow_datasets has no {path}')
  with open(path) as f:
    tfds_synsets = tuple(line.strip() for line in f if line.strip())
  assert labels.imagenet2012_synsets() == tfds_synsets


def test_label_sets():
  assert labels.class_names(None) is None
  assert labels.class_names(['a', 'b'], 2) == ('a', 'b')
  with pytest.raises(ValueError, match=r'3 names but the classifier has 2 classes'):
    labels.class_names(['a', 'b', 'c'], 2)
  with pytest.raises(ValueError, match=r"Unknown label_set 'imagenet21k'.*'imagenet2012'"):
    labels.class_names('imagenet21k')


def test_top_k_without_names_shows_indices():
  top = predict.top_k_predictions(np.array([[0.0, 3.0, 1.0]]), k=5)[0]
  assert [p.index for p in top] == [1, 2, 0]  # k is capped at the number of classes
  assert sum(p.probability for p in top) == pytest.approx(1.0)
  text = predict.format_predictions(top)
  assert 'class 1' in text.splitlines()[0]


# --- Unreadable inputs (no model needed) ----------------------------------------------------------

METADATA = {'resolution': 32, 'crop_padding': 32, 'interpolation': 'bicubic',
            'mean_rgb': [127.0] * 3, 'stddev_rgb': [128.0] * 3}


def test_preprocess_errors_name_the_file(tmp_path):
  text = tmp_path / 'notes.jpg'
  text.write_text('not an image')
  with pytest.raises(predict.ImageDecodeError, match=r'notes\.jpg: not a readable image '
                     r'\(Unknown image file format'):
    predict.preprocess(str(text), METADATA)
  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(_png(np.zeros((40, 40, 3), np.uint8))[:60])
  with pytest.raises(predict.ImageDecodeError, match=r'truncated\.png: not a readable image'):
    predict.preprocess(str(truncated), METADATA)
  with pytest.raises(predict.ImageDecodeError, match=r'missing\.png: cannot read the file'):
    predict.preprocess(str(tmp_path / 'missing.png'), METADATA)
  with pytest.raises(predict.ImageDecodeError, match=r'expected a uint8 image'):
    predict.preprocess(np.zeros((8, 8, 3), np.float32), METADATA)


def test_preprocess_is_the_eval_pipeline():
  """A grey PNG, RGBA array and RGB array all become the eval crop, as uint8 [R, R, 3]."""
  from efficientnet_jax.data import preprocessing
  rng = np.random.RandomState(0)
  image = rng.randint(0, 256, (50, 70, 3)).astype(np.uint8)
  expected = np.round(preprocessing.preprocess_for_eval(image, 32, 32, 'bicubic').numpy())
  np.testing.assert_array_equal(predict.preprocess(image, METADATA), expected)
  np.testing.assert_array_equal(predict.preprocess(_png(image), METADATA), expected)
  rgba = np.concatenate([image, np.full((50, 70, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(predict.preprocess(rgba, METADATA), expected)
  assert predict.preprocess(image[..., 0], METADATA).shape == (32, 32, 3)


def test_bad_checkpoint_exits_2(tmp_path):
  image = tmp_path / 'x.png'
  image.write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
  out, err = io.StringIO(), io.StringIO()
  status = predict.run(str(tmp_path / 'nowhere'), [str(image)], out=out, err=err)
  assert status == 2
  assert 'cannot load the checkpoint' in err.getvalue()
  assert 'No pretrained directory' in err.getvalue()
  assert predict.run(str(tmp_path), [], out=out, err=err) == 2
  assert 'no images given' in err.getvalue()


# --- The real Lite0 weights ---------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
  import tensorflow as tf
  return tf.io.encode_png(array).numpy()


def _photos(tmp_path):
  """chelsea() as PNG, coffee() as JPEG, plus a text file and a truncated JPEG."""
  import tensorflow as tf
  skimage_data = pytest.importorskip('skimage.data')
  cat = tmp_path / 'chelsea.png'
  cat.write_bytes(_png(skimage_data.chelsea()))
  coffee = tmp_path / 'coffee.jpg'
  coffee.write_bytes(tf.io.encode_jpeg(skimage_data.coffee(), quality=95).numpy())
  not_image = tmp_path / 'readme.jpg'
  not_image.write_text('this is text, not a JPEG')
  truncated = tmp_path / 'truncated.jpg'
  truncated.write_bytes(coffee.read_bytes()[:500])
  return cat, coffee, not_image, truncated


def test_cli_names_the_cat_and_the_espresso(lite0_dir, tmp_path):  # noqa: F811
  """`python -m efficientnet_jax.predict`: the right classes, and bad files reported one by one."""
  cat, coffee, not_image, truncated = _photos(tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.predict', f'--checkpoint={lite0_dir}',
       str(not_image), str(cat), str(truncated), str(coffee)],
      cwd=str(ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output  # two files failed; the other two were classified
  blocks = _parse(result.stdout)
  assert list(blocks) == [str(cat), str(coffee)], output
  assert len(blocks[str(cat)]) == 5
  cat_top = blocks[str(cat)][0]
  assert cat_top[0] in CAT_CLASSES, output
  assert blocks[str(coffee)][0][:2] == (ESPRESSO, 'espresso'), output
  assert blocks[str(coffee)][0][2] > 0.5, output
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 2, result.stderr
  assert errors[0].startswith(f'error: {not_image}: not a readable image (Unknown image file '
                              'format'), errors
  assert errors[1].startswith(f'error: {truncated}: not a readable image ('), errors
  assert '2 of 4 images could not be classified.' in result.stderr


def test_bfloat16_run_names_the_espresso(lite0_dir, tmp_path):  # noqa: F811
  """`--dtype=bfloat16` (oneDNN where it loads, else XLA): the same classes; a bad dtype, or one
  given for an exported artifact, exits 2 saying why."""
  cat, coffee, _, _ = _photos(tmp_path)
  out, err = io.StringIO(), io.StringIO()
  assert predict.run(lite0_dir, [str(cat), str(coffee)], out=out, err=err,
                     dtype='bfloat16') == 0, err.getvalue()
  blocks = _parse(out.getvalue())
  assert blocks[str(cat)][0][0] in CAT_CLASSES
  assert blocks[str(coffee)][0][:2] == (ESPRESSO, 'espresso')
  assert predict.run(lite0_dir, [str(cat)], out=out, err=err, dtype='float16') == 2
  assert '--dtype=float16: valid values: float32, bfloat16.' in err.getvalue()
  assert predict.run(None, [str(cat)], out=out, err=err, model=str(tmp_path / 'm.onnx'),
                     dtype='bfloat16') == 2
  assert 'applies to --checkpoint, not to an exported artifact' in err.getvalue()


def test_classify_api(lite0_dir):  # noqa: F811
  """The notebook's path: arrays in, named top-k out (the cat photo as a uint8 array)."""
  skimage_data = pytest.importorskip('skimage.data')
  from efficientnet_jax import pretrained
  model, variables, metadata = pretrained.load(lite0_dir)
  cat, coffee = skimage_data.chelsea(), skimage_data.coffee()
  results = predict.classify(model, variables, metadata, [cat, coffee], top_k=3)
  assert [len(top) for top in results] == [3, 3]
  assert results[0][0].index in CAT_CLASSES
  assert results[1][0] == predict.Prediction(
      ESPRESSO, 'espresso', pytest.approx(results[1][0].probability))
  probabilities = [p.probability for p in results[1]]
  assert probabilities == sorted(probabilities, reverse=True)


def _parse(stdout: str) -> dict[str, list[tuple[int, str, float]]]:
  """{path: [(index, name, probability), ...]} from the CLI's output."""
  blocks, current = {}, None
  for line in stdout.splitlines():
    if not line.startswith('  '):
      current = blocks.setdefault(line.strip(), [])
      continue
    rank, index, rest = line.split(maxsplit=2)
    name, probability = rest.rsplit(maxsplit=1)
    current.append((int(index), name.strip(), float(probability)))
  return blocks
