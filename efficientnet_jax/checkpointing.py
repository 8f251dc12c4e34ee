"""Checkpoints in the workdir: orbax, asynchronous, keeping N (and the best), never half-written.

Each checkpoint holds the train state plus a small JSON fingerprint of what produced it (model,
coefficients, classes, optimizer, batch size, seed). The data position needs no state of its own:
the input pipeline reads a pure function of (seed, step, batch size), so the restored step is the
position. A restart with the same workdir resumes from the newest checkpoint that restores:

* a newer one that is incomplete or damaged (a kill during the save, a lost file) is skipped with
  a warning naming it; the run fails only when none restores;
* a workdir written by a different model or recipe (or batch size, which would move the data
  position and the schedule) is refused with the differences named;
* restoring targets the current run's shardings, so a checkpoint written on 256 chips restores
  on 8, or on one CPU.

What is never taken for a checkpoint: orbax writes a step into a temporary directory and makes it
visible only when complete. On a local or NFS path that is an atomic rename, and temporaries left
by a killed save are deleted at start-up (`cleanup_tmp_directories`). On gs://, where renames are
copies, orbax instead marks a finished step with a commit file and ignores steps without one.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

from efficientnet_jax import configs_lib, errors

# Config fields that change the state's structure or meaning, or the data a step reads: resuming
# across a change in any of them is refused. Everything else (schedule length, logging) may change.
FINGERPRINT_FIELDS = ('model', 'width', 'depth', 'num_classes', 'stem_stride', 'optimizer',
                      'momentum', 'dataset', 'freeze_backbone', 'batch_size', 'seed')
BEST_DIR = 'best_checkpoint'
CONFIG_FILE = 'config.json'


class CheckpointMismatchError(errors.UserError, ValueError):
  """The workdir's checkpoint was written by a different model or recipe."""


class CheckpointRestoreError(errors.UserError, ValueError):
  """No checkpoint of the workdir could be restored."""


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint must agree with to be resumed by `config` (a resolved config)."""
  fields = {k: config.get(k) for k in FINGERPRINT_FIELDS}
  fields['ema'] = bool(config.ema_decay > 0)
  return fields


def check_workdir_writable(workdir: str) -> None:
  """Fails at start-up, not at the first checkpoint hours later, if `workdir` can't be written."""
  # One probe file per process: every host of a multi-host job runs this on the same (shared)
  # workdir, and a common name would let one host delete the file another is checking.
  probe = os.path.join(workdir, f'.write_probe.{uuid.uuid4().hex}')
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('ok')
    tf.io.gfile.remove(probe)
  except Exception as e:  # gfile raises several types (PermissionDenied, NotFound, OSError).
    raise errors.ConfigError(
        f'The workdir {workdir!r} is not writable ({type(e).__name__}: {e}). Checkpoints, '
        'metrics and logs go there, so training cannot start. Pass a --workdir you can write '
        '(a local directory you own, or a gs:// bucket this VM\'s service account can write).'
    ) from e


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the run's resolved config as workdir/config.json (process 0; replaced atomically).

  What a checkpoint alone does not say (resolution, crop, interpolation, the dataset) is needed
  to rebuild and use the model: `python -m efficientnet_jax.export --workdir=...` reads it.
  """
  if jax.process_index() != 0:
    return
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  staging = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
  with tf.io.gfile.GFile(staging, 'w') as f:
    # Best effort: a value JSON cannot hold is written as its repr, never failing the run.
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  tf.io.gfile.rename(staging, path, overwrite=True)


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  """workdir/config.json over the default recipe (fields it lacks keep their defaults), or None.

  Fields this version does not know are dropped with a warning.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    stored = json.load(f)
  config = configs_lib.base_config()
  unknown = sorted(set(stored) - set(config))
  if unknown:
    logging.warning('%s: ignoring field(s) this version does not know: %s', path, unknown)
  with config.unlocked():
    for key in sorted(set(stored) & set(config)):
      try:
        config[key] = stored[key]
      except (TypeError, ValueError) as e:  # e.g. a value written as its repr
        logging.warning('%s: keeping the default of %s (%s).', path, key, e)
  return config


def _manager(directory: str, max_to_keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  # Read-only (export) leaves a live run's in-flight saves and temporaries alone.
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=None if read_only else max_to_keep, read_only=read_only,
          save_interval_steps=0 if read_only else 1,
          enable_async_checkpointing=not read_only, create=not read_only,
          cleanup_tmp_directories=not read_only))


