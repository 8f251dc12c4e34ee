"""Command-line plumbing shared by the study scripts in `experiments/`.

Every study takes the same flags:

    --config=configs/experiments/<study>.py[:quick]   the study's config (locked: typos raise)
    --config.<field>=...                  overrides, e.g. --config.train.num_epochs=30
    --workdir=DIR                         results, plots and one directory per trained candidate
    --quick                               the same as appending ':quick' to --config: the study
                                          shrunk to run on the offline digits in minutes on a CPU

    from efficientnet_jax.study import cli
    cli.define_flags('compound_search')
    def main(argv):
      config, workdir = cli.parse(argv)
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

__all__ = ['CONFIG_DIR', 'define_flags', 'load_config', 'parse', 'run']

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'experiments'


def run(main_fn) -> None:
  """`app.run(main_fn)` for a study. A preemption notice (SIGTERM) saves the running candidate's
  checkpoint and ends the study with status 0; the same command resumes it."""
  def main(argv):
    from efficientnet_jax import launch, preemption  # pylint: disable=import-outside-toplevel
    try:
      return main_fn(argv)
    except preemption.Preempted as e:
      launch.exit_now(0, f'{e}; rerun the same command to resume the study.')
  app.run(main)


def define_flags(study: str) -> None:
  """Defines --config (default configs/experiments/<study>.py), --workdir and --quick."""
  config_flags.DEFINE_config_file(
      'config', str(CONFIG_DIR / f'{study}.py'),
      f'Study configuration file (default configs/experiments/{study}.py; append :quick for the '
      'small offline version).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for results, plots and one subdirectory per '
                      'trained network (local or gs://). Rerunning resumes.')
  flags.DEFINE_bool('quick', False, 'Run the quick version (the config file\'s :quick argument): '
                    'tiny networks on the offline digits, minutes on a CPU.')
  flags.mark_flag_as_required('workdir')


def load_config(path: str | os.PathLike, arg: str | None = None,
                overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Imports a config file by path (configs/ is not a package), calls get_config(arg) and applies
  dotted overrides such as {'train.num_epochs': 30}. The result is locked."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f'_study_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  for dotted, value in (overrides or {}).items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    setattr(node, leaf, value)  # locked: a mistyped field raises
  return config


def parse(argv) -> tuple[ml_collections.ConfigDict, str]:
  """The config (with :quick applied when --quick) and the workdir from the parsed flags."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  filename = config_flags.get_config_filename(flags.FLAGS['config'])
  path, _, arg = str(filename).partition(':')
  quick = flags.FLAGS.quick or arg == 'quick'
  if flags.FLAGS.quick and arg != 'quick':
    if arg:
      raise app.UsageError(f'--quick cannot be combined with the config argument {arg!r}.')
    config = load_config(path, 'quick', config_flags.get_override_values(flags.FLAGS['config']))
  logging.info('Study config%s:\n%s', ' (quick)' if quick else '', config)
  return config, flags.FLAGS.workdir
