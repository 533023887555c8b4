"""The one "compile, then time" helper every benchmark row uses.

Compilation (or a framework's lazy tracing) and the first steps are timed apart from the
steady state: ``warmup`` untimed steps, then ``steps`` steps as one block with a single sync at
the end, so that asynchronous dispatch (JAX, CUDA) overlaps as it does in training.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Callable


def time_steps(
    step: Callable[[], Any], sync: Callable[[Any], None], warmup: int, steps: int
) -> dict[str, float]:
    """Time ``step()``: ``first_step_s`` (includes lazy compilation), ``warmup_s``, ``timed_s``."""
    t0 = time.perf_counter()
    out = None
    for i in range(max(warmup, 1)):
        out = step()
        sync(out)
        if i == 0:
            first = time.perf_counter() - t0
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    total = time.perf_counter() - t0
    return {"first_step_s": first, "warmup_s": warm, "timed_s": total,
            "s_per_step": total / max(steps, 1)}


def compile_then_time(
    fn: Any, state: Any, *inputs: Any, warmup: int, steps: int,
    loss_of: Callable[[Any], Any] = lambda out: out, carry: bool = True,
) -> dict[str, Any]:
    """Compile the jitted ``fn`` ahead of time (``compile_s``, ``gflops_per_step``), then time it.

    With ``carry`` the function is a step ``(state, *inputs) -> (state, out)`` whose new state is
    fed back; otherwise ``fn(state, *inputs) -> out`` runs on the same arguments every time.
    ``loss_of(out)`` picks the array to sync on; the first and last are reported as losses.
    """
    t0 = time.perf_counter()
    compiled = fn.lower(state, *inputs).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state, "losses": []}

    def one():
        out = compiled(holder["state"], *inputs)
        if carry:
            holder["state"], out = out
        holder["losses"].append(loss_of(out))
        return holder["losses"][-1]

    timing = time_steps(one, lambda out: out.block_until_ready(), warmup, steps)
    first, last = holder["losses"][0], holder["losses"][-1]
    return {
        "compile_s": compile_s, "gflops_per_step": flops(compiled) / 1e9,
        **({"first_loss": float(first), "final_loss": float(last)} if first.size == 1 else {}),
        **timing, **jax_memory(),
    }


def flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled function (0 when the backend does not report it)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def jax_memory() -> dict[str, float]:
    """Peak device memory in MB, where the JAX backend reports it (GPU/TPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"device_peak_mb": stats["peak_bytes_in_use"] / 2**20}
    return {}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (each benchmark row runs in its own)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
