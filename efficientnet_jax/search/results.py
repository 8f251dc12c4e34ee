"""What a baseline search writes: the leaderboard, two plots and the best network as a config.

    leaderboard.csv / leaderboard.md   every finished candidate of every algorithm, by reward
    pareto.png     top-1 against multiply-adds: the candidates, their Pareto front and curves of
                   equal reward (ACC x (MAdds / T)^w = R)
    progress.png   the best reward so far against the number of finished candidates, per
                   algorithm (and each candidate's reward)
    best_architecture.py   the best network's block strings, as a config file that
                   experiments/compound_search.py takes as --config, and create_model as blocks=

Built from the rows `rows_of` reads out of the store, through `study.report`, so the files are
byte-for-byte deterministic for a given store.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from efficientnet_jax.search import objective
from efficientnet_jax.study import report

__all__ = ['BEST_CONFIG_FILE', 'COLUMNS', 'best_config_text', 'pareto_front', 'rows_of',
           'write_reports']

BEST_CONFIG_FILE = 'best_architecture.py'
COLUMNS = ('rank', 'algorithm', 'order', 'reward', 'top1', 'madds', 'madds_over_target', 'params',
           'trial', 'name', 'blocks')
FORMATS = {'reward': '{:.4f}', 'top1': '{:.2%}', 'madds': lambda m: f'{m / 1e6:,.2f}M',
           'madds_over_target': '{:.3f}'}


def rows_of(search, trials) -> list[dict[str, Any]]:
  """One row per finished trial (in finishing order): its network, scores and place."""
  rows = []
  for order, trial in enumerate(trials, 1):
    choices = search.space.choices_from_params(trial.params)
    rows.append({
        'algorithm': search.algorithm.name, 'order': order, 'reward': float(trial.value),
        'top1': trial.user_attrs.get('top1'), 'madds': trial.user_attrs.get('madds'),
        'madds_over_target': (trial.user_attrs['madds'] / search.target_madds
                              if 'madds' in trial.user_attrs else None),
        'params': trial.user_attrs.get('params'), 'trial': trial.number,
        'name': trial.user_attrs.get('name'),
        'blocks': ' '.join(b.encode() for b in search.space.decode(choices))})
  return rows


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The rows no other row beats on both accuracy and cost, by increasing multiply-adds."""
  front, best = [], -math.inf
  for row in sorted(rows, key=lambda r: (r['madds'], -r['top1'])):
    if row['top1'] > best:
      front.append(row)
      best = row['top1']
  return front


def _reward_curve(level: float, madds_range: tuple[float, float], target: float, w: float,
                  form: str, points: int = 60) -> list[tuple[float, float]]:
  """Points (m, acc) with acc x (m / T)^exponent = level, on a log grid of m."""
  lo, hi = (math.log(m) for m in madds_range)
  curve = []
  for i in range(points):
    m = math.exp(lo + (hi - lo) * i / (points - 1))
    curve.append((m, level / (m / target) ** objective.exponent(m, target, w, form)))
  return curve


def plot_pareto(path, rows, target: float, w: float, form: str) -> None:
  series, styles = {}, {}
  algorithms = list(dict.fromkeys(r['algorithm'] for r in rows))
  for i, name in enumerate(algorithms):
    series[name] = [(r['madds'], r['top1']) for r in rows if r['algorithm'] == name]
    styles[name] = {'color': f'C{i}', 'linestyle': 'none', 'alpha': 0.8}
  front = pareto_front(rows)
  series['Pareto front'] = [(r['madds'], r['top1']) for r in front]
  styles['Pareto front'] = {'color': 'black', 'marker': None, 'linestyle': '-'}
  madds = [r['madds'] for r in rows]
  span = (min(madds) / 1.2, max(madds) * 1.2)
  best = max(r['reward'] for r in rows)
  top1 = [r['top1'] for r in rows]
  # Equal-reward curves through the best network and below it, in steps of the accuracy spread.
  step = max((max(top1) - min(top1)) / 3, 0.01)
  for level in (best, best - step, best - 2 * step):
    if level > 0:
      label = f'reward {level:.3f}'
      series[label] = _reward_curve(level, span, target, w, form)
      styles[label] = {'color': 'gray', 'marker': None, 'linestyle': ':'}
  report.plot_series(path, series, xlabel=f'multiply-adds per image (T = {target / 1e6:.3g}M)',
                     ylabel='top-1', logx=True, styles=styles,
                     title=f'Candidates, Pareto front and ACC x (MAdds/T)^{w:g} ({form})')


