"""Exports (`efficientnet_jax.export`) against `model.apply`, and every error a user can meet.

* Parity: each format, run in each of its runtimes, gives `model.apply`'s logits on the same
  uint8 images within 1e-4 x max |logit|, for B0 and Lite0 (width and depth 0.25, 32 px, random
  weights and BatchNorm statistics), at batch 1 and 3 (the batch is symbolic in every format).
* The real ImageNet Lite0 weights exported to each format give JAX's top-1 on skimage's photos;
  int8 TFLite agrees with float32 on them (slow).
* Errors: an unknown format, a missing or mismatched checkpoint, an op an exporter cannot
  convert (named, with the format), int8 without calibration images.

The workdir -> pretrained directory export is tested in tests/test_export_workdir.py.
"""
from __future__ import annotations

import io
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import artifacts, export, predict, pretrained
from efficientnet_jax.export import formats
from efficientnet_jax.export.__main__ import run as export_cli
from efficientnet_jax.models import create_model

from pretrained_fixtures import lite0_dir  # noqa: F401  (a fixture)

RESOLUTION = 32
TINY = {'width_coefficient': 0.25, 'depth_coefficient': 0.25}
MODELS = ('efficientnet-b0', 'efficientnet-lite0')
SUFFIX = {'stablehlo': '.stablehlo', 'savedmodel': '_savedmodel', 'tflite': '.tflite',
          'onnx': '.onnx'}
RUNTIME_MODULES = {'jax': 'jax', 'tensorflow': 'tensorflow', 'litert': 'ai_edge_litert',
                   'onnxruntime': 'onnxruntime', 'openvino': 'openvino'}
FORMAT_MODULES = {'stablehlo': 'jax', 'savedmodel': 'tensorflow', 'tflite': 'tensorflow',
                  'onnx': 'jax2onnx'}
CASES = [(name, fmt, runtime) for name in MODELS for fmt, runtimes in artifacts.RUNTIMES.items()
         for runtime in runtimes]


def needs(module: str):
  return pytest.importorskip(module, reason=f"{module} comes with the 'export' extra: "
                             "pip install -e '.[export]'")


