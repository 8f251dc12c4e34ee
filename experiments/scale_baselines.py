"""Compound scaling of MobileNetV1, MobileNetV2 and ResNet-50 (Tan & Le 2019, Table 3).

    python experiments/scale_baselines.py --workdir=/tmp/scale_baselines          # counts only
    python experiments/scale_baselines.py --quick --workdir=/tmp/scale_baselines  # + tiny training
    python experiments/scale_baselines.py --train --workdir=gs://BUCKET/scale_baselines  # TPU

For each model, the paper's rows: the baseline, depth x4 (d=4), width x2 (w=2), resolution x2
(r=2) and compound scaling. Each network is built with `create_model(model, width=w, depth=d)`
at r x the model's resolution, and its multiply-adds are counted exactly and set beside the
paper's FLOPs and top-1.

Compound coefficients: the paper states them only for MobileNetV1 (d=1.4, w=1.2, r=1.3). For the
other two it gives only the FLOPs, so we derive them from alpha=1.2, beta=1.1, gamma=1.15:
ResNet-50 at phi=2 (d=1.44, w=1.21, r=1.3225, 16.3B vs the paper's 16.7B); MobileNetV2 at
phi=1.8 (d=1.388, w=1.187, r=1.286), the phi whose count is nearest the paper's 1.3B (phi=2
would cost 1.49B).

Writes under --workdir: table3.csv / table3.md (every row: multiply-adds, paper FLOPs, ratio,
paper top-1, and our top-1 where a row was trained at the paper's scale), and, when training,
trained.csv / trained.md / trained.png (top-1 against multiply-adds, one curve per model) with
candidates/<network>/ per trained network. Rerunning resumes.
"""
from __future__ import annotations

from efficientnet_jax import allocator

if __name__ == '__main__':  # before the heavy imports below, which would otherwise run twice
  allocator.reexec_with_tcmalloc()

import dataclasses
import os

from absl import app, flags, logging
from etils import epath

from efficientnet_jax import complexity
from efficientnet_jax.models import create_model, get_variant
from efficientnet_jax.study import cli, report, runner


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 3: multipliers and the paper's FLOPs (multiply-adds) and top-1."""
  label: str
  depth: float
  width: float
  resolution: float
  paper_madds: float
  paper_top1: float


# Tan & Le 2019, Table 3 (ImageNet top-1, FLOPs in multiply-adds). MobileNetV1 has no d=4 row.
TABLE3: dict[str, tuple[Row, ...]] = {
    'mobilenet-v1': (
        Row('baseline', 1.0, 1.0, 1.0, 0.6e9, 0.706),
        Row('w=2', 1.0, 2.0, 1.0, 2.2e9, 0.742),
        Row('r=2', 1.0, 1.0, 2.0, 2.2e9, 0.727),
        Row('compound (d=1.4, w=1.2, r=1.3)', 1.4, 1.2, 1.3, 2.3e9, 0.756),
    ),
    'mobilenet-v2': (
        Row('baseline', 1.0, 1.0, 1.0, 0.3e9, 0.720),
        Row('d=4', 4.0, 1.0, 1.0, 1.2e9, 0.768),
        Row('w=2', 1.0, 2.0, 1.0, 1.1e9, 0.764),
        Row('r=2', 1.0, 1.0, 2.0, 1.2e9, 0.748),
        # Derived (not in the paper): 1.2, 1.1, 1.15 at phi = 1.8.
        Row('compound (phi=1.8: d=1.388, w=1.187, r=1.286)', 1.388, 1.187, 1.286, 1.3e9, 0.774),
    ),
    'resnet-50': (
        Row('baseline', 1.0, 1.0, 1.0, 4.1e9, 0.760),
        Row('d=4', 4.0, 1.0, 1.0, 16.2e9, 0.781),
        Row('w=2', 1.0, 2.0, 1.0, 14.7e9, 0.777),
        Row('r=2', 1.0, 1.0, 2.0, 16.4e9, 0.775),
        # Derived (not in the paper): 1.2, 1.1, 1.15 at phi = 2.
        Row('compound (phi=2: d=1.44, w=1.21, r=1.3225)', 1.44, 1.21, 1.3225, 16.7e9, 0.788),
    ),
}
COLUMNS = ('model', 'row', 'depth', 'width', 'resolution', 'params', 'madds', 'paper_madds',
           'madds_ratio', 'paper_top1', 'top1')
FORMATS = {'madds': lambda m: f'{m / 1e9:.3f}B', 'paper_madds': lambda m: f'{m / 1e9:.1f}B',
           'madds_ratio': '{:.3f}', 'paper_top1': '{:.1%}', 'top1': '{:.2%}',
           'depth': '{:.4g}', 'width': '{:.4g}'}


