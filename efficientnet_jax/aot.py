"""Will it fit? Compile a config's real train and eval steps for a TPU slice, on any machine.

    pip install -e '.[tpu]'        # libtpu: compiles for TPUs without one
    python -m efficientnet_jax.aot --config=configs/b7.py --topology=v4:8x8x8
    python -m efficientnet_jax.aot --config=configs/b0.py --topology=v3:4x4 --json=/tmp/b0.json
    python -m efficientnet_jax.aot --config=configs/b7.py        # on a TPU VM: its own slice

The steps are `train.build_steps`'s, the functions and shardings `train_and_evaluate` runs; only
the devices are a topology's compile-only descriptions (`jax.experimental.topologies`). For each
step it prints the per-chip HBM the compiler allocates (arguments, temporaries, outputs) against
the chip's capacity, the FLOPs and HBM bytes of one step, and the roofline bound they imply:
a step takes at least max(FLOPs / peak, bytes / bandwidth), so a chip processes at most
batch-per-chip / that many images per second. A step that does not fit is reported as such,
with the compiler's figure, not as a crash.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from efficientnet_jax import configs_lib, errors, launch, sharding, train

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: peak dense bfloat16 FLOP/s, HBM capacity (bytes) and bandwidth (bytes/s)."""
  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  source: str


# Per chip, from the Cloud TPU system-architecture pages (checked 2026-12). The compile-only
# topologies expose v3's and v4's two TensorCores as two devices each, v5p's as one megacore.
CHIPS = {
    'v3': Chip('TPU v3', 123e12, 32 * GiB, 900e9, 'https://cloud.google.com/tpu/docs/v3'),
    'v4': Chip('TPU v4', 275e12, 32 * GiB, 1200e9, 'https://cloud.google.com/tpu/docs/v4'),
    'v5e': Chip('TPU v5e', 197e12, 16 * GiB, 819e9, 'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip('TPU v5p', 459e12, 95 * GiB, 2765e9, 'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('TPU v6e', 918e12, 32 * GiB, 1640e9, 'https://cloud.google.com/tpu/docs/v6e'),
}
# jax Device.device_kind -> generation, for the slice a TPU VM is attached to.
_DEVICE_KINDS = {'TPU v3': 'v3', 'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e',
                 'TPU v5': 'v5p', 'TPU v5p': 'v5p', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e'}
# The compiler's out-of-memory message: "... (33.18G) exceeds available HBM (15.25G)".
_OOM_RE = re.compile(r'\(([\d.]+)([KMGT])\)[^()]*exceeds[^()]*HBM[^()]*\(([\d.]+)([KMGT])\)')
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


class TopologyError(errors.UserError, ValueError):
  """The topology name is not one libtpu knows, or libtpu is missing."""


def tpu_devices(topology: str | None, num_slices: int = 1) -> tuple[list, str]:
  """(devices, chip generation) of a named topology ('v4:2x2x1'), or of the attached TPUs."""
  if not topology:
    if jax.default_backend() != 'tpu':
      raise TopologyError('Name a slice with --topology (e.g. v4:2x2x1, v5e:4x4, v6e:16x16), or '
                          'run on a TPU VM to check its own slice.')
    devices = jax.devices()
    return devices, _DEVICE_KINDS.get(devices[0].device_kind, devices[0].device_kind)
  generation = topology.split(':', 1)[0]
  if generation not in CHIPS:
    raise TopologyError(f'Unknown TPU generation {generation!r} in --topology={topology}; '
                        f'valid: {", ".join(CHIPS)} (e.g. v4:2x2x1, v5e:16x16).')
  # Compiling only: other processes may hold libtpu too (parallel dry runs, tests), so its
  # one-process lock (meant for the chips of a real TPU VM) is not taken.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    description = topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                               num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises several types)
    if 'libtpu' in str(e).lower() or isinstance(e, (ImportError, ModuleNotFoundError)):
      raise TopologyError(f'Compiling for a TPU needs libtpu: pip install -e \'.[tpu]\' ({e}).')
    raise TopologyError(f'libtpu does not know the topology {topology!r}: {e}. Names look '
                        'like v3:4x4, v4:2x2x1, v5e:16x16, v5p:8x8x8, v6e:16x16.') from e
  return list(description.devices), generation


def count_chips(devices) -> int:
  """Physical chips behind `devices` (several TensorCores of a chip may be separate devices)."""
  return len({(getattr(d, 'slice_index', 0), d.process_index, tuple(d.coords)) for d in devices})


def _memory(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  arguments, outputs = m.argument_size_in_bytes, m.output_size_in_bytes
  aliased, temporaries = m.alias_size_in_bytes, m.temp_size_in_bytes
  code = m.generated_code_size_in_bytes
  # Donated arguments are reused as outputs (aliased), so they count once.
  return {'arguments': arguments, 'temporaries': temporaries, 'outputs': outputs,
          'aliased': aliased, 'code': code,
          'total': arguments + outputs - aliased + temporaries + code}


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))


def out_of_memory_figure(message: str) -> tuple[float, float] | None:
  """(required, available) bytes per device from the compiler's out-of-memory error, if any."""
  match = _OOM_RE.search(message)
  if not match:
    return None
  return (float(match[1]) * _UNITS[match[2]], float(match[3]) * _UNITS[match[4]])


def analyse(lowered, *, chip: Chip, devices_per_chip: int, num_chips: int, batch_size: int,
            hbm_bytes: float) -> dict[str, Any]:
  """Compiles `lowered` and returns its per-chip memory, cost and roofline figures."""
  row: dict[str, Any] = {'batch_size': batch_size, 'hbm_capacity_per_chip': hbm_bytes}
  began = time.time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError / JaxRuntimeError)
    figure = out_of_memory_figure(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) and figure is None:
      raise
    row.update(fits=False, compile_seconds=time.time() - began,
               error=str(e).splitlines()[0][:500])
    if figure:
      row['hbm_total_per_chip'] = figure[0] * devices_per_chip
      row['compiler_capacity_per_chip'] = figure[1] * devices_per_chip
    return row
  row['compile_seconds'] = time.time() - began
  memory = _memory(compiled)
  flops, bytes_accessed = _cost(compiled)
  for key, value in memory.items():
    row[f'hbm_{key}_per_chip'] = value * devices_per_chip
  row['fits'] = row['hbm_total_per_chip'] <= hbm_bytes
  row['flops_per_chip'] = flops * devices_per_chip
  row['bytes_per_chip'] = bytes_accessed * devices_per_chip
  compute_s = row['flops_per_chip'] / chip.peak_flops
  memory_s = row['bytes_per_chip'] / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  row.update(step_seconds_bound=step_s, bound_by='compute' if compute_s >= memory_s else 'memory',
             images_per_second_per_chip=batch_size / num_chips / step_s if step_s else None,
             images_per_second=batch_size / step_s if step_s else None)
  return row


