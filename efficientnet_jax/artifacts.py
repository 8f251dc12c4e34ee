"""Exported models: their metadata and the runtimes that run them.

`python -m efficientnet_jax.export --checkpoint=DIR --format=F --output=PATH` writes an artifact
(a file, or a directory for a SavedModel) and `PATH.json` beside it. Every artifact has one
contract, whatever its format:

    input   'images'  uint8 [batch, R, R, 3], RGB, already centre-cropped and resized to R =
                      metadata['resolution'] (crop and interpolation are in the metadata)
    output  'logits'  float32 [batch, num_classes]

The normalisation, (x - mean_rgb) / stddev_rgb, happens inside the artifact, so a deployment
feeds decoded pixels; the crop and resize stay outside because every serving stack decodes
images its own way. `open_artifact` runs one in its runtime:

    artifact = artifacts.open_artifact('lite0.onnx')           # ONNX Runtime; or runtime='openvino'
    logits = artifact(uint8_images)                           # numpy in, numpy out
    artifact.metadata['class_names'][logits.argmax(-1)[0]]

| format       | file            | runtimes (the first is the default)              |
|--------------|-----------------|--------------------------------------------------|
| `stablehlo`  | serialised `jax.export.Exported` | `jax` (`jax.export.deserialize`) |
| `savedmodel` | directory       | `tensorflow` (`tf.saved_model.load`, signature `serving_default`) |
| `tflite`     | `.tflite`       | `litert` (`ai_edge_litert.interpreter.Interpreter`) |
| `onnx`       | `.onnx`         | `onnxruntime`, `openvino`                        |

Each runtime is imported only when used (the `export` extra installs them). OpenVINO is asked for
float32 inference: on CPUs with bfloat16 units its default precision would change the logits. The
batch is symbolic in every format but TFLite, whose file takes one image (what phones run, and
what lets the converter fuse BatchNorm and relu6 into the convolutions); `Artifact` runs a batch
through it image by image.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from efficientnet_jax import errors

FORMAT = 'efficientnet-jax-export'
VERSION = 1
INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
# Formats and, for each, the runtimes that run it (the first is the default).
RUNTIMES = {
    'stablehlo': ('jax',),
    'savedmodel': ('tensorflow',),
    'tflite': ('litert',),
    'onnx': ('onnxruntime', 'openvino'),
}
FORMATS = tuple(RUNTIMES)
_EXTRA = "install the 'export' extra: pip install -e '.[export]' (see docs/export.md)"


class ArtifactError(errors.UserError, ValueError):
  """An exported artifact is missing, not ours, or cannot run in the requested runtime."""


def metadata_path(path: str | os.PathLike) -> str:
  """Where an artifact's metadata lives: `PATH.json` beside the file or directory."""
  return os.fspath(path).rstrip('/\\') + '.json'


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata JSON of the artifact at `path`, checked to be ours and complete."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ArtifactError(
        f'No exported model at {path!r}. Export one with `python -m efficientnet_jax.export '
        '--checkpoint=DIR --format=onnx --output=PATH` (or stablehlo, savedmodel, tflite).')
  meta_path = metadata_path(path)
  if not os.path.isfile(meta_path):
    hint = (' It looks like a pretrained directory: pass it as --checkpoint instead.'
            if os.path.isfile(os.path.join(path, 'metadata.json')) else '')
    raise ArtifactError(
        f'{path!r} has no metadata file {meta_path!r} beside it, so its input size, '
        f'preprocessing and classes are unknown.{hint} Export it again with '
        '`python -m efficientnet_jax.export`, which writes both, and copy them together.')
  try:
    with open(meta_path) as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(f'{meta_path} is not valid JSON ({e}); export the model again.') from e
  if not isinstance(metadata, dict) or metadata.get('format') != FORMAT:
    raise ArtifactError(f'{meta_path} is not efficientnet-jax export metadata (its format is '
                        f'{metadata.get("format") if isinstance(metadata, dict) else None!r}, '
                        f'expected {FORMAT!r}).')
  if not isinstance(metadata.get('version'), int) or metadata['version'] > VERSION:
    raise ArtifactError(f'{meta_path} has version {metadata.get("version")!r}; this '
                        f'efficientnet_jax reads version {VERSION}. Upgrade efficientnet_jax.')
  if metadata.get('artifact') not in RUNTIMES:
    raise ArtifactError(f'{meta_path} names an unknown artifact format '
                        f'{metadata.get("artifact")!r}; known: {", ".join(FORMATS)}.')
  return metadata


