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

import os
import pathlib
import sys
import traceback

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
flags.DEFINE_bool('traceback', False, 'Show the stack trace of errors the user can fix.')
flags.mark_flags_as_required(['config', 'workdir'])


def _wants_distributed() -> bool:
  if FLAGS.jax_distributed != 'auto':
    return FLAGS.jax_distributed == 'true'
  if FLAGS.coordinator_address:
    return True
  workers = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in workers or 'SLURM_JOB_ID' in os.environ and int(
      os.environ.get('SLURM_NTASKS', '1')) > 1


_main_started = False


def main(argv):
  global _main_started
  _main_started = True
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
    _exit(0, f'{e}; rerun the same command to resume.')
  except errors.UserError as e:
    if FLAGS.traceback:
      raise
    _exit(2, f'error: {e}')
  except FloatingPointError as e:
    _exit(1, f'error: {e}')
  top1 = metrics.get('eval_ema/top1', metrics.get('eval/top1'))
  logging.info('Final eval metrics: %s', metrics)
  if jax.process_index() == 0:
    count = int(metrics.get('eval_ema/num_examples', metrics.get('eval/num_examples', 0)))
    print(f'Final top-1: {top1:.4f} ({count} eval examples)')


def _exit(status: int, message: str) -> None:
  """Prints `message` to stderr and ends the process now, whatever threads are still running.

  The training loop has already waited for its checkpoints; what may remain are daemon or
  library threads (tf.data, metric writers) that must not keep a stopped job alive on a pod.
  """
  print(message, file=sys.stderr, flush=True)
  logging.flush()
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access


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


def run(main_fn=None) -> None:
  """`app.run(main)`; an error in the config file or its overrides prints its message alone."""
  argv = with_repo_config_path(sys.argv)
  try:
    app.run(main_fn or main, argv=argv)
  except Exception as e:  # pylint: disable=broad-except
    if _main_started:  # an unexpected failure: its traceback, then out, on every host
      traceback.print_exc()
      _exit(1, f'error: training failed ({type(e).__name__}); the traceback is above.')
    if '--traceback' in argv:  # raised while parsing the flags: the config or an override
      raise
    _exit(2, f'error: {_config_message(e)}')


def _config_message(error: Exception) -> str:
  """An exception from loading a config or applying an override, as one readable message."""
  text = str(error)
  if isinstance(error, (AttributeError, KeyError)) and len(text) > 1 and text[0] == text[-1] == "'":
    text = text[1:-1].encode().decode('unicode_escape')  # ml_collections quotes its message
  return f'{text} (in --config or a --config.* override)'.replace("\\'", "'")


if __name__ == '__main__':
  run()