def dry_run(config: ml_collections.ConfigDict, topology: str | None, *, num_slices: int = 1,
            hbm_gib: float | None = None, steps: tuple[str, ...] = ('train', 'eval'),
            num_train_examples: int = 1_281_167) -> dict[str, Any]:
  """Compiles `config`'s steps for a TPU slice; returns the figures `main` prints."""
  devices, generation = tpu_devices(topology, num_slices)
  chip = CHIPS[generation]
  num_chips = count_chips(devices)
  devices_per_chip = len(devices) // num_chips
  config = configs_lib.resolve(config, log=True, platform='tpu')
  mesh = sharding.create_mesh(devices, config.fsdp_axis_size)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  built = train.build_steps(config, mesh, num_train_examples / config.batch_size)
  state_bytes = sharding.sharding_summary(built.abstract_state, built.state_sharding)
  hbm_bytes = hbm_gib * GiB if hbm_gib else chip.hbm_bytes
  report = {
      'config': {'model': config.model, 'resolution': config.resolution, 'dtype': config.dtype,
                 'remat': bool(config.remat), 'batch_size': config.batch_size,
                 'eval_batch_size': config.eval_batch_size,
                 'fsdp_axis_size': config.fsdp_axis_size},
      'topology': topology or f'attached {generation}', 'num_slices': num_slices,
      'chip': dataclasses.asdict(chip), 'num_chips': num_chips, 'num_devices': len(devices),
      'devices_per_chip': devices_per_chip, 'mesh': dict(mesh.shape),
      'state': state_bytes, 'steps': {},
  }
  lowerings = {'train': lambda: built.lower_train(config.batch_size),
               'eval': lambda: built.lower_eval(config.eval_batch_size)}
  batches = {'train': config.batch_size, 'eval': config.eval_batch_size}
  for name in steps:
    logging.info('Compiling the %s step for %s (%d devices)...', name, report['topology'],
                 len(devices))
    report['steps'][name] = analyse(lowerings[name](), chip=chip,
                                    devices_per_chip=devices_per_chip, num_chips=num_chips,
                                    batch_size=batches[name], hbm_bytes=hbm_bytes)
  report['fits'] = all(row['fits'] for row in report['steps'].values())
  return report


