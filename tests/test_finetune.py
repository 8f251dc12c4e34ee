"""Transfer learning: `config.init_from`, the frozen backbone, the backbone learning rate, and the
finetune configs (paper section 5.3).

The runs are tiny, as in test_train.py: a pretrained directory of EfficientNet-B0 at width and
depth 0.25 (with distinctive BatchNorm statistics, so loading them is visible) stands in for
ImageNet weights, and the training data is `tfds.testing.mock_data`. The real Lite0 weights are
fine-tuned on the digits by test_notebook.py.
"""
from __future__ import annotations

import functools
import glob
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from efficientnet_jax import checkpointing, configs_lib, optim, pretrained, train, transfer
from efficientnet_jax.data import pipeline, sources
from efficientnet_jax.models import create_model
from support import load_config_module

# One worker runs this module (--dist loadgroup): its module fixtures are built once.
pytestmark = pytest.mark.xdist_group('finetune')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 16
TINY = {'width': 0.25, 'depth': 0.25}

# The paper's Table 6 (train, test, classes), REFERENCE.md.
TABLE6 = {
    'cifar10': (50_000, 10_000, 10), 'cifar100': (50_000, 10_000, 100),
    'oxford_flowers102': (2_040, 6_149, 102), 'oxford_iiit_pet': (3_680, 3_369, 37),
    'cars196': (8_144, 8_041, 196), 'food101': (75_750, 25_250, 101),
}
# The splits of the installed TFDS builders (tensorflow_datasets 4.9.10; the split names are in
# each builder's _split_generators, the sizes in the TFDS catalog). Mock data knows neither.
TFDS_SPLITS = {
    'cifar10': {'train': 50_000, 'test': 10_000},
    'cifar100': {'train': 50_000, 'test': 10_000},
    'oxford_flowers102': {'train': 1_020, 'validation': 1_020, 'test': 6_149},
    'oxford_iiit_pet': {'train': 3_680, 'test': 3_669},
    'cars196': {'train': 8_144, 'test': 8_041},
    'food101': {'train': 75_750, 'validation': 25_250},
    'caltech_birds2011': {'train': 5_994, 'test': 5_794},
}
FINETUNE_CONFIGS = sorted(pathlib.Path(p).stem for p in glob.glob(str(ROOT / 'configs' /
                                                                      'finetune_*.py')))
PAPER_DATASET_CONFIGS = [name for name in FINETUNE_CONFIGS if name != 'finetune_digits']


def tiny(config, **overrides):
  """A finetune config shrunk for a test: B0 at width/depth 0.25, 32 px, a few steps."""
  config.model = 'efficientnet-b0'
  config.width, config.depth = TINY['width'], TINY['depth']
  config.resolution = 32
  config.dropout = 0.0
  config.drop_connect_rate = 0.0
  config.train_crop = 'none'
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.optimizer = 'adamw'
  config.learning_rate = 1e-2
  config.lr_batch_size = 16
  config.warmup_epochs = 0.0
  config.ema_decay = 0.9
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def flowers(**overrides):
  return tiny(load_config_module('finetune_oxford_flowers102').get_config('smoke'), **overrides)


@pytest.fixture(scope='module')
def pretrained_dir(tmp_path_factory):
  """'ImageNet' weights of the tiny B0: 1000 classes, BN statistics far from their init."""
  model = create_model('efficientnet-b0', num_classes=1000, **TINY)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.RandomState(0)  # random values: nothing needs compiling
  variables = {
      'params': jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32),
                             shapes['params']),
      'batch_stats': jax.tree.map(lambda x: rng.uniform(0.5, 2.0, x.shape).astype(np.float32),
                                  shapes['batch_stats'])}
  directory = tmp_path_factory.mktemp('pretrained') / 'tiny_b0'
  pretrained.save(str(directory), 'efficientnet-b0', variables, model_overrides=TINY)
  return str(directory), variables


@pytest.fixture(scope='module')
def frozen_run(pretrained_dir, tmp_path_factory):
  """Two steps of a linear probe on mock Flowers from the tiny pretrained weights."""
  directory, _ = pretrained_dir
  workdir = tmp_path_factory.mktemp('frozen')
  config = flowers(init_from=directory, freeze_backbone=True)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    state, metrics = train.train_and_evaluate(config, str(workdir))
  return {'state': state, 'metrics': metrics, 'workdir': workdir, 'config': config}


