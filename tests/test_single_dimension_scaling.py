"""experiments/single_dimension_scaling.py: the paper's grids, and the quick study end to end."""
from __future__ import annotations

import csv
import time

import pytest

from efficientnet_jax.study import cli
from study_support import (QUICK_TEST_ARGS, QUICK_TEST_OVERRIDES, load_experiment,
                           result_mtimes, run_quick, shared_xla_cache)
from efficientnet_jax.study.cli import CONFIG_DIR

study = load_experiment('single_dimension_scaling')


def config(arg=None, **overrides):
  return cli.load_config(CONFIG_DIR / 'single_dimension_scaling.py', arg, overrides)


def test_full_scale_grids_are_the_papers():
  points = study.candidates(config())
  by_curve = {}
  for p in points:
    by_curve.setdefault(p.labels['curve'], []).append(p.config)
  # Figure 3: B0 (224 px) by width, depth and resolution alone; Figure 8 adds compound.
  assert [c.width for c in by_curve['width']] == [1.0, 1.4, 1.8, 2.6, 3.8, 5.0]
  assert [c.depth for c in by_curve['depth']] == [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
  assert [c.resolution for c in by_curve['resolution']] == [224, 291, 336, 381, 426, 493, 560]
  assert all(c.depth == 1.0 and c.resolution == 224 for c in by_curve['width'])
  assert [(c.width, c.depth, c.resolution) for c in by_curve['compound']][:3] == [
      (1.0, 1.0, 224), (1.1, 1.2, 258), (1.21, 1.44, 296)]
  # The baseline is on all four curves but is one network.
  assert len(points) == 24 and len({p.name for p in points}) == 21


def test_figure4_mode_scales_width_at_four_settings():
  points = study.candidates(config(mode='width_at_depth_resolution'))
  curves = {}
  for p in points:
    curves.setdefault(p.labels['curve'], []).append(
        (p.config.width, p.config.depth, p.config.resolution))
  assert list(curves) == ['d=1, r=1', 'd=1, r=1.3', 'd=2, r=1', 'd=2, r=1.3']
  assert curves['d=2, r=1.3'][0] == (1.0, 2.0, 291) and curves['d=2, r=1.3'][-1][0] == 5.0


def test_unknown_mode_or_dimension_is_an_error():
  with pytest.raises(ValueError, match='mode'):
    study.candidates(config(mode='height'))
  with pytest.raises(ValueError, match='height'):
    study.candidates(config(dimensions=('width', 'height')))


# One test for the run and its rerun: under pytest-xdist a module fixture shared by two tests
# could be built once per worker, training everything twice. In one session with
# test_compound_search.py, networks both studies train hit the shared compilation cache.
@pytest.mark.slow
def test_quick_study_end_to_end_then_resumed(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('single_dimension')
  seconds, _ = run_quick('single_dimension_scaling', workdir,
                         shared_xla_cache(tmp_path_factory), *QUICK_TEST_ARGS)
  for name in ('dimensions.csv', 'dimensions.md', 'dimensions.png'):
    assert (workdir / name).stat().st_size > 0, name
  with open(workdir / 'dimensions.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['curve'] for r in rows] == ['width', 'width', 'depth', 'depth', 'resolution',
                                        'resolution', 'compound', 'compound']
  # Every curve starts at the baseline: the same network, trained once.
  assert len({(r['name'], r['top1'], r['madds']) for r in rows[::2]}) == 1
  for first, second in zip(rows[::2], rows[1::2]):
    assert int(second['madds']) > int(first['madds'])
  mtimes = result_mtimes(workdir)
  assert len(mtimes) == 5

  start = time.time()
  rerun = study.run(config('quick', **QUICK_TEST_OVERRIDES), str(workdir))
  assert all(r['cached'] for r in rerun)
  assert result_mtimes(workdir) == mtimes
  assert time.time() - start < seconds / 3