def paper_scale_rows(model: str) -> list[dict]:
  """Table 3's rows for `model` at the paper's scale, with exact multiply-adds (no training)."""
  base = get_variant(model).resolution
  rows = []
  for row in TABLE3[model]:
    resolution = int(round(base * row.resolution))
    cost = complexity.model_complexity(create_model(model, width=row.width, depth=row.depth),
                                       resolution)
    rows.append({'model': model, 'row': row.label, 'depth': row.depth, 'width': row.width,
                 'resolution': resolution, 'params': cost['params'], 'madds': cost['madds'],
                 'paper_madds': row.paper_madds,
                 'madds_ratio': round(cost['madds'] / row.paper_madds, 4),
                 'paper_top1': row.paper_top1})
  return rows


def training_candidates(config, model: str) -> list[runner.Candidate]:
  """Table 3's rows for `model` scaled from `config.train`'s width, depth and resolution."""
  base = runner.scaled_config(config.train, model=model)  # unset coefficients: the model's
  points = []
  for row in TABLE3[model]:
    fields = dict(model=model, width=round(base.width * row.width, 6),
                  depth=round(base.depth * row.depth, 6),
                  resolution=int(round(base.resolution * row.resolution)))
    if model == 'mobilenet-v1':
      fields['drop_connect_rate'] = 0.0  # no residual branches, so nothing to drop
    scaled = runner.scaled_config(base, **fields)
    points.append(runner.Candidate(runner.network_name(scaled), scaled, {'row': row.label}))
  return points


def run(config, workdir: str) -> dict[str, list[dict]]:
  """Counts every row, trains the requested models' rows; returns {'table3': .., 'trained': ..}."""
  unknown = sorted(set(config.models) - set(TABLE3))
  if unknown:
    raise ValueError(f'No Table 3 rows for {unknown}; known: {sorted(TABLE3)}.')
  table = [row for model in config.models for row in paper_scale_rows(model)]
  for row in table:
    logging.info('%s %s: %.3fB multiply-adds (paper %.1fB, ratio %.3f).', row['model'],
                 row['row'], row['madds'] / 1e9, row['paper_madds'] / 1e9, row['madds_ratio'])
  trained = []
  for model in config.train_models:
    if model not in TABLE3:
      raise ValueError(f'No Table 3 rows for {model!r}; known: {sorted(TABLE3)}.')
    trained += runner.run_candidates(training_candidates(config, model),
                                     os.path.join(workdir, 'candidates'))
  # A row trained at the paper's scale (same model, width, depth, resolution) gets its top-1.
  by_network = {(r['model'], r['width'], r['depth'], r['resolution']): r['top1'] for r in trained}
  for row in table:
    row['top1'] = by_network.get((row['model'], row['width'], row['depth'], row['resolution']))
  report.write_csv(os.path.join(workdir, 'table3.csv'), table, COLUMNS)
  report.write_markdown(os.path.join(workdir, 'table3.md'), table, COLUMNS, formats=FORMATS,
                        title='Table 3: scaling MobileNets and ResNet-50 (multiply-adds counted '
                              'here vs the paper\'s FLOPs)')
  if trained:
    columns = ('model', 'row', 'width', 'depth', 'resolution', 'params', 'madds', 'top1', 'name')
    formats = {**FORMATS, 'madds': lambda m: f'{m / 1e6:,.2f}M'}
    report.write_csv(os.path.join(workdir, 'trained.csv'), trained, columns)
    report.write_markdown(os.path.join(workdir, 'trained.md'), trained, columns, formats=formats,
                          title=f'Table 3 rows trained ({config.train.dataset}, '
                                f'{config.train.resolution} px baseline)')
    series, notes = {}, {}
    for row in trained:
      series.setdefault(row['model'], []).append((row['madds'], row['top1']))
      notes.setdefault(row['model'], []).append(row['row'].split(' (')[0])
    report.plot_series(os.path.join(workdir, 'trained.png'), series, lines=False,
                       xlabel='multiply-adds per image', ylabel='top-1', annotate=notes,
                       title='Scaling other ConvNets: top-1 vs multiply-adds')
  return {'table3': table, 'trained': trained}


def main(argv):
  config, workdir = cli.parse(argv)
  if flags.FLAGS.train:
    config.train_models = tuple(config.models)
  results = run(config, workdir)
  print(epath.Path(workdir, 'table3.md').read_text())
  if results['trained']:
    print(epath.Path(workdir, 'trained.md').read_text())


if __name__ == '__main__':
  cli.define_flags('scale_baselines')
  flags.DEFINE_bool('train', False, 'Also train every row (sets --config.train_models to all '
                    'of --config.models).')
  cli.run(main)
