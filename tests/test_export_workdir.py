"""A training workdir -> a pretrained directory (`python -m efficientnet_jax.export --workdir`).

The checkpoint is written as `train_and_evaluate` writes it (the same Checkpointer, state and
config.json) for a tiny digits run, so the default suite pays for no training; a slow test trains
a real one for a few steps. The export predicts with `predict`, its metadata is the run's config,
the EMA weights are taken when the run has them, and bad workdirs get clear errors.
"""
from __future__ import annotations

import functools
import io
import json

import jax
import numpy as np
import pytest

from efficientnet_jax import checkpointing, configs_lib, export, optim, predict, pretrained, train
from efficientnet_jax.export.__main__ import run as export_cli
from efficientnet_jax.models import get_variant

STEP = 7


def digits_config(**overrides):
  """The quickstart recipe, tiny: B0 at width and depth 0.25, 16 px, with EMA."""
  config = configs_lib.digits_config()
  fields = dict(width=0.25, depth=0.25, resolution=16, ema_decay=0.9, batch_size=16,
                keep_checkpoints=2)
  for key, value in {**fields, **overrides}.items():
    setattr(config, key, value)
  return config


def write_run(workdir, config, steps=(3, STEP)):
  """Checkpoints at `steps` and config.json, as train_and_evaluate writes them. The EMA
  weights are made to differ from the raw ones (x 0.5), so a test can tell which was exported."""
  resolved = configs_lib.resolve(config)
  model = train.build_model(resolved)
  tx = optim.create_optimizer(resolved, 1.0)
  shapes = jax.eval_shape(functools.partial(train.create_train_state, model=model, tx=tx,
                                            config=resolved), jax.random.key(0))
  rng = np.random.default_rng(0)  # random leaves of the right shapes: nothing to compile
  state = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  if state.ema_params is not None:
    state = state.replace(ema_params=jax.tree.map(lambda x: 0.5 * x, state.ema_params))
  checkpointing.save_config(str(workdir), resolved)
  checkpointer = checkpointing.Checkpointer(str(workdir), resolved)
  for step in steps:
    checkpointer.save(step, state.replace(step=jax.numpy.asarray(step, jax.numpy.int32)))
  checkpointer.close()
  return state


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  state = write_run(workdir, digits_config())
  return workdir, state


def _digit_png(tmp_path) -> str:
  import tensorflow as tf
  image = np.zeros((8, 8, 3), np.uint8)
  image[1:7, 3:5] = 255  # a "1"
  path = tmp_path / 'one.png'
  path.write_bytes(tf.io.encode_png(image).numpy())
  return str(path)


def test_export_predicts_and_records_the_run(run_dir, tmp_path):
  workdir, state = run_dir
  out = io.StringIO()
  assert export_cli(workdir=str(workdir), output=str(tmp_path / 'pretrained'), out=out) == 0
  model, variables, metadata = pretrained.load(str(tmp_path / 'pretrained'))

  # The metadata is the run's config.
  config = configs_lib.resolve(digits_config())
  spec = get_variant(config.model)
  assert metadata['model'] == config.model == 'efficientnet-b0'
  assert metadata['num_classes'] == config.num_classes == 10
  assert metadata['resolution'] == config.resolution == 16
  assert metadata['crop_padding'] == config.crop_padding == 0
  assert metadata['crop_fraction'] == 1.0
  assert metadata['interpolation'] == config.interpolation
  assert metadata['mean_rgb'] == list(spec.mean_rgb)
  assert metadata['stddev_rgb'] == list(spec.stddev_rgb)
  assert metadata['model_overrides'] == {'width_coefficient': 0.25, 'depth_coefficient': 0.25,
                                         'stem_stride': 1}
  assert metadata['label_set'] == [str(i) for i in range(10)]
  assert metadata['source'] == {'format': 'workdir', 'path': str(workdir), 'step': STEP,
                                'weights': 'ema', 'dataset': 'digits'}
  # EMA preferred: the EMA weights, not the raw ones.
  np.testing.assert_array_equal(variables['params']['stem_conv']['kernel'],
                                np.asarray(state.ema_params['stem_conv']['kernel']))
  # And predict uses it.
  out, err = io.StringIO(), io.StringIO()
  assert predict.run(str(tmp_path / 'pretrained'), [_digit_png(tmp_path)], top_k=3,
                     out=out, err=err) == 0, err.getvalue()
  assert out.getvalue().splitlines()[1].split()[2] in [str(i) for i in range(10)]


