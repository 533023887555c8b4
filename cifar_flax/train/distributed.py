"""Joining several processes (hosts) into one JAX runtime, from ``config.distributed``.

Each process runs the same command with its own ``process_id`` (or lets
``jax.distributed.initialize()`` detect everything, as on TPU pods and SLURM); afterwards
``jax.devices()`` lists the devices of all processes and the training mesh spans them. A process
that dies is noticed by the others through JAX's heartbeats: after
``distributed.heartbeat_timeout_seconds`` they stop with "another task died" instead of waiting
forever.
"""

from __future__ import annotations

from typing import Any

import jax


def config_errors(d: Any) -> list[str]:
    """One line per invalid field of the ``distributed`` group (empty when valid)."""
    errors = []
    if not isinstance(d.enabled, bool):
        errors.append(f"distributed.enabled={d.enabled!r} must be True or False.")
    addr = d.coordinator_address
    if addr and (":" not in addr or not addr.rsplit(":", 1)[1].isdigit()):
        errors.append(f"distributed.coordinator_address={addr!r} must be 'host:port' "
                      "(process 0's address) or '' to detect it (TPU pods, SLURM).")
    n, i = d.num_processes, d.process_id
    if addr and (n < 1 or not 0 <= i < n):
        errors.append(f"distributed.num_processes={n}, process_id={i}: with a coordinator_address "
                      "set num_processes >= 1 and 0 <= process_id < num_processes on each process.")
    if not addr and (n != -1 or i != -1):
        errors.append("distributed.num_processes / process_id are set but coordinator_address is "
                      "empty: set all three, or none (-1, -1, '') to let JAX detect them.")
    for field in ("timeout_seconds", "heartbeat_timeout_seconds"):
        if d[field] < 1:
            errors.append(f"distributed.{field}={d[field]} must be >= 1.")
    return errors


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
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
