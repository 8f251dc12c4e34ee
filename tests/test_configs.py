"""The config files: the variant registry as the one source of coefficients, the 'smoke'
argument, the lock, loading from any directory, and B7 starting.
"""
from __future__ import annotations

import glob
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import configs_lib, optim, sharding, train
from efficientnet_jax.models import VARIANTS
from support import load_config_module as load, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs'
NOT_VARIANTS = ('default', 'quickstart')
# finetune_*.py (transfer learning) are tested in test_finetune.py.
VARIANT_FILES = sorted(pathlib.Path(p).stem for p in glob.glob(str(CONFIG_DIR / '*.py'))
                       if pathlib.Path(p).stem not in NOT_VARIANTS and
                       not pathlib.Path(p).stem.startswith(('_', 'finetune_')))
B7_TRAINABLE_PARAMS = 66_347_960


def test_one_config_file_per_variant():
  assert sorted(f'efficientnet-{name}' for name in VARIANT_FILES) == sorted(VARIANTS)


@pytest.mark.parametrize('name', VARIANT_FILES)
def test_variant_config_is_the_registry_variant(name):
  config = load(name).get_config()
  spec = VARIANTS[f'efficientnet-{name}']
  assert config.model == spec.name
  # The coefficients are placeholders that resolve to the registry's, never copies of them.
  assert all(config[field] is None for field in configs_lib.MODEL_FIELDS)
  resolved = configs_lib.resolve(config)
  assert (resolved.width, resolved.depth, resolved.resolution, resolved.dropout) == (
      spec.width, spec.depth, spec.resolution, spec.dropout)
  # Everything else is the paper recipe of configs/default.py.
  base = load('default').get_config()
  assert config.num_classes == base.num_classes == 1000
  assert config.optimizer == base.optimizer and config.learning_rate == base.learning_rate
  assert config.dataset == 'imagenet2012'
  assert config.batch_size % 8 == 0


def test_stated_coefficients_that_disagree_with_the_registry_fail_at_load():
  with pytest.raises(ValueError, match=r"width=2\.1 \(the registry has 2\.0\)") as err:
    configs_lib.variant_config('efficientnet-b7', batch_size=4096, coefficients=dict(
        width=2.1, depth=3.1, resolution=600, dropout=0.5))
  assert 'models/variants.py' in str(err.value)
  with pytest.raises(ValueError, match='Unknown coefficient'):
    configs_lib.variant_config('efficientnet-b0', batch_size=8, coefficients=dict(widht=1.0))


def test_model_override_builds_that_variant_on_any_config():
  """--config.model=efficientnet-b3 on default.py (B0) or b7.py is the real B3 at 300 px."""
  for base in ('default', 'b7'):
    config = load(base).get_config()
    config.model = 'efficientnet-b3'
    resolved = configs_lib.resolve(config)
    assert resolved.resolution == 300 and resolved.dropout == 0.3
    model = train.build_model(config)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 300, 300, 3), jnp.float32))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
    assert count == VARIANTS['efficientnet-b3'].published_params == 12_233_232


def test_explicit_width_overrides_the_variant_and_is_logged(caplog):
  config = load('b3').get_config()
  config.width = 1.5
  with caplog.at_level('INFO'):
    resolved = configs_lib.resolve(config, log=True)
  assert (resolved.width, resolved.depth, resolved.resolution) == (1.5, 1.4, 300)
  assert train.build_model(config).width_coefficient == 1.5
  assert "width 1.5 (set by the config; the variant's own is 1.2)" in caplog.text


def test_model_override_through_main_as_the_user_types_it(tmp_path):
  """`python -m efficientnet_jax.main --config=configs/default.py --config.model=...`, typed in
  another directory, on mock data, builds the real B3: its parameters, at 300 px.

  The run is stopped once it has said so: training B3 itself would only add minutes of compile.
  """
  lines = []
  with subprocess.Popen(
      [sys.executable, str(ROOT / 'tests' / 'mock_main.py'), '--mock_num_examples=8',
       '--config=configs/default.py', '--config.model=efficientnet-b3',
       f'--workdir={tmp_path / "b3"}', '--config.batch_size=8', '--config.eval_batch_size=8',
       '--local_device_count=1'],
      cwd=str(tmp_path), env=subprocess_env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) as process:
    try:
      for line in process.stderr:
        lines.append(line)
        if 'trainable parameters' in line:
          break
    finally:
      process.kill()
  output = ''.join(lines)
  assert ('Model efficientnet-b3: width 1.2, depth 1.4, resolution 300, dropout 0.3, all the '
          "variant's own.") in output, output[-4000:]
  assert 'efficientnet-b3: 12,233,232 trainable parameters at 300 px' in output, output[-4000:]


