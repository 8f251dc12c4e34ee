"""The study machinery (efficientnet_jax.study): grid filter, reports and the resumable runner.

The runner's tests use a stand-in for `train.train_and_evaluate` (it records calls and returns
fixed metrics), so they check the bookkeeping in milliseconds; the studies' end-to-end tests
(test_compound_search.py, ...) run the real loop.
"""
from __future__ import annotations

import csv
import json
import math

import pytest

from efficientnet_jax import configs_lib
from efficientnet_jax.study import cli, grid, report, runner


# --- grid ---------------------------------------------------------------------------------------


def test_constraint_accepts_the_papers_coefficients():
  # 1.2 * 1.1**2 * 1.15**2 = 1.9203: 4% below 2.
  assert grid.satisfies_flops_constraint(1.2, 1.1, 1.15, target=2.0, tolerance=0.05)
  assert not grid.satisfies_flops_constraint(1.2, 1.1, 1.15, target=2.0, tolerance=0.03)


@pytest.mark.parametrize('alpha, beta, gamma, ok', [
    (2.0, 1.0, 1.0, True),      # depth only: exactly 2
    (1.0, math.sqrt(2), 1.0, True),  # width only
    (1.0, 1.0, 1.4, True),      # 1.96
    (1.0, 1.0, 1.0, False),     # 1x: not twice the FLOPs
    (4.0, 0.8, 0.9, False),     # 2.07, but beta, gamma < 1 are not allowed
    (1.3, 1.2, 1.2, False),     # 2.70
])
def test_constraint(alpha, beta, gamma, ok):
  assert grid.satisfies_flops_constraint(alpha, beta, gamma) is ok


def test_compound_grid_is_filtered_sorted_and_deduplicated():
  found = grid.compound_grid((1.0, 1.2, 2.0, 2.0), (1.0, 1.1, 1.4), (1.0, 1.15, 1.4))
  assert found == [(2.0, 1.0, 1.0), (1.0, 1.0, 1.4), (1.0, 1.4, 1.0), (1.2, 1.1, 1.15)]
  for a, b, g in found:
    assert abs(a * b**2 * g**2 / 2 - 1) <= 0.05


def test_frange_and_scale():
  assert grid.frange(1.0, 1.2, 0.05) == (1.0, 1.05, 1.1, 1.15, 1.2)
  # B0 at phi = 1 with the paper's coefficients; 224 * 1.15 = 257.6 -> 258 px.
  assert grid.scale(1.0, 1.0, 224, alpha=1.2, beta=1.1, gamma=1.15, phi=1) == (1.1, 1.2, 258)
  assert grid.scale(0.5, 0.25, 24, alpha=1.2, beta=1.1, gamma=1.15, phi=0) == (0.5, 0.25, 24)


# --- report -------------------------------------------------------------------------------------

ROWS = [{'name': 'a', 'madds': 1_500_000, 'top1': 0.5, 'note': 'x|y'},
        {'name': 'b', 'madds': 3_000_000, 'top1': None}]


def test_write_csv_round_trips(tmp_path):
  report.write_csv(tmp_path / 'out' / 't.csv', ROWS)
  with open(tmp_path / 'out' / 't.csv') as f:
    read = list(csv.DictReader(f))
  assert read == [{'name': 'a', 'madds': '1500000', 'top1': '0.5', 'note': 'x|y'},
                  {'name': 'b', 'madds': '3000000', 'top1': '', 'note': ''}]
  report.write_csv(tmp_path / 'c.csv', ROWS, columns=['top1', 'name'])
  assert (tmp_path / 'c.csv').read_text().splitlines()[0] == 'top1,name'


def test_write_markdown(tmp_path):
  text = report.write_markdown(tmp_path / 't.md', ROWS, ['name', 'madds', 'top1', 'note'],
                               title='T', formats={'top1': '{:.1%}'}, headers={'top1': 'top-1'})
  assert text == (tmp_path / 't.md').read_text()
  assert text.splitlines() == [
      '## T', '',
      '| name | madds | top-1 | note |',
      '|---|---:|---:|---|',
      '| a | 1,500,000 | 50.0% | x\\|y |',
      '| b | 3,000,000 | - | - |']


def test_plot_is_a_deterministic_png(tmp_path):
  series = {'width': [(1e6, 0.5), (2e6, 0.6)], 'depth': [(1.5e6, 0.55)]}
  for name in ('a.png', 'b.png'):
    report.plot_series(tmp_path / name, series, 'multiply-adds', 'top-1', logx=True,
                       annotate={'width': ['w=1', 'w=2']}, title='t')
  data = (tmp_path / 'a.png').read_bytes()
  assert data.startswith(b'\x89PNG') and len(data) > 5000
  assert data == (tmp_path / 'b.png').read_bytes()  # no timestamps or version strings


# --- runner -------------------------------------------------------------------------------------


