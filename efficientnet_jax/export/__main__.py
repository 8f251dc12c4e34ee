"""Command line: `python -m efficientnet_jax.export`, in two modes.

    # A training workdir -> a pretrained directory (EMA weights when kept, newest checkpoint):
    python -m efficientnet_jax.export --workdir=RUN --output=DIR [--weights=ema|raw] [--step=N]
    # A pretrained directory -> an artifact plus ARTIFACT.json:
    python -m efficientnet_jax.export --checkpoint=DIR --format=stablehlo|savedmodel|tflite|onnx \
        --output=PATH [--quantize=int8 --calibration=DIR_OF_IMAGES]

Exit status: 0 on success, 2 with the message alone for anything the user can fix (an unknown
format, a missing or mismatched checkpoint, an op the exporter cannot convert, int8 without
calibration images); `--traceback` shows the stack.
"""
from __future__ import annotations

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string('workdir', None, 'A training workdir to turn into a pretrained directory.')
  flags.DEFINE_string('checkpoint', None, 'A pretrained directory to export to --format.')
  flags.DEFINE_string('format', None, 'stablehlo, savedmodel, tflite or onnx (with --checkpoint).')
  flags.DEFINE_string('output', None, 'The pretrained directory (--workdir) or the artifact '
                      '(--checkpoint) to write; the artifact\'s metadata goes to OUTPUT.json.')
  flags.DEFINE_enum('weights', 'ema', ['ema', 'raw'], '--workdir: the EMA weights (taken when '
                    'the run keeps them, the default) or the raw ones.')
  flags.DEFINE_integer('step', None, '--workdir: the checkpoint step (default: the newest).')
  config_flags.DEFINE_config_file('config', None, '--workdir without config.json (runs from '
                                  'before it was recorded): the config that trained it.',
                                  lock_config=True)
  flags.DEFINE_enum('quantize', 'float32', ['float32', 'int8'], '--format=tflite: int8 '
                    'post-training quantisation (Lite family; needs --calibration).')
  flags.DEFINE_string('calibration', None, '--quantize=int8: a directory of images to calibrate '
                      'the activation ranges on.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --output.')
  flags.DEFINE_bool('traceback', False, 'Show the stack trace of errors the user can fix.')


def run(*, output: str | None, workdir: str | None = None, checkpoint: str | None = None,
        fmt: str | None = None, weights: str | None = None, step: int | None = None,
        config=None, quantize: str = 'float32', calibration: str | None = None,
        overwrite: bool = False, show_traceback: bool = False, out=None, err=None) -> int:
  """The command line's work; returns the exit status (2 with the message for user errors)."""
  from efficientnet_jax import errors, export  # pylint: disable=import-outside-toplevel
  out, err = out or sys.stdout, err or sys.stderr
  try:
    if bool(workdir) == bool(checkpoint):
      raise export.ExportError(
          'Give either --workdir=RUN (a training run -> a pretrained directory) or '
          '--checkpoint=DIR --format=F (a pretrained directory -> an artifact).')
    if not output:
      raise export.ExportError('--output is required: where to write.')
    if workdir:
      if fmt or calibration:
        raise export.ExportError(
            '--format and --calibration apply to --checkpoint exports; a --workdir export '
            'writes a pretrained directory. Export that next, with --checkpoint=OUTPUT.')
      path = export.workdir_to_pretrained(workdir, output, weights=weights, step=step,
                                          config=config, overwrite=overwrite)
      print(f'Wrote the pretrained directory {path}', file=out)
    else:
      if not fmt:
        raise export.ExportError(f'--format is required with --checkpoint: one of '
                                 f'{", ".join(export.FORMATS)}.')
      path = export.export_pretrained(checkpoint, fmt, output, quantize=quantize,
                                      calibration=calibration, overwrite=overwrite)
      print(f'Wrote {path} and its metadata {path}.json', file=out)
  except errors.UserError as e:
    if show_traceback:
      traceback.print_exc()
    print(f'error: {e}', file=err)
    return 2
  return 0


def main(argv):
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TF log every step at INFO
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  return run(output=FLAGS.output, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
             fmt=FLAGS.format, weights=FLAGS.weights if FLAGS['weights'].present else None,
             step=FLAGS.step, config=FLAGS.config, quantize=FLAGS.quantize,
             calibration=FLAGS.calibration, overwrite=FLAGS.overwrite,
             show_traceback=FLAGS.traceback)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
