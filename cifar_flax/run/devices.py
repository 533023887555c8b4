"""The devices of a run: one mesh over all of them, data placement, and several processes.

The mesh has one ``data`` axis over all devices (of all hosts); the state is replicated, batches
are split on ``data`` (``config.batch_size`` is global and must divide by the device count).
Several processes (hosts) join one JAX runtime from ``config.distributed`` (:func:`join_processes`,
before anything touches a device): each runs the same command with its own ``process_id`` (or lets
``jax.distributed.initialize()`` detect everything, as on TPU pods, SLURM and GKE);
``jax.devices()`` then lists the devices of every process and the mesh spans them. A process that
dies is noticed by the others through JAX's heartbeats: after
``distributed.heartbeat_timeout_seconds`` they stop instead of waiting forever.

What a multi-process run does (train.py, input_pipeline.py, checkpoints.py):

- Each process reads only its own part of every split (logged as ``Input shard: process i of n
  reads ... (indices sha1 ...)``): its contiguous slice of every global batch, so a step's global
  batch holds the same examples in the same device order on any topology (1 process x 4 devices
  trains like 2 x 2). Evaluation counts every example exactly once.
- Only process 0 writes metrics, TensorBoard and the report, and holds the workdir lock; every
  process writes its part of each checkpoint into the one ``<workdir>/checkpoints``, so the
  workdir must be a shared filesystem or ``gs://``. Saves are synchronous (Orbax's background
  commits from several processes deadlocked). Checkpoints restore onto any device or process
  count (explicit target shardings for the current mesh).
- A signal (SIGTERM, Ctrl-C) to any process stops all of them at the same step: they agree with
  :func:`any_process` every ``min(10, log_every_steps)`` steps; each saves its part, and rerunning
  every process resumes.

On a TPU pod slice (everything detected)::

    python -m cifar_flax.main --config configs/finetune.py --workdir gs://BUCKET/runs/ft \\
        --config.distributed.enabled=True

By hand, e.g. two processes on one machine with 2 CPU devices each (what the tests run); the
second process is the same command with ``process_id=1``::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m cifar_flax.main \\
        --config configs/smoke.py --workdir /tmp/mp --config.distributed.enabled=True \\
        --config.distributed.coordinator_address=127.0.0.1:12355 \\
        --config.distributed.num_processes=2 --config.distributed.process_id=0
"""

from __future__ import annotations

import os
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cifar_flax import UserError, brief

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


def join_processes(d: Any) -> None:
    """``jax.distributed.initialize`` with the group's fields when ``d.enabled``; call it first,
    before anything touches a device, on a group that config.validate_distributed accepted.

    Without a coordinator_address JAX must detect the cluster (TPU pods, SLURM): where it finds
    none, one UserError line says what to set. Processes that do not all join within
    ``timeout_seconds`` end with one line naming who is missing (JAX would abort with a C++
    stack trace a little later: it gets a longer deadline, and a timer here fires first)."""
    if not d.enabled:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
    timer = threading.Timer(d.timeout_seconds, _did_not_join, args=(d,))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(initialization_timeout=d.timeout_seconds + 60,
                                   heartbeat_timeout_seconds=d.heartbeat_timeout_seconds, **kwargs)
    except ValueError as e:  # JAX found no cluster to join (no coordinator_address given).
        raise UserError(
            f"--config.distributed.enabled=True, but JAX detected no cluster to join ({brief(e)}): "
            "set --config.distributed.coordinator_address=HOST:PORT (process 0's), "
            "num_processes and process_id on every process, or leave distributed.enabled=False "
            "for a single process.") from None
    finally:
        timer.cancel()


def _did_not_join(d: Any) -> None:
    """The one line for processes that did not all join in time; ends this process (status 1)."""
    if d.process_id == 0:
        others = ("process 1" if d.num_processes == 2 else
                  f"some of processes 1..{d.num_processes - 1}")
        who = f"{others} did not join the coordinator at {d.coordinator_address}"
    elif d.process_id > 0:
        who = (f"process {d.process_id} could not reach process 0 (the coordinator at "
               f"{d.coordinator_address})")
    else:
        who = "the processes JAX detected did not all join"
    os.write(2, (f"error: {who} within distributed.timeout_seconds={d.timeout_seconds} s: start "
                 "every process with the same command and its own --config.distributed."
                 "process_id, or raise --config.distributed.timeout_seconds.\n").encode())
    os._exit(1)


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