def _without_head(tree):
  return {k: v for k, v in tree.items() if k != optim.HEAD_MODULE}


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


# --- init_from ----------------------------------------------------------------------------------


def test_frozen_backbone_keeps_loaded_weights_and_statistics(frozen_run, pretrained_dir):
  _, loaded = pretrained_dir
  state = frozen_run['state']
  assert int(state.step) == 2
  assert np.isfinite(frozen_run['metrics']['eval/loss'])
  # Backbone weights and BN statistics: exactly the pretrained ones after training, and their
  # EMA too, up to rounding (it started from them and averages them with themselves).
  assert_trees_equal(_without_head(state.params), _without_head(loaded['params']))
  assert_trees_equal(state.batch_stats, loaded['batch_stats'])
  assert_trees_close(_without_head(state.ema_params), _without_head(loaded['params']))
  assert_trees_close(state.ema_batch_stats, loaded['batch_stats'])
  # The 1000-class ImageNet head was replaced by a fresh 102-class one, which trained.
  head = state.params[optim.HEAD_MODULE]['kernel']
  assert head.shape == (320, 102)
  assert not np.allclose(np.asarray(head), np.asarray(state.ema_params['predictions']['kernel']))
  # The frozen backbone keeps no optimizer state: only the head's Adam moments exist.
  sizes = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sum(sizes) == 2 * (320 * 102 + 102), sizes


def test_resumed_run_ignores_init_from(frozen_run, tmp_path):
  """A workdir with its own checkpoint resumes from it; init_from is not even opened."""
  workdir = tmp_path / 'run'
  shutil.copytree(frozen_run['workdir'], workdir)
  config = flowers(init_from=str(tmp_path / 'gone'), freeze_backbone=True)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    state, _ = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  assert_trees_equal(state.params, frozen_run['state'].params)


def test_resume_with_other_freeze_setting_is_refused(frozen_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(frozen_run['workdir'], workdir)
  config = flowers(init_from=None, freeze_backbone=False)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r'freeze_backbone: checkpoint has True, config has False'):
      train.train_and_evaluate(config, str(workdir))


def _abstract_state(config):
  model = train.build_model(config)
  tx = optim.create_optimizer(config, 1.0)
  init = functools.partial(train.create_train_state, model=model, tx=tx, config=config)
  return jax.eval_shape(init, jax.random.key(0)), tx


def test_init_from_missing_directory(tmp_path):
  config = flowers(init_from=str(tmp_path / 'no_such_dir'))
  state, tx = _abstract_state(config)
  with pytest.raises(transfer.InitFromError,
                     match=r"config\.init_from='.*no_such_dir' cannot be loaded: No pretrained "
                     r'directory.*python -m efficientnet_jax\.convert'):
    transfer.init_from_pretrained(state, config, tx=tx)
  with pytest.raises(transfer.InitFromError, match=r'cannot be loaded: .*has no metadata\.json'):
    transfer.init_from_pretrained(state, flowers(init_from=str(tmp_path)), tx=tx)


def test_init_from_other_model_lists_the_differences(pretrained_dir):
  directory, _ = pretrained_dir
  config = flowers(init_from=directory, model='efficientnet-b2', width=0.5)
  state, tx = _abstract_state(config)
  with pytest.raises(transfer.InitFromError) as error:
    transfer.init_from_pretrained(state, config, tx=tx)
  message = str(error.value)
  assert 'holds efficientnet-b0 (1000 classes), which does not match' in message
  assert "model: pretrained 'efficientnet-b0', config.model 'efficientnet-b2'" in message
  assert 'width: pretrained 0.25, config.width 0.5' in message
  assert 'depth' not in message.split('\n', 1)[1].split('Fine-tuning')[0]  # depth agrees
  assert '--config.model, --config.width and --config.depth' in message


