"""Pretrained-weights directories: our variables plus everything needed to use them correctly.

A pretrained directory holds

    metadata.json   what the weights are: model name, classes, preprocessing, where they came from
    variables/      an orbax checkpoint of {'params': ..., 'batch_stats': ...}

and is written by `save` (the converters' CLI, `python -m efficientnet_jax.convert`, calls it) and
read by `load`:

    model, variables, metadata = pretrained.load('/path/to/efficientnet-lite0')
    images = (rgb_0_255 - metadata['mean_rgb']) / metadata['stddev_rgb']   # our model's input
    logits = model.apply(variables, images, train=False)

The preprocessing fields travel with the weights because the wrong mean/std or crop silently costs
5-20 points of top-1: the resolution, crop and interpolation default to the variant's published
ones (`get_variant(name)`), and a source that was trained differently says so through `save`'s
keyword overrides; metadata['overridden'] then lists which fields differ from the variant's.

Writes are atomic: `save` builds the whole directory under a temporary sibling name and renames it
into place only when complete, so a crash never leaves a directory that `load` accepts.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp

from efficientnet_jax.models import create_model, get_variant
from efficientnet_jax.models.naming import (flatten, format_problems, shape_problems,
                                            variable_shapes)

FORMAT = 'efficientnet-jax-pretrained'
VERSION = 1
METADATA_FILE = 'metadata.json'
VARIABLES_DIR = 'variables'
COLLECTIONS = ('params', 'batch_stats')

# Preprocessing fields a source may override; every other metadata field is fixed by `save`.
PREPROCESSING_FIELDS = ('resolution', 'crop_padding', 'crop_fraction', 'interpolation',
                        'mean_rgb', 'stddev_rgb')
_OVERRIDABLE = PREPROCESSING_FIELDS + ('notes',)


class PretrainedError(ValueError):
  """A pretrained directory is not in our format, or its variables do not fit its model."""


def variant_preprocessing(model_name: str) -> dict[str, Any]:
  """The published eval preprocessing of a variant, in metadata.json's field names."""
  spec = get_variant(model_name)
  return {
      'resolution': spec.resolution,
      'crop_padding': spec.crop_padding,
      'crop_fraction': spec.crop_fraction,
      'interpolation': spec.interpolation,
      'mean_rgb': [float(v) for v in spec.mean_rgb],
      'stddev_rgb': [float(v) for v in spec.stddev_rgb],
  }