def test_raw_weights_and_an_older_step(run_dir, tmp_path):
  workdir, state = run_dir
  path = export.workdir_to_pretrained(str(workdir), str(tmp_path / 'raw'), weights='raw', step=3)
  _, variables, metadata = pretrained.load(path)
  np.testing.assert_array_equal(variables['params']['stem_conv']['kernel'],
                                np.asarray(state.params['stem_conv']['kernel']))
  assert metadata['source']['step'] == 3 and metadata['source']['weights'] == 'raw'


def test_errors(run_dir, tmp_path):
  workdir, _ = run_dir
  with pytest.raises(export.ExportError, match=r'No checkpoint at step 5 .* it holds steps '
                     r'\[3, 7\]'):
    export.workdir_to_pretrained(str(workdir), str(tmp_path / 'a'), step=5)
  with pytest.raises(export.ExportError, match=r'No training workdir at'):
    export.workdir_to_pretrained(str(tmp_path / 'nowhere'), str(tmp_path / 'a'))
  # A config that did not write the checkpoint: refused with the differences named.
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r'width: checkpoint has 0\.25, '
                     r'config has 0\.5'):
    export.workdir_to_pretrained(str(workdir), str(tmp_path / 'a'),
                                 config=digits_config(width=0.5))
  # No config.json (a run from before it was recorded) and no --config.
  bare = tmp_path / 'bare'
  bare.mkdir()
  (bare / 'checkpoints').mkdir()
  err = io.StringIO()
  assert export_cli(workdir=str(bare), output=str(tmp_path / 'a'), err=err) == 2
  assert 'has no config.json' in err.getvalue() and '--config=configs/' in err.getvalue()
  # A run that keeps no EMA weights, asked for them.
  no_ema = tmp_path / 'no_ema'
  write_run(no_ema, digits_config(ema_decay=0.0), steps=(1,))
  with pytest.raises(export.ExportError, match=r'kept no EMA weights'):
    export.workdir_to_pretrained(str(no_ema), str(tmp_path / 'a'), weights='ema')
  path = export.workdir_to_pretrained(str(no_ema), str(tmp_path / 'raw'))
  assert pretrained.read_metadata(path)['source']['weights'] == 'raw'


def test_config_json_round_trips(tmp_path):
  config = configs_lib.resolve(digits_config())
  checkpointing.save_config(str(tmp_path), config)
  loaded = checkpointing.load_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  stored = json.loads((tmp_path / 'config.json').read_text())
  assert stored['resolution'] == 16 and stored['dataset'] == 'digits'


@pytest.mark.slow
def test_a_real_digits_run_exports(tmp_path):
  """train_and_evaluate writes config.json and checkpoints; the export of its workdir predicts."""
  config = digits_config(num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4,
                         log_every_steps=2, holdout_examples=1437 - 64, eval_batch_size=40,
                         data_dir=str(tmp_path / 'tfds'), compilation_cache='')
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  assert (workdir / 'config.json').exists()
  path = export.workdir_to_pretrained(str(workdir), str(tmp_path / 'pretrained'))
  metadata = pretrained.read_metadata(path)
  assert metadata['source']['step'] == 4 and metadata['source']['weights'] == 'ema'
  out = io.StringIO()
  assert predict.run(path, [_digit_png(tmp_path)], out=out) == 0
