"""Where arrays live: the device mesh, batch sharding and (optionally FSDP) state sharding.

Everything is declared at the boundary with `NamedSharding`s over one mesh axis, 'data'; the
model code never mentions devices. Under `jax.jit`, a reduction over the data-sharded batch axis
(BatchNorm statistics, the loss mean) is a global one, so BN is synchronised across all devices
and hosts without any hand-written collective.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficientnet_jax import errors

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (all hosts) with the single axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  """Fails early, with the fix, when a global batch cannot be split evenly over the devices."""
  devices = mesh.devices.size
  if batch_size % devices:
    lower = batch_size // devices * devices
    raise errors.ConfigError(
        f'config.{what}={batch_size} is not divisible by the {devices} devices of the mesh '
        f'({jax.process_count()} process(es) x {jax.local_device_count()} local devices): each '
        f'device must get the same number of examples. Use a multiple of {devices}, e.g. '
        f'--config.{what}={max(devices, lower)} or {lower + devices}.')


def fsdp_partition_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
  """Shards an array's largest axis that divides evenly over 'data', if it is big enough.

  Small arrays (BN vectors, biases, tiny kernels) stay replicated: sharding them saves nothing
  and costs an all-gather per use.
  """
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool, fsdp_min_size: int) -> Any:
  """Shardings for a tree of abstract arrays: replicated, or FSDP-sharded over 'data'."""
  num_shards = mesh.devices.size

  def sharding_for(leaf):
    shape = getattr(leaf, 'shape', ())
    if not fsdp or not shape:
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_partition_spec(tuple(shape), num_shards, fsdp_min_size))

  return jax.tree.map(sharding_for, abstract_state)

