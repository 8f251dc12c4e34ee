"""AutoAugment v0 / RandAugment: uint8 in and out, seeded, and each op does what it says."""
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_jax.data import augment

RNG = np.random.RandomState(0)
IMAGE = RNG.randint(0, 256, size=(24, 32, 3)).astype(np.uint8)
SQUARE = RNG.randint(0, 256, size=(9, 9, 3)).astype(np.uint8)


def _np(x):
  return np.asarray(x.numpy() if hasattr(x, 'numpy') else x)


# --- The policy and the argument mapping. ------------------------------------------------------


def test_policy_v0_shape():
  assert len(augment.POLICY_V0) == 25
  assert all(len(sub) == 2 for sub in augment.POLICY_V0)
  names = {name for sub in augment.POLICY_V0 for name, _, _ in sub}
  assert names == {'Equalize', 'ShearY', 'Color', 'Rotate', 'Solarize', 'SolarizeAdd', 'ShearX',
                   'Invert', 'Posterize', 'AutoContrast', 'TranslateY'}
  assert augment.POLICY_V0[0] == (('Equalize', 0.8, 1), ('ShearY', 0.8, 4))
  assert augment.POLICY_V0[-1] == (('Color', 0.8, 6), ('Rotate', 0.4, 5))
  assert len(augment.RANDAUGMENT_OPS) == 16


@pytest.mark.parametrize('name,level,hparams,expected', [
    ('Rotate', 9, None, 27.0),
    ('Posterize', 6, None, 2.0),
    ('Posterize', 2, None, 0.0),  # int(0.8): policy v0's ('Posterize', 0.8, 2).
    ('Solarize', 3, None, 76.0),
    ('Solarize', 10, None, 256.0),
    ('SolarizeAdd', 3, None, 33.0),
    ('Color', 9, None, 1.72),
    ('Color', 0, None, 0.1),
    ('ShearX', 9, None, 0.27),
    ('TranslateY', 9, augment.AUTOAUGMENT_HPARAMS, 225.0),
    ('TranslateX', 9, augment.RANDAUGMENT_HPARAMS, 90.0),
    ('Cutout', 9, augment.RANDAUGMENT_HPARAMS, 36.0),
])
def test_level_to_arg(name, level, hparams, expected):
  assert augment.level_to_arg(name, level, hparams) == pytest.approx(expected)


# --- Every op keeps dtype and shape. -----------------------------------------------------------


@pytest.mark.parametrize('name', augment.RANDAUGMENT_OPS)
def test_each_op_uint8_same_shape(name):
  out = augment.apply_op(IMAGE, name, 7, seed=[1, 2], hparams=augment.RANDAUGMENT_HPARAMS)
  assert out.dtype == tf.uint8
  assert tuple(out.shape) == IMAGE.shape


# --- Direction of each op on simple cases. -----------------------------------------------------


def test_invert():
  np.testing.assert_array_equal(_np(augment.invert(IMAGE)), 255 - IMAGE)


def test_rotate_zero_is_identity_and_90_is_rot90():
  np.testing.assert_array_equal(_np(augment.rotate(IMAGE, 0.0)), IMAGE)
  np.testing.assert_array_equal(_np(augment.rotate(SQUARE, 90.0)), np.rot90(SQUARE))
  np.testing.assert_array_equal(_np(augment.rotate(SQUARE, -90.0)), np.rot90(SQUARE, k=-1))
  # 45 degrees leaves the corners empty: filled with grey 128.
  out = _np(augment.rotate(SQUARE, 45.0))
  np.testing.assert_array_equal(out[0, 0], [128, 128, 128])


def test_translate_moves_content_and_fills_grey():
  out = _np(augment.translate_x(IMAGE, 5.0))
  np.testing.assert_array_equal(out[:, :-5], IMAGE[:, 5:])
  assert np.all(out[:, -5:] == 128)
  out = _np(augment.translate_y(IMAGE, -3.0))
  np.testing.assert_array_equal(out[3:], IMAGE[:-3])
  assert np.all(out[:3] == 128)


def test_shear():
  np.testing.assert_array_equal(_np(augment.shear_x(IMAGE, 0.0)), IMAGE)
  out = _np(augment.shear_x(IMAGE, 1.0))
  # output[y, x] = input[y, x + y]: row 0 unchanged, row 2 shifted left by 2.
  np.testing.assert_array_equal(out[0], IMAGE[0])
  np.testing.assert_array_equal(out[2, :-2], IMAGE[2, 2:])
  assert np.all(out[2, -2:] == 128)
  out = _np(augment.shear_y(IMAGE, 1.0))
  np.testing.assert_array_equal(out[:, 0], IMAGE[:, 0])
  np.testing.assert_array_equal(out[:-3, 3], IMAGE[3:, 3])


def test_solarize_and_solarize_add():
  ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
  out = _np(augment.solarize(ramp, 128))
  np.testing.assert_array_equal(out[0, :128, 0], np.arange(128))
  np.testing.assert_array_equal(out[0, 128:, 0], 255 - np.arange(128, 256))
  np.testing.assert_array_equal(_np(augment.solarize(ramp, 256)), ramp)  # Level 10: no-op.
  out = _np(augment.solarize_add(ramp, 100))
  np.testing.assert_array_equal(out[0, :128, 0], np.minimum(np.arange(128) + 100, 255))
  np.testing.assert_array_equal(out[0, 128:, 0], np.arange(128, 256))


