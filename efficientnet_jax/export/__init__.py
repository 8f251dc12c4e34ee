"""Deploy what you trained: a training workdir becomes a pretrained directory, and a pretrained
directory becomes a StableHLO, TF SavedModel, TFLite (LiteRT) or ONNX artifact.

    python -m efficientnet_jax.export --workdir=RUN --output=DIR [--weights=ema|raw] [--step=N]
    python -m efficientnet_jax.export --checkpoint=DIR --format=onnx --output=model.onnx
    python -m efficientnet_jax.export --checkpoint=DIR --format=tflite --output=m.tflite \
        --quantize=int8 --calibration=DIR_OF_IMAGES

From Python:

    export.workdir_to_pretrained('/tmp/run', '/tmp/run_pretrained')
    export.export_pretrained('/tmp/lite0', 'onnx', '/tmp/lite0.onnx')

Every artifact takes uint8 RGB images at the model's resolution and normalises inside;
`PATH.json` beside it holds the preprocessing and class names (`efficientnet_jax.artifacts`
reads and runs it, and `python -m efficientnet_jax.predict --model=PATH` classifies photos with
it). Formats, runtimes and measured figures: docs/export.md.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from efficientnet_jax import artifacts, labels, pretrained
from efficientnet_jax.export.formats import (ExportError, WRITERS, input_spec, serving_function,
                                             write_atomically)
from efficientnet_jax.export.workdir import workdir_to_pretrained
from efficientnet_jax.models import get_variant

FORMATS = artifacts.FORMATS
QUANTIZATIONS = ('float32', 'int8')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')

__all__ = ['ExportError', 'FORMATS', 'QUANTIZATIONS', 'calibration_images', 'export_pretrained',
           'workdir_to_pretrained']


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    import difflib  # pylint: disable=import-outside-toplevel
    close = difflib.get_close_matches(str(fmt), FORMATS, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise ExportError(f'Unknown export format {fmt!r}.{hint} Choose one of '
                      f'{", ".join(FORMATS)}.')


def calibration_images(directory: str, metadata: dict[str, Any]) -> np.ndarray:
  """uint8 [N, R, R, 3]: every image under `directory`, preprocessed as `predict` does it.

  Files that do not decode are skipped with a warning; none at all is an ExportError.
  """
  from absl import logging  # pylint: disable=import-outside-toplevel

  from efficientnet_jax import predict  # pylint: disable=import-outside-toplevel
  if not directory or not os.path.isdir(directory):
    raise ExportError(f'--calibration={directory!r} is not a directory. int8 quantisation '
                      'measures activation ranges on real images: give a directory of a few '
                      'hundred photos like those the model will see (JPEG, PNG, ...).')
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                 for name in names if name.lower().endswith(IMAGE_SUFFIXES))
  images = []
  for path in paths:
    try:
      images.append(predict.preprocess(path, metadata))
    except predict.ImageDecodeError as e:
      logging.warning('Calibration: skipping %s', e)
  if not images:
    raise ExportError(f'--calibration={directory!r} holds no readable image ({len(paths)} files '
                      f'with an image suffix {IMAGE_SUFFIXES}); int8 quantisation needs some.')
  return np.stack(images)


def export_pretrained(checkpoint: str, fmt: str, output: str, *, quantize: str = 'float32',
                      calibration: str | None = None, overwrite: bool = False) -> str:
  """Exports the pretrained directory `checkpoint` to `output` in format `fmt`.

  Writes the artifact and `output.json` (the metadata), each atomically; returns the absolute
  artifact path. `quantize='int8'` (tflite, Lite family) needs `calibration`, a directory of
  images. Raises ExportError for an unknown format, a missing or unusable checkpoint, an op the
  exporter cannot convert, or int8 without calibration images.
  """
  _check_format(fmt)
  if quantize not in QUANTIZATIONS:
    raise ExportError(f'Unknown quantisation {quantize!r}; choose one of '
                      f'{", ".join(QUANTIZATIONS)}.')
  if quantize == 'int8':
    if fmt != 'tflite':
      raise ExportError(f'int8 quantisation is offered for --format=tflite, not {fmt}.')
    if not calibration:
      raise ExportError(
          'int8 quantisation needs calibration images: pass --calibration=DIR, a directory of '
          'a few hundred photos like those the model will see. Post-training quantisation sets '
          'each activation\'s int8 range from them; without them it cannot be done.')
  elif calibration:
    raise ExportError('--calibration is read only for --quantize=int8; drop it, or add '
                      '--quantize=int8.')
  try:
    model, variables, metadata = pretrained.load(checkpoint, conv_impl='xla')
  except (OSError, ValueError) as e:
    raise ExportError(f'Cannot export --checkpoint={checkpoint!r}: {e}') from e
  if quantize == 'int8' and not get_variant(metadata['model']).lite:
    raise ExportError(
        f'int8 quantisation is offered for the EfficientNet-Lite family, not '
        f'{metadata["model"]}: swish and squeeze-and-excitation lose accuracy under int8 '
        'post-training quantisation, which is why the Lite variants exist. Export float32.')
  calibration_batch = (calibration_images(calibration, metadata) if quantize == 'int8'
                       else None)
  serve = serving_function(model, variables, metadata['mean_rgb'], metadata['stddev_rgb'])
  spec = input_spec(int(metadata['resolution']))
  what = f'{metadata["model"]} from {checkpoint}'
  writer = WRITERS[fmt]
  if fmt == 'tflite':
    write = lambda path: writer(serve, spec, path, what, calibration=calibration_batch)
  else:
    write = lambda path: writer(serve, spec, path, what)

  output = os.path.abspath(os.fspath(output).rstrip('/\\'))
  meta_path = artifacts.metadata_path(output)
  if os.path.exists(meta_path) and not overwrite:
    raise ExportError(f'{meta_path} already exists; choose a new --output, or pass --overwrite.')
  write_atomically(output, write, overwrite)
  write_atomically(meta_path, lambda path: _write_json(
      path, export_metadata(metadata, fmt, output, quantize, checkpoint,
                            None if calibration_batch is None else len(calibration_batch))),
                   overwrite=True)
  return output


def export_metadata(metadata: dict[str, Any], fmt: str, output: str, quantize: str,
                    checkpoint: str, calibration_count: int | None = None) -> dict[str, Any]:
  """The pretrained metadata, plus the artifact's interface and the class names spelt out."""
  size, classes = int(metadata['resolution']), int(metadata['num_classes'])
  names = labels.class_names(metadata.get('label_set'), classes)
  return {
      **{k: v for k, v in metadata.items() if k not in ('format', 'version')},
      'format': artifacts.FORMAT,
      'version': artifacts.VERSION,
      'artifact': fmt,
      'file': os.path.basename(output),
      'quantization': quantize,
      'calibration_images': calibration_count,
      'input': {'name': artifacts.INPUT_NAME, 'dtype': 'uint8', 'shape': [None, size, size, 3],
                'layout': 'NHWC RGB, centre-cropped and resized as below, normalised inside'},
      'output': {'name': artifacts.OUTPUT_NAME, 'dtype': 'float32', 'shape': [None, classes]},
      'class_names': list(names) if names is not None else None,
      'pretrained': {'path': os.path.abspath(checkpoint), 'format': metadata.get('format'),
                     'version': metadata.get('version')},
      'exported_with': _versions(fmt),
  }


def _versions(fmt: str) -> dict[str, str]:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  packages = {'stablehlo': ('jax',), 'savedmodel': ('jax', 'tensorflow-cpu'),
              'tflite': ('jax', 'tensorflow-cpu'), 'onnx': ('jax', 'jax2onnx', 'onnx')}[fmt]
  found = {}
  for package in ('efficientnet-jax',) + packages:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def _write_json(path: str, data: Any) -> None:
  with open(path, 'w') as f:
    json.dump(data, f, indent=2)
    f.write('\n')

