"""The paper's Table 2 and Figure 1: parameters and multiply-adds of EfficientNet-B0..B7 beside
ResNet-50/152 and GPipe, with the paper's figures next to ours.

    python experiments/size_table.py --workdir=/tmp/size_table [--quick]

Writes under --workdir: `size_table.md` and `size_table.csv` (one row per model), and two
log-scale plots against the paper's ImageNet top-1: `size_params.png` (Figure 1) and
`size_madds.png` (Figure 5). Nothing runs on a device: parameters come from `jax.eval_shape`
and multiply-adds from the traced forward pass (`efficientnet_jax.complexity`), so the output
is the same on every machine. GPipe (AmoebaNet-B, 557M parameters; the EfficientNet paper's
Figure 1 prints 556M) has no model here: its row is the published figures only.
Settings: configs/experiments/size_table.py (`--config.models=...` overrides them).
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from efficientnet_jax.complexity import model_complexity
from efficientnet_jax.models import get_variant
from efficientnet_jax.study import report

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Table 2 of the paper rounds parameters to two significant figures; our exact counts (and the
# official ones, `VariantSpec.published_params`) are beside them. The paper's multiply-adds and
# top-1 come from each `VariantSpec`.
PAPER_PARAMS = {
    'efficientnet-b0': 5.3e6, 'efficientnet-b1': 7.8e6, 'efficientnet-b2': 9.2e6,
    'efficientnet-b3': 12e6, 'efficientnet-b4': 19e6, 'efficientnet-b5': 30e6,
    'efficientnet-b6': 43e6, 'efficientnet-b7': 66e6, 'resnet-50': 26e6, 'resnet-152': 60e6,
}
GPIPE = {'model': 'gpipe (paper only)', 'paper_params': 557e6, 'paper_top1': 84.3}
COLUMNS = ('model', 'resolution', 'params', 'paper_params', 'madds', 'paper_madds',
           'madds_ratio', 'paper_top1')


def size_row(name: str) -> dict:
  """Our counts for one model at its native resolution, with the paper's figures beside them."""
  spec = get_variant(name)
  ours = model_complexity(name)
  return {
      'model': name,
      'resolution': ours['resolution'],
      'params': ours['params'],
      'paper_params': PAPER_PARAMS.get(name),
      'madds': ours['madds'],
      'paper_madds': spec.paper_madds,
      'madds_ratio': ours['madds'] / spec.paper_madds if spec.paper_madds else None,
      'paper_top1': spec.paper_top1,
  }


def size_rows(models, gpipe_row: bool = True) -> list[dict]:
  rows = [size_row(name) for name in models]
  if gpipe_row:
    rows.append(dict(GPIPE))
  return rows


def _millions(value):
  return f'{value / 1e6:.1f}M'


def _paper_millions(value):
  """The paper's precision: 5.3M, 26M, 557M."""
  millions = value / 1e6
  return f'{millions:.1f}M' if millions < 10 else f'{millions:.0f}M'


def _billions(value):
  return f'{value / 1e9:.3f}B' if value < 10e9 else f'{value / 1e9:.1f}B'


def _paper_billions(value):
  """The paper's precision: 0.39B, 1.0B, 19B."""
  billions = value / 1e9
  return f'{billions:.2f}B' if billions < 1 else (
      f'{billions:.1f}B' if billions < 10 else f'{billions:.0f}B')


def plot_series_of(rows: list[dict], x_key: str) -> tuple[dict, dict]:
  """(series, annotations) for `report.plot_series`: EfficientNets as one line, the others as
  single markers, each against the paper's top-1."""
  series, labels = {}, {}
  for row in rows:
    x, y = row.get(x_key), row.get('paper_top1')
    if x is None and x_key == 'params':
      x = row.get('paper_params')  # GPipe: the published count
    if x is None or y is None:
      continue
    name = row['model']
    if name.startswith('efficientnet-'):
      series.setdefault('EfficientNet', []).append((x, y))
      labels.setdefault('EfficientNet', []).append(name.removeprefix('efficientnet-').upper())
    else:
      series[name] = [(x, y)]
  return series, labels


def write_outputs(rows: list[dict], workdir: str) -> str:
  """Writes the table, the CSV and both plots; returns the Markdown text."""
  os.makedirs(workdir, exist_ok=True)
  report.write_csv(os.path.join(workdir, 'size_table.csv'), rows, COLUMNS)
  text = report.write_markdown(
      os.path.join(workdir, 'size_table.md'), rows, COLUMNS,
      title='Model size and cost (paper Table 2)',
      formats={'params': _millions, 'paper_params': _paper_millions, 'madds': _billions,
               'paper_madds': _paper_billions, 'madds_ratio': '{:.3f}', 'paper_top1': '{:.1f}'},
      headers={'resolution': 'res', 'paper_params': 'paper params', 'madds': 'multiply-adds',
               'paper_madds': 'paper madds',
               'madds_ratio': 'ours / paper', 'paper_top1': 'paper top-1'})
  for x_key, filename, xlabel, figure in (
      ('params', 'size_params.png', 'trainable parameters (counted here; log scale)', 1),
      ('madds', 'size_madds.png', 'multiply-adds per image (counted here; log scale)', 5)):
    series, labels = plot_series_of(rows, x_key)
    report.plot_series(os.path.join(workdir, filename), series, xlabel=xlabel,
                       ylabel="ImageNet top-1 (%, the paper's)", logx=True, annotate=labels,
                       title=f'Model size vs accuracy (paper Figure {figure})')
  return text


def define_flags() -> None:
  """The command line (defined only when run as a script, so tests can import this module)."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(ROOT, 'configs', 'experiments', 'size_table.py'),
      'Study settings (ml_collections config file).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for the table, CSV and plots.')
  flags.DEFINE_bool('quick', False, "Apply the config's `quick` fields (a smoke run).")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required (the table, CSV and plots are written there).')
  config = FLAGS.config
  if FLAGS.quick:
    config.update(config.quick)
  try:
    rows = size_rows(config.models, config.gpipe_row)
  except ValueError as e:  # an unknown model name: say which names exist, no traceback
    raise app.UsageError(str(e)) from None
  text = write_outputs(rows, FLAGS.workdir)
  print(text)
  print(f'Wrote size_table.md, size_table.csv, size_params.png and size_madds.png to '
        f'{FLAGS.workdir}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
