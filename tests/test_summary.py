"""The summary CLI: JSON output, the --all table, and errors without tracebacks."""
import json
import os
import subprocess
import sys

import pytest

from efficientnet_jax import summary
from efficientnet_jax.models import VARIANTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'efficientnet_jax.summary', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def test_model_json_subprocess():
  proc = run_cli('--model=efficientnet-b0', '--json')
  assert proc.returncode == 0, proc.stderr
  row = json.loads(proc.stdout)
  assert row['params'] == 5_288_548
  assert row['published_params'] == 5_288_548
  assert row['resolution'] == 224
  assert row['madds'] == 385_814_752
  assert row['paper_madds'] == 390_000_000
  assert row['madds_ratio'] == pytest.approx(0.989, abs=1e-3)
  assert row['paper_top1'] == 77.1


def test_unknown_model_subprocess():
  proc = run_cli('--model=efficientnet-b9')
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert "Unknown model 'efficientnet-b9'" in proc.stderr
  assert "Did you mean 'efficientnet-b8'?" in proc.stderr
  for name in VARIANTS:
    assert name in proc.stderr
  assert proc.stdout == ''


def test_all_lists_every_variant(capsys):
  assert summary.main(['--all']) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[0].split() == ['model', 'res', 'params', 'published', 'madds', 'paper', 'ratio',
                              'top-1']
  rows = {line.split()[0]: line.split() for line in lines[2:2 + len(VARIANTS)]}
  assert list(rows) == list(VARIANTS)
  assert rows['efficientnet-b0'][1:] == ['224', '5,288,548', '5,288,548', '0.386B', '0.39B',
                                         '0.989', '77.1']
  assert rows['efficientnet-b7'][5] == '37B'
  assert rows['efficientnet-l2'][1] == '800'
  for name, spec in VARIANTS.items():
    ours, published = rows[name][2], rows[name][3]
    if spec.published_params:
      assert ours == published
    else:
      assert published == '-'


def test_all_json(capsys):
  assert summary.main(['--all', '--json']) == 0  # counts are cached from the table above
  rows = json.loads(capsys.readouterr().out)
  assert [r['model'] for r in rows] == list(VARIANTS)
  for r in rows:
    spec = VARIANTS[r['model']]
    assert r['resolution'] == spec.resolution
    assert r['published_params'] == spec.published_params
    if spec.published_params:
      assert r['params'] == spec.published_params
      assert r['madds_ratio'] == pytest.approx(1.0, abs=0.05)


def test_off_native_resolution_drops_paper_figures(capsys):
  assert summary.main(['--model=efficientnet-b2', '--json', '--resolution=64']) == 0
  row = json.loads(capsys.readouterr().out)
  # The paper's multiply-adds and top-1 are for 260 px; the parameters do not depend on size.
  assert row['resolution'] == 64 and row['native_resolution'] == 260
  assert row['paper_madds'] is None and row['madds_ratio'] is None and row['paper_top1'] is None
  assert row['params'] == row['published_params'] == 9_109_994


def test_single_model_text(capsys):
  assert summary.main(['--model', 'efficientnet-lite0', '--resolution', '256']) == 0
  out = capsys.readouterr().out
  assert 'efficientnet-lite0' in out and '256 px (native 224 px)' in out
  assert 'trainable params: 4,652,008' in out


def test_num_classes(capsys):
  assert summary.main(['--model=efficientnet-b0', '--num_classes=10', '--json']) == 0
  row = json.loads(capsys.readouterr().out)
  assert row['params'] == 5_288_548 - 1281 * 990
  assert row['published_params'] is None and row['paper_madds'] is None


@pytest.mark.parametrize('argv, message', [
    (['--model=efficientnet-b0x'], "Did you mean 'efficientnet-b0'?"),
    (['--model=efficientnet-b0', '--resolution=16'], 'too small'),
])
def test_errors_in_process(capsys, argv, message):
  assert summary.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err


@pytest.mark.parametrize('argv', [[], ['--model=efficientnet-b0', '--all'],
                                  ['--model=efficientnet-b0', '--resolution=0']])
def test_bad_arguments_exit_2(capsys, argv):
  with pytest.raises(SystemExit) as exc:
    summary.main(argv)
  assert exc.value.code == 2