class Checkpointer:
  """Saves and restores the train state under `workdir/checkpoints`.

  With `best_metric` set, the state at the best evaluation so far (`best_mode` 'max' or 'min')
  is also kept, under `workdir/best_checkpoint`, whatever `keep_checkpoints` deletes.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               best_metric: str | None = None, best_mode: str = 'max', read_only: bool = False):
    self.directory = os.path.join(workdir, 'checkpoints')
    self.fingerprint = fingerprint(config)
    self.manager = _manager(self.directory, config.keep_checkpoints, read_only)
    self.best_metric, self.best_mode = best_metric, best_mode
    self._best = None
    if best_metric:
      self.best_manager = _manager(os.path.join(workdir, BEST_DIR), 1)
      step = self.best_manager.latest_step()
      if step is not None:
        meta = self.best_manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}
        self._best = meta.get('best_value')

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _args(self, state, extra_meta=None):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave({**self.fingerprint, **(extra_meta or {})}))

  def save(self, step: int, state: Any) -> bool:
    """Starts an asynchronous save of `state` at `step`; training continues meanwhile."""
    return self.manager.save(step, args=self._args(state), force=True)

  def maybe_save_best(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
    """Keeps `state` as the best checkpoint when `metrics[best_metric]` beats the best so far."""
    if not self.best_metric or self.best_metric not in metrics:
      return False
    value = float(metrics[self.best_metric])
    better = (self._best is None or (value > self._best if self.best_mode == 'max'
                                     else value < self._best))
    if better:
      self._best = value
      self.best_manager.save(step, args=self._args(
          state, {'best_metric': self.best_metric, 'best_value': value}), force=True)
      logging.info('New best %s = %.6g at step %d, kept in %s.', self.best_metric, value, step,
                   self.best_manager.directory)
    return better

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the checkpoint at `step` onto `abstract_state`, refusing another recipe's."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    self._check_fingerprint(meta, step)
    return self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state

  def restore_latest(self, abstract_state: Any) -> Any | None:
    """Restores the newest checkpoint that restores onto `abstract_state` (None if none exist).

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s carrying the current run's shardings.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta.meta
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
        failures.append((step, e))
        logging.warning('Checkpoint %s/%d is incomplete or damaged (%s: %s); trying an older one.',
                        self.directory, step, type(e).__name__, str(e)[:300])
        continue
      self._check_fingerprint(meta, step)
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        logging.warning('Checkpoint %s/%d does not restore (%s: %s); trying an older one.',
                        self.directory, step, type(e).__name__, str(e)[:300])
        continue
      if failures:
        self._set_aside([s for s, _ in failures])
        logging.warning('Resuming from step %d; newer checkpoint(s) %s could not be restored and '
                        'were moved to %s.', step, [s for s, _ in failures], self.damaged_directory)
      return restored.state
    if failures:
      listing = '\n'.join(f'  step {s}: {type(e).__name__}: {str(e)[:300]}' for s, e in failures)
      raise CheckpointRestoreError(
          f'None of the {len(failures)} checkpoint(s) in {self.directory} could be restored:\n'
          f'{listing}\nEither they are damaged (a lost or truncated file), or this config changes '
          'the state\'s structure in a way the fingerprint does not name (e.g. '
          'grad_clip_norm or ema_decay add or remove optimizer state), or a different version of '
          'efficientnet_jax wrote them. Resume with the config and version that wrote them, or '
          'restore the files from a backup; the rest of the workdir (metrics, the best '
          'checkpoint) is unaffected.')
    return None

  @property
  def damaged_directory(self) -> str:
    return os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of the manager's directory (kept, not deleted: a user may
    still recover files from them), so the resumed run can save those steps again."""
    if jax.process_index() == 0:
      tf.io.gfile.makedirs(self.damaged_directory)
      for step in steps:
        target = os.path.join(self.damaged_directory, f'{step}-{uuid.uuid4().hex[:8]}')
        tf.io.gfile.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('efficientnet_jax: damaged checkpoints set aside')
    self.manager.reload()

  def _check_fingerprint(self, saved: dict[str, Any] | None, step: int) -> None:
    saved = saved or {}
    # A field the checkpoint lacks (written before it was fingerprinted) is not compared.
    diffs = [f'{k}: checkpoint has {saved[k]!r}, config has {v!r}'
             for k, v in self.fingerprint.items() if k in saved and saved[k] != v]
    if diffs:
      hint = ''
      if any(d.startswith('batch_size') for d in diffs):
        hint = (' A different batch size would move the data position and stretch the learning '
                'rate schedule; to fit a smaller slice keep the global batch and raise '
                '--config.grad_accum_steps.')
      raise CheckpointMismatchError(
          f'The workdir already holds a checkpoint (step {step} in {self.directory}) written by '
          f'a different model or recipe, so this run cannot resume from it: '
          f'{"; ".join(diffs)}.{hint} Use a new --workdir for a different experiment, or pass the '
          'config that wrote this checkpoint to resume it.')

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()
    if self.best_metric:
      self.best_manager.wait_until_finished()

  def close(self) -> None:
    """Waits for every in-flight save, then releases the managers."""
    try:
      self.wait_until_finished()
    finally:
      self.manager.close()
      if self.best_metric:
        self.best_manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """Attaches target shardings to a tree of shapes, for restoring onto the current mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
