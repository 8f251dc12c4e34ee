"""When to stop and save: preemption notices (SIGTERM) and time-based checkpoints.

Cloud TPU VMs, spot/preemptible VMs, GKE and SLURM send SIGTERM some time before they kill a job.
`PreemptionWatch.reached(step)`, asked at every step boundary, says when the job must save and
exit; every process of a multi-host job gets the same answer at the same step:

* one process: a SIGTERM handler, installed when `main` starts, sets a flag that the next step
  boundary reads;
* several processes (`jax.distributed`, whose preemption service is on by default): JAX's own
  SIGTERM notifier and its preemption sync point (`multihost_utils.reached_preemption_sync_point`)
  agree on one step across hosts, so no host saves alone and none waits for a save that never
  comes. No Python handler is installed there: it would replace JAX's.

`SaveClock` decides time-based checkpoints (`config.checkpoint_every_minutes`) the same way on
every host: process 0's clock decides, and the decision is broadcast at the boundaries where the
loop already synchronises with the devices.
"""
from __future__ import annotations

import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

__all__ = ['PreemptionWatch', 'Preempted', 'SaveClock', 'install_sigterm_handler']


class Preempted(Exception):
  """The run saved a checkpoint at `step` after a preemption notice and stopped (not an error)."""

  def __init__(self, step: int, directory: str):
    super().__init__(f'preempted at step {step}; checkpoint saved in {directory}')
    self.step = step


def _distributed() -> bool:
  return jax.process_count() > 1


# The notice flag of this process. `install_sigterm_handler` (called by `main` first thing) sets
# it from SIGTERM, so a notice that arrives while the run restores or compiles is not lost.
_NOTICE = threading.Event()
_PROCESS_HANDLER = False


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  # Only a flag: the step boundary saves, so a half-applied step is never written.
  _NOTICE.set()


def install_sigterm_handler() -> None:
  """Installs the process's SIGTERM handler for a one-process run, for its whole lifetime.

  Call it before the run's set-up (and after `jax.distributed.initialize` decides that there
  is one process): from then on SIGTERM never kills the process mid-step, and the training
  loop saves at its first step boundary.
  """
  global _PROCESS_HANDLER
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)
    _PROCESS_HANDLER = True


class PreemptionWatch:
  """Tells the loop, at a step boundary, that a preemption notice arrived (use as a context).

  Without the process handler (a caller of `train_and_evaluate` other than `main`), the watch
  installs one for its own duration and restores the previous handler after.
  """

  def __init__(self):
    self._previous = None
    self._installed = False

  def __enter__(self) -> 'PreemptionWatch':
    if (not _PROCESS_HANDLER and not _distributed()
        and threading.current_thread() is threading.main_thread()):
      _NOTICE.clear()  # a notice from an earlier run in this process is not this run's
      self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def notify(self) -> None:
    """Marks a preemption notice as received (what the SIGTERM handler does)."""
    _NOTICE.set()

  def reached(self, step: int) -> bool:
    """True at the step boundary where this run must save and stop (the same on every host)."""
    if _distributed():
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
        return False
    return _NOTICE.is_set()


class SaveClock:
  """Time-based checkpoints every `minutes` (0 disables), decided identically on every host."""

  def __init__(self, minutes: float):
    self.seconds = float(minutes) * 60.0
    self.last = time.monotonic()

  def due(self) -> bool:
    """Whether a time-based checkpoint is due; every process must call it at the same step."""
    if self.seconds <= 0:
      return False
    decision = np.int32(time.monotonic() - self.last >= self.seconds)
    if _distributed():
      decision = multihost_utils.broadcast_one_to_all(decision)
    return bool(decision)

  def saved(self) -> None:
    self.last = time.monotonic()


def log_preempted(step: int, directory: str) -> None:
  logging.warning('preempted at step %d; checkpoint saved in %s', step, directory)
