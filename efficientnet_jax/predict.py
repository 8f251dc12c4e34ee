"""Classify images with a pretrained checkpoint: the top-k classes of each image.

    python -m efficientnet_jax.predict --checkpoint=/tmp/lite0 cat.jpg coffee.png [--top_k=5]

`--checkpoint` is a pretrained directory (`metadata.json` plus orbax variables, written by
`python -m efficientnet_jax.convert` or `efficientnet_jax.pretrained.save`). Each image is
preprocessed exactly as the evaluation pipeline does it, with the checkpoint's own metadata: the
center crop with its `crop_padding`, a resize with its `interpolation` to its `resolution`,
rounding to uint8, then `(x - mean_rgb) / stddev_rgb`. Without that metadata a model loses 5-20
points of top-1 to the wrong preprocessing.

JPEG, PNG, GIF (first frame) and BMP files are decoded by TensorFlow (`tf.io.decode_image`, which
in recent versions also reads WebP). A file that cannot be read or
decoded gets one `error:` line on stderr and the others are still classified; the exit status is
1 when any file failed (2 for a bad checkpoint or usage).

`--model=PATH` classifies with an exported artifact instead (`python -m efficientnet_jax.export
--format=...`: StableHLO, SavedModel, TFLite or ONNX), run in its runtime (`--runtime=openvino`
for ONNX in OpenVINO instead of ONNX Runtime), with the preprocessing from its `PATH.json`: the
same crop and resize, and the normalisation inside the artifact. That is how to check an export
on your own photos.

`--dtype=bfloat16` runs a checkpoint with bfloat16 activations. With the `onednn` extra the
network runs as one native call (`models/onednn.py`): bfloat16 on a CPU with AMX or AVX512_BF16,
float32 on one with AVX-512; else on XLA. The real Lite0 weights keep float32's top-1 on
skimage's photos in bfloat16 (logits within 2% of the largest).

From Python (the notebook does this):

    from efficientnet_jax import pretrained, predict
    model, variables, metadata = pretrained.load('/tmp/lite0')
    for top in predict.classify(model, variables, metadata, [image_array, 'cat.jpg']):
      print(top[0].name, top[0].probability)
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from efficientnet_jax import labels, xla_cpu
from efficientnet_jax.data import preprocessing
from efficientnet_jax.models import make_inference_fn

# A path, encoded image bytes, or a decoded uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array.
Image = Union[str, os.PathLike, bytes, np.ndarray]


class ImageDecodeError(ValueError):
  """An input cannot be read, or is not an image TensorFlow decodes (JPEG, PNG, GIF, BMP)."""


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One of an image's top-k classes."""
  index: int
  name: str | None  # None when the checkpoint has no class names.
  probability: float


def _field(metadata: Any, key: str, default: Any = None) -> Any:
  if isinstance(metadata, Mapping):
    return metadata.get(key, default)
  return getattr(metadata, key, default)


def _describe(image: Image) -> str:
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  if isinstance(image, bytes):
    return f'<{len(image)} bytes>'
  return f'<array {getattr(image, "shape", "?")}>'


def preprocess(image: Image, metadata: Any) -> np.ndarray:
  """uint8 [R, R, 3]: the eval pipeline's crop and resize, with the checkpoint's metadata.

  This is `preprocessing.preprocess_for_eval` followed by the same rounding to uint8 that
  evaluation applies before normalising on the device.

  Raises:
    ImageDecodeError: the file cannot be read or decoded.
  """
  name = _describe(image)
  if isinstance(image, (str, os.PathLike)):
    try:
      with tf.io.gfile.GFile(os.fspath(image), 'rb') as f:
        image = f.read()
    except (tf.errors.OpError, OSError) as e:
      raise ImageDecodeError(f'{name}: cannot read the file ({_first_line(e)}).') from e
  if isinstance(image, bytes):
    image = tf.constant(image, tf.string)
  else:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ImageDecodeError(f'{name}: expected a uint8 image array (0..255), got {image.dtype}.')
  try:
    out = preprocessing.preprocess_for_eval(
        image, int(_field(metadata, 'resolution')), int(_field(metadata, 'crop_padding', 32)),
        str(_field(metadata, 'interpolation', 'bicubic')))
  except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
    raise ImageDecodeError(
        f'{name}: not a readable image ({_first_line(e)}).') from e
  return np.asarray(tf.cast(tf.round(out), tf.uint8))


