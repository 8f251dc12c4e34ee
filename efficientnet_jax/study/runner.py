"""Trains a study's candidates through the real training loop, one workdir each, resumably.

A candidate is a full training config (model, width, depth, resolution, budget) plus the study's
own columns (e.g. alpha, beta, gamma or the scaled dimension). `run_candidates` gives each one
the directory `workdir/<candidate name>`, trains it with `train.train_and_evaluate`, and writes
what the study reports into `result.json` there:

    from efficientnet_jax.study import runner
    candidates = [runner.Candidate('w1.4', runner.scaled_config(base, width=1.4), {'w': 1.4})]
    rows = runner.run_candidates(candidates, workdir)   # one dict per candidate, in order

Resuming: a candidate whose `result.json` exists is not retrained (its result is read back), and
an interrupted one resumes from its latest checkpoint (`train_and_evaluate` restores from its
workdir). Rerunning a finished study therefore only rewrites its tables and plots. A result
written under a different recipe is refused rather than silently mixed in.

Multiply-adds and parameters are counted exactly on the model the config builds, at the config's
resolution (`complexity.model_complexity`), before any training: they cost a trace, not a run.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from efficientnet_jax import complexity, configs_lib, train
from efficientnet_jax.models import variants

__all__ = ['RESULT_FILE', 'UNCHECKED_FIELDS', 'Candidate', 'measure', 'network_name',
           'run_candidate', 'run_candidates', 'scaled_config', 'top1_of']

RESULT_FILE = 'result.json'
# Fields that do not change what a run computes: a finished result stays valid if they differ
# (e.g. the data moved, or logging got more frequent).
UNCHECKED_FIELDS = frozenset({
    'data_dir', 'manual_dir', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'profile', 'prefetch_batches', 'eval_batch_size', 'eval_every_steps', 'conv_impl'})

_RESULT_FIELDS = ('params', 'madds', 'top1', 'top5', 'eval_loss', 'train_seconds')

TrainFn = Callable[[ml_collections.ConfigDict, str], tuple[Any, Mapping[str, float]]]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One network to train: a directory name, its training config and the study's columns."""
  name: str
  config: ml_collections.ConfigDict
  labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.name or '/' in self.name or self.name.startswith('.'):
      raise ValueError(f'Candidate name {self.name!r} must be a plain directory name.')


