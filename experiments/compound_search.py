"""Compound scaling, the method (Tan & Le 2019, section 3.3): search alpha, beta, gamma, then scale.

    python experiments/compound_search.py --quick --workdir=/tmp/compound_search
    python experiments/compound_search.py \
        --config=configs/experiments/compound_search.py \
        --workdir=gs://BUCKET/compound_search --config.phi=3   # full scale; see the config

Step 1 enumerates (alpha, beta, gamma) >= 1 on the config's grid with alpha * beta**2 * gamma**2
within a tolerance of 2, scales the baseline (`config.train`: model, width, depth, resolution) by
each at phi = 1, trains every candidate with the same recipe and budget, and ranks them by
top-1. Each candidate's FLOPs ratio is reported twice: the formula's alpha * beta**2 * gamma**2,
and the real one, multiply-adds of the built network over the baseline's. They differ because
channels round to multiples of 8, repeats round up and the resolution to whole pixels: for B0 at
224 px, (1.2, 1.1, 1.15) costs 2.57x, not 1.92x, mostly from ceil() on the stages' repeats.

Step 2 (`--config.phi=N`) fixes the winner and trains the baseline scaled to phi = 1 .. N.

Writes under --workdir: search.csv / search.md / search.png (step 1, ranked; accuracy against
real multiply-adds), scaling.csv / scaling.md / scaling.png (step 2), and candidates/<network>/
with each network's checkpoints, TensorBoard metrics and result.json. Rerunning resumes.
"""
from __future__ import annotations

from efficientnet_jax import allocator

if __name__ == '__main__':  # before the heavy imports below, which would otherwise run twice
  allocator.reexec_with_tcmalloc()

import os

from absl import app, logging
from etils import epath

from efficientnet_jax.models import scaling
from efficientnet_jax.study import cli, grid, report, runner

COLUMNS = ('rank', 'alpha', 'beta', 'gamma', 'width', 'depth', 'resolution', 'flops_ratio_formula',
           'flops_ratio_real', 'madds', 'params', 'top1', 'name')
FORMATS = {'top1': '{:.2%}', 'flops_ratio_formula': '{:.3f}', 'flops_ratio_real': '{:.3f}',
           'madds': lambda m: f'{m / 1e6:,.2f}M', 'alpha': '{:g}', 'beta': '{:g}',
           'gamma': '{:g}', 'width': '{:.4g}', 'depth': '{:.4g}'}


def scaled_candidate(config, alpha: float, beta: float, gamma: float, phi: float,
                     **labels) -> runner.Candidate:
  """The baseline `config.train` scaled by alpha**phi, beta**phi, gamma**phi."""
  base = runner.scaled_config(config.train)
  width, depth, resolution = grid.scale(base.width, base.depth, base.resolution, alpha=alpha,
                                        beta=beta, gamma=gamma, phi=phi)
  train_config = runner.scaled_config(base, width=width, depth=depth, resolution=resolution)
  return runner.Candidate(runner.network_name(train_config), train_config,
                          {'alpha': alpha, 'beta': beta, 'gamma': gamma, 'phi': phi, **labels})


def search_candidates(config) -> tuple[list[runner.Candidate], list[dict]]:
  """Step 1's candidates (phi = 1), each with both FLOPs ratios; and those the real count dropped.

  The real ratio needs only a trace of each network (no training), so it is known up front.
  """
  baseline_madds = runner.measure(config.train)['madds']
  candidates, dropped = [], []
  for alpha, beta, gamma in grid.compound_grid(config.alphas, config.betas, config.gammas,
                                               config.target_flops_ratio, config.tolerance):
    candidate = scaled_candidate(config, alpha, beta, gamma, phi=1.0)
    real = runner.measure(candidate.config)['madds'] / baseline_madds
    labels = {**candidate.labels, 'flops_ratio_formula': round(scaling.flops_multiplier(alpha, beta, gamma), 6),
              'flops_ratio_real': round(real, 6)}
    candidate = runner.Candidate(candidate.name, candidate.config, labels)
    if (config.filter_on_real_flops and
        abs(real / config.target_flops_ratio - 1) > config.tolerance):
      dropped.append({'name': candidate.name, **labels})
      continue
    candidates.append(candidate)
  return candidates, dropped


def rank(rows: list[dict]) -> list[dict]:
  """Rows sorted by top-1 (ties: fewer multiply-adds, then name), numbered from 1."""
  ordered = sorted(rows, key=lambda r: (-r['top1'], r['madds'], r['name']))
  return [{'rank': i, **row} for i, row in enumerate(ordered, 1)]