def _first_line(error: BaseException) -> str:
  """The readable part of an error: TF's '{{function_node ...}}' and '[Op:...]' wrapping removed."""
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text.strip().splitlines()[0] if text.strip() else '')
  return (text.strip() or type(error).__name__)[:200]


def normalize(images: np.ndarray, metadata: Any) -> np.ndarray:
  """uint8 [B, R, R, 3] -> float32 `(x - mean_rgb) / stddev_rgb` with the checkpoint's values."""
  mean = np.asarray(_field(metadata, 'mean_rgb'), np.float32)
  std = np.asarray(_field(metadata, 'stddev_rgb'), np.float32)
  return (images.astype(np.float32) - mean) / std


@functools.lru_cache(maxsize=4)
def _cached_inference_fn(model):
  return make_inference_fn(model)


def _inference_fn(model):
  try:
    return _cached_inference_fn(model)
  except TypeError:  # an unhashable module: compile afresh
    return make_inference_fn(model)


def class_names(metadata: Any, num_classes: int | None = None) -> tuple[str, ...] | None:
  """The checkpoint's class names (its metadata's `label_set`), or None for indices only."""
  return labels.class_names(_field(metadata, 'label_set'), num_classes)


def top_k_predictions(logits: np.ndarray, k: int,
                      names: Sequence[str] | None = None) -> list[list[Prediction]]:
  """The k most probable classes of each row of `logits`, most probable first."""
  logits = np.asarray(logits, np.float64)
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  k = max(1, min(int(k), logits.shape[-1]))
  results = []
  for row in probabilities:
    order = np.argsort(-row, kind='stable')[:k]
    results.append([Prediction(int(i), names[i] if names is not None else None, float(row[i]))
                    for i in order])
  return results


def classify(model, variables, metadata: Any, images: Sequence[Image], top_k: int = 5,
             batch_size: int = 32) -> list[list[Prediction]]:
  """The top-k classes of each image, most probable first.

  Args:
    model, variables, metadata: what `efficientnet_jax.pretrained.load(directory)` returns.
    images: paths, encoded image bytes or uint8 arrays ([H, W] grey, [H, W, 3] RGB or
      [H, W, 4] RGBA), of any size: each is center-cropped and resized as in evaluation.
    top_k: classes returned per image.
    batch_size: images per forward pass (every pass has this shape, so one compilation serves
      all of them).

  Raises:
    ImageDecodeError: an image cannot be read or decoded (nothing is classified then; the
      command line instead reports such files one by one and classifies the rest).
  """
  batch = np.stack([preprocess(image, metadata) for image in images]) if len(images) else None
  if batch is None:
    return []
  logits = _logits(model, variables, normalize(batch, metadata), min(batch_size, len(batch)))
  return top_k_predictions(logits, top_k, class_names(metadata, logits.shape[-1]))


def _logits(model, variables, images: np.ndarray, size: int) -> np.ndarray:
  """Logits of `images`, run in passes of exactly `size` (the last one padded)."""
  fn = _inference_fn(model)
  size = max(1, int(size))
  outputs = []
  for start in range(0, len(images), size):
    chunk = images[start:start + size]
    padded = np.pad(chunk, [(0, size - len(chunk))] + [(0, 0)] * 3)
    outputs.append(np.asarray(jax.device_get(fn(variables, padded)))[:len(chunk)])
  return np.concatenate(outputs).astype(np.float32)