class FakeTrain:
  """Stands in for train.train_and_evaluate: records calls, returns accuracy from the width."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    return None, {'eval/top1': round(config.width, 3), 'eval/top5': 1.0, 'eval/loss': 0.1}


def candidate(width, **labels):
  config = runner.scaled_config(configs_lib.quick_study_recipe(steps=2), width=width)
  return runner.Candidate(runner.network_name(config), config, labels)


def test_scaled_config_copies_and_stays_locked():
  base = configs_lib.quick_study_recipe()
  config = runner.scaled_config(base, width=1, resolution=30.4)
  assert (config.width, config.resolution, base.width) == (1.0, 30, 0.5)
  assert isinstance(config.width, float)
  with pytest.raises(AttributeError):
    runner.scaled_config(base, widht=1.0)
  assert runner.network_name(config) == 'efficientnet-b0-w1-d0.25-r30'


def test_measure_counts_the_built_network():
  cost = runner.measure(configs_lib.quick_study_recipe())
  wider = runner.measure(runner.scaled_config(configs_lib.quick_study_recipe(), width=1.0))
  assert 0 < cost['params'] < wider['params'] and 0 < cost['madds'] < wider['madds']


def test_runner_trains_once_and_resumes(tmp_path):
  fake = FakeTrain()
  points = [candidate(0.5, curve='width'), candidate(1.0, curve='width'),
            candidate(0.5, curve='depth')]  # the same network on two curves
  rows = runner.run_candidates(points, tmp_path, train_fn=fake)
  assert len(fake.calls) == 2  # the shared network trained once
  assert [r['curve'] for r in rows] == ['width', 'width', 'depth']
  assert [r['top1'] for r in rows] == [0.5, 1.0, 0.5]
  assert rows[0]['madds'] == rows[2]['madds'] > 0
  assert not any(r['cached'] for r in rows)
  saved = json.loads((tmp_path / points[1].name / runner.RESULT_FILE).read_text())
  assert saved['top1'] == 1.0 and saved['config']['width'] == 1.0

  rows_again = runner.run_candidates(points, tmp_path, train_fn=fake)
  assert len(fake.calls) == 2  # nothing retrained
  assert all(r['cached'] for r in rows_again)
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'cached'} for r in rs]
  assert strip(rows_again) == strip(rows)


def test_runner_refuses_a_result_from_another_recipe(tmp_path):
  fake = FakeTrain()
  runner.run_candidates([candidate(0.5)], tmp_path, train_fn=fake)
  changed = candidate(0.5)
  changed.config.learning_rate = 0.5
  with pytest.raises(ValueError, match='learning_rate'):
    runner.run_candidates([changed], tmp_path, train_fn=fake)
  logged_more = candidate(0.5)
  logged_more.config.log_every_steps = 1  # does not change the result: accepted
  assert runner.run_candidates([logged_more], tmp_path, train_fn=fake)[0]['cached']


def test_runner_rejects_one_name_for_two_configs(tmp_path):
  a, b = candidate(0.5), candidate(0.5)
  b.config.seed = 1
  with pytest.raises(ValueError, match='different configs'):
    runner.run_candidates([a, b], tmp_path, train_fn=FakeTrain())


def test_runner_measures_without_training(tmp_path):
  fake = FakeTrain()
  rows = runner.run_candidates([candidate(0.5)], tmp_path, train_model=False, train_fn=fake)
  assert not fake.calls and rows[0]['madds'] > 0 and 'top1' not in rows[0]
  assert not list(tmp_path.glob('*/result.json'))


def test_runner_logs_progress(tmp_path, caplog):
  caplog.set_level('INFO')
  # The absl logger's own level too: an earlier test in the same worker may have lowered absl's
  # verbosity (this test failed only after others, in the full suite).
  caplog.set_level('INFO', logger='absl')
  runner.run_candidates([candidate(0.5), candidate(1.0)], tmp_path, train_fn=FakeTrain())
  text = caplog.text
  assert '[1/2]' in text and '[2/2]' in text and 'ETA' in text and 'elapsed' in text


# --- study configs ------------------------------------------------------------------------------


@pytest.mark.parametrize('study', ['compound_search', 'single_dimension_scaling',
                                   'scale_baselines'])
def test_study_configs_load_locked_with_quick_and_overrides(study):
  path = cli.CONFIG_DIR / f'{study}.py'
  full = cli.load_config(path)
  quick = cli.load_config(path, 'quick', {'train.seed': 3})
  assert full.train.dataset == 'imagenet2012' and quick.train.dataset == 'digits'
  assert quick.train.seed == 3 and quick.train.batch_size % 8 == 0
  assert f'python experiments/{study}.py' in path.read_text()  # the launch command
  with pytest.raises(AttributeError):
    cli.load_config(path, overrides={'train.learnig_rate': 1.0})
  with pytest.raises(ValueError, match='quick'):
    cli.load_config(path, 'smoke')