def random_variables(model, seed: int) -> dict:
  """Random weights, BatchNorm scales, shifts and statistics in the model's shapes (numpy, so
  nothing is compiled): kernels ~ N(0, 1/fan_in), BatchNorm variances in [0.5, 2]."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if "'scale'" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if "'kernel'" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)  # biases, means
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """{model name: pretrained directory} of tiny random B0 and Lite0 at 32 px."""
  root = tmp_path_factory.mktemp('export')
  directories = {}
  for i, name in enumerate(MODELS):
    model = create_model(name, **TINY)
    directories[name] = pretrained.save(
        str(root / name), name, random_variables(model, i),
        model_overrides=TINY, resolution=RESOLUTION, source={'format': 'test'})
  return directories


IMAGES = np.random.default_rng(0).integers(0, 256, (3, RESOLUTION, RESOLUTION, 3), np.uint8)
_exported: dict = {}


def exported(tiny, name: str, fmt: str, root) -> str:
  """The artifact of `name` in `fmt`, exported once per test session."""
  if (name, fmt) not in _exported:
    _exported[name, fmt] = export.export_pretrained(tiny[name], fmt,
                                                    str(root / f'{name}{SUFFIX[fmt]}'))
  return _exported[name, fmt]


@pytest.fixture(scope='module')
def artifact_root(tmp_path_factory):
  return tmp_path_factory.mktemp('artifacts')


_references: dict = {}


def reference_logits(directory: str) -> np.ndarray:
  """model.apply on IMAGES normalised as predict does it (the default conv path), once."""
  if directory not in _references:
    model, variables, metadata = pretrained.load(directory)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    _references[directory] = np.asarray(apply(variables, predict.normalize(IMAGES, metadata)))
  return _references[directory]


@pytest.mark.parametrize('name,fmt,runtime', CASES)
def test_parity_with_model_apply(tiny, artifact_root, name, fmt, runtime):
  needs(FORMAT_MODULES[fmt])
  needs(RUNTIME_MODULES[runtime])
  path = exported(tiny, name, fmt, artifact_root)
  artifact = artifacts.open_artifact(path, runtime)
  reference = reference_logits(tiny[name])
  scale = np.abs(reference).max()
  for batch in (1, 3):
    logits = artifact(IMAGES[:batch])
    assert logits.shape == (batch, 1000) and logits.dtype == np.float32
    error = np.abs(logits - reference[:batch]).max() / scale
    print(f'{name} {fmt} in {runtime}, batch {batch}: max |difference| / max |logit| = '
          f'{error:.2e}')
    assert error <= 1e-4, (batch, error)


@pytest.mark.parametrize('fmt', artifacts.FORMATS)
def test_metadata_beside_the_artifact(tiny, artifact_root, fmt):
  needs(FORMAT_MODULES[fmt])
  path = exported(tiny, 'efficientnet-lite0', fmt, artifact_root)
  metadata = artifacts.read_metadata(path)
  stored = pretrained.read_metadata(tiny['efficientnet-lite0'])
  assert metadata['artifact'] == fmt and metadata['file'] == os.path.basename(path)
  for key in ('model', 'num_classes', 'resolution', 'crop_padding', 'crop_fraction',
              'interpolation', 'mean_rgb', 'stddev_rgb', 'model_overrides', 'label_set'):
    assert metadata[key] == stored[key], key
  assert metadata['input'] == {
      'name': 'images', 'dtype': 'uint8', 'shape': [None, RESOLUTION, RESOLUTION, 3],
      'layout': metadata['input']['layout']}
  assert metadata['output']['shape'] == [None, 1000]
  assert len(metadata['class_names']) == 1000 and metadata['class_names'][281] == 'tabby'
  assert metadata['quantization'] == 'float32'


def test_predict_runs_an_exported_model(tiny, artifact_root, tmp_path):
  needs('jax2onnx')
  needs('onnxruntime')
  path = exported(tiny, 'efficientnet-lite0', 'onnx', artifact_root)
  image = tmp_path / 'noise.png'
  image.write_bytes(_png(np.random.default_rng(1).integers(0, 256, (50, 40, 3), np.uint8)))
  out, err = io.StringIO(), io.StringIO()
  assert predict.run(None, [str(image)], top_k=3, model=path, out=out, err=err) == 0, err.getvalue()
  lines = out.getvalue().splitlines()
  assert lines[0] == str(image) and len(lines) == 4
  # The classes of the artifact's logits on the image preprocessed from its metadata.
  artifact = artifacts.open_artifact(path)
  logits = artifact(predict.preprocess(str(image), artifact.metadata)[None])[0]
  assert [int(line.split()[1]) for line in lines[1:]] == list(np.argsort(-logits)[:3])


def _png(image: np.ndarray) -> bytes:
  import tensorflow as tf
  return tf.io.encode_png(image).numpy()


# --- Errors -------------------------------------------------------------------------------------


def test_unknown_format(tiny, tmp_path):
  with pytest.raises(export.ExportError, match=r"Unknown export format 'tflit'\. Did you mean "
                     r"'tflite'\? Choose one of stablehlo, savedmodel, tflite, onnx"):
    export.export_pretrained(tiny['efficientnet-lite0'], 'tflit', str(tmp_path / 'm'))
  err = io.StringIO()
  assert export_cli(checkpoint=tiny['efficientnet-lite0'], fmt='pb', output=str(tmp_path / 'm'),
                    err=err) == 2
  assert err.getvalue().startswith("error: Unknown export format 'pb'")
  assert not os.path.exists(tmp_path / 'm')


def test_missing_checkpoint(tmp_path):
  err = io.StringIO()
  assert export_cli(checkpoint=str(tmp_path / 'nowhere'), fmt='onnx',
                    output=str(tmp_path / 'm.onnx'), err=err) == 2
  assert 'Cannot export --checkpoint=' in err.getvalue()
  assert 'No pretrained directory at' in err.getvalue()


def test_mismatched_checkpoint(tiny, tmp_path):
  """A directory whose metadata names another model than its variables hold."""
  directory = tmp_path / 'mislabelled'
  import shutil
  shutil.copytree(tiny['efficientnet-b0'], directory)
  metadata = json.loads((directory / 'metadata.json').read_text())
  metadata['model'] = 'efficientnet-lite0'
  (directory / 'metadata.json').write_text(json.dumps(metadata))
  with pytest.raises(export.ExportError, match=r'(?s)Cannot export --checkpoint=.*do not fit '
                     r'efficientnet-lite0'):
    export.export_pretrained(str(directory), 'stablehlo', str(tmp_path / 'm.stablehlo'))


def test_int8_needs_calibration_images(tiny, tmp_path):
  with pytest.raises(export.ExportError, match=r'int8 quantisation needs calibration images: '
                     r'pass --calibration=DIR'):
    export.export_pretrained(tiny['efficientnet-lite0'], 'tflite', str(tmp_path / 'm.tflite'),
                             quantize='int8')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(export.ExportError, match=r'holds no readable image'):
    export.export_pretrained(tiny['efficientnet-lite0'], 'tflite', str(tmp_path / 'm.tflite'),
                             quantize='int8', calibration=str(tmp_path / 'empty'))
  with pytest.raises(export.ExportError, match=r'offered for the EfficientNet-Lite family, not '
                     r'efficientnet-b0'):
    export.export_pretrained(tiny['efficientnet-b0'], 'tflite', str(tmp_path / 'm.tflite'),
                             quantize='int8', calibration=str(tmp_path / 'empty'))
  with pytest.raises(export.ExportError, match=r'only for --quantize=int8'):
    export.export_pretrained(tiny['efficientnet-lite0'], 'tflite', str(tmp_path / 'm.tflite'),
                             calibration=str(tmp_path / 'empty'))


def _with_host_callback(images):
  x = images.astype(jnp.float32)
  return jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def _with_fft(images):
  return jnp.abs(jnp.fft.fft(images.astype(jnp.float32)))


@pytest.mark.parametrize('fmt,fn,op', [
    ('stablehlo', _with_host_callback, 'a host callback'),
    ('savedmodel', _with_host_callback, 'a host callback'),
    ('onnx', _with_host_callback, 'pure_callback'),
    ('tflite', _with_fft, 'vhlo.fft_v1'),
])
def test_an_op_the_exporter_cannot_convert_is_named(tmp_path, fmt, fn, op):
  needs(FORMAT_MODULES[fmt])
  with pytest.raises(export.ExportError,
                     match=rf'The {fmt} exporter cannot convert the op {re.escape(op)}.* in a test '
                     r'model'):
    formats.WRITERS[fmt](fn, formats.input_spec(8), str(tmp_path / 'm'), 'a test model')


def test_missing_artifact_and_metadata(tmp_path):
  with pytest.raises(artifacts.ArtifactError, match=r'No exported model at'):
    artifacts.open_artifact(tmp_path / 'm.onnx')
  (tmp_path / 'm.onnx').write_bytes(b'')
  with pytest.raises(artifacts.ArtifactError, match=r'has no metadata file .*m\.onnx\.json'):
    artifacts.open_artifact(tmp_path / 'm.onnx')
  err = io.StringIO()
  assert predict.run(None, ['x.png'], model=str(tmp_path / 'm.onnx'), err=err) == 2
  assert 'cannot load the model' in err.getvalue()


# --- The real ImageNet Lite0 weights ------------------------------------------------------------

PHOTOS = ('chelsea', 'coffee', 'rocket', 'astronaut', 'hubble_deep_field', 'retina',
          'immunohistochemistry', 'motorcycle')


def photos(tmp_path) -> list[str]:
  skimage_data = pytest.importorskip('skimage.data', reason="scikit-image is in the 'test' extra")
  paths = []
  for name in PHOTOS:
    image = (skimage_data.stereo_motorcycle()[0] if name == 'motorcycle'
             else getattr(skimage_data, name)())
    path = tmp_path / f'{name}.png'
    path.write_bytes(_png(np.asarray(image[..., :3], np.uint8)))
    paths.append(str(path))
  return paths


@pytest.mark.slow
def test_real_lite0_every_format_agrees_with_jax(lite0_dir, tmp_path):  # noqa: F811
  """Top-1 of the real weights in every runtime equals JAX's on skimage's photos; int8 too
  (calibrated on the same photos), reported with its size."""
  paths = photos(tmp_path)
  model, variables, metadata = pretrained.load(lite0_dir)
  images = np.stack([predict.preprocess(p, metadata) for p in paths])
  reference = np.asarray(model.apply(variables, predict.normalize(images, metadata),
                                     train=False))
  top1 = reference.argmax(-1)
  assert 281 <= top1[0] <= 285 and top1[1] == 967  # a cat, an espresso
  for fmt, runtimes in artifacts.RUNTIMES.items():
    needs(FORMAT_MODULES[fmt])
    path = export.export_pretrained(lite0_dir, fmt, str(tmp_path / f'lite0{SUFFIX[fmt]}'))
    for runtime in runtimes:
      needs(RUNTIME_MODULES[runtime])
      logits = artifacts.open_artifact(path, runtime)(images)
      error = np.abs(logits - reference).max() / np.abs(reference).max()
      print(f'real Lite0 {fmt} in {runtime}: max |difference| / max |logit| = {error:.2e}, '
            f'top-1 {logits.argmax(-1).tolist()} (JAX {top1.tolist()})')
      assert error <= 1e-4
      np.testing.assert_array_equal(logits.argmax(-1), top1)
  calibration = tmp_path / 'calibration'
  calibration.mkdir()
  for p in paths:
    os.link(p, calibration / os.path.basename(p))
  int8 = export.export_pretrained(lite0_dir, 'tflite', str(tmp_path / 'lite0_int8.tflite'),
                                  quantize='int8', calibration=str(calibration))
  logits = artifacts.open_artifact(int8)(images)
  agree = int((logits.argmax(-1) == top1).sum())
  float_size = os.path.getsize(tmp_path / 'lite0.tflite')
  print(f'int8 Lite0: top-1 agrees with float32 on {agree}/{len(paths)} photos; '
        f'{os.path.getsize(int8) / 2**20:.2f} MiB vs float32 {float_size / 2**20:.2f} MiB; '
        f'top-1 {logits.argmax(-1).tolist()}')
  assert artifacts.read_metadata(int8)['quantization'] == 'int8'
  assert 281 <= logits.argmax(-1)[0] <= 285  # still a cat
  assert agree >= len(paths) - 2
  assert os.path.getsize(int8) < 0.35 * float_size
