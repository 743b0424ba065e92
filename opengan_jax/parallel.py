"""Data parallelism: one device mesh axis, per-device steps under `jax.shard_map`.

Every training step is written as per-device code, as with `pmap`: each device computes on its shard of
the global batch, and gradients, losses and BatchNorm statistics are averaged over `DATA_AXIS`.
The mesh spans all devices of all processes, so the same code runs on one CPU, on several local
devices, or multi-host after `jax.distributed.initialize()`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'  # Name of the single mesh axis over which batches are split.


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """Build a one-axis mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = 'batch_size') -> None:
  """Raise ValueError unless `global_batch` splits evenly over the mesh and the processes."""
  num_devices = mesh.devices.size
  if global_batch <= 0 or global_batch % num_devices:
    raise ValueError(
      f'{what}={global_batch} must be a positive multiple of the number of devices '
      f'({num_devices}); set --config.{what} to a multiple of {num_devices}.'
    )
  if global_batch % jax.process_count():
    raise ValueError(
      f'{what}={global_batch} must be a multiple of the number of processes '
      f'({jax.process_count()}).'
    )


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits an array's leading axis over the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Place every array of `tree` on all devices of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's slice of a batch into global arrays split over the mesh."""
  sharding = batch_sharded(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in local_batch.items()
  }