@dataclasses.dataclass
class Artifact:
  """A loaded artifact: call it with uint8 [B, R, R, 3] images to get float32 [B, C] logits."""
  path: str
  runtime: str
  metadata: dict[str, Any]
  run: Callable[[np.ndarray], np.ndarray]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    size = int(self.metadata['resolution'])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ArtifactError(
          f'{self.path} takes uint8 RGB images of shape [batch, {size}, {size}, 3] (centre-'
          f'cropped and resized as its metadata says); got {images.dtype} {images.shape}.')
    return np.asarray(self.run(np.ascontiguousarray(images)), np.float32)


def open_artifact(path: str | os.PathLike, runtime: str | None = None,
                  num_threads: int | None = None) -> Artifact:
  """Loads the artifact at `path` in `runtime` (default: its format's first runtime).

  `num_threads` caps the runtime's CPU threads where it has such a setting (default: all cores).
  """
  path = os.fspath(path).rstrip('/\\') or os.fspath(path)
  metadata = read_metadata(path)
  fmt = metadata['artifact']
  runtime = runtime or RUNTIMES[fmt][0]
  if runtime not in RUNTIMES[fmt]:
    raise ArtifactError(f'{path} is a {fmt} model, which runs in {", ".join(RUNTIMES[fmt])}; '
                        f'not in {runtime!r}.')
  num_threads = num_threads or os.cpu_count() or 1
  try:
    run = _LOADERS[runtime](path, num_threads)
  except ImportError as e:
    raise ArtifactError(f'Running a {fmt} model needs {runtime} ({e}); {_EXTRA}.') from e
  return Artifact(path, runtime, metadata, run)


def _load_jax(path, num_threads):
  del num_threads
  import jax  # pylint: disable=import-outside-toplevel
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  call = jax.jit(exported.call)
  return lambda images: np.asarray(call(images))


def _load_tensorflow(path, num_threads):
  del num_threads
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  signature = tf.saved_model.load(path).signatures['serving_default']
  return lambda images: signature(**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME].numpy()


def _load_litert(path, num_threads):
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
  interpreter = Interpreter(model_path=path, num_threads=num_threads)
  interpreter.allocate_tensors()
  input_index = interpreter.get_input_details()[0]['index']
  output_index = interpreter.get_output_details()[0]['index']

  def run_one(image):
    interpreter.set_tensor(input_index, image[None])
    interpreter.invoke()
    return interpreter.get_tensor(output_index)[0].copy()

  # The file's batch is 1 (see export/formats.py): a batch runs image by image, as on a device.
  return lambda images: np.stack([run_one(image) for image in images])


def _load_onnxruntime(path, num_threads):
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.intra_op_num_threads = num_threads
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _load_openvino(path, num_threads):
  import openvino as ov  # pylint: disable=import-outside-toplevel
  core = ov.Core()
  compiled = core.compile_model(core.read_model(path), 'CPU', {
      'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY',
      'INFERENCE_NUM_THREADS': num_threads})
  request = compiled.create_infer_request()
  return lambda images: request.infer({INPUT_NAME: images})[OUTPUT_NAME]


_LOADERS = {'jax': _load_jax, 'tensorflow': _load_tensorflow, 'litert': _load_litert,
            'onnxruntime': _load_onnxruntime, 'openvino': _load_openvino}
