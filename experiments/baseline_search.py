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

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

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


def algorithms_of(name: str) -> tuple[str, ...]:
  return ALGORITHM_CHOICES[:3] if name == 'all' else (name,)


def run(config, workdir: str, *, storage_url: str | None = None, algorithm: str = 'ppo',
        quick: bool = False, train: bool = True, train_fn=None) -> list[dict]:
  """Runs one worker of each algorithm's search, then writes the reports; returns the ranked
  leaderboard rows (every algorithm with a search in the store)."""
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
    for name in algorithms_of(algorithm):
      driver.run_worker(searches[name], train_fn=train_fn)
  stored = set(driver.study_names(storage))
  finished = [(s, driver.finished_trials(s.study)) for name, s in searches.items()
              if s.name in stored]
  return results.write_reports(workdir, [(s, t) for s, t in finished if t], quick=quick)


def main(argv):
  config, workdir = cli.parse(argv)
  filename = str(config_flags.get_config_filename(flags.FLAGS['config']))
  quick = flags.FLAGS.quick or filename.endswith(':quick')
  rows = run(config, workdir, storage_url=flags.FLAGS.storage,
             algorithm=flags.FLAGS.algorithm, quick=quick, train=not flags.FLAGS.report_only)
  if rows:
    print(epath.Path(workdir, 'leaderboard.md').read_text())
    print(f'Best network: {epath.Path(workdir, results.BEST_CONFIG_FILE)}')


if __name__ == '__main__':
  cli.define_flags('baseline_search')
  app.run(main)
