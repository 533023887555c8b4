"""The device mesh and data placement shared by every step: one ``data`` axis over all devices
(of all hosts); the state replicated, batches split on ``data``."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh named ``data`` over all devices (of all hosts)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Place a pytree fully replicated on the mesh (for the state)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def abstract(mesh: Mesh, tree: Any) -> Any:
    """Shapes/dtypes of a pytree as replicated ShapeDtypeStructs (restore targets, templates)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def shard_batch(mesh: Mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's numpy batch -> global arrays split on ``data`` (multi-host safe)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every host (gathers across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