def scaled_config(base: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of the (locked) training config `base` with some fields replaced, then resolved.

  Typical fields: model, width, depth, resolution, dropout. A mistyped field raises. Coefficients
  neither `base` nor `fields` set become the model's own (`configs_lib.resolve`), so the result
  names a concrete network.
  """
  config = copy.deepcopy(base)
  config.lock()
  for key, value in fields.items():
    if key == 'resolution':
      value = int(value)
    elif isinstance(value, float) or key in ('width', 'depth'):
      value = float(value)
    setattr(config, key, value)
  return configs_lib.resolve(config)


def network_name(config: ml_collections.ConfigDict) -> str:
  """A directory name saying which network a config trains, e.g. 'efficientnet-b0-w1.1-d1.2-r258'.

  Studies name candidates by the network, so the same network reached by two routes (the
  baseline of every curve, the step-1 winner at phi = 1) is trained once. A config with its own
  block table (`config.blocks`) adds the table's digest: 'efficientnet-b0-blocks1a2b3c4d-w1-...'.
  """
  config = configs_lib.resolve(config)
  blocks = config.get('blocks')
  table = f'-blocks{variants.block_table_digest(blocks)}' if blocks is not None else ''
  return (f'{config.model}{table}-w{config.width:.6g}-d{config.depth:.6g}'
          f'-r{int(config.resolution)}')


def measure(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Exact trainable parameters and multiply-adds per image of the model `config` trains."""
  config = configs_lib.resolve(config)
  model = train.build_model(config)
  cost = complexity.model_complexity(model, config.resolution)
  return {'params': int(cost['params']), 'madds': int(cost['madds'])}


def top1_of(metrics: Mapping[str, float]) -> float:
  """The reported accuracy: the EMA weights' top-1 when EMA is on (the paper's), else the raw."""
  for key in ('eval_ema/top1', 'eval/top1'):
    if key in metrics:
      return float(metrics[key])
  raise KeyError(f'No top-1 in the eval metrics {sorted(metrics)}.')


def _comparable(config_dict: Mapping[str, Any]) -> dict[str, Any]:
  # Through JSON, so a config read back from result.json compares equal (tuples become lists).
  plain = json.loads(json.dumps(dict(config_dict), sort_keys=True, default=str))
  return {k: v for k, v in plain.items() if k not in UNCHECKED_FIELDS}


def _check_same_recipe(path: epath.Path, saved: Mapping[str, Any],
                       config: ml_collections.ConfigDict) -> None:
  want, have = _comparable(config.to_dict()), _comparable(saved)
  # Only fields both know: a field added to the recipe later (at its default) does not void
  # finished results.
  diffs = [f'{k}: result has {have[k]!r}, config has {want[k]!r}'
           for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  if diffs:
    raise ValueError(
        f'{path} was trained with a different config ({"; ".join(diffs)}). Use a new --workdir '
        f'for a new budget or recipe, or delete {path.parent} to retrain this candidate.')


def _write_json(path: epath.Path, data: Mapping[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + '\n')
  tmp.replace(path)  # a crash mid-write never leaves a truncated result that would be trusted


def run_candidate(candidate: Candidate, workdir: str | epath.PathLike, *, train_model: bool = True,
                  train_fn: TrainFn | None = None,
                  extra: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
                  ) -> dict[str, Any]:
  """Trains one candidate in `workdir/<name>` (or reads its finished result) and returns its row.

  The row holds the candidate's name and labels, model, width, depth, resolution, params, madds
  and, when trained, top1, top5, eval_loss, train_seconds and 'cached' (True when read back from
  result.json rather than trained now). With `train_model=False` only the cost is measured and
  nothing is written. `extra(row)` adds fields computed from a trained row (e.g. a search's
  reward) to the row and to result.json; for a cached row they are computed again.
  """
  config = configs_lib.resolve(candidate.config)
  directory = epath.Path(workdir) / candidate.name
  path = directory / RESULT_FILE
  row = {'name': candidate.name, **candidate.labels, 'model': config.model,
         'width': config.width, 'depth': config.depth, 'resolution': config.resolution}
  if path.exists():
    saved = json.loads(path.read_text())
    _check_same_recipe(path, saved['config'], config)
    row.update({k: saved[k] for k in _RESULT_FIELDS if k in saved})
    row.update(extra(row) if extra else {})
    row['cached'] = True
    return row
  row.update(measure(config))
  if not train_model:
    return row
  train_fn = train_fn or train.train_and_evaluate
  start = time.time()
  _, metrics = train_fn(config, str(directory))
  seconds = time.time() - start
  row.update({
      'top1': top1_of(metrics),
      'top5': float(metrics.get('eval_ema/top5', metrics.get('eval/top5', float('nan')))),
      'eval_loss': float(metrics.get('eval_ema/loss', metrics.get('eval/loss', float('nan')))),
      'train_seconds': round(seconds, 1),
  })
  added = dict(extra(row)) if extra else {}
  row.update(added)
  if jax.process_index() == 0:
    saved = {k: row[k] for k in ('name', 'model', 'width', 'depth', 'resolution',
                                 *_RESULT_FIELDS)}
    _write_json(path, {**saved, **added, 'config': config.to_dict()})
  row['cached'] = False
  return row


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


def run_candidates(candidates: Sequence[Candidate], workdir: str | epath.PathLike, *,
                   train_model: bool = True, train_fn: TrainFn | None = None,
                   ) -> list[dict[str, Any]]:
  """Runs every candidate in order (see `run_candidate`), logging k/N, elapsed time and ETA.

  Candidates may repeat a name (the baseline is the first point of every curve): the network
  is trained once and each occurrence gets its own labels. The same name with another config
  is an error. The ETA assumes each remaining network takes as long as the mean of those
  trained so far in this run; results read back from result.json cost nothing.
  """
  unique: dict[str, Candidate] = {}
  for c in candidates:
    first = unique.setdefault(c.name, c)
    if first.config.to_dict() != c.config.to_dict():
      raise ValueError(f'Two candidates are named {c.name!r} but have different configs.')
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  total = len(unique)
  pending = {n for n in unique if not (workdir / n / RESULT_FILE).exists()}
  logging.info('%d networks in %s: %d finished earlier, %d to %s.', total, workdir,
               total - len(pending), len(pending), 'train' if train_model else 'measure')
  results: dict[str, dict[str, Any]] = {}
  trained_seconds, trained = 0.0, 0
  start = time.time()
  for k, (name, candidate) in enumerate(unique.items(), 1):
    row = run_candidate(candidate, workdir, train_model=train_model, train_fn=train_fn)
    results[name] = {key: value for key, value in row.items() if key not in candidate.labels}
    if row.get('cached'):
      logging.info('[%d/%d] %s: finished earlier (top-1 %.4f), not retrained.', k, total, name,
                   row['top1'])
    elif not train_model:
      logging.info('[%d/%d] %s: %s params, %.4gM multiply-adds.', k, total, name,
                   f'{row["params"]:,}', row['madds'] / 1e6)
    else:
      trained += 1
      trained_seconds += row['train_seconds']
      remaining = len(pending) - trained
      logging.info('[%d/%d] %s: top-1 %.4f, %.4gM multiply-adds, %s params, trained in %s; '
                   'elapsed %s, ETA %s for %d more.', k, total, name, row['top1'],
                   row['madds'] / 1e6, f'{row["params"]:,}', _duration(row['train_seconds']),
                   _duration(time.time() - start),
                   _duration(remaining * trained_seconds / trained), remaining)
  rows = []
  for c in candidates:
    result = dict(results[c.name])
    rows.append({'name': result.pop('name'), **c.labels, **result})
  return rows
