"""Trains and evaluates an EfficientNet: `python -m efficientnet_jax.main --config=... --workdir=...`.

    python -m efficientnet_jax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m efficientnet_jax.main --config=configs/b7.py --workdir=gs://BUCKET/b7 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Everything happens in `train.train_and_evaluate(config, workdir)`; this file only parses flags and
sets up JAX (multi-host initialisation, TF kept off the accelerators).
"""
from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics (local or gs://).')
flags.DEFINE_enum('jax_distributed', 'auto', ['auto', 'true', 'false'],
                  'Call jax.distributed.initialize(): auto = on TPU pods, SLURM and when a '
                  'coordinator address is given.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (multi-process runs).')
flags.DEFINE_integer('local_device_count', None,
                     'CPU only: number of (fake) local CPU devices, for testing sharding.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file (a Python file '
                                'with get_config(arg); append :ARG for variants).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _wants_distributed() -> bool:
  if FLAGS.jax_distributed != 'auto':
    return FLAGS.jax_distributed == 'true'
  if FLAGS.coordinator_address:
    return True
  workers = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in workers or 'SLURM_JOB_ID' in os.environ and int(
      os.environ.get('SLURM_NTASKS', '1')) > 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax
  if FLAGS.local_device_count:
    jax.config.update('jax_num_cpu_devices', FLAGS.local_device_count)
  if _wants_distributed():
    if FLAGS.coordinator_address and jax.config.jax_platforms in (None, '', 'cpu'):
      # Cross-process collectives on CPU need an implementation; gloo works over TCP.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  # tf.data only: keep TensorFlow away from GPU/TPU memory that JAX owns.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  from efficientnet_jax import train
  logging.info('JAX process %d/%d, %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  _, metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  top1 = metrics.get('eval_ema/top1', metrics.get('eval/top1'))
  logging.info('Final eval metrics: %s', metrics)
  if jax.process_index() == 0:
    print(f'Final top-1: {top1:.4f} ({int(metrics.get("eval_ema/num_examples", metrics.get("eval/num_examples", 0)))} eval examples)')


# The checkout's configs/, for `--config=configs/b7.py` typed in another working directory.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def with_repo_config_path(argv: list[str]) -> list[str]:
  """`argv` with a relative --config path that is missing here taken from the checkout instead.

  config_flags reads the path relative to the working directory; a path such as
  configs/b7.py that only exists relative to the repository then still loads.
  """
  result = []
  for arg in argv:
    if arg.startswith('--config='):
      path, sep, rest = arg[len('--config='):].partition(':')
      if (path and not os.path.isabs(path) and not os.path.exists(path)
          and (_REPO_ROOT / path).is_file()):
        arg = f'--config={_REPO_ROOT / path}{sep}{rest}'
    result.append(arg)
  return result


def run() -> None:
  app.run(main, argv=with_repo_config_path(sys.argv))


if __name__ == '__main__':
  run()
