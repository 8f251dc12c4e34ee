"""The README's "Will it fit?" table: TPU dry runs (`efficientnet_jax.aot`) of the paper's configs.

    pip install -e '.[tpu]'
    python experiments/dry_run_table.py --workdir=/tmp/dry_runs            # every row
    python experiments/dry_run_table.py --workdir=/tmp/dry_runs --rows=b0  # rows whose name has b0

Each row is one command, `python -m efficientnet_jax.aot --config=... --topology=... --json=...`,
run in its own process (the command is printed in the table); finished rows are kept in the
workdir, so a rerun only compiles what is missing. Compiling B7 for a 256-chip slice takes
minutes on a small machine: only the train step is compiled, as it is the one that decides the fit.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (row name, config, topology, slice as Cloud TPU names it, extra flags)
ROWS = [
    ('b0-v3-32', 'configs/b0.py', 'v3:4x4', 'v3-32', []),
    ('b0-v4-32', 'configs/b0.py', 'v4:2x2x4', 'v4-32', []),
]
for _model in ('b4', 'b7'):
  for _topology, _slice in (('v3:16x8', 'v3-256'), ('v4:4x4x8', 'v4-256'),
                            ('v5e:16x16', 'v5e-256')):
    for _remat in (False, True):
      ROWS.append((f'{_model}-{_slice}{"-remat" if _remat else ""}', f'configs/{_model}.py',
                   _topology, _slice, ['--config.remat=True'] if _remat else []))
# B7 on the next sizes up (added when, before the FSDP fix, it did not fit v4-256; docs/pod.md).
ROWS.append(('b7-v4-512-remat', 'configs/b7.py', 'v4:4x8x8', 'v4-512', ['--config.remat=True']))
ROWS.append(('b7-v4-1024-remat', 'configs/b7.py', 'v4:8x8x8', 'v4-1024', ['--config.remat=True']))
ROWS.append(('l2-v4-1024-remat', 'configs/l2.py', 'v4:8x8x8', 'v4-1024', ['--config.remat=True']))
# The slice each training config's docstring recommends (the rows above cover b0, b4, b7, l2).
CONFIG_ROWS = [
    ('config-b1-v4-32', 'configs/b1.py', 'v4:2x2x4', 'v4-32', []),
    ('config-b2-v4-32', 'configs/b2.py', 'v4:2x2x4', 'v4-32', []),
    ('config-b3-v4-64', 'configs/b3.py', 'v4:2x4x4', 'v4-64', []),
    ('config-b5-v4-256', 'configs/b5.py', 'v4:4x4x8', 'v4-256', []),
    ('config-b6-v4-256', 'configs/b6.py', 'v4:4x4x8', 'v4-256', []),
    ('config-b8-v4-512-remat', 'configs/b8.py', 'v4:4x8x8', 'v4-512', ['--config.remat=True']),
    ('config-lite0-v4-32', 'configs/lite0.py', 'v4:2x2x4', 'v4-32', []),
    ('config-lite1-v4-32', 'configs/lite1.py', 'v4:2x2x4', 'v4-32', []),
    ('config-lite2-v4-32', 'configs/lite2.py', 'v4:2x2x4', 'v4-32', []),
    ('config-lite3-v4-32', 'configs/lite3.py', 'v4:2x2x4', 'v4-32', []),
    ('config-lite4-v4-64', 'configs/lite4.py', 'v4:2x4x4', 'v4-64', []),
]


def command(config, topology, extra, json_path) -> list[str]:
  return [sys.executable, '-m', 'efficientnet_jax.aot', f'--config={config}',
          f'--topology={topology}', '--steps=train', *extra, f'--json={json_path}']


def run_row(name, config, topology, extra, workdir: pathlib.Path) -> dict | None:
  path = workdir / f'{name}.json'
  if not path.exists():
    began = time.time()
    result = subprocess.run(command(config, topology, extra, path), cwd=str(ROOT),
                            capture_output=True, text=True)
    (workdir / f'{name}.log').write_text(result.stdout + result.stderr)
    print(f'{name}: exit {result.returncode} after {time.time() - began:.0f} s', flush=True)
    if not path.exists():
      return None
  return json.loads(path.read_text())


def markdown(rows) -> str:
  lines = ['| model | slice | batch | px | remat | HBM per chip (GiB) | fits | step ≥ (ms) | '
           'img/s ≤ (per chip) | command |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for (name, config, topology, slice_name, extra), report in rows:
    cmd = (f'`python -m efficientnet_jax.aot --config={config} --topology={topology}'
           f'{" " + " ".join(extra) if extra else ""}`')
    if report is None:
      lines.append(f'| {name} | {slice_name} | | | | | failed | | | {cmd} |')
      continue
    c, r = report['config'], report['steps']['train']
    total = r.get('hbm_total_per_chip')
    step = r.get('step_seconds_bound')
    lines.append(
        f"| {c['model']} | {slice_name} ({topology}) | {c['batch_size']} | {c['resolution']} | "
        f"{'yes' if c['remat'] else 'no'} | {total / 2**30:.1f} / "
        f"{r['hbm_capacity_per_chip'] / 2**30:.0f} | {'yes' if r['fits'] else '**no**'} | "
        + (f"{step * 1e3:.0f} ({r['bound_by']}) | {r['images_per_second']:,.0f} "
           f"({r['images_per_second_per_chip']:,.0f}) | " if step else '– | – | ')
        + f'{cmd} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--rows', default='', help='Only rows whose name contains this.')
  parser.add_argument('--configs', action='store_true',
                      help='Also the slices the training configs\' docstrings recommend.')
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  selected = [row for row in ROWS + (CONFIG_ROWS if args.configs else []) if args.rows in row[0]]
  results = [(row, run_row(row[0], row[1], row[2], row[4], workdir)) for row in selected]
  table = markdown(results)
  (workdir / 'table.md').write_text(table + '\n')
  print(table)


if __name__ == '__main__':
  main()
