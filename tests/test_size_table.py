"""experiments/size_table.py: the rows beside the paper's Table 2, and --quick end to end."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

from support import ROOT, subprocess_env


def load_script(name):
  spec = importlib.util.spec_from_file_location(f'_experiment_{name}',
                                                ROOT / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


size_table = load_script('size_table')


def test_rows_beside_the_paper():
  rows = size_table.size_rows(['efficientnet-b0', 'resnet-50'])
  b0, resnet, gpipe = rows
  assert b0 == {'model': 'efficientnet-b0', 'resolution': 224, 'params': 5_288_548,
                'paper_params': 5.3e6, 'madds': 385_814_752, 'paper_madds': 0.39e9,
                'madds_ratio': pytest.approx(0.989, abs=1e-3), 'paper_top1': 77.1}
  assert (resnet['params'], resnet['paper_params'], resnet['paper_top1']) == (25_557_032, 26e6,
                                                                              76.0)
  assert gpipe == {'model': 'gpipe (paper only)', 'paper_params': 557e6, 'paper_top1': 84.3}
  assert len(size_table.size_rows(['efficientnet-b0'], gpipe_row=False)) == 1


def test_plot_series_split_efficientnets_from_the_rest():
  rows = [{'model': 'efficientnet-b0', 'params': 5e6, 'madds': 4e8, 'paper_top1': 77.1},
          {'model': 'efficientnet-b1', 'params': 8e6, 'madds': 7e8, 'paper_top1': 79.1},
          {'model': 'resnet-101', 'params': 4e7, 'madds': 8e9, 'paper_top1': None},
          dict(size_table.GPIPE)]
  series, labels = size_table.plot_series_of(rows, 'params')
  assert series == {'EfficientNet': [(5e6, 77.1), (8e6, 79.1)],
                    'gpipe (paper only)': [(557e6, 84.3)]}  # no top-1, no point
  assert labels == {'EfficientNet': ['B0', 'B1']}
  series, _ = size_table.plot_series_of(rows, 'madds')
  assert 'gpipe (paper only)' not in series  # no published multiply-adds


def run_script(*args):
  return subprocess.run([sys.executable, str(ROOT / 'experiments' / 'size_table.py'), *args],
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_quick_end_to_end_is_deterministic(tmp_path):
  proc = run_script(f'--workdir={tmp_path}', '--quick')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'size_table.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['model'] for r in rows] == ['efficientnet-b0', 'efficientnet-b1', 'resnet-50',
                                        'gpipe (paper only)']
  assert rows[0]['params'] == '5288548' and rows[2]['madds'] == '4089184256'
  table = (tmp_path / 'size_table.md').read_text()
  assert '| efficientnet-b1 | 240 | 7.8M | 7.8M | 0.687B | 0.70B | 0.981 | 79.1 |' in table
  assert table in proc.stdout
  for png in ('size_params.png', 'size_madds.png'):
    assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # Rewriting the same rows gives the same bytes (no timestamps anywhere).
  before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
  size_table.write_outputs(size_table.size_rows(['efficientnet-b0', 'efficientnet-b1',
                                                 'resnet-50']), str(tmp_path))
  assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


def test_unknown_model_is_a_usage_error(tmp_path):
  proc = run_script(f'--workdir={tmp_path}', '--config.models=("resnet50",)')
  assert proc.returncode == 1
  assert "Unknown model 'resnet50'. Did you mean 'resnet-50'?" in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)