def test_init_from_same_classes_keeps_the_head(pretrained_dir):
  """With the pretrained number of classes the classifier is loaded too, onto FSDP shardings."""
  from efficientnet_jax import sharding
  directory, loaded = pretrained_dir
  config = flowers(init_from=directory, num_classes=1000, fsdp_axis_size=8, fsdp_min_size=1024)
  abstract, tx = _abstract_state(config)
  shardings = sharding.state_shardings(abstract, sharding.create_mesh(fsdp_axis_size=8), 1024)
  # A stand-in for the fresh sharded state (zeros), without compiling the model's init.
  state = jax.tree.map(
      lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
  state = transfer.init_from_pretrained(state, config, tx=tx)
  assert_trees_equal(state.params, loaded['params'])
  assert_trees_equal(state.ema_batch_stats, loaded['batch_stats'])
  kernel = state.params['top_conv']['kernel']
  assert kernel.sharding == shardings.params['top_conv']['kernel']
  assert not kernel.sharding.is_fully_replicated  # placed sharded, not gathered on one device
  # params and their EMA are separate buffers: the train step donates the whole state.
  assert state.params['stem_conv']['kernel'] is not state.ema_params['stem_conv']['kernel']


def test_new_head_starts_at_zero(pretrained_dir):
  directory, _ = pretrained_dir
  config = flowers(init_from=directory)
  abstract, tx = _abstract_state(config)
  state = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract)
  state = transfer.init_from_pretrained(state, config, tx=tx)
  for leaf in jax.tree.leaves(state.params['predictions']):
    assert leaf.shape[-1] == 102 and not np.any(np.asarray(leaf))


# --- The optimizer's head/backbone split --------------------------------------------------------

TOY_PARAMS = {'stem_conv': {'kernel': jnp.ones((3, 3, 3, 4))},
              'top_bn': {'scale': jnp.ones((4,)), 'bias': jnp.zeros((4,))},
              'predictions': {'kernel': jnp.ones((4, 5)), 'bias': jnp.zeros((5,))}}


def _updates(config, steps=3):
  tx = optim.create_optimizer(config, steps_per_epoch=2.0)
  params, opt_state = TOY_PARAMS, tx.init(TOY_PARAMS)
  history = []
  for i in range(steps):
    grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.1 * (i + 1)) + 0.05 * p, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history


