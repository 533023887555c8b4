"""The devices of a run: one mesh over all of them, data placement, and several processes.

The mesh has one ``data`` axis over all devices (of all hosts); the state is replicated, batches
are split on ``data``. Several processes (hosts) join one JAX runtime from ``config.distributed``
(:func:`initialize`, before anything touches a device): each runs the same command with its own
``process_id`` (or lets ``jax.distributed.initialize()`` detect everything, as on TPU pods and
SLURM); ``jax.devices()`` then lists the devices of every process and the mesh spans them. A
process that dies is noticed by the others through JAX's heartbeats: after
``distributed.heartbeat_timeout_seconds`` they stop instead of waiting forever.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
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
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize(d: Any) -> None:
    """``jax.distributed.initialize`` with the group's fields when ``d.enabled``; call it first,
    before anything touches a device, on a group that config.validate_distributed accepted."""
    if not d.enabled:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
    jax.distributed.initialize(initialization_timeout=d.timeout_seconds,
                               heartbeat_timeout_seconds=d.heartbeat_timeout_seconds, **kwargs)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true on any process (a collective: every process must call it at the
    same point). Multi-process runs use it so that all processes stop at the same step when only
    some of them got SIGTERM/Ctrl-C; a single process returns ``flag`` without any sync."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def sync(name: str) -> None:
    """Wait until every process reaches this point (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
