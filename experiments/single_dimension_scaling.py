"""Scaling width, depth or resolution alone against compound scaling (Tan & Le 2019, Figs. 3, 4, 8).

    python experiments/single_dimension_scaling.py --quick --workdir=/tmp/single_dimension
    python experiments/single_dimension_scaling.py \
        --config=configs/experiments/single_dimension_scaling.py \
        --workdir=gs://BUCKET/single_dimension     # full scale; see the config

`mode='dimensions'` (Figures 3 and 8): the baseline (`config.train`) scaled by each width
multiplier alone, each depth multiplier alone, each resolution multiplier alone, and by compound
scaling (depth alpha**phi, width beta**phi, resolution gamma**phi), every network trained with
the same recipe; one accuracy-vs-multiply-adds curve per dimension. The paper's finding: each
single dimension saturates, while compound scaling reaches higher accuracy at equal cost.

`mode='width_at_depth_resolution'` (Figure 4): width scaled at several (depth, resolution)
settings, one curve per setting.

Writes under --workdir: <mode>.csv, <mode>.md, <mode>.png and candidates/<network>/ (checkpoints,
TensorBoard metrics, result.json). A network on several curves (the baseline) trains once, and
rerunning resumes.
"""
from __future__ import annotations

from efficientnet_jax import allocator

if __name__ == '__main__':  # before the heavy imports below, which would otherwise run twice
  allocator.reexec_with_tcmalloc()

import os

from absl import app, logging
from etils import epath

from efficientnet_jax.study import cli, grid, report, runner

MODES = ('dimensions', 'width_at_depth_resolution')
COLUMNS = ('curve', 'multiplier', 'width', 'depth', 'resolution', 'madds', 'params', 'top1', 'name')
FORMATS = {'top1': '{:.2%}', 'madds': lambda m: f'{m / 1e6:,.2f}M', 'multiplier': '{:g}',
           'width': '{:.4g}', 'depth': '{:.4g}'}


def _candidate(base, curve: str, multiplier: float, *, w: float = 1.0, d: float = 1.0,
               r: float = 1.0) -> runner.Candidate:
  config = runner.scaled_config(base, width=round(base.width * w, 6),
                                depth=round(base.depth * d, 6),
                                resolution=int(round(base.resolution * r)))
  return runner.Candidate(runner.network_name(config), config,
                          {'curve': curve, 'multiplier': float(multiplier)})


def candidates(config) -> list[runner.Candidate]:
  """Every point of every curve, curve by curve, in the config's order (a pure function)."""
  base = runner.scaled_config(config.train)
  points = []
  if config.mode == 'dimensions':
    unknown = sorted(set(config.dimensions) - {'width', 'depth', 'resolution', 'compound'})
    if unknown:
      raise ValueError(f'Unknown dimensions {unknown}; valid: width, depth, resolution, compound.')
    for dimension in config.dimensions:
      if dimension == 'width':
        points += [_candidate(base, 'width', w, w=w) for w in config.widths]
      elif dimension == 'depth':
        points += [_candidate(base, 'depth', d, d=d) for d in config.depths]
      elif dimension == 'resolution':
        points += [_candidate(base, 'resolution', r, r=r) for r in config.resolutions]
      else:
        for phi in config.phis:
          width, depth, resolution = grid.scale(
              base.width, base.depth, base.resolution, alpha=config.alpha, beta=config.beta,
              gamma=config.gamma, phi=phi)
          scaled = runner.scaled_config(base, width=width, depth=depth, resolution=resolution)
          points.append(runner.Candidate(runner.network_name(scaled), scaled,
                                         {'curve': 'compound', 'multiplier': float(phi)}))
  elif config.mode == 'width_at_depth_resolution':
    for d, r in config.depth_resolution_settings:
      curve = f'd={d:g}, r={r:g}'
      points += [_candidate(base, curve, w, w=w, d=d, r=r) for w in config.widths]
  else:
    raise ValueError(f'Unknown mode {config.mode!r}; valid: {", ".join(MODES)}.')
  return points


def run(config, workdir: str) -> list[dict]:
  """Trains every point (resumably) and writes the table and plot; returns the rows."""
  points = candidates(config)
  logging.info('%s: %d points, %d distinct networks.', config.mode, len(points),
               len({p.name for p in points}))
  rows = runner.run_candidates(points, os.path.join(workdir, 'candidates'))
  stem = os.path.join(workdir, config.mode)
  report.write_csv(f'{stem}.csv', rows, COLUMNS)
  is_dims = config.mode == 'dimensions'
  header = {'multiplier': 'w / d / r / phi' if is_dims else 'w'}
  title = (f'Scaling {config.train.model} by one dimension vs compound scaling' if is_dims else
           f'Scaling {config.train.model}\'s width at several (depth, resolution)')
  report.write_markdown(f'{stem}.md', rows, COLUMNS, title=title, formats=FORMATS,
                        headers=header)
  series, notes = {}, {}
  for row in rows:
    series.setdefault(row['curve'], []).append((row['madds'], row['top1']))
    prefix = {'width': 'w=', 'depth': 'd=', 'resolution': 'r=', 'compound': 'phi='}.get(
        row['curve'], 'w=')
    notes.setdefault(row['curve'], []).append(f'{prefix}{row["multiplier"]:g}')
  report.plot_series(f'{stem}.png', series, xlabel='multiply-adds per image', ylabel='top-1',
                     logx=config.log_madds, annotate=notes, title=title)
  return rows


def main(argv):
  config, workdir = cli.parse(argv)
  run(config, workdir)
  print(epath.Path(workdir, f'{config.mode}.md').read_text())


if __name__ == '__main__':
  cli.define_flags('single_dimension_scaling')
  cli.run(main)