def _json_ready(value):
  """Numpy scalars/arrays and tuples -> plain JSON types (metadata must round-trip exactly)."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  return value


def save(directory: str, model_name: str, variables: Mapping[str, Any], *,
         num_classes: int | None = None, label_set: str | Sequence[str] | None = 'imagenet2012',
         source: Mapping[str, Any] | None = None,
         model_overrides: Mapping[str, Any] | None = None, overwrite: bool = False,
         **metadata_overrides) -> str:
  """Writes `variables` of `model_name` as a pretrained directory; returns its absolute path.

  Args:
    directory: where to write. It must not exist yet (or be empty) unless `overwrite=True`.
    model_name: our variant name, e.g. 'efficientnet-lite0'.
    variables: {'params': ..., 'batch_stats': ...} of numpy or jax arrays. They are checked
      against `create_model(model_name, num_classes, **model_overrides)` before anything is
      written, so a saved directory always loads.
    num_classes: the classifier size; read from params['predictions']['kernel'] if None.
    label_set: 'imagenet2012' (TFDS's 0-based ImageNet order), None (unknown), or one name per
      class.
    source: where the weights came from, e.g. {'format': 'torch', 'path': '...'}; stored as is.
    model_overrides: `create_model` options needed to rebuild the network (e.g. stem_stride=1).
    overwrite: replace an existing pretrained directory.
    **metadata_overrides: preprocessing that differs from the variant's published one (any of
      resolution, crop_padding, crop_fraction, interpolation, mean_rgb, stddev_rgb) and
      free-text `notes`. Overridden fields are listed in metadata['overridden'].
  """
  unknown = sorted(set(metadata_overrides) - set(_OVERRIDABLE))
  if unknown:
    raise TypeError(f'pretrained.save got unknown metadata field(s) {unknown}; the ones a '
                    f'source may set are {list(_OVERRIDABLE)}.')
  missing = [c for c in COLLECTIONS if c not in variables]
  if missing:
    raise PretrainedError(
        f'pretrained.save needs the variables {{"params": ..., "batch_stats": ...}}; '
        f'{missing} missing (got keys {sorted(variables)}). Pass the whole variables dict, '
        'not only its params.')
  variables = {c: variables[c] for c in COLLECTIONS}
  model_overrides = dict(model_overrides or {})
  if num_classes is None:
    try:
      num_classes = int(np.shape(variables['params']['predictions']['kernel'])[-1])
    except (KeyError, TypeError, IndexError):
      raise PretrainedError(
          'pretrained.save cannot read the number of classes from '
          "params['predictions']['kernel']; pass num_classes=.") from None
  if isinstance(label_set, (list, tuple)):
    if len(label_set) != num_classes:
      raise PretrainedError(
          f'label_set lists {len(label_set)} names but the classifier has {num_classes} '
          'classes; give one name per class, or a named set such as "imagenet2012".')
    label_set = [str(name) for name in label_set]
  elif label_set is not None and not isinstance(label_set, str):
    raise TypeError(f'label_set must be a name, a list of class names or None; got '
                    f'{type(label_set).__name__}.')

  model = create_model(model_name, num_classes=num_classes, **model_overrides)
  found = {name: tuple(np.shape(v)) for name, v in flatten(variables).items()}
  problems = shape_problems(found, variable_shapes(model))
  if problems:
    raise PretrainedError(
        f'The variables do not fit {model_name} with {num_classes} classes'
        f'{" and overrides " + repr(model_overrides) if model_overrides else ""}, so they were '
        f'not saved; {len(problems)} problem(s):\n{format_problems(problems)}\nCheck the model name '
        'and the converter that produced these variables.')

  preprocessing = variant_preprocessing(model_name)
  overridden = []
  for key, value in metadata_overrides.items():
    if key in PREPROCESSING_FIELDS and _json_ready(value) != preprocessing.get(key):
      overridden.append(key)
  preprocessing.update(_json_ready(metadata_overrides))
  if ({'resolution', 'crop_padding'} & set(overridden)) and 'crop_fraction' not in overridden:
    # Keep the three crop fields consistent: fraction = res / (res + padding).
    preprocessing['crop_fraction'] = (
        preprocessing['resolution'] / (preprocessing['resolution'] + preprocessing['crop_padding']))
  metadata = {
      'format': FORMAT,
      'version': VERSION,
      'model': model_name,
      'num_classes': int(num_classes),
      **preprocessing,
      'label_set': label_set,
      'model_overrides': _json_ready(model_overrides),
      'source': _json_ready(dict(source or {})),
      'overridden': sorted(overridden),
  }
  json.dumps(metadata)  # fail before writing anything if a field cannot be stored

  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise FileExistsError(
        f'{directory} already exists and is not empty; pretrained.save does not mix a new model '
        'into an existing directory. Choose a new path, or pass overwrite=True to replace it.')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f'.{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:8]}')
  os.makedirs(staging)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, VARIABLES_DIR), _to_numpy_tree(variables))
    checkpointer.wait_until_finished()
    checkpointer.close()
    # metadata.json is written last: it is what marks a directory as complete.
    with open(os.path.join(staging, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)
      f.write('\n')
    if os.path.exists(directory):
      old = f'{staging}.old'
      os.rename(directory, old)
      os.rename(staging, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def _to_numpy_tree(tree):
  """Nested plain dicts of float numpy arrays (orbax stores numpy leaves as is)."""
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def read_metadata(directory: str) -> dict[str, Any]:
  """Reads and validates `directory/metadata.json` (no arrays are loaded)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f'No pretrained directory at {directory!r}: it does not exist or is not a directory. '
        'Create one from a checkpoint with `python -m efficientnet_jax.convert --source=... '
        '--weights=... --output=DIR` (see docs/pretrained.md), then pass DIR.')
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{directory!r} is not a pretrained directory: it has no {METADATA_FILE}. Either it is '
        'some other kind of directory (a training workdir holds checkpoints/ instead), or its '
        'writing was interrupted (metadata.json is written last). Convert the weights again '
        'with `python -m efficientnet_jax.convert`.')
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise PretrainedError(
        f'{path} is corrupt: it is not valid JSON ({err}). Convert the weights again with '
        '`python -m efficientnet_jax.convert` rather than editing the file by hand.') from err
  if not isinstance(metadata, dict) or metadata.get('format') != FORMAT:
    found = metadata.get('format') if isinstance(metadata, dict) else type(metadata).__name__
    raise PretrainedError(
        f'{path} is not efficientnet-jax pretrained metadata (format {found!r}, expected '
        f'{FORMAT!r}). Checkpoints from other frameworks must be converted first: '
        '`python -m efficientnet_jax.convert --source={keras,torch,timm,tf} ...`.')
  version = metadata.get('version')
  if not isinstance(version, int) or version > VERSION:
    raise PretrainedError(
        f'{path} has format version {version!r}, but this efficientnet_jax reads version '
        f'{VERSION} or older. Upgrade efficientnet_jax, or convert the weights again with this '
        'version.')
  needed = ('model', 'num_classes', 'model_overrides') + PREPROCESSING_FIELDS
  absent = [key for key in needed if key not in metadata]
  if absent:
    raise PretrainedError(
        f'{path} lacks the field(s) {absent}, so the model or its preprocessing cannot be '
        'rebuilt. Convert the weights again with `python -m efficientnet_jax.convert`.')
  return metadata


