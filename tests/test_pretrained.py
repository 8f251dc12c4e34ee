"""Pretrained directories: save -> load round trip, metadata, atomic writes and every error path.

The variables are random arrays of the right shapes (from abstract shapes, never `model.init`),
so these tests cost no compilation.
"""
import json
import os

import jax
import numpy as np
import pytest

from efficientnet_jax import pretrained
from efficientnet_jax.models import create_model, get_variant

MODEL = 'efficientnet-lite0'
CLASSES = 10


def random_variables(model_name=MODEL, num_classes=CLASSES, seed=0, **overrides):
  model = create_model(model_name, num_classes=num_classes, conv_impl='xla', **overrides)
  size = max(32, model.total_stride)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), dict(shapes))


@pytest.fixture(scope='module')
def variables():
  return random_variables()


@pytest.fixture(scope='module')
def saved(variables, tmp_path_factory):
  directory = tmp_path_factory.mktemp('pretrained') / 'lite0'
  return pretrained.save(str(directory), MODEL, variables, source={'format': 'test'},
                         mean_rgb=[127.5] * 3, notes='for the test')


def test_round_trip_and_metadata(saved, variables):
  model, loaded, metadata = pretrained.load(saved)
  assert model == create_model(MODEL, num_classes=CLASSES)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)

  spec = get_variant(MODEL)
  assert metadata == pretrained.read_metadata(saved)
  assert metadata['format'] == 'efficientnet-jax-pretrained' and metadata['version'] == 1
  assert metadata['model'] == MODEL and metadata['num_classes'] == CLASSES
  assert metadata['resolution'] == spec.resolution == 224
  assert metadata['crop_fraction'] == pytest.approx(224 / 256)
  assert metadata['interpolation'] == 'bicubic'
  assert metadata['mean_rgb'] == [127.5] * 3  # overridden ...
  assert metadata['stddev_rgb'] == list(spec.stddev_rgb)  # ... the rest from the variant
  assert metadata['overridden'] == ['mean_rgb'] and metadata['notes'] == 'for the test'
  assert metadata['label_set'] == 'imagenet2012' and metadata['source'] == {'format': 'test'}
  # Nothing but the finished directory is left in the parent (no staging directories).
  assert os.listdir(os.path.dirname(saved)) == ['lite0']


def test_load_overrides_and_model_overrides(tmp_path):
  variables = random_variables(stem_stride=1)
  path = pretrained.save(str(tmp_path / 'd'), MODEL, variables, label_set=None,
                         model_overrides={'stem_stride': 1})
  model, _, metadata = pretrained.load(path, conv_impl='xla', features_only=True)
  assert (model.stem_stride, model.conv_impl, model.features_only) == (1, 'xla', True)
  assert metadata['model_overrides'] == {'stem_stride': 1} and metadata['label_set'] is None


def test_load_refuses_overrides_that_change_the_variables(saved):
  with pytest.raises(pretrained.PretrainedError) as err:
    pretrained.load(saved, width=1.1)
  message = str(err.value)
  assert 'do not fit efficientnet-lite0' in message and "overrides {'width': 1.1}" in message
  assert 'shape mismatch: ' in message.splitlines()[1]


def test_save_refuses_variables_that_do_not_fit(tmp_path, variables):
  with pytest.raises(pretrained.PretrainedError) as err:
    pretrained.save(str(tmp_path / 'd'), 'efficientnet-b0', variables)
  message = str(err.value)
  assert 'do not fit efficientnet-b0 with 10 classes' in message and 'not saved' in message
  assert 'params/' in message or 'batch_stats/' in message
  assert not (tmp_path / 'd').exists()
  with pytest.raises(pretrained.PretrainedError, match='"batch_stats": ...'):
    pretrained.save(str(tmp_path / 'd'), MODEL, {'params': variables['params']})
  with pytest.raises(pretrained.PretrainedError, match='label_set lists 2 names'):
    pretrained.save(str(tmp_path / 'd'), MODEL, variables, label_set=['cat', 'dog'])
  with pytest.raises(TypeError, match='unknown metadata field'):
    pretrained.save(str(tmp_path / 'd'), MODEL, variables, resolutoin=300)
  with pytest.raises(pretrained.PretrainedError, match='number of classes'):
    params = {k: v for k, v in variables['params'].items() if k != 'predictions'}
    pretrained.save(str(tmp_path / 'd'), MODEL, {'params': params, 'batch_stats': {}})


