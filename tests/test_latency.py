"""experiments/latency.py: the speedup arithmetic, and --quick end to end (tiny inputs)."""
import csv
import importlib.util
import subprocess
import sys

import pytest

from support import ROOT, subprocess_env


def load_by_path(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


latency = load_by_path(ROOT / 'experiments' / 'latency.py', '_experiment_latency')


def test_speedup_is_the_ratio_of_medians():
  # The paper's Table 4: 0.554 s / 0.098 s = 5.65x (it prints 5.7x).
  assert latency.speedup(0.098, 0.554) == pytest.approx(5.653, abs=1e-3)
  fast = latency.latency_stats([0.1, 0.3, 0.2, 5.0])   # one outlier run
  slow = latency.latency_stats([1.0, 0.9, 1.1])
  assert fast == {'runs': 4, 'median_s': pytest.approx(0.25), 'mean_s': pytest.approx(1.4),
                  'min_s': 0.1}
  assert slow['median_s'] == 1.0
  # The median ignores the outlier; a ratio of means would give 0.71x.
  assert latency.speedup(fast['median_s'], slow['median_s']) == pytest.approx(4.0)


@pytest.mark.parametrize('call, message', [
    (lambda: latency.latency_stats([]), 'needs at least one timed call'),
    (lambda: latency.speedup(0.0, 1.0), 'Latencies must be positive; got fast=0.0'),
])
def test_arithmetic_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_models_of_keeps_order_once():
  assert latency.models_of([('a', 'b'), ('c', 'b'), ('a', 'd')]) == ['a', 'b', 'c', 'd']


def config_with(**fields):
  """configs/experiments/latency.py with some fields replaced."""
  config = load_by_path(ROOT / 'configs' / 'experiments' / 'latency.py',
                        '_configs_latency').get_config()
  for key, value in fields.items():
    setattr(config, key, value)
  return config


@pytest.mark.parametrize('pairs, message', [
    ((('efficientnet-b0',),), r"holds \(fast, slow\) model pairs; got \('efficientnet-b0',\)"),
    ((('efficientnet-b0', 'resnet50'),), "Unknown model 'resnet50'. Did you mean 'resnet-50'"),
])
def test_bad_pairs_fail_before_timing(tmp_path, pairs, message):
  with pytest.raises(ValueError, match=message):
    latency.run_study(config_with(pairs=pairs), str(tmp_path), log=lambda _: None)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('conv_impls', [(), ('cpu', 'gpu')])
def test_bad_conv_impls_fail_before_timing(tmp_path, conv_impls):
  with pytest.raises(ValueError, match=r"config.conv_impls must name one or more of \('auto', "
                                       r"'cpu', 'xla'\)"):
    latency.run_study(config_with(conv_impls=conv_impls), str(tmp_path), log=lambda _: None)
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / 'latency.py'), f'--workdir={tmp_path}',
       '--quick'], env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'latency.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['model'], r['resolution'], r['conv_impl'], r['runs'], r['cpus']) for r in rows] == [
      ('efficientnet-b0', '32', 'auto', '5', '1'),
      ('resnet-50', '32', 'auto', '5', '1')]  # each pinned to one core
  b0, resnet = (float(r['median_s']) for r in rows)
  assert b0 > 0 and resnet > 0
  assert f'efficientnet-b0 is {resnet / b0:.2f}x faster than resnet-50' in proc.stdout
  table = (tmp_path / 'latency.md').read_text()
  assert '| efficientnet-b0 | resnet-50 |' in table and 'B7 vs GPipe' in table
  assert (tmp_path / 'latency.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
