"""The work every benchmark row does, and how it is timed, defined once.

The work: ResNet50 v1.5 with a 10-class linear head, softmax cross-entropy, SGD momentum 0.9 at
lr 0.1, on one batch already on the device (:class:`Workload` holds its size). Which rows can run
here (:func:`missing_reason`: the modules each needs, with the pip extra that installs them), and
the machine a report was measured on (:func:`machine_info`).

The timing (:func:`compile_then_time`, :func:`time_steps`): compilation (or a framework's lazy
tracing) and the first steps are timed apart from the steady state: ``warmup`` untimed steps,
then ``steps`` steps as one block with a single sync at the end, so that asynchronous dispatch
(JAX, CUDA) overlaps as it does in training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import resource
import time
from importlib import metadata
from typing import Any, Callable

import jax
from absl import flags

from cifar_flax.models import STAGE_SIZES

NUM_CLASSES = 10
LR, MOMENTUM = 0.1, 0.9
TINY_STAGES = (1, 1, 1, 1)  # the tests' stand-in for ResNet50's (3, 4, 6, 3)
DTYPES = ("float32", "bfloat16")
FRAMEWORKS = ("flax", "flax_bare", "keras", "torch")
# What each row needs importable, and the pip extra of this package that installs it.
REQUIREMENTS = {
    "flax": (("flax", "optax"), ""),
    "flax_bare": (("flax", "optax"), ""),
    "keras": (("keras", "tensorflow"), "test"),
    "torch": (("torch",), "torch"),
}
HIDE_ENV = "CIFAR_FLAX_BENCH_HIDE"  # Comma-separated frameworks to treat as not installed (tests).
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "tensorflow", "tensorflow-cpu", "keras",
                    "torch", "numpy")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One row's measurement: ``batch`` images of ``size`` x ``size``, ``warmup`` untimed steps
    then ``steps`` timed ones, in ``dtype``, ResNet50's ``stage_sizes`` (TINY_STAGES in tests);
    ``conv_impl`` is the flax rows' model.conv_impl (auto = im2col for tiny maps on CPU)."""

    size: int = 32
    batch: int = 128
    steps: int = 10
    warmup: int = 2
    dtype: str = "float32"
    stage_sizes: tuple[int, ...] = STAGE_SIZES
    conv_impl: str = "auto"


def stage_sizes(tiny: bool) -> tuple[int, ...]:
    """TINY_STAGES for tests, else ResNet50's (cifar_flax.models.STAGE_SIZES)."""
    return TINY_STAGES if tiny else tuple(STAGE_SIZES)


def hidden() -> set[str]:
    """Frameworks that ``$CIFAR_FLAX_BENCH_HIDE`` marks as not installed."""
    return {s.strip() for s in os.environ.get(HIDE_ENV, "").split(",") if s.strip()}


def missing_reason(framework: str) -> str | None:
    """Why ``framework``'s row cannot run here (with the install command), or None if it can."""
    modules, extra = REQUIREMENTS[framework]
    absent = [m for m in modules if framework in hidden() or importlib.util.find_spec(m) is None]
    if not absent:
        return None
    fix = f'pip install -e ".[{extra}]"' if extra else "pip install -e ."
    return f"not installed ({', '.join(absent)}); install with: {fix}"


# ---- the machine ----


def machine_info() -> dict[str, Any]:
    """Host, accelerator and library versions, for the JSON and the README table caption."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:  # Call it after the rows: on a GPU, JAX's backend takes most of its memory once started.
        info.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                    device_count=jax.device_count())
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        info["backend_error"] = str(e)
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version
                 for d in metadata.distributions()}
    info["versions"] = {pkg: installed[pkg] for pkg in VERSION_PACKAGES if pkg in installed}
    return info


def _cpu_model() -> str:
    for line in _proc_file("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _proc_file(path: str) -> str:
    """A /proc file's text; "" where there is none (not Linux)."""
    return open(path).read() if os.path.exists(path) else ""


# ---- timing ----


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
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"device_peak_mb": stats["peak_bytes_in_use"] / 2**20}
    return {}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (each benchmark row runs in its own).

    Linux's ``VmHWM``: ``ru_maxrss`` would not do, as Linux carries the starting process's peak
    over into it (the comparison holds TensorFlow and JAX when it starts a row's process).
    """
    status = _proc_file("/proc/self/status")
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def define_workload_flags(flag_values: flags.FlagValues) -> None:
    """The flags of the timed work that the comparison and its worker share (the same names and
    bounds, so the comparison passes its own on unchanged)."""
    flags.DEFINE_integer("size", 32, "Image height = width.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("batch", 128, "Images per step.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("warmup", 2, "Untimed steps (after compilation).", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype.", flag_values=flag_values)