def test_save_refuses_existing_directory_unless_overwrite(tmp_path, saved, variables):
  target = tmp_path / 'copy'
  target.mkdir()
  (target / 'other.txt').write_text('x')
  with pytest.raises(FileExistsError, match='overwrite=True'):
    pretrained.save(str(target), MODEL, variables)
  pretrained.save(str(target), MODEL, variables, resolution=256, overwrite=True)
  metadata = pretrained.read_metadata(str(target))
  assert metadata['resolution'] == 256 and metadata['crop_fraction'] == pytest.approx(256 / 288)
  assert sorted(os.listdir(target)) == ['metadata.json', 'variables']
  assert os.listdir(tmp_path) == ['copy']


def test_interrupted_save_leaves_nothing_loadable(tmp_path, variables, monkeypatch):
  import orbax.checkpoint as ocp

  def crash(self, *args, **kwargs):
    raise KeyboardInterrupt('simulated crash while writing')

  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', crash)
  with pytest.raises(KeyboardInterrupt):
    pretrained.save(str(tmp_path / 'd'), MODEL, variables)
  assert os.listdir(tmp_path) == []


def _broken_copy(tmp_path, saved, name, metadata=None, text=None):
  import shutil

  target = tmp_path / name
  shutil.copytree(saved, target)
  if metadata is not None:
    (target / 'metadata.json').write_text(json.dumps(metadata))
  if text is not None:
    (target / 'metadata.json').write_text(text)
  return str(target)


def test_load_errors_explain_what_is_wrong(tmp_path, saved):
  good = pretrained.read_metadata(saved)
  with pytest.raises(FileNotFoundError, match='No pretrained directory at .*does not exist'):
    pretrained.load(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='has no metadata.json'):
    pretrained.load(str(tmp_path / 'empty'))
  with pytest.raises(pretrained.PretrainedError, match='corrupt: it is not valid JSON'):
    pretrained.load(_broken_copy(tmp_path, saved, 'corrupt', text='{"format": '))
  with pytest.raises(pretrained.PretrainedError, match="format 'something-else'"):
    pretrained.load(_broken_copy(tmp_path, saved, 'foreign', {**good, 'format': 'something-else'}))
  with pytest.raises(pretrained.PretrainedError, match='format version 2'):
    pretrained.load(_broken_copy(tmp_path, saved, 'newer', {**good, 'version': 2}))
  partial = {k: v for k, v in good.items() if k != 'mean_rgb'}
  with pytest.raises(pretrained.PretrainedError, match=r"lacks the field\(s\) \['mean_rgb'\]"):
    pretrained.load(_broken_copy(tmp_path, saved, 'partial', partial))
  with pytest.raises(pretrained.PretrainedError, match='do not fit efficientnet-lite0 with 5 '):
    pretrained.load(_broken_copy(tmp_path, saved, 'classes', {**good, 'num_classes': 5}))
  with pytest.raises(ValueError, match="Unknown model 'efficientnet-b99'"):
    pretrained.load(_broken_copy(tmp_path, saved, 'model', {**good, 'model': 'efficientnet-b99'}))

  import shutil
  no_variables = _broken_copy(tmp_path, saved, 'novars')
  shutil.rmtree(os.path.join(no_variables, 'variables'))
  with pytest.raises(FileNotFoundError, match='no variables/ checkpoint'):
    pretrained.load(no_variables)
  damaged = _broken_copy(tmp_path, saved, 'damaged')
  shutil.rmtree(os.path.join(damaged, 'variables'))
  os.makedirs(os.path.join(damaged, 'variables'))
  with pytest.raises(pretrained.PretrainedError, match='Cannot read the orbax checkpoint'):
    pretrained.load(damaged)