def test_import_of_models_pays_for_neither_tensorflow_nor_tfds():
  code = ('import sys, efficientnet_jax.models; '
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, env=subprocess_env(), timeout=120)


@pytest.mark.parametrize('name', VARIANT_FILES + list(NOT_VARIANTS))
def test_smoke_argument(name):
  module = load(name)
  full, smoke = module.get_config(), module.get_config('smoke')
  # Same experiment (model, coefficients, dataset), shrunk.
  for key in ('model', 'width', 'depth', 'dropout', 'dataset', 'num_classes', 'optimizer'):
    assert smoke[key] == full[key], key
  assert smoke.resolution == 64 and smoke.batch_size == 16 and smoke.num_train_steps == 4
  assert smoke.batch_size % 8 == 0 and smoke.eval_batch_size % 8 == 0
  with pytest.raises(ValueError, match=r"Unknown config argument 'smok'.*'smoke'"):
    module.get_config('smok')


@pytest.mark.parametrize('name', ['default', 'b7', 'quickstart', 'lite0'])
def test_config_is_locked(name):
  config = load(name).get_config('smoke')
  with pytest.raises(AttributeError, match=r'learnig_rate.*Did you mean "learning_rate"'):
    config.learnig_rate = 1.0
  config.learning_rate = 1.0  # Existing fields can still be overridden.
  assert config.learning_rate == 1.0


def test_main_rejects_mistyped_override(tmp_path):
  workdir = tmp_path / 'workdir'
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.main', f'--config={CONFIG_DIR / "default.py"}:smoke',
       f'--workdir={workdir}', '--config.learnig_rate=1'],
      cwd=str(ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=120)
  output = result.stdout + result.stderr
  assert result.returncode != 0, output
  assert 'learnig_rate' in output and 'Did you mean "learning_rate"' in output, output
  assert not workdir.exists()  # Rejected while parsing flags, before anything started.


def test_b7_smoke_model_is_b7():
  """The cheap check: configs/b7.py:smoke builds exactly B7 (66,347,960 trainable parameters)."""
  config = load('b7').get_config('smoke')
  assert config.model == 'efficientnet-b7'
  model = train.build_model(config)
  images = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  assert count == B7_TRAINABLE_PARAMS
  # The full config's FSDP groups of 8 devices split the big kernels (the smoke run, meant for
  # any device count, replicates).
  assert config.fsdp_axis_size == 1
  full = load('b7').get_config()
  assert full.fsdp_axis_size == 8
  tx = optim.create_optimizer(config, 1.0)
  abstract = jax.eval_shape(
      lambda key: train.create_train_state(key, model=model, tx=tx, config=config),
      jax.random.key(0))
  shardings = sharding.state_shardings(
      abstract, sharding.create_mesh(fsdp_axis_size=full.fsdp_axis_size), full.fsdp_min_size)
  kernel = shardings.params['top_conv']['kernel']
  assert not kernel.is_fully_replicated
  assert shardings.params['top_bn']['scale'].is_fully_replicated


@pytest.mark.slow
def test_b7_smoke_starts_on_mock_data(tmp_path):
  """`python -m efficientnet_jax.main --config=configs/b7.py:smoke` trains a step on mock data."""
  import tensorflow as tf
  workdir = tmp_path / 'b7'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'tests' / 'mock_main.py'), '--mock_num_examples=16',
       f'--config={CONFIG_DIR / "b7.py"}:smoke', f'--workdir={workdir}',
       '--config.num_train_steps=1', '--local_device_count=8'],
      cwd=str(ROOT), env=subprocess_env(fast_compile=True), capture_output=True, text=True,
      timeout=1500)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-6000:]
  assert 'Final top-1:' in result.stdout, output[-6000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1']
  losses = []
  for path in glob.glob(str(workdir / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'train/loss':
          losses.append(float(tf.make_ndarray(value.tensor)))
  assert len(losses) == 1 and np.isfinite(losses[0])


def test_path_fields_accept_command_line_overrides(tmp_path):
  """--config.data_dir / manual_dir are typed placeholders: with a plain None default,
  config_flags refuses the override ('Type NoneType ... not supported')."""
  workdir, manual = tmp_path / 'workdir', tmp_path / 'no_tars_here'
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.main', f'--config={CONFIG_DIR / "b0.py"}:smoke',
       f'--workdir={workdir}', f'--config.data_dir={tmp_path / "tfds"}',
       f'--config.manual_dir={manual}'],
      cwd=str(ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=300)
  output = result.stdout + result.stderr
  assert result.returncode != 0, output
  # Parsed and used: the dataset error names both directories.
  assert 'not supported' not in output, output
  assert "is not prepared in data_dir='" in output and str(manual) in output, output
  config = load('default').get_config()
  assert config.data_dir is None and config.manual_dir is None
