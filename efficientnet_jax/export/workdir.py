"""A training workdir -> a pretrained directory, read the way the training loop reads it.

The run's config is `workdir/config.json` (written by `train_and_evaluate` at start; an older
workdir without it takes the config that trained it as an argument). The model, optimizer and
abstract state come from the same functions `train_and_evaluate` uses (`configs_lib.resolve`,
`train.build_model`, `optim.create_optimizer`, `train.create_train_state`), and the checkpoint
is restored by `checkpointing.Checkpointer`, read-only (a live run's in-flight saves are left
alone) and with its fingerprint check, so a config that did not write the checkpoint is refused
with the differences named. The result is written by `pretrained.save`, the converters' writer.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from efficientnet_jax import checkpointing, configs_lib, optim, pretrained, train
from efficientnet_jax.export.formats import ExportError
from efficientnet_jax.models import create_model, get_variant

WEIGHTS = ('ema', 'raw')
# Module fields that do not change the variables or the inference output: not recorded.
_TRAINING_ONLY_FIELDS = {'dtype', 'dropout_rate', 'drop_connect_rate', 'bn_momentum',
                         'bn_group_size', 'conv_impl', 'remat', 'num_classes', 'parent', 'name'}


def run_config(workdir: str,
               config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The resolved config of the run in `workdir`: `config` if given, else its config.json."""
  if config is None:
    config = checkpointing.load_config(workdir)
  if config is None:
    raise ExportError(
        f'{workdir!r} has no {checkpointing.CONFIG_FILE}, so the model and its preprocessing '
        'cannot be rebuilt (runs record it at start; older runs did not). Pass the config that '
        'trained it, as for the run: --config=configs/... with the same --config.* overrides.')
  return configs_lib.resolve(config)


def _model_overrides(model, model_name: str) -> dict[str, Any]:
  """The `create_model` options that rebuild `model`'s network: its fields unlike the variant's."""
  default = create_model(model_name, num_classes=model.num_classes)
  overrides = {}
  for field in dataclasses.fields(model):
    if field.name in _TRAINING_ONLY_FIELDS:
      continue
    value, base = getattr(model, field.name), getattr(default, field.name)
    if value == base:
      continue
    if not isinstance(value, (bool, int, float, str)):
      raise ExportError(
          f'The run changes the model\'s {field.name} ({value!r}), which a pretrained directory '
          'cannot record yet; only scalar options (width, depth, stem_stride, ...) can be.')
    overrides[field.name] = value
  return overrides


def class_names(config: ml_collections.ConfigDict) -> str | list[str] | None:
  """The dataset's class names where they are known without reading the data, else None."""
  if config.dataset == 'imagenet2012':
    return 'imagenet2012'
  try:
    from efficientnet_jax.data import sources  # pylint: disable=import-outside-toplevel
    if config.dataset.startswith(sources.FOLDER_PREFIX):
      names = sources.open_source(config).class_names  # lists the folders only
    else:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

      import efficientnet_jax.data.digits  # pylint: disable=import-outside-toplevel,unused-import
      info = tfds.builder(config.dataset, data_dir=config.get('data_dir')).info
      names = getattr(info.features['label'], 'names', None)
  except Exception as e:  # pylint: disable=broad-except  (names are a convenience)
    logging.warning('No class names for dataset %r (%s: %s); predictions will show indices.',
                    config.dataset, type(e).__name__, e)
    return None
  if not names or len(names) != config.num_classes:
    return None
  return [str(name) for name in names]


def workdir_to_pretrained(workdir: str, output: str, *, weights: str | None = None,
                          step: int | None = None, config: ml_collections.ConfigDict | None = None,
                          overwrite: bool = False) -> str:
  """Writes a training run's weights as a pretrained directory; returns its path.

  Args:
    workdir: the run's --workdir (local or gs://).
    output: the pretrained directory to write.
    weights: 'ema' or 'raw'; None takes the EMA weights when the run keeps them, else the raw.
    step: the checkpoint's step; None takes the newest.
    config: the run's config, for a workdir without config.json.
    overwrite: replace an existing `output`.
  """
  if weights not in (None,) + WEIGHTS:
    raise ExportError(f'Unknown --weights={weights!r}; choose ema or raw.')
  if not os.path.isdir(workdir) and '://' not in workdir:
    raise ExportError(f'No training workdir at {workdir!r}: it does not exist. Pass the '
                      '--workdir a run of `python -m efficientnet_jax.main` wrote.')
  config = run_config(workdir, config)
  model = train.build_model(config)
  tx = optim.create_optimizer(config, 1.0)  # the schedule's length does not shape the state
  abstract = jax.eval_shape(functools.partial(train.create_train_state, model=model, tx=tx,
                                              config=config), jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = checkpointing.abstract_with_shardings(
      abstract, jax.tree.map(lambda _: device, abstract))

  checkpointer = checkpointing.Checkpointer(workdir, config, read_only=True)
  try:
    steps = sorted(checkpointer.manager.all_steps())
    if not steps:
      raise ExportError(f'{checkpointer.directory} holds no checkpoint: the run saved none yet '
                        '(checkpoints are written every config.checkpoint_every_steps and at '
                        'the end).')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ExportError(f'No checkpoint at step {step} in {checkpointer.directory}; it holds '
                        f'steps {steps}.')
    state = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()

  has_ema = state.ema_params is not None
  if weights == 'ema' and not has_ema:
    raise ExportError(f'--weights=ema, but the run in {workdir} kept no EMA weights '
                      f'(config.ema_decay={config.ema_decay}); use --weights=raw.')
  chosen = weights or ('ema' if has_ema else 'raw')
  params, stats = ((state.ema_params, state.ema_batch_stats) if chosen == 'ema'
                   else (state.params, state.batch_stats))
  variables = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32),
                           {'params': params, 'batch_stats': stats})
  spec = get_variant(config.model)
  if os.path.exists(output) and os.listdir(output) and not overwrite:
    raise ExportError(f'{output} already exists and is not empty; choose a new --output, or '
                      'pass --overwrite to replace it.')
  return pretrained.save(
      output, config.model, variables, num_classes=config.num_classes,
      label_set=class_names(config), model_overrides=_model_overrides(model, config.model),
      overwrite=overwrite,
      source={'format': 'workdir', 'path': workdir, 'step': int(step), 'weights': chosen,
              'dataset': config.dataset},
      resolution=int(config.resolution), crop_padding=int(config.crop_padding),
      interpolation=str(config.interpolation),
      # train.normalize_images uses the variant's mean and std.
      mean_rgb=list(spec.mean_rgb), stddev_rgb=list(spec.stddev_rgb))