def test_posterize():
  ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (1, 1, 3))
  np.testing.assert_array_equal(_np(augment.posterize(ramp, 4))[0, :, 0],
                                np.arange(256) & 0xF0)
  # 0 bits keeps the top bit, as TF's clamped shift does in the official code.
  np.testing.assert_array_equal(_np(augment.posterize(ramp, 0))[0, :, 0],
                                np.arange(256) & 0x80)


def test_blend_ops():
  np.testing.assert_array_equal(_np(augment.brightness(IMAGE, 0.0)), 0)
  np.testing.assert_array_equal(_np(augment.brightness(IMAGE, 1.0)), IMAGE)
  assert _np(augment.brightness(IMAGE, 1.5)).astype(int).sum() > IMAGE.astype(int).sum()
  grey = _np(augment.color(IMAGE, 0.0))
  np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
  np.testing.assert_array_equal(grey[..., 1], grey[..., 2])
  np.testing.assert_array_equal(_np(augment.color(IMAGE, 1.0)), IMAGE)
  flat = _np(augment.contrast(IMAGE, 0.0))
  assert np.unique(flat).size == 1
  mean_grey = np.round(_np(tf.image.rgb_to_grayscale(IMAGE)).astype(float).mean())
  assert abs(int(flat[0, 0, 0]) - mean_grey) <= 1
  np.testing.assert_array_equal(_np(augment.sharpness(IMAGE, 1.0)), IMAGE)
  smooth = _np(augment.sharpness(IMAGE, 0.0)).astype(int)
  np.testing.assert_array_equal(smooth[0], IMAGE[0])  # Border kept.
  assert np.abs(np.diff(smooth[1:-1, 1:-1], axis=1)).mean() < np.abs(
      np.diff(IMAGE[1:-1, 1:-1].astype(int), axis=1)).mean()


def test_autocontrast_and_equalize():
  dull = (IMAGE // 4 + 60).astype(np.uint8)  # Range 60..123.
  out = _np(augment.autocontrast(dull))
  assert out.min() == 0 and out.max() == 255
  flat = np.full((5, 5, 3), 77, np.uint8)
  np.testing.assert_array_equal(_np(augment.autocontrast(flat)), flat)
  np.testing.assert_array_equal(_np(augment.equalize(flat)), flat)
  out = _np(augment.equalize(dull))
  assert out.min() < 60 and out.max() > 123  # Histogram spread out.


def test_cutout_fills_a_grey_square():
  image = np.zeros((40, 40, 3), np.uint8)
  out = _np(augment.cutout(image, 5, seed=[3, 4]))
  filled = np.all(out == 128, axis=-1)
  rows, cols = np.nonzero(filled)
  assert 0 < filled.sum() <= 100
  assert rows.max() - rows.min() < 10 and cols.max() - cols.min() < 10
  np.testing.assert_array_equal(out[~filled], 0)


# --- The policies. -----------------------------------------------------------------------------


@pytest.mark.parametrize('fn', [
    lambda image, seed: augment.distort_image_with_autoaugment(image, 'v0', seed=seed),
    lambda image, seed: augment.distort_image_with_randaugment(image, 2, 9, seed=seed),
], ids=['autoaugment', 'randaugment'])
def test_policies_uint8_deterministic(fn):
  outs = [_np(fn(IMAGE, [7, s])) for s in range(6)]
  for out in outs:
    assert out.dtype == np.uint8 and out.shape == IMAGE.shape
  np.testing.assert_array_equal(_np(fn(IMAGE, [7, 0])), outs[0])
  assert any(not np.array_equal(out, IMAGE) for out in outs)
  assert any(not np.array_equal(outs[0], out) for out in outs[1:])


def test_policies_inside_tf_data():
  ds = tf.data.Dataset.from_tensors(IMAGE).repeat(4).enumerate()
  ds = ds.map(lambda i, image: (
      augment.distort_image_with_autoaugment(image, 'v0', seed=tf.stack([i, i])),
      augment.distort_image_with_randaugment(image, 3, 15, seed=tf.stack([i, i + 1]))))
  first = [(a.copy(), b.copy()) for a, b in ds.as_numpy_iterator()]
  second = list(ds.as_numpy_iterator())
  for (a1, b1), (a2, b2) in zip(first, second):
    assert a1.dtype == np.uint8 and a1.shape == IMAGE.shape and b1.shape == IMAGE.shape
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)


def test_bad_inputs():
  with pytest.raises(ValueError, match='v0'):
    augment.distort_image_with_autoaugment(IMAGE, 'v9')
  with pytest.raises(TypeError, match='uint8'):
    augment.distort_image_with_autoaugment(IMAGE.astype(np.float32), 'v0')
  with pytest.raises(ValueError, match='Unknown augmentation op'):
    augment.apply_op(IMAGE, 'Blur', 3)