def format_predictions(predictions: Sequence[Prediction]) -> str:
  """One line per class: rank, index, name and probability."""
  lines = []
  for rank, p in enumerate(predictions, 1):
    name = p.name if p.name is not None else f'class {p.index}'
    lines.append(f'  {rank}. {p.index:>4d}  {name:<32s} {p.probability:.4f}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# Command line.


DTYPES = ('float32', 'bfloat16')


def _load(checkpoint: str | None, model_path: str | None, runtime: str | None, batch_size: int,
          dtype: str | None = None):
  """(logits of a uint8 batch, metadata, class names) of a pretrained directory or an artifact."""
  if model_path:
    from efficientnet_jax import artifacts  # pylint: disable=import-outside-toplevel
    artifact = artifacts.open_artifact(model_path, runtime)
    metadata = artifact.metadata
    return artifact, metadata, class_names(metadata, int(metadata['num_classes']))
  from efficientnet_jax import pretrained  # pylint: disable=import-outside-toplevel
  model, variables, metadata = pretrained.load(checkpoint)
  if dtype:
    model = model.clone(dtype=jnp.dtype(dtype))
  logits_of = lambda batch: _logits(model, variables, normalize(batch, metadata), batch_size)
  return logits_of, metadata, class_names(metadata, getattr(model, 'num_classes', None))


def run(checkpoint: str | None, paths: Sequence[str], top_k: int = 5, batch_size: int = 32,
        out=None, err=None, *, model: str | None = None, runtime: str | None = None,
        dtype: str | None = None) -> int:
  """The command line's work: prints each image's top-k to `out` and errors to `err`.

  `checkpoint` is a pretrained directory, run with `dtype` activations (default: the model's,
  float32); or `model` an exported artifact, run in `runtime` (default: its format's first, see
  `efficientnet_jax.artifacts`).

  Returns the exit status: 0 when every image was classified, 1 when some failed, 2 when the
  checkpoint cannot be loaded or no image was given.
  """
  out = out or sys.stdout
  err = err or sys.stderr
  if not paths:
    print('error: no images given. Usage: python -m efficientnet_jax.predict '
          '--checkpoint=DIR (or --model=EXPORTED) IMAGE [IMAGE ...]', file=err)
    return 2
  if bool(checkpoint) == bool(model):
    print('error: give either --checkpoint=DIR (a pretrained directory) or --model=PATH (an '
          'exported artifact).', file=err)
    return 2
  if dtype and (dtype not in DTYPES or model):
    print(f'error: --dtype={dtype}: ' + ('applies to --checkpoint, not to an exported artifact '
                                         '(its dtype is fixed at export).' if model else
                                         f'valid values: {", ".join(DTYPES)}.'), file=err)
    return 2
  batch_size = max(1, min(int(batch_size), len(paths)))
  source = model or checkpoint
  try:
    logits_of, metadata, names = _load(checkpoint, model, runtime, batch_size, dtype)
  except Exception as e:  # pylint: disable=broad-except  (any cause: report it, exit 2)
    print(f'error: cannot load {"the model" if model else "the checkpoint"} {source!r}: '
          f'{type(e).__name__}: {e}', file=err)
    return 2

  pending, failed = [], 0

  def flush():
    logits = logits_of(np.stack([im for _, im in pending]))
    for (path, _), top in zip(pending, top_k_predictions(logits, top_k, names)):
      print(path, file=out)
      print(format_predictions(top), file=out)
    pending.clear()

  # Batch by batch, so memory stays bounded however many files are given.
  for path in paths:
    try:
      pending.append((path, preprocess(path, metadata)))
    except ImageDecodeError as e:
      print(f'error: {e}', file=err)
      failed += 1
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
  if failed:
    print(f'{failed} of {len(paths)} images could not be classified.', file=err)
  return 1 if failed else 0


def main(argv):
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  # On CPU, a batch runs as one stream per core (models/inference.py); before JAX starts.
  xla_cpu.use_one_device_per_core()
  return run(flags.FLAGS.checkpoint, argv[1:], flags.FLAGS.top_k, flags.FLAGS.batch_size,
             model=flags.FLAGS.model, runtime=flags.FLAGS.runtime, dtype=flags.FLAGS.dtype)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('checkpoint', None, 'Pretrained directory: metadata.json and orbax '
                      'variables, e.g. written by python -m efficientnet_jax.convert.')
  flags.DEFINE_string('model', None, 'An exported artifact (python -m efficientnet_jax.export '
                      '--format=...) instead of --checkpoint; its metadata is MODEL.json.')
  flags.DEFINE_string('runtime', None, '--model: the runtime (jax, tensorflow, litert, '
                      'onnxruntime, openvino); default: the format\'s own.')
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.DEFINE_string('dtype', None, '--checkpoint: activations, float32 (default) or bfloat16 '
                      '(on oneDNN with the onednn extra on AMX / AVX512_BF16 CPUs).')


if __name__ == '__main__':
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
