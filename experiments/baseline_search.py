"""The baseline search (Tan & Le 2019, section 4): how EfficientNet-B0 was found, rerunnable.

    python experiments/baseline_search.py --quick --workdir=/tmp/baseline_search
    python experiments/baseline_search.py --quick --algorithm=all --workdir=/tmp/bs_all
    python experiments/baseline_search.py --workdir=gs://BUCKET/baseline_search \
        --storage=postgresql://USER:PASSWORD@HOST/search --algorithm=ppo   # one per worker

MnasNet's factorised space (`efficientnet_jax/search/space.py`), the paper's objective
ACC x (MAdds / T)^w with T = 400M at 224 px and w = -0.07 (`search/objective.py`), and three
algorithms (`search/algorithms.py`): MnasNet's PPO controller, regularized evolution and random
search. Workers share one Optuna store (`--storage`; by default an SQLite file in the workdir):
run this command on as many processes or hosts as you like, each trains candidates until the
budget (`--config.num_candidates`) is finished. Each candidate trains `config.train`'s recipe
through `study/runner.py` in `<workdir>/<algorithm>/candidates/<network>/`.

Writes under --workdir: leaderboard.csv / leaderboard.md, pareto.png (top-1 against
multiply-adds, the Pareto front and curves of equal reward), progress.png (reward against the
number of candidates, per algorithm) and best_architecture.py, the best network as block strings
in a config file that compound_search.py takes:

    python experiments/compound_search.py --config=/tmp/baseline_search/best_architecture.py \
        --workdir=/tmp/compound_search_searched

Rerunning resumes: finished candidates are in the store, an interrupted one continues from its
checkpoint. `--report_only` rewrites the reports from the store without training.
"""
from __future__ import annotations

from efficientnet_jax import allocator

if __name__ == '__main__':  # before the heavy imports below, which would otherwise run twice
  allocator.reexec_with_tcmalloc()

import os
import subprocess
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from efficientnet_jax import errors
from efficientnet_jax.search import driver, results
from efficientnet_jax.study import cli

ALGORITHM_CHOICES = ('ppo', 'evolution', 'random', 'all')

flags.DEFINE_string('storage', None, 'The shared store: an Optuna RDB URL every worker reaches '
                    '(postgresql://..., mysql://..., sqlite:////abs/path.db). Default: an SQLite '
                    'file search.db in a local --workdir.')
flags.DEFINE_enum('algorithm', 'ppo', ALGORITHM_CHOICES, 'Which search to run: MnasNet\'s PPO '
                  'controller, regularized evolution, random search, or all three in turn on the '
                  'same budget and space.')
flags.DEFINE_bool('report_only', False, 'Write the reports from the store; train nothing.')
flags.DEFINE_integer('workers', 1, 'Worker processes on this machine: this one and N - 1 that it '
                     'starts with the same flags (their logs in <workdir>/logs/). Not on a TPU '
                     'VM, whose chips belong to one process: there, start one per host. With '
                     '--quick and a local --workdir the default is 2 where the machine has 2 or '
                     'more cores: a tiny candidate\'s run is mostly its compile, which uses about '
                     'one core.')
flags.DEFINE_bool('reports', True, 'Write the reports when this worker is done (the workers that '
                  '--workers starts leave them to it).')


def algorithms_of(name: str) -> tuple[str, ...]:
  return ALGORITHM_CHOICES[:3] if name == 'all' else (name,)


def _is_local(workdir: str) -> bool:
  return '://' not in str(workdir)


def start_local_workers(count: int, workdir: str) -> list[subprocess.Popen]:
  """Starts `count` more workers of this command on this machine, logging to workdir/logs/."""
  if not _is_local(workdir):
    raise errors.ConfigError('--workers needs a local --workdir for the workers\' logs; on a '
                             'cluster start one worker per host instead.')
  args = [a for a in sys.argv[1:] if not a.lstrip('-').startswith(('workers', 'reports',
                                                                      'noreports'))]
  os.makedirs(os.path.join(workdir, 'logs'), exist_ok=True)
  workers = []
  for k in range(1, count + 1):
    with open(os.path.join(workdir, 'logs', f'worker-{k}.log'), 'w') as log:
      workers.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), *args, '--workers=1', '--noreports'],
          stdout=log, stderr=subprocess.STDOUT))
  return workers


def run(config, workdir: str, *, storage_url: str | None = None, algorithm: str = 'ppo',
        quick: bool = False, train: bool = True, train_fn=None, reports: bool = True,
        workers: int = 1) -> list[dict]:
  """Runs one worker of each algorithm's search (and `workers - 1` more in subprocesses), then
  writes the reports; returns the ranked leaderboard rows (every algorithm in the store)."""
  storage = driver.open_storage(storage_url or driver.default_storage_url(workdir),
                                config.workers.heartbeat_seconds, config.workers.grace_seconds,
                                config.workers.max_retries)
  searches = {name: driver.build_search(config, workdir, storage, name)
              for name in ALGORITHM_CHOICES[:3]}
  logging.info('Search space: %d choice vectors over %d decisions; T = %s.',
               searches['ppo'].space.size,
               sum(n > 1 for n in searches['ppo'].space.option_counts),
               searches['ppo'].target_note)
  if train:
    others = start_local_workers(workers - 1, workdir) if workers > 1 else []
    for name in algorithms_of(algorithm):
      driver.run_worker(searches[name], train_fn=train_fn)
    failed = [k for k, worker in enumerate(others, 1) if worker.wait() != 0]
    if failed:
      raise RuntimeError(f'Worker(s) {failed} failed; see {workdir}/logs/worker-<k>.log.')
  if not reports:
    return []
  stored = set(driver.study_names(storage))
  finished = [(s, driver.finished_trials(s.study)) for name, s in searches.items()
              if s.name in stored]
  return results.write_reports(workdir, [(s, t) for s, t in finished if t], quick=quick)


def main(argv):
  config, workdir = cli.parse(argv)
  filename = str(config_flags.get_config_filename(flags.FLAGS['config']))
  quick = flags.FLAGS.quick or filename.endswith(':quick')
  workers = flags.FLAGS.workers
  if quick and not flags.FLAGS['workers'].present and _is_local(workdir):
    workers = min(2, os.cpu_count() or 1)
  rows = run(config, workdir, storage_url=flags.FLAGS.storage,
             algorithm=flags.FLAGS.algorithm, quick=quick, train=not flags.FLAGS.report_only,
             reports=flags.FLAGS.reports, workers=workers)
  if rows:
    print(epath.Path(workdir, 'leaderboard.md').read_text())
    print(f'Best network: {epath.Path(workdir, results.BEST_CONFIG_FILE)}')


if __name__ == '__main__':
  cli.define_flags('baseline_search')
  cli.run(main)
