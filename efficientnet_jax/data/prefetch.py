"""Host batches onto the device mesh, a few steps ahead of the train step.

Each process passes only the examples it read; `global_batch` assembles them into global arrays
sharded over the mesh's 'data' axis (their concatenation in process order). Bookkeeping keys
(the example ids and stream positions of a train batch) stay on the host.
"""
from __future__ import annotations

import collections
import json
import os
import threading
from typing import Iterator

import jax
import numpy as np

from efficientnet_jax import sharding

__all__ = ['InputLog', 'dispose_in_background', 'global_batch', 'prefetch_to_mesh']


def global_batch(local_batch: dict[str, np.ndarray], mesh,
                 host_keys=('example_id', 'position')) -> dict[str, jax.Array]:
  """This process's slice of a batch as global arrays sharded over 'data' (host keys dropped)."""
  data = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(data, np.asarray(v))
          for k, v in local_batch.items() if k not in host_keys}


def dispose_in_background(holder: list) -> None:
  """Drops the objects in `holder` (emptying it) on a daemon thread.

  Deleting a tf.data iterator whose pipeline is autotuned waits for TensorFlow's autotuning
  thread to finish its current optimisation period, which grows to a minute over a run (seen
  with TF 2.21: 25-50 s at the end of 80-step CPU runs). The deletion releases the GIL, so it
  can happen off the caller's path; the caller must hold no other reference.
  """
  threading.Thread(target=holder.clear, name='dispose_tf_data_iterator', daemon=True).start()


def prefetch_to_mesh(iterator: Iterator[dict], mesh, size: int,
                     on_batch=None) -> Iterator[dict]:
  """Turns host batches into global device arrays `size` batches ahead of the consumer.

  Pass the source iterator itself (e.g. `dataset.as_numpy_iterator()`), no other reference to it:
  when this generator ends or is dropped, the source is deleted on a background thread
  (`dispose_in_background`), so a tf.data iterator's slow teardown never stalls the caller.
  `on_batch(host_batch)`, if given, sees every host batch in order as it is consumed (e.g. to
  record which examples a step read).
  """
  queue = collections.deque()
  source = [iterator]
  del iterator

  def enqueue(n):
    for batch in source[0]:
      queue.append((batch, global_batch(batch, mesh)))
      if len(queue) >= n:
        return

  try:
    enqueue(max(size, 1))
    while queue:
      host, device = queue.popleft()
      if on_batch is not None:
        on_batch(host)
      yield device
      enqueue(max(size, 1))
  finally:
    dispose_in_background(source)


class InputLog:
  """Records which examples every step read: `workdir/input_ids/process_<k>.jsonl`.

  One JSON line per step and process: {"step": s, "example_id": [...], "position": [...]} (a
  step redone after a restart is written again; the last line for a step is what it read).
  Useful for finding the examples behind a loss spike, and for checking exact resumes.
  """

  def __init__(self, workdir: str, global_batch_size: int):
    directory = os.path.join(workdir, 'input_ids')
    os.makedirs(directory, exist_ok=True)
    self.global_batch_size = global_batch_size
    self.file = open(os.path.join(directory, f'process_{jax.process_index()}.jsonl'), 'a',
                     buffering=1, encoding='utf-8')

  def __call__(self, host_batch: dict[str, np.ndarray]) -> None:
    positions = np.asarray(host_batch['position'])
    self.file.write(json.dumps({
        'step': int(positions[0]) // self.global_batch_size + 1,
        'example_id': np.asarray(host_batch['example_id']).tolist(),
        'position': positions.tolist()}) + '\n')

  def close(self) -> None:
    self.file.close()
