"""Is this process one of several? Detecting the multi-host environments our users launch in.

`python -m efficientnet_jax.main` calls `jax.distributed.initialize()` when `detect()` names an
environment (or when --coordinator_address is given); JAX then reads the coordinator, process
count and index from that same environment. Without it, every host of a pod would train alone on
its own devices, get no preemption notices, and hang its peers when it crashed.

* 'slurm': a SLURM job step with more than one task (`srun`).
* 'gke': a GKE TPU pod, whose workers are listed in TPU_WORKER_HOSTNAMES or
  TPU_PROCESS_ADDRESSES (multi-slice jobs too: MEGASCALE_* comes on top).
* 'cloud_tpu': a Cloud TPU VM pod slice (v4-32, v5e-256, ...). Nothing in its environment says
  so; this host has TPU chips and the VM's metadata server lists more than one worker. The
  metadata server is asked only when this host has TPU chips, so nothing waits elsewhere.
"""
from __future__ import annotations

import os
import urllib.request
from typing import Callable, Mapping

from absl import logging

__all__ = ['detect', 'local_tpu_chips', 'tpu_worker_endpoints']

_METADATA_URL = ('http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
                 'worker-network-endpoints')


def local_tpu_chips() -> int:
  """TPU chips attached to this host (read from the PCI bus; no TPU runtime is started)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # pylint: disable=broad-except  (a private API; absent means no TPU)
    return 0


def tpu_worker_endpoints(timeout_s: float = 5.0) -> str | None:
  """The Cloud TPU VM metadata's comma-separated worker list, or None if it can't be read."""
  request = urllib.request.Request(_METADATA_URL, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      return response.read().decode()
  except Exception as e:  # pylint: disable=broad-except  (no metadata server: not a TPU VM)
    logging.warning('This host has TPU chips but its worker list could not be read from the VM '
                    'metadata (%s); running as a single process. On a multi-host slice pass '
                    '--jax_distributed=true.', e)
    return None


def _count(listing: str | None) -> int:
  return len([part for part in (listing or '').split(',') if part.strip()])


def detect(environ: Mapping[str, str] | None = None, *,
           tpu_chips: Callable[[], int] = local_tpu_chips,
           worker_endpoints: Callable[[], str | None] = tpu_worker_endpoints) -> str | None:
  """The multi-process environment of this process ('slurm', 'gke', 'cloud_tpu'), or None."""
  env = os.environ if environ is None else environ
  if 'SLURM_JOB_ID' in env:
    tasks = env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1'))
    if int(tasks) > 1:
      return 'slurm'
  if _count(env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')) > 1:
    return 'gke'
  if tpu_chips() > 0 and _count(worker_endpoints()) > 1:
    return 'cloud_tpu'
  return None