@pytest.mark.parametrize('optimizer', ['rmsprop', 'sgd', 'adamw'])
def test_backbone_multiplier_is_a_backbone_learning_rate(optimizer):
  """Scaled backbone updates equal a run at learning rate x m, warmup and cosine included."""
  base = load_config_module('default').get_config()
  base.optimizer = optimizer
  base.lr_schedule = 'cosine'
  base.warmup_epochs = 1.0
  base.num_train_steps = 4
  base.weight_decay = 1e-2
  m = 0.1
  scaled = base.copy_and_resolve_references()
  scaled.backbone_learning_rate_multiplier = m
  slow = base.copy_and_resolve_references()
  slow.learning_rate = base.learning_rate * m
  for u_scaled, u_base, u_slow in zip(_updates(scaled), _updates(base), _updates(slow)):
    for name in u_scaled:
      expected = u_base[name] if name == optim.HEAD_MODULE else u_slow[name]
      for a, b in zip(jax.tree.leaves(u_scaled[name]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)


def test_frozen_backbone_gets_no_updates():
  config = load_config_module('default').get_config()
  config.freeze_backbone = True
  config.warmup_epochs = 0.0
  for updates in _updates(config):
    for name, subtree in updates.items():
      frozen = name != optim.HEAD_MODULE
      assert all(np.all(np.asarray(u) == 0) == frozen for u in jax.tree.leaves(subtree)), name
  with pytest.raises(ValueError, match=r'backbone_learning_rate_multiplier must be >= 0'):
    config = load_config_module('default').get_config()
    config.backbone_learning_rate_multiplier = -1.0
    optim.create_optimizer(config, 1.0)


# --- The finetune configs -----------------------------------------------------------------------


@pytest.mark.parametrize('name', PAPER_DATASET_CONFIGS)
def test_config_matches_dataset_and_paper(name):
  module = load_config_module(name)
  config = module.get_config()
  splits = TFDS_SPLITS[config.dataset]
  train_parts = config.train_split.split('+')
  assert all(part in splits for part in train_parts), config.train_split
  assert config.eval_split in splits
  assert sum(splits[p] for p in train_parts) == module.NUM_TRAIN_EXAMPLES
  assert splits[config.eval_split] == module.NUM_EVAL_EXAMPLES
  with tfds.testing.mock_data(num_examples=1):
    assert tfds.builder(config.dataset).info.features['label'].num_classes == config.num_classes
  if config.dataset in TABLE6:
    paper_train, paper_test, paper_classes = TABLE6[config.dataset]
    assert (module.NUM_TRAIN_EXAMPLES, config.num_classes) == (paper_train, paper_classes)
    if config.dataset != 'oxford_iiit_pet':  # Table 6's 3,369 vs the official 3,669
      assert module.NUM_EVAL_EXAMPLES == paper_test
  # The default variant is B0 with its published coefficients; the argument picks another.
  resolved = configs_lib.resolve(config)
  assert (config.model, resolved.resolution, resolved.dropout) == ('efficientnet-b0', 224, 0.2)
  lite = configs_lib.resolve(module.get_config('lite2'))
  assert (lite.model, lite.width, lite.depth, lite.resolution) == ('efficientnet-lite2', 1.1,
                                                                    1.2, 260)
  with pytest.raises(ValueError, match=r"Unknown config argument 'b9'.*'smoke'"):
    module.get_config('b9')


def _records(builder, split, decoders=None, deserialize_method=None, **kwargs):
  """A mock ArrayRecord data source: serialized records holding the image and the label.

  TFDS's own mock generator draws invalid bounding boxes (min > max) for the bbox features of
  cars196, caltech_birds2011 and oxford_iiit_pet, and fails serializing them; the pipeline
  parses nothing but the image and the label.
  """
  del split, decoders, deserialize_method, kwargs
  features = builder.info.features
  subset = tfds.features.FeaturesDict({'image': features['image'], 'label': features['label']})
  rng = np.random.RandomState(0)
  num_classes = features['label'].num_classes
  return [subset.serialize_example({
      'image': rng.randint(0, 256, (24 + 4 * i, 40, 3)).astype(np.uint8),
      'label': int(rng.randint(0, num_classes))}) for i in range(NUM_EXAMPLES)]


def _images_and_labels(builder, split, decoders=None, read_config=None, **kwargs):
  """Mock examples with only the image (random PNG bytes, of varied sizes) and the label.

  TFDS's own mock generator draws invalid bounding boxes (min > max) for the bbox features of
  cars196, caltech_birds2011 and oxford_iiit_pet, and fails encoding them; the pipeline reads
  nothing but the image and the label.
  """
  del split, read_config, kwargs
  import tensorflow as tf
  rng = np.random.RandomState(0)
  images = [tf.io.encode_png(rng.randint(0, 256, (24 + 4 * i, 40, 3)).astype(np.uint8)).numpy()
            for i in range(NUM_EXAMPLES)]
  labels = rng.randint(0, builder.info.features['label'].num_classes, NUM_EXAMPLES)
  ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  if not (decoders and 'image' in decoders):  # TFDS decodes unless told to skip
    ds = ds.map(lambda ex: {**ex, 'image': tf.io.decode_png(ex['image'], channels=3)})
  return ds


@pytest.mark.parametrize('name', FINETUNE_CONFIGS)
def test_config_smoke_reads_mock_data(name):
  """`:smoke` of every finetune config builds its train and eval pipelines under mock data."""
  config = load_config_module(name).get_config('smoke')
  assert config.num_train_steps == 4 and config.batch_size == 16
  assert config.init_from is None  # given on the command line
  with tfds.testing.mock_data(as_dataset_fn=_images_and_labels, as_data_source_fn=_records):
    info = sources.get_dataset_info(config)
    assert info.num_classes == config.num_classes
    for is_train in (True, False):
      batch = next(iter(pipeline.create_split(config, train=is_train, batch_size=16)))
      size = config.resolution
      assert batch['image'].shape == (16, size, size, 3)
      assert np.all(batch['label'].numpy() < config.num_classes)
