"""experiments/baseline_search.py end to end: the store, the reports, and the best network as a
config that create_model and experiments/compound_search.py take (the search -> compound search
-> scaled family pipeline).

The default-suite test runs the real script's `run` in-process with a stand-in for training (an
accuracy that is a fixed function of the network; multiply-adds and parameters are counted for
real). The slow tests run `--quick` as a user would, training every candidate.
"""
from __future__ import annotations

import csv
import importlib.util
import zlib

import pytest

from efficientnet_jax import complexity
from efficientnet_jax.models import create_model
from efficientnet_jax.search import driver, results
from efficientnet_jax.study import cli
from study_support import (QUICK_TEST_ARGS, load_experiment, run_quick, shared_xla_cache)

pytest.importorskip('optuna', reason="the search's shared store needs the 'search' extra: "
                    "pip install -e '.[search]'")

baseline_search = load_experiment('baseline_search')
compound_search = load_experiment('compound_search')
BUDGET = 5


def quick_config(**overrides):
  return cli.load_config(cli.CONFIG_DIR / 'baseline_search.py', 'quick',
                         {'num_candidates': BUDGET, **overrides})


class StandIn:
  """Training's stand-in: top-1 from a hash of the block table; counts its calls."""

  def __init__(self):
    self.calls = 0

  def __call__(self, config, workdir):
    self.calls += 1
    return None, {'eval/top1': 0.5 + zlib.crc32(' '.join(config.blocks).encode()) % 500 / 1000}


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def load_module(path):
  spec = importlib.util.spec_from_file_location('_searched_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_three_algorithms_reports_best_config_and_resume(tmp_path):
  workdir = str(tmp_path)
  train = StandIn()
  ranked = baseline_search.run(quick_config(), workdir, algorithm='all', quick=True,
                               train_fn=train)
  assert train.calls == 3 * BUDGET
  rows = read_csv(tmp_path / 'leaderboard.csv')
  assert [r['rank'] for r in rows] == [str(i) for i in range(1, 3 * BUDGET + 1)]
  assert sorted({r['algorithm'] for r in rows}) == ['evolution', 'ppo', 'random']
  rewards = [float(r['reward']) for r in rows]
  assert rewards == sorted(rewards, reverse=True)
  for name in ('leaderboard.md', 'pareto.png', 'progress.png', results.BEST_CONFIG_FILE):
    assert (tmp_path / name).stat().st_size > 0, name
  assert 'T = 18.37M multiply-adds at 24 px: 400M at 224 px x (48/224)^2' in (
      tmp_path / 'leaderboard.md').read_text()

  # The best network as a config: create_model builds it, compound_search scales it.
  best = ranked[0]
  module = load_module(tmp_path / results.BEST_CONFIG_FILE)
  assert ' '.join(module.BLOCK_STRINGS) == best['blocks']
  model = create_model('efficientnet-b0', num_classes=10, blocks=module.BLOCK_STRINGS,
                       width=0.5, depth=0.25, stem_stride=1)
  assert complexity.model_complexity(model, 24)['params'] == best['params']
  config = cli.load_config(tmp_path / results.BEST_CONFIG_FILE)  # quick by default
  assert config.train.blocks == module.BLOCK_STRINGS and config.train.resolution == 24
  candidates, _ = compound_search.search_candidates(config)
  assert candidates and all(c.config.blocks == module.BLOCK_STRINGS for c in candidates)
  assert all(c.name.startswith('efficientnet-b0-blocks') for c in candidates)
  assert cli.load_config(tmp_path / results.BEST_CONFIG_FILE, 'quick').train.blocks == (
      module.BLOCK_STRINGS)

  # Rerunning trains nothing and rewrites identical reports; so does --report_only.
  before = {n: (tmp_path / n).read_bytes() for n in ('leaderboard.csv', 'pareto.png')}
  again = StandIn()
  baseline_search.run(quick_config(), workdir, algorithm='all', quick=True, train_fn=again)
  baseline_search.run(quick_config(), workdir, algorithm='ppo', quick=True, train=False)
  assert again.calls == 0
  assert {n: (tmp_path / n).read_bytes() for n in before} == before

  # A larger budget continues the same search; another objective is refused.
  more = StandIn()
  baseline_search.run(quick_config(num_candidates=BUDGET + 1), workdir, algorithm='random',
                      quick=True, train_fn=more)
  assert more.calls == 1
  with pytest.raises(driver.SearchStoreError, match=r"another setup \(w: store -0.07, config "
                                                    r"-0.1\).*new --workdir"):
    baseline_search.run(quick_config(**{'objective.w': -0.1}), workdir, algorithm='random',
                        quick=True, train_fn=StandIn())


def test_config_errors_name_the_fix(tmp_path):
  storage = driver.open_storage(driver.default_storage_url(str(tmp_path)))
  with pytest.raises(driver.errors.ConfigError, match="Unknown config.space.reference 'b0'"):
    driver.build_search(quick_config(**{'space.reference': 'b0'}), str(tmp_path), storage, 'ppo')
  with pytest.raises(driver.errors.ConfigError, match=r"config.space: Unknown decision"):
    driver.build_search(quick_config(**{'space.decisions': ('kernel',)}), str(tmp_path),
                        storage, 'ppo')
  with pytest.raises(driver.errors.ConfigError, match="form 'latency'"):
    driver.build_search(quick_config(**{'objective.form': 'latency'}), str(tmp_path), storage,
                        'ppo')
  with pytest.raises(driver.errors.ConfigError, match='must be an EfficientNet'):
    driver.build_search(quick_config(**{'train.model': 'resnet-50'}), str(tmp_path), storage,
                        'ppo')
  with pytest.raises(driver.errors.ConfigError, match='--storage=URL'):
    driver.default_storage_url('gs://bucket/search')


def test_local_workers_rerun_this_command(tmp_path, monkeypatch):
  started = []
  monkeypatch.setattr(baseline_search.subprocess, 'Popen',
                      lambda args, **kw: started.append(args) or 'process')
  monkeypatch.setattr(baseline_search.sys, 'argv', [
      'baseline_search.py', '--quick', '--workers=3', f'--workdir={tmp_path}', '--noreports'])
  assert baseline_search.start_local_workers(2, str(tmp_path)) == ['process'] * 2
  for args in started:
    assert args[2:] == ['--quick', f'--workdir={tmp_path}', '--workers=1', '--noreports']
  assert (tmp_path / 'logs' / 'worker-2.log').exists()
  with pytest.raises(driver.errors.ConfigError, match='one worker per host'):
    baseline_search.start_local_workers(1, 'gs://bucket/search')


def test_pareto_front_and_plots_in_both_forms(tmp_path):
  row = lambda algorithm, order, madds, top1: {
      'algorithm': algorithm, 'order': order, 'madds': madds, 'top1': top1, 'reward': top1}
  rows = [row('ppo', 1, 1e6, 0.5), row('ppo', 2, 2e6, 0.7), row('random', 1, 3e6, 0.6),
          row('random', 2, 1.5e6, 0.4), row('ppo', 3, 1e6, 0.45)]
  assert [(r['madds'], r['top1']) for r in results.pareto_front(rows)] == [(1e6, 0.5), (2e6, 0.7)]
  for form in ('soft', 'hard'):
    results.plot_pareto(tmp_path / f'{form}.png', rows, 1.8e6, -0.07, form)
    assert (tmp_path / f'{form}.png').stat().st_size > 0
  # An equal-reward curve in the hard form is flat up to T and falls as T / MAdds above it.
  curve = results._reward_curve(0.6, (1e6, 4e6), 2e6, -0.07, 'hard', points=3)
  assert [(pytest.approx(m), pytest.approx(a)) for m, a in curve] == [
      (1e6, 0.6), (2e6, 0.6), (4e6, 1.2)]
  results.plot_progress(tmp_path / 'progress.png', rows)
  assert (tmp_path / 'progress.png').stat().st_size > 0


def test_a_preempted_candidate_stops_the_worker_and_is_retried(tmp_path):
  """SIGTERM during a candidate (train raises Preempted after saving): the worker stops instead
  of counting a failed network and going on, and the rerun trains that candidate again."""
  from efficientnet_jax import preemption
  workdir = str(tmp_path)

  class PreemptedOnThird(StandIn):
    def __call__(self, config, workdir):
      if self.calls == 2:
        self.calls += 1
        raise preemption.Preempted(7, workdir)
      return super().__call__(config, workdir)

  first = PreemptedOnThird()
  with pytest.raises(preemption.Preempted):
    baseline_search.run(quick_config(), workdir, algorithm='random', quick=True, train_fn=first)
  assert first.calls == 3
  rest = StandIn()
  rows = baseline_search.run(quick_config(), workdir, algorithm='random', quick=True,
                             train_fn=rest)
  assert rest.calls == BUDGET - 2 and len(rows) == BUDGET


@pytest.mark.slow
def test_quick_search_then_compound_search_of_its_best(tmp_path_factory):
  # The quick mode as shipped (PPO), each candidate trained for the test's 10 steps; then the
  # compound-scaling search of the network it found (step 1 and phi = 0..2).
  cache = shared_xla_cache(tmp_path_factory)
  workdir = tmp_path_factory.mktemp('baseline_search')
  _, output = run_quick('baseline_search', workdir, cache, *QUICK_TEST_ARGS)
  rows = read_csv(workdir / 'leaderboard.csv')
  assert len(rows) == 12 and {r['algorithm'] for r in rows} == {'ppo'}
  assert all(0 <= float(r['top1']) <= 1 for r in rows)
  best = workdir / results.BEST_CONFIG_FILE
  assert 'Best network' in output
  scaled = tmp_path_factory.mktemp('compound_of_searched')
  run_quick('compound_search', scaled, cache, f'--config={best}', *QUICK_TEST_ARGS)
  scaling = read_csv(scaled / 'scaling.csv')
  assert [r['phi'] for r in scaling] == ['0.0', '1.0', '2.0']
  assert all('blocks' in r['name'] for r in scaling)


@pytest.mark.slow
def test_quick_all_algorithms(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('baseline_search_all')
  run_quick('baseline_search', workdir, shared_xla_cache(tmp_path_factory), '--algorithm=all',
            *QUICK_TEST_ARGS)
  rows = read_csv(workdir / 'leaderboard.csv')
  assert sorted(r['algorithm'] for r in rows) == ['evolution'] * 12 + ['ppo'] * 12 + [
      'random'] * 12
