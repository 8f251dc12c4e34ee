"""experiments/compound_search.py: the FLOPs-ratio check on real networks and the quick study.

The quick study runs once per session as a user would (a subprocess with --quick); the rerun
that must skip every finished network runs in-process.
"""
from __future__ import annotations

import csv
import time

import pytest

from efficientnet_jax.study import cli
from study_support import (QUICK_TEST_ARGS, QUICK_TEST_OVERRIDES, load_experiment,
                           result_mtimes, run_quick, shared_xla_cache)
from efficientnet_jax.study.cli import CONFIG_DIR

compound_search = load_experiment('compound_search')


def paper_only_config(**overrides):
  """The full-scale config (B0, 224 px, ImageNet's 1000 classes) with a one-point grid."""
  return cli.load_config(CONFIG_DIR / 'compound_search.py', overrides={
      'alphas': (1.2,), 'betas': (1.1,), 'gammas': (1.15,), **overrides})


def test_real_flops_ratio_is_not_the_formulas():
  # B0 scaled by the paper's (1.2, 1.1, 1.15) at phi = 1: the formula says 1.92x. The built
  # network (258 px, repeats ceil(1.2 * r) = 2, 3, 3, 4, 4, 5, 2 instead of 1, 2, 2, 3, 3, 4, 1,
  # channels rounded to multiples of 8) costs about 2.57x B0's 0.386B multiply-adds.
  (candidate,), dropped = compound_search.search_candidates(paper_only_config())
  assert not dropped
  labels = candidate.labels
  assert labels['flops_ratio_formula'] == pytest.approx(1.9203, abs=1e-4)
  assert 2.45 < labels['flops_ratio_real'] < 2.7
  assert (candidate.config.width, candidate.config.depth, candidate.config.resolution) == (
      1.1, 1.2, 258)


def test_filter_on_real_flops_drops_what_rounding_pushes_out():
  candidates, dropped = compound_search.search_candidates(
      paper_only_config(filter_on_real_flops=True))
  assert not candidates and len(dropped) == 1 and dropped[0]['alpha'] == 1.2


def test_rank_orders_by_accuracy_then_cost():
  rows = [{'name': 'a', 'top1': 0.5, 'madds': 2}, {'name': 'b', 'top1': 0.7, 'madds': 3},
          {'name': 'c', 'top1': 0.5, 'madds': 1}]
  assert [(r['rank'], r['name']) for r in compound_search.rank(rows)] == [
      (1, 'b'), (2, 'c'), (3, 'a')]


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


# One test for the run and its rerun: under pytest-xdist a module fixture shared by two tests
# could be built once per worker, training everything twice.
@pytest.mark.slow
def test_quick_study_end_to_end_then_resumed(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('compound_search')
  seconds, output = run_quick('compound_search', workdir, shared_xla_cache(tmp_path_factory),
                                   *QUICK_TEST_ARGS)
  for name in ('search.csv', 'search.md', 'search.png', 'scaling.csv', 'scaling.md',
               'scaling.png'):
    assert (workdir / name).stat().st_size > 0, name
  search = read_csv(workdir / 'search.csv')
  assert [r['rank'] for r in search] == ['baseline', '1', '2', '3']
  assert sorted((r['alpha'], r['beta'], r['gamma']) for r in search[1:]) == [
      ('1.0', '1.0', '1.4'), ('1.2', '1.1', '1.15'), ('2.0', '1.0', '1.0')]
  top1 = [float(r['top1']) for r in search[1:]]
  assert top1 == sorted(top1, reverse=True) and all(0 <= t <= 1 for t in top1)
  for row in search[1:]:
    assert 1.9 < float(row['flops_ratio_formula']) < 2.1
    assert float(row['flops_ratio_real']) > 1.0
  scaling = read_csv(workdir / 'scaling.csv')
  assert [r['phi'] for r in scaling] == ['0.0', '1.0', '2.0']
  madds = [int(r['madds']) for r in scaling]
  assert madds == sorted(madds) and madds[0] == int(search[0]['madds'])
  # The winner at phi = 1 is a step-1 network and phi = 0 the baseline, each trained once:
  # 3 candidates + the baseline + phi = 2.
  mtimes = result_mtimes(workdir)
  assert len(mtimes) == 5
  assert 'not retrained' in output

  # The rerun (in-process) reads every result back and rewrites identical tables and plots.
  outputs = {n: (workdir / n).read_bytes() for n in ('search.csv', 'search.md', 'search.png')}
  config = cli.load_config(CONFIG_DIR / 'compound_search.py', 'quick', QUICK_TEST_OVERRIDES)
  start = time.time()
  results = compound_search.run(config, str(workdir))
  rerun_seconds = time.time() - start
  assert all(r['cached'] for r in results['search'] + results['baseline'] + results['scaling'])
  assert result_mtimes(workdir) == mtimes
  assert rerun_seconds < seconds / 3
  assert {n: (workdir / n).read_bytes() for n in outputs} == outputs