def format_report(report: dict[str, Any]) -> str:
  c, chip = report['config'], report['chip']
  lines = [
      f"{c['model']} at {c['resolution']} px, {c['dtype']} activations, remat "
      f"{'on' if c['remat'] else 'off'}, batch {c['batch_size']} (eval {c['eval_batch_size']}) on "
      f"{report['topology']}: {report['num_chips']} x {chip['name']} "
      f"({report['devices_per_chip']} device(s) per chip), mesh {report['mesh']}.",
      f"State: {report['state']['total_bytes'] / GiB:.2f} GiB, "
      f"{100 * report['state']['sharded_fraction']:.1f}% sharded, "
      f"{report['state']['per_device_bytes'] / GiB:.3f} GiB per device.",
      '',
      'step   HBM per chip (GiB): args   temps  outputs  total / capacity  fits  '
      'TFLOP/chip  GB/chip  step >= ms (bound)   img/s/chip  img/s',
  ]
  for name, r in report['steps'].items():
    capacity = r['hbm_capacity_per_chip'] / GiB
    if 'flops_per_chip' not in r:
      total = r.get('hbm_total_per_chip')
      lines.append(f"{name:<6} {'':>20}{'':>22} {total / GiB if total else float('nan'):7.2f} / "
                   f"{capacity:<8.2f}  no    (the compiler ran out of HBM: {r['error'][:120]})")
      continue
    lines.append(
        f"{name:<6} {r['hbm_arguments_per_chip'] / GiB:27.2f} {r['hbm_temporaries_per_chip'] / GiB:7.2f}"
        f" {r['hbm_outputs_per_chip'] / GiB:8.2f} {r['hbm_total_per_chip'] / GiB:7.2f} / "
        f"{capacity:<8.2f}  {'yes' if r['fits'] else 'no ':<4}  "
        f"{r['flops_per_chip'] / 1e12:10.2f} {r['bytes_per_chip'] / 1e9:8.1f} "
        f"{r['step_seconds_bound'] * 1e3:9.1f} ({r['bound_by']:<7}) "
        f"{r['images_per_second_per_chip']:11.0f} {r['images_per_second']:7.0f}")
  lines += ['', f"Fits: {'yes' if report['fits'] else 'NO'}. Peak {chip['peak_flops'] / 1e12:.0f} "
            f"TFLOP/s bf16, {chip['hbm_bandwidth'] / 1e9:.0f} GB/s, "
            f"{chip['hbm_bytes'] / GiB:.0f} GiB per chip ({chip['source']}). The step time is a "
            'lower bound (roofline), so the images/s are upper bounds.']
  return '\n'.join(lines)


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file (as for main).',
                                lock_config=True)
flags.DEFINE_string('topology', None, 'TPU slice, e.g. v4:2x2x1, v3:4x4, v5e:16x16, v6e:8x8; '
                    'default: the TPUs this VM is attached to.')
flags.DEFINE_integer('num_slices', 1, 'Slices joined over DCN (multi-slice data parallelism).')
flags.DEFINE_float('hbm_gib', None, 'Per-chip HBM to check against instead of the chip\'s own.')
flags.DEFINE_list('steps', ['train', 'eval'], 'Which steps to compile: train, eval.')
flags.DEFINE_integer('num_train_examples', 1_281_167, 'Training examples per epoch (for the '
                     'learning-rate schedule\'s constants; ImageNet by default).')
flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
flags.DEFINE_bool('traceback', False, 'Show the stack trace of errors the user can fix.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  unknown = sorted(set(FLAGS.steps) - {'train', 'eval'})
  if unknown:
    raise app.UsageError(f'Unknown --steps {unknown}; valid: train, eval.')
  if FLAGS.topology and not jax.config.jax_platforms:
    # The named slice's devices are compile-only descriptions; this process itself needs only
    # the CPU (and must not try to open TPU chips that a CPU machine does not have).
    jax.config.update('jax_platforms', 'cpu')
  try:
    report = dry_run(FLAGS.config, FLAGS.topology, num_slices=FLAGS.num_slices,
                     hbm_gib=FLAGS.hbm_gib, steps=tuple(FLAGS.steps),
                     num_train_examples=FLAGS.num_train_examples)
  except errors.UserError as e:
    if FLAGS.traceback:
      raise
    launch.exit_now(2, f'error: {e}')
  print(format_report(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=1, default=lambda x: x.item() if isinstance(x, np.generic)
                else str(x))
  if not report['fits']:
    launch.exit_now(3, 'The config does not fit this slice (exit status 3).')


if __name__ == '__main__':
  launch.run(main)
