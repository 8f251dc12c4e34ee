"""Trains and evaluates an EfficientNet: `python -m efficientnet_jax.main --config=... --workdir=...`.

    python -m efficientnet_jax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m efficientnet_jax.main --config=configs/b7.py --workdir=gs://BUCKET/b7 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Everything happens in `train.train_and_evaluate(config, workdir)`; this file only parses flags,
sets up JAX (multi-host initialisation, TF kept off the accelerators) and turns the outcome into
an exit status: 0 when training finished or saved and stopped on a preemption notice (SIGTERM);
2 with the message alone for an error the user can fix (a config value, a dataset, a checkpoint
mismatch; `--traceback` shows the stack); 1 for a NaN halt or any other failure (with its
traceback). The process ends promptly on every host: no background thread keeps it alive.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from efficientnet_jax import allocator, cluster, launch

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics (local or gs://).')
flags.DEFINE_enum('jax_distributed', 'auto', ['auto', 'true', 'false'],
                  'Call jax.distributed.initialize(): auto = on Cloud TPU VM pod slices, GKE '
                  'TPU pods, multi-task SLURM steps, and when a coordinator address is given.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (multi-process runs).')
flags.DEFINE_integer('local_device_count', None,
                     'CPU only: number of (fake) local CPU devices, for testing sharding.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file (a Python file '
                                'with get_config(arg); append :ARG for variants).',
                                lock_config=True)
flags.DEFINE_bool('traceback', False, 'Show the stack trace of errors the user can fix.')
flags.mark_flags_as_required(['config', 'workdir'])


def _wants_distributed() -> bool:
  if FLAGS.jax_distributed != 'auto':
    return FLAGS.jax_distributed == 'true'
  if FLAGS.coordinator_address:
    return True
  environment = cluster.detect()
  if environment:
    logging.info('Multi-process environment detected: %s.', environment)
  return environment is not None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax
  if FLAGS.local_device_count:
    jax.config.update('jax_num_cpu_devices', FLAGS.local_device_count)
  distributed = _wants_distributed()
  if not distributed:
    from efficientnet_jax import preemption
    preemption.install_sigterm_handler()  # before set-up, so an early notice still saves
  if distributed:
    if FLAGS.coordinator_address and jax.config.jax_platforms in (None, '', 'cpu'):
      # Cross-process collectives on CPU need an implementation; gloo works over TCP.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  # tf.data only: keep TensorFlow away from GPU/TPU memory that JAX owns.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  from efficientnet_jax import errors, preemption, train
  logging.info('JAX process %d/%d, %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    _, metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    launch.exit_now(0, f'{e}; rerun the same command to resume.')
  except errors.UserError as e:
    if FLAGS.traceback:
      raise
    launch.exit_now(2, f'error: {e}')
  except FloatingPointError as e:
    launch.exit_now(1, f'error: {e}')
  top1 = metrics.get('eval_ema/top1', metrics.get('eval/top1'))
  logging.info('Final eval metrics: %s', metrics)
  if jax.process_index() == 0:
    count = int(metrics.get('eval_ema/num_examples', metrics.get('eval/num_examples', 0)))
    print(f'Final top-1: {top1:.4f} ({count} eval examples)')


def run(main_fn=None) -> None:
  """`python -m efficientnet_jax.main`: `main_fn` (default `main`) with the exits of `launch.run`."""
  launch.run(main_fn or main)


if __name__ == '__main__':
  allocator.reexec_with_tcmalloc()
  run()
