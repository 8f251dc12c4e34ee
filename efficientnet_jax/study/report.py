"""Study outputs: CSV, Markdown tables and PNG plots, byte-for-byte deterministic.

    from efficientnet_jax.study import report
    report.write_csv(workdir / 'results.csv', rows)
    report.write_markdown(workdir / 'results.md', rows, ['name', 'madds', 'top1'],
                          title='Compound search', formats={'top1': '{:.1%}'})
    report.plot_series(workdir / 'accuracy.png', {'width': [(0.39e9, 0.77), ...]},
                       xlabel='multiply-adds', ylabel='top-1', logx=True)

No timestamps or hostnames go into any file, so rerunning a finished study rewrites identical
bytes (PNG metadata included: matplotlib's 'Software' and creation-time chunks are dropped).
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from etils import epath

__all__ = ['format_value', 'plot_series', 'write_csv', 'write_markdown']

Row = Mapping[str, Any]
Formatter = str | Callable[[Any], str]


def _columns(rows: Sequence[Row], columns: Sequence[str] | None) -> list[str]:
  """The given columns, else every key in first-seen order across the rows."""
  if columns is not None:
    return list(columns)
  seen: dict[str, None] = {}
  for row in rows:
    for key in row:
      seen.setdefault(key, None)
  return list(seen)


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
  """Writes via a temporary file and a rename, so a killed run never leaves half a table.

  Paths may be local or gs:// (etils.epath), like the training workdir.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_bytes(data)
  tmp.replace(path)


def write_csv(path: str | os.PathLike, rows: Sequence[Row],
              columns: Sequence[str] | None = None) -> None:
  """Writes `rows` (dicts) as CSV with a header. Missing values are empty cells.

  `columns` fixes the column order (and drops other keys); by default it is every key in the
  order first seen. Floats are written with `repr`, so they round-trip exactly.
  """
  columns = _columns(rows, columns)
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(columns)
  for row in rows:
    writer.writerow(['' if row.get(c) is None else row.get(c) for c in columns])
  _atomic_write(path, buffer.getvalue().encode('utf-8'))


def format_value(value: Any, fmt: Formatter | None = None) -> str:
  """One table cell: `fmt` is a format string ('{:.1%}') or a callable; None prints '-'."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '-'
  if fmt is None:
    if isinstance(value, float):
      return f'{value:.4g}'
    if isinstance(value, int) and not isinstance(value, bool):
      return f'{value:,}'
    return str(value)
  if callable(fmt):
    return fmt(value)
  return fmt.format(value)


def write_markdown(path: str | os.PathLike | None, rows: Sequence[Row],
                   columns: Sequence[str] | None = None, title: str | None = None,
                   formats: Mapping[str, Formatter] | None = None,
                   headers: Mapping[str, str] | None = None) -> str:
  """Renders `rows` as a GitHub Markdown table, writes it to `path` (if given) and returns it.

  Args:
    path: the output file, or None to only return the text.
    rows: a list of dicts.
    columns: which keys, in order (default: every key, first seen first).
    title: an optional '## title' line above the table.
    formats: per column, a format string such as '{:.1%}' or a callable value -> str.
      Unformatted floats use 4 significant digits, ints get thousands separators.
    headers: per column, the header text (default: the key).
  """
  columns = _columns(rows, columns)
  formats = dict(formats or {})
  headers = dict(headers or {})
  numeric = {c: all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
             for c in columns}

  def escape(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')

  lines = []
  if title:
    lines += [f'## {title}', '']
  lines.append('| ' + ' | '.join(escape(headers.get(c, c)) for c in columns) + ' |')
  lines.append('|' + '|'.join('---:' if numeric[c] and rows else '---' for c in columns) + '|')
  for row in rows:
    cells = [escape(format_value(row.get(c), formats.get(c))) for c in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  text = '\n'.join(lines) + '\n'
  if path is not None:
    _atomic_write(path, text.encode('utf-8'))
  return text


def plot_series(path: str | os.PathLike, series: Mapping[str, Iterable[tuple[float, float]]],
                xlabel: str, ylabel: str, logx: bool = False, title: str | None = None,
                annotate: Mapping[str, Sequence[str]] | None = None, markers: bool = True,
                logy: bool = False, lines: bool = True,
                styles: Mapping[str, Mapping[str, Any]] | None = None) -> None:
  """Plots one line (or scatter) per label and saves a PNG.

  Args:
    path: the PNG file.
    series: label -> [(x, y), ...]. Points are drawn in the order given (sort them for curves).
    xlabel, ylabel, title: axis labels and an optional title.
    logx, logy: logarithmic axes (multiply-adds span decades).
    annotate: label -> one text per point (e.g. 'w=1.4'), written next to each point.
    markers: draw a marker at every point.
    lines: join the points of a series; False gives a scatter.
    styles: label -> matplotlib `plot` keywords that override the above for that series, e.g.
      {'reward 0.9': {'linestyle': ':', 'marker': None, 'color': 'gray'}}.
  """
  import matplotlib
  matplotlib.use('Agg')  # No display; must precede pyplot's import in a fresh process.
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
  try:
    for label, points in series.items():
      points = list(points)
      if not points:
        continue
      xs = [float(p[0]) for p in points]
      ys = [float(p[1]) for p in points]
      style = {'marker': 'o' if markers else None, 'linestyle': '-' if lines else 'none',
               **(styles or {}).get(label, {})}
      ax.plot(xs, ys, label=label, **style)
      texts = (annotate or {}).get(label)
      if texts:
        for x, y, text in zip(xs, ys, texts):
          ax.annotate(str(text), (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7)
    if logx:
      ax.set_xscale('log')
    if logy:
      ax.set_yscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
      ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
    if len(series) > 1 or any(series):
      ax.legend(loc='best', fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    # metadata={'Software': None} drops the version string; Agg PNGs carry no creation time.
    fig.savefig(buffer, format='png', metadata={'Software': None})
  finally:
    plt.close(fig)
  _atomic_write(path, buffer.getvalue())
