"""Pod scale without a pod: the TPU dry run, FSDP at 256-1,024 devices, the 2-D mesh, bfloat16
activations, remat and the multi-host detection.

The dry run compiles for a real TPU topology through libtpu (`pip install -e '.[tpu]'`). Without
it that test skips, except where EFFICIENTNET_JAX_REQUIRE_LIBTPU is set (CI), where it fails.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from efficientnet_jax import (aot, cluster, configs_lib, errors, optim, sharding, train,
                              xla_cpu)
from efficientnet_jax.models import create_model
from support import load_config_module, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def require_libtpu():
  try:
    import libtpu  # noqa: F401
  except ImportError:
    if os.environ.get('EFFICIENTNET_JAX_REQUIRE_LIBTPU'):
      pytest.fail('libtpu is missing but EFFICIENTNET_JAX_REQUIRE_LIBTPU is set: '
                  "pip install -e '.[tpu]'")
    pytest.skip("the TPU dry run needs libtpu: pip install -e '.[tpu]'")


def abstract_train_state(config):
  model = train.build_model(config)
  tx = optim.create_optimizer(config, 312.0)
  return jax.eval_shape(
      lambda key: train.create_train_state(key, model=model, tx=tx, config=config),
      jax.random.key(0))


# --- The dry run ---------------------------------------------------------------------------------


def test_dry_run_reports_fit_and_misfit_on_the_smallest_slice(tmp_path):
  """A tiny B0 compiled for v4:2x2x1 (4 chips, 8 TensorCores). Against a 0.05 GiB budget per
  chip its train step does not fit and its eval step does: both are reported, with the
  per-chip figures, and the exit status says it does not fit."""
  require_libtpu()
  report_path = tmp_path / 'dry_run.json'
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_jax.aot', '--config=configs/b0.py:smoke',
       '--config.width=0.25', '--config.depth=0.25', '--config.resolution=32',
       '--config.batch_size=64', '--config.eval_batch_size=64', '--topology=v4:2x2x1',
       '--hbm_gib=0.05', f'--json={report_path}'],
      cwd=str(ROOT), env={**subprocess_env(), 'JAX_PLATFORMS': 'cpu'}, capture_output=True,
      text=True, timeout=900)
  output = result.stdout + result.stderr
  assert result.returncode == 3, output[-4000:]
  assert 'does not fit' in result.stderr and 'Traceback' not in output, output[-4000:]
  report = json.loads(report_path.read_text())
  assert report['num_chips'] == 4 and report['num_devices'] == 8
  assert report['config']['dtype'] == 'bfloat16'  # 'auto' on a TPU
  train_row, eval_row = report['steps']['train'], report['steps']['eval']
  assert not train_row['fits'] and eval_row['fits'] and not report['fits']
  budget = 0.05 * 2**30
  assert train_row['hbm_total_per_chip'] > budget > eval_row['hbm_total_per_chip'] > 0
  for row in (train_row, eval_row):
    assert row['hbm_arguments_per_chip'] > 0 and row['hbm_temporaries_per_chip'] > 0
    assert row['flops_per_chip'] > 0 and row['bytes_per_chip'] > 0
    assert row['step_seconds_bound'] == pytest.approx(max(
        row['flops_per_chip'] / aot.CHIPS['v4'].peak_flops,
        row['bytes_per_chip'] / aot.CHIPS['v4'].hbm_bandwidth))
    assert row['images_per_second'] == pytest.approx(64 / row['step_seconds_bound'])
  # The backward pass makes a train step several times an eval step's work.
  assert train_row['flops_per_chip'] > 2 * eval_row['flops_per_chip']
  assert ' no ' in result.stdout and ' yes ' in result.stdout


def test_compiler_out_of_memory_is_reported_not_raised():
  """When the TPU compiler itself runs out of HBM, the dry run reports its figure."""
  message = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory '
             'space hbm. Used 33.18G of 15.48G hbm. Exceeded hbm capacity by 17.70G. Total hbm '
             'usage >= 33.43G: reserved 258.00M program 33.18G arguments 0B. The total memory '
             'required for HLO temporaries (33.18G) exceeds available HBM (15.25G).')

  class Lowered:
    def compile(self):
      raise RuntimeError(message)

  row = aot.analyse(Lowered(), chip=aot.CHIPS['v4'], devices_per_chip=2, num_chips=64,
                    batch_size=4096, hbm_bytes=aot.CHIPS['v4'].hbm_bytes)
  assert row['fits'] is False
  assert row['hbm_total_per_chip'] == pytest.approx(2 * 33.18 * 2**30)
  assert 'RESOURCE_EXHAUSTED' in row['error']

  class Broken:
    def compile(self):
      raise RuntimeError('INTERNAL: something else')

  with pytest.raises(RuntimeError, match='something else'):
    aot.analyse(Broken(), chip=aot.CHIPS['v4'], devices_per_chip=2, num_chips=64,
                batch_size=4096, hbm_bytes=aot.CHIPS['v4'].hbm_bytes)


def test_unknown_topology_is_a_user_error():
  with pytest.raises(aot.TopologyError, match="Unknown TPU generation 'v9'"):
    aot.tpu_devices('v9:2x2')


# --- FSDP at pod scale ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['b7', 'b8', 'l2'])
@pytest.mark.parametrize('devices', [256, 1024])
def test_fsdp_shards_the_big_models_at_pod_scale(name, devices):
  """Each big config's FSDP groups shard >= 95% of its state's bytes on 256 and 1,024 devices
  (the rule that sharded over all devices left B7 6% sharded at 512, L2 0% at 256)."""
  config = configs_lib.resolve(load_config_module(name).get_config(), platform='tpu')
  abstract = abstract_train_state(config)
  fsdp = config.fsdp_axis_size
  mesh = AbstractMesh((devices // fsdp, fsdp), sharding.BATCH_AXES)
  summary = sharding.sharding_summary(
      abstract, sharding.state_shardings(abstract, mesh, config.fsdp_min_size))
  assert summary['sharded_fraction'] >= 0.95, summary


def test_per_device_state_shrinks_as_the_fsdp_axis_grows():
  config = configs_lib.resolve(load_config_module('b7').get_config(), platform='tpu')
  abstract = abstract_train_state(config)
  per_device = []
  for fsdp in (1, 2, 4, 8, 16):
    mesh = AbstractMesh((1024 // fsdp, fsdp), sharding.BATCH_AXES)
    per_device.append(sharding.sharding_summary(
        abstract, sharding.state_shardings(abstract, mesh, config.fsdp_min_size)
    )['per_device_bytes'])
  assert all(b < a for a, b in zip(per_device, per_device[1:])), per_device
  assert per_device[-1] < per_device[0] / 10


def test_mesh_has_data_and_fsdp_axes():
  mesh = sharding.create_mesh(jax.devices(), 4)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  # A batch is split over all 8 devices, a sharded kernel over the 4 of a group.
  batch = jax.device_put(np.zeros((16, 3)), sharding.batch_sharding(mesh))
  assert batch.addressable_shards[0].data.shape == (2, 3)
  with pytest.raises(errors.ConfigError, match='fsdp_axis_size=3 must be >= 1 and divide the 8'):
    sharding.create_mesh(jax.devices(), 3)


def test_multi_slice_mesh_runs_data_parallel_across_slices():
  """Two v5e:2x2 slices: the 'data' axis spans the slices, each FSDP group stays in one."""
  require_libtpu()
  devices, generation = aot.tpu_devices('v5e:2x2', num_slices=2)
  assert generation == 'v5e' and len(devices) == 8
  mesh = sharding.create_mesh(devices, 2)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  for group in mesh.devices:  # one row = one FSDP group
    assert len({d.slice_index for d in group}) == 1
  assert {d.slice_index for d in mesh.devices[:, 0]} == {0, 1}


def _two_block_config(**overrides):
  config = configs_lib.default_config('smoke')
  for key, value in dict(width=0.25, depth=0.25, resolution=16, stem_stride=1, num_classes=10,
                         drop_connect_rate=0.0, dropout=0.0, ema_decay=0.0,
                         blocks=('r1_k3_s11_e1_i32_o16_se0.25',
                                 'r1_k3_s22_e6_i16_o24_se0.25'), **overrides).items():
    setattr(config, key, value)
  return configs_lib.resolve(config)


def test_fsdp_steps_keep_the_batch_sharded():
  """With FSDP the parameters are all-gathered for the step, never the activations: no tensor of
  the global batch (24) appears in a device's program, only its own 3 examples. Without the
  gather XLA kept kernels sharded and gathered the global batch's activations on every device
  (on v4:2x2x1 for B0; for B7 on v4-512 that was ~60 GiB per chip)."""
  mesh = sharding.create_mesh(jax.devices(), 8)
  config = _two_block_config(fsdp_axis_size=8, fsdp_min_size=64)
  steps = train.build_steps(config, mesh, 10.0)
  params = jax.tree.leaves(steps.state_sharding.params)
  assert any(not s.is_fully_replicated for s in params)  # the kernels really are sharded
  gather, scatter = sharding.fsdp_compute_constraints(steps.state_sharding.params, mesh)
  assert gather is not None and scatter is not None
  for name, text in (('train', steps.lower_train(24).compile().as_text()),
                     ('eval', steps.lower_eval(24).compile().as_text())):
    global_batch = re.findall(r'f32\[24,\d+,\d+,\d+\]', text)
    assert not global_batch, (name, sorted(set(global_batch)))
    assert re.search(r'f32\[3,\d+,\d+,\d+\]', text), name
  # Replicated parameters need neither constraint.
  assert sharding.fsdp_compute_constraints(
      train.build_steps(_two_block_config(), sharding.create_mesh(jax.devices()),
                        10.0).state_sharding.params, mesh) == (None, None)


# --- bfloat16 and remat ---------------------------------------------------------------------------


def test_dtype_auto_is_bfloat16_on_accelerators():
  assert configs_lib.base_config().dtype == 'auto'
  assert configs_lib.resolved_dtype('auto', 'tpu') == 'bfloat16'
  assert configs_lib.resolved_dtype('auto', 'gpu') == 'bfloat16'
  assert configs_lib.resolved_dtype('auto', 'cpu') == 'float32'
  assert configs_lib.resolved_dtype('float32', 'tpu') == 'float32'
  with pytest.raises(errors.ConfigError, match="Unknown config.dtype 'fp16'"):
    configs_lib.resolved_dtype('fp16')


def test_bfloat16_train_step_on_cpu():
  """bfloat16 activations: a finite loss within 2% of float32's on the same batch, while the
  parameters, BatchNorm statistics and optimiser state stay float32. (Two MBConv blocks:
  XLA:CPU compiles bfloat16 programs slowly.)"""
  mesh = sharding.create_mesh(jax.devices()[:2])
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, (8,), dtype=np.int32)}
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = configs_lib.default_config('smoke')
    for key, value in dict(width=0.25, depth=0.25, resolution=16, stem_stride=1, num_classes=10,
                           dtype=dtype, drop_connect_rate=0.0, dropout=0.0, ema_decay=0.0,
                           blocks=('r1_k3_s11_e1_i32_o16_se0.25',
                                   'r1_k3_s22_e6_i16_o24_se0.25')).items():
      setattr(config, key, value)
    config = configs_lib.resolve(config)
    steps = train.build_steps(config, mesh, 10.0)
    state = steps.initial_state()
    step = steps.lower_train(8).compile(compiler_options=xla_cpu.run_once_options())
    flag = jax.device_put(jnp.int32(-1), steps.replicated)
    placed = {k: jax.device_put(v, steps.data_sharding) for k, v in batch.items()}
    new_state, _, metrics = step(state, flag, placed)
    results[dtype] = float(metrics['loss'])
    for leaf in jax.tree.leaves((new_state.params, new_state.batch_stats, new_state.opt_state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  assert np.isfinite(results['bfloat16'])
  assert results['bfloat16'] == pytest.approx(results['float32'], rel=0.02), results


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  model, remat = (create_model('efficientnet-b0', num_classes=10, width=0.25, depth=0.25,
                               conv_impl='xla', remat=r) for r in (False, True))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)

  def loss(params, m):
    logits, _ = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                        train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
    return jnp.sum(logits ** 2)

  expected = jax.grad(loss)(variables['params'], model)
  actual = jax.grad(loss)(variables['params'], remat)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- Multi-host detection ------------------------------------------------------------------------


def _no_tpu():
  return 0


def _never(*_):
  raise AssertionError('the metadata server must not be asked on a host without TPU chips')


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}, 'slurm'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16', 'SLURM_STEP_NUM_TASKS': '1'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'host-0'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1,host-2,host-3', 'TPU_WORKER_ID': '1'}, 'gke'),
    ({'TPU_PROCESS_ADDRESSES': '10.0.0.1:8476,10.0.0.2:8476'}, 'gke'),
])
def test_detects_slurm_and_gke(environ, expected):
  assert cluster.detect(environ, tpu_chips=_no_tpu, worker_endpoints=_never) == expected


def test_detects_a_cloud_tpu_vm_pod_slice():
  """On a Cloud TPU VM nothing in the environment says 'pod': the metadata lists the workers."""
  four_chips = lambda: 4
  assert cluster.detect({}, tpu_chips=four_chips,
                        worker_endpoints=lambda: 'w-0:10.0.0.1,w-1:10.0.0.2') == 'cloud_tpu'
  assert cluster.detect({}, tpu_chips=four_chips, worker_endpoints=lambda: 'w-0') is None
  assert cluster.detect({}, tpu_chips=four_chips, worker_endpoints=lambda: None) is None
