"""Checkpoints in the workdir: orbax CheckpointManager, asynchronous, keeping N, restorable anywhere.

Each checkpoint holds the train state plus a small JSON 'fingerprint' of what produced it (model,
coefficients, classes, optimizer). A restart with the same workdir resumes from the latest step;
a workdir written by a different model or recipe fails with a message naming what differs,
instead of an opaque shape error or, worse, silently training a mixture. Restoring targets the
current run's shardings, so a checkpoint written on 256 chips restores on 8, or on one CPU.
"""
from __future__ import annotations

import os
import uuid
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorflow as tf

# Config fields that change the state's structure or meaning: resuming across a change in any of
# them is refused. Everything else (batch size, schedule length, logging) may change on restart.
FINGERPRINT_FIELDS = ('model', 'width', 'depth', 'num_classes', 'stem_stride', 'optimizer',
                      'momentum', 'dataset', 'freeze_backbone')
# Values of fields added after checkpoints were first written, as older checkpoints (and configs
# without the field) implicitly had them. `config.init_from` is deliberately not a field: it only
# decides how step 0 is initialised, and a resumed run never reads it.
FINGERPRINT_DEFAULTS = {'freeze_backbone': False}


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written by a different model or recipe."""


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint must agree with to be resumed by `config`."""
  fields = {k: config.get(k, FINGERPRINT_DEFAULTS.get(k)) for k in FINGERPRINT_FIELDS}
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
    raise PermissionError(
        f'The workdir {workdir!r} is not writable ({type(e).__name__}: {e}). Checkpoints, '
        'metrics and logs go there, so training cannot start. Pass a --workdir you can write '
        '(a local directory you own, or a gs:// bucket this VM\'s service account can write).'
    ) from e


class Checkpointer:
  """Saves and restores the train state under `workdir/checkpoints`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.directory = os.path.join(workdir, 'checkpoints')
    self.fingerprint = fingerprint(config)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True,
            create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` at `step`; training continues meanwhile."""
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(self.fingerprint)), force=force)

  def restore_latest(self, abstract_state: Any) -> Any | None:
    """Restores the newest checkpoint onto `abstract_state`'s shapes and shardings, if any.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s carrying the current run's shardings.
    """
    step = self.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    self._check_fingerprint(meta, step)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f'The checkpoint at step {step} in {self.directory} does not fit this run\'s state '
          f'({type(e).__name__}: {e}). Start from a fresh --workdir, or restore with the config '
          'that wrote it.') from e
    return restored.state

  def _check_fingerprint(self, saved: dict[str, Any] | None, step: int) -> None:
    saved = saved or {}
    saved = {k: saved.get(k, FINGERPRINT_DEFAULTS.get(k)) for k in self.fingerprint}
    diffs = [f'{k}: checkpoint has {saved[k]!r}, config has {v!r}'
             for k, v in self.fingerprint.items() if saved[k] != v]
    if diffs:
      raise CheckpointMismatchError(
          f'The workdir already holds a checkpoint (step {step} in {self.directory}) written by '
          f'a different model or recipe, so this run cannot resume from it: '
          f'{"; ".join(diffs)}. Use a new --workdir for a different experiment, or pass the '
          'config that wrote this checkpoint to resume it.')

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """Attaches target shardings to a tree of shapes, for restoring onto the current mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
