"""Print a model's trainable parameters and multiply-adds, or a table of every EfficientNet.

    python -m efficientnet_jax.summary --model=efficientnet-b0
    python -m efficientnet_jax.summary --model=efficientnet-b3 --resolution=320 --json
    python -m efficientnet_jax.summary --model=resnet-50      # ResNet and MobileNet too
    python -m efficientnet_jax.summary --all [--json]         # the EfficientNet variants

Nothing runs on a device: the counts come from abstract shapes and the traced forward pass (see
`efficientnet_jax.complexity`), so the whole `--all` table takes seconds. Multiply-adds follow the
paper's convention (convolutions and the classifier, including squeeze-and-excitation; no
elementwise ops). The paper's figures (Table 2) hold at each variant's native resolution, so they
are shown only there.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from efficientnet_jax.complexity import model_complexity
from efficientnet_jax.models.variants import ALL_VARIANTS, VARIANTS, get_variant

EXIT_USAGE = 2


def variant_row(name: str, resolution: int | None = None, num_classes: int = 1000) -> dict:
  """Our counts for one variant, with the published figures beside them where they apply."""
  spec = get_variant(name)
  ours = model_complexity(name, resolution, num_classes=num_classes)
  # The published figures are for 1000 classes, and multiply-adds and top-1 for the native
  # resolution; elsewhere they do not apply.
  published = num_classes == 1000
  native = published and ours['resolution'] == spec.resolution
  published_params = spec.published_params if published else None
  paper_madds = int(spec.paper_madds) if native and spec.paper_madds else None
  paper_top1 = spec.paper_top1 if native else None
  return {
      'model': name,
      'resolution': ours['resolution'],
      'native_resolution': spec.resolution,
      'params': ours['params'],
      'published_params': published_params,
      'madds': ours['madds'],
      'paper_madds': paper_madds,
      'madds_ratio': ours['madds'] / paper_madds if paper_madds else None,
      'paper_top1': paper_top1,
  }


def _billions(value: float | None, digits: int) -> str:
  return '-' if value is None else f'{value / 1e9:.{digits}f}B'


def _paper_billions(value: float | None) -> str:
  """The paper's own precision: 0.39B, 1.0B, 19B."""
  if value is None:
    return '-'
  b = value / 1e9
  return f'{b:.2f}B' if b < 1 else (f'{b:.1f}B' if b < 10 else f'{b:.0f}B')


def _count(value: int | None) -> str:
  return '-' if value is None else f'{value:,}'


def format_row(row: dict) -> str:
  return '\n'.join([
      f'model:            {row["model"]}',
      f'resolution:       {row["resolution"]} px'
      + ('' if row['resolution'] == row['native_resolution']
         else f' (native {row["native_resolution"]} px)'),
      f'trainable params: {_count(row["params"])}'
      + (f' (published {_count(row["published_params"])})' if row['published_params'] else ''),
      f'multiply-adds:    {_count(row["madds"])} ({_billions(row["madds"], 3)})'
      + (f' (paper {_paper_billions(row["paper_madds"])}, ratio {row["madds_ratio"]:.3f})'
         if row['paper_madds'] else ''),
  ] + ([f'paper top-1:      {row["paper_top1"]}%'] if row['paper_top1'] else []))


def format_table(rows: Sequence[dict]) -> str:
  header = ('model', 'res', 'params', 'published', 'madds', 'paper', 'ratio', 'top-1')
  lines = [header]
  for r in rows:
    lines.append((
        r['model'], str(r['resolution']), _count(r['params']), _count(r['published_params']),
        _billions(r['madds'], 3), _paper_billions(r['paper_madds']),
        '-' if r['madds_ratio'] is None else f'{r["madds_ratio"]:.3f}',
        '-' if r['paper_top1'] is None else f'{r["paper_top1"]:.1f}'))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  out = []
  for n, line in enumerate(lines):
    cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
    out.append('  '.join(cells).rstrip())
    if n == 0:
      out.append('  '.join('-' * w for w in widths))
  out.append('madds: multiply-adds per image (convs incl. squeeze-excite, and the classifier); '
             'paper: Table 2 (Tan & Le, 2019); top-1: paper, ImageNet.')
  return '\n'.join(out)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m efficientnet_jax.summary',
      description='Trainable parameters and multiply-adds of the model zoo, computed '
      'from shapes only (nothing runs on a device).')
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--model', help=f'a model name: {", ".join(ALL_VARIANTS)}')
  which.add_argument('--all', action='store_true',
                     help='a table of every EfficientNet variant beside the paper\'s figures '
                     '(experiments/size_table.py adds ResNet and GPipe)')
  parser.add_argument('--resolution', type=int, default=None,
                      help='input size in pixels (default: each variant\'s native resolution)')
  parser.add_argument('--num_classes', '--num-classes', type=int, default=1000,
                      help='classifier outputs (default 1000, as published)')
  parser.add_argument('--json', action='store_true', help='print machine-readable JSON')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (0, or 2 for a bad model name or bad arguments)."""
  parser = _parser()
  args = parser.parse_args(argv)  # exits with code 2 on malformed arguments
  if args.resolution is not None and args.resolution < 1:
    parser.error(f'--resolution must be a positive number of pixels; got {args.resolution}.')
  if args.num_classes < 1:
    parser.error(f'--num_classes must be positive; got {args.num_classes}.')
  names = list(VARIANTS) if args.all else [args.model]
  try:
    rows = [variant_row(name, args.resolution, args.num_classes) for name in names]
  except ValueError as e:  # unknown model, or an input too small for the network
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  if args.json:
    print(json.dumps(rows if args.all else rows[0], indent=2))
  elif args.all:
    print(format_table(rows))
  else:
    print(format_row(rows[0]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