def load(directory: str, **model_overrides) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Loads a pretrained directory: (model, variables, metadata).

  model is `create_model(metadata['model'], num_classes=metadata['num_classes'],
  **metadata['model_overrides'], **model_overrides)`; `model_overrides` may change anything
  that does not change the variables (conv_impl, dtype, features_only, drop_connect_rate, ...)
  and overrides stored ones of the same name. variables is {'params': ..., 'batch_stats': ...}
  of numpy arrays. Raises a clear error for a missing or foreign directory and for variables
  that do not fit the model (naming the first mismatched tensors).
  """
  metadata = read_metadata(directory)
  variables_path = os.path.abspath(os.path.join(os.fspath(directory), VARIABLES_DIR))
  if not os.path.isdir(variables_path):
    raise FileNotFoundError(
        f'{os.fspath(directory)!r} has metadata.json but no {VARIABLES_DIR}/ checkpoint; the '
        'directory is incomplete. Convert the weights again with '
        '`python -m efficientnet_jax.convert`.')
  overrides = {**metadata['model_overrides'], **model_overrides}
  model = create_model(metadata['model'], num_classes=metadata['num_classes'], **overrides)

  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      stored = checkpointer.metadata(variables_path)
      # orbax returns StepMetadata whose item_metadata.tree is the saved tree of ArrayMetadata;
      # for an unreadable directory it logs a warning and returns no item metadata.
      tree = getattr(getattr(stored, 'item_metadata', None), 'tree', None)
      if not isinstance(tree, Mapping):
        raise ValueError('no readable tree metadata')
    except Exception as err:  # orbax raises several types for unreadable checkpoints
      raise PretrainedError(
          f'Cannot read the orbax checkpoint in {variables_path} ({type(err).__name__}: {err}). '
          'It is damaged or was not written by pretrained.save; convert the weights '
          'again.') from err
    found = {name: tuple(leaf.shape) for name, leaf in flatten(dict(tree)).items()}
    problems = shape_problems(found, variable_shapes(model))
    if problems:
      extra = f' and overrides {overrides}' if overrides else ''
      raise PretrainedError(
          f'The variables in {variables_path} do not fit {metadata["model"]} with '
          f'{metadata["num_classes"]} classes{extra}; {len(problems)} problem(s), first '
          f'mismatched tensors:\n{format_problems(problems)}\nLoad it without options that change the '
          'architecture (width, depth, blocks, stem_stride, ...), or convert the weights again.')
    # No target tree: numpy leaves were saved, so numpy leaves come back, on no device.
    restored = checkpointer.restore(variables_path)
  finally:
    checkpointer.close()
  variables = {c: restored[c] for c in COLLECTIONS if c in restored}
  return model, variables, metadata