def run(config, workdir: str) -> dict[str, list[dict]]:
  """Runs both steps; returns {'search': ranked rows, 'baseline': [row] or [], 'scaling': rows}."""
  candidates_dir = os.path.join(workdir, 'candidates')
  candidates, dropped = search_candidates(config)
  if dropped:
    logging.warning('Dropped %d candidates whose real multiply-add ratio misses %g by more than '
                    '%g: %s', len(dropped), config.target_flops_ratio, config.tolerance,
                    [(d['alpha'], d['beta'], d['gamma'], d['flops_ratio_real']) for d in dropped])
  if not candidates:
    raise ValueError('No (alpha, beta, gamma) on the grid satisfies the constraint; widen the grid '
                     'or --config.tolerance.')
  baseline = scaled_candidate(config, 1.0, 1.0, 1.0, phi=0.0, flops_ratio_formula=1.0,
                              flops_ratio_real=1.0)
  logging.info('Step 1: %d candidates with alpha * beta^2 * gamma^2 within %g of %g.',
               len(candidates), config.tolerance, config.target_flops_ratio)
  rows = runner.run_candidates(([baseline] if config.train_baseline else []) + candidates,
                               candidates_dir)
  baseline_rows = rows[:1] if config.train_baseline else []
  ranked = rank(rows[len(baseline_rows):])
  table = [{**row, 'rank': 'baseline'} for row in baseline_rows] + ranked
  report.write_csv(os.path.join(workdir, 'search.csv'), table, COLUMNS)
  winner = ranked[0]
  report.write_markdown(
      os.path.join(workdir, 'search.md'), table, COLUMNS, formats=FORMATS,
      title=(f'Compound search, step 1: {config.train.model} scaled at phi = 1, ranked by top-1 '
             f'(winner alpha={winner["alpha"]:g}, beta={winner["beta"]:g}, '
             f'gamma={winner["gamma"]:g})'))
  series = {'candidates (phi = 1)': [(r['madds'], r['top1']) for r in ranked]}
  annotate = {'candidates (phi = 1)': [f'{r["alpha"]:g},{r["beta"]:g},{r["gamma"]:g}'
                                       for r in ranked]}
  if baseline_rows:
    series['baseline'] = [(baseline_rows[0]['madds'], baseline_rows[0]['top1'])]
  report.plot_series(os.path.join(workdir, 'search.png'), series, xlabel='multiply-adds per image',
                     ylabel='top-1', lines=False, annotate=annotate,
                     title='Step 1: (alpha, beta, gamma) with alpha*beta^2*gamma^2 ~ 2')
  logging.info('Step 1 winner: alpha=%g beta=%g gamma=%g, top-1 %.4f at %.3fx the baseline\'s '
               'multiply-adds (formula %.3fx).', winner['alpha'], winner['beta'], winner['gamma'],
               winner['top1'], winner['flops_ratio_real'], winner['flops_ratio_formula'])

  scaling = []
  if config.phi > 0:
    step2 = [scaled_candidate(config, winner['alpha'], winner['beta'], winner['gamma'],
                              phi=float(phi)) for phi in range(0, int(config.phi) + 1)]
    logging.info('Step 2: scaling the winner to phi = 0 .. %d.', config.phi)
    scaling = runner.run_candidates(step2, candidates_dir)
    base_madds = scaling[0]['madds']
    for row in scaling:
      row['flops_ratio_formula'] = round(
          (row['alpha'] * row['beta']**2 * row['gamma']**2)**row['phi'], 6)
      row['flops_ratio_real'] = round(row['madds'] / base_madds, 6)
    columns = ('phi',) + COLUMNS[4:]
    report.write_csv(os.path.join(workdir, 'scaling.csv'), scaling, columns)
    report.write_markdown(
        os.path.join(workdir, 'scaling.md'), scaling, columns, formats={**FORMATS, 'phi': '{:g}'},
        title=(f'Compound scaling, step 2: alpha={winner["alpha"]:g}, beta={winner["beta"]:g}, '
               f'gamma={winner["gamma"]:g}, phi = 0 .. {config.phi}'))
    report.plot_series(os.path.join(workdir, 'scaling.png'),
                       {'compound scaling': [(r['madds'], r['top1']) for r in scaling]},
                       xlabel='multiply-adds per image', ylabel='top-1',
                       annotate={'compound scaling': [f'phi={r["phi"]:g}' for r in scaling]},
                       title='Step 2: the winner scaled by phi')
  return {'search': ranked, 'baseline': baseline_rows, 'scaling': scaling}


def main(argv):
  config, workdir = cli.parse(argv)
  results = run(config, workdir)
  print(epath.Path(workdir, "search.md").read_text())
  if results['scaling']:
    print(epath.Path(workdir, "scaling.md").read_text())


if __name__ == '__main__':
  cli.define_flags('compound_search')
  cli.run(main)