def plot_progress(path, rows) -> None:
  series, styles = {}, {}
  algorithms = list(dict.fromkeys(r['algorithm'] for r in rows))
  for i, name in enumerate(algorithms):
    own = sorted((r for r in rows if r['algorithm'] == name), key=lambda r: r['order'])
    best, curve = -math.inf, []
    for r in own:
      best = max(best, r['reward'])
      curve.append((r['order'], best))
    series[f'{name}: best so far'] = curve
    styles[f'{name}: best so far'] = {'color': f'C{i}', 'marker': None}
    series[f'{name}: each'] = [(r['order'], r['reward']) for r in own]
    styles[f'{name}: each'] = {'color': f'C{i}', 'linestyle': 'none', 'alpha': 0.4,
                               'markersize': 4}
  report.plot_series(path, series, xlabel='finished candidates', ylabel='reward',
                     styles=styles, title='Reward against the number of candidates')


def best_config_text(row: Mapping[str, Any], *, workdir: str, quick: bool, resolution: int,
                     total: int) -> str:
  """A config file for the best network: its block strings, and get_config for compound search.

  `get_config(arg)` is configs/experiments/compound_search.py's with `train.blocks` set, so
  search -> compound search -> scaled family is one pipeline.
  """
  blocks = row['blocks'].split()
  path = os.path.join(str(workdir), BEST_CONFIG_FILE)
  default_arg = "'quick'" if quick else 'None'
  lines = [
      f'"""The best network of the baseline search in {workdir}.',
      '',
      f'Found by {row["algorithm"]} as candidate {row["order"]} of {total}: reward '
      f'{row["reward"]:.4f}, top-1 {row["top1"]:.2%},',
      f'{row["madds"] / 1e6:,.2f}M multiply-adds and {row["params"]:,} parameters at '
      f'{resolution} px{" (the quick proxy)" if quick else ""}.',
      '',
      'Scale it with the compound scaling search (step 1, then step 2 up to --config.phi):',
      '',
      f'  python experiments/compound_search.py --config={path} \\',
      '      --workdir=/tmp/compound_search_searched --config.phi=2',
      '',
      'or build it: create_model(\'efficientnet-b0\', blocks=BLOCK_STRINGS).',
      '"""',
      'from efficientnet_jax.study import cli',
      '',
      '# The block table at baseline width and depth, in the official block-string format.',
      'BLOCK_STRINGS = (',
      *[f'    {b!r},' for b in blocks],
      ')',
      '',
      '',
      f'def get_config(arg={default_arg}):',
      '  """configs/experiments/compound_search.py (arg None or \'quick\') with these blocks."""',
      '  config = cli.load_config(cli.CONFIG_DIR / \'compound_search.py\', arg)',
      '  config.train.blocks = BLOCK_STRINGS',
      '  return config',
      '',
  ]
  return '\n'.join(lines)


def write_reports(workdir: str, searches_and_trials, *, quick: bool) -> list[dict[str, Any]]:
  """Writes the leaderboard, the plots and best_architecture.py; returns the ranked rows.

  `searches_and_trials` is [(search, finished trials in order), ...], one per algorithm.
  """
  rows = []
  for search, trials in searches_and_trials:
    rows.extend(rows_of(search, trials))
  if not rows:
    return []
  ranked = [{'rank': i, **r} for i, r in enumerate(
      sorted(rows, key=lambda r: (-r['reward'], r['madds'], r['algorithm'], r['order'])), 1)]
  search = searches_and_trials[0][0]
  target, w, form = search.target_madds, search.w, search.form
  report.write_csv(os.path.join(workdir, 'leaderboard.csv'), ranked, COLUMNS)
  resolution = search.train_config.resolution
  report.write_markdown(
      os.path.join(workdir, 'leaderboard.md'), ranked, COLUMNS, formats=FORMATS,
      title=(f'Baseline search: reward = ACC x (MAdds / T)^w, w = {w:g} ({form}), '
             f'T = {search.target_note}'))
  plot_pareto(os.path.join(workdir, 'pareto.png'), ranked, target, w, form)
  plot_progress(os.path.join(workdir, 'progress.png'), ranked)
  text = best_config_text(ranked[0], workdir=workdir, quick=quick, resolution=resolution,
                          total=sum(1 for r in rows if r['algorithm'] == ranked[0]['algorithm']))
  path = epath.Path(workdir, BEST_CONFIG_FILE)
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_text(text)
  tmp.replace(path)
  return ranked
