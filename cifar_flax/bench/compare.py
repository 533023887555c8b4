"""Training throughput of the same ResNet50 step in Flax (ours and a bare jit), Keras and PyTorch.

    python -m cifar_flax.bench --frameworks flax,flax_bare,keras,torch --size 32 --batch 128 \
        --steps 20 --warmup 3 --json bench.json

Each framework runs in its own subprocess (bench/frameworks.py) so that peak memory and thread
pools are separate; compile / warm-up time is excluded from images/s and reported on its own. A
framework that is not installed is reported as skipped with the pip extra that installs it. The
host input pipeline (input_pipeline.train_batches) is measured separately for the same batch, so a
reader sees whether the input keeps up with the step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Sequence

from cifar_flax.bench.frameworks import RESULT_PREFIX
from cifar_flax.bench.workload import hidden, stage_sizes

FRAMEWORKS = ("flax", "flax_bare", "keras", "torch")
# What each row needs importable, and the pip extra of this package that installs it.
REQUIREMENTS = {
    "flax": (("flax", "optax"), ""),
    "flax_bare": (("flax", "optax"), ""),
    "keras": (("keras", "tensorflow"), "test"),
    "torch": (("torch",), "torch"),
}
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "tensorflow", "tensorflow-cpu", "keras",
                    "torch", "numpy")


def missing_reason(framework: str) -> str | None:
    """Why ``framework`` cannot run here (with the install command), or None if it can."""
    modules, extra = REQUIREMENTS[framework]
    absent = [m for m in modules if framework in hidden() or importlib.util.find_spec(m) is None]
    if not absent:
        return None
    fix = f'pip install -e ".[{extra}]"' if extra else "pip install -e ."
    return f"not installed ({', '.join(absent)}); install with: {fix}"


def run_worker(framework: str, args: argparse.Namespace, env: dict | None = None,
               timeout: float = 3600) -> dict[str, Any]:
    """Run one framework's timed step in a fresh Python process and return its result dict."""
    cmd = [sys.executable, "-m", "cifar_flax.bench.frameworks", "--framework", framework,
           "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--dtype", args.dtype, "--conv-impl", args.conv_impl,
           "--stage-sizes", ",".join(map(str, stage_sizes(args.tiny)))]
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "status": "error", "reason": f"timed out after {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"framework": framework, "status": "error", "reason": f"exit {proc.returncode}: {tail}"}


def machine_info() -> dict[str, Any]:
    """Host, accelerator and library versions, for the JSON and the README table caption."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import jax

        info.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                    device_count=jax.device_count())
    except Exception as e:  # pragma: no cover - reported, never fatal
        info["backend_error"] = str(e)
    versions = {}
    for pkg in VERSION_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_to_fastest`` per measured row, and ``flax`` over ``flax_bare`` if both ran."""
    ok = [r for r in rows if r.get("status") == "ok"]
    best = max((r["images_per_s"] for r in ok), default=0.0)
    for r in ok:
        r["ratio_to_fastest"] = r["images_per_s"] / best if best else 0.0
    by_name = {r["framework"]: r for r in ok}
    if "flax" in by_name and "flax_bare" in by_name:
        by_name["flax"]["ratio_to_bare"] = (
            by_name["flax"]["images_per_s"] / by_name["flax_bare"]["images_per_s"])


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows (skipped and failed rows say why)."""
    lines = ["| framework | layout / mode | images/s | ms/step | compile / first step (s) | "
             "peak RSS (MB) | vs fastest |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['framework']} | {r['status']}: {r.get('reason', '')} |"
                         " | | | | |")
            continue
        mem = f"{r['peak_rss_mb']:.0f}"
        if "device_peak_mb" in r:
            mem += f" (device {r['device_peak_mb']:.0f})"
        lines.append(
            f"| {r['framework']} | {r.get('layout', '')}; {r.get('mode', '')} | "
            f"{r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['compile_s']:.1f} | {mem} | "
            f"{r['ratio_to_fastest']:.2f}x |")
    return "\n".join(lines)


def measure_input_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Host images/s of ``input_pipeline.train_batches`` for the benchmark's batch size."""
    from cifar_flax.bench import input_speed as bench_input

    return bench_input.measure(args.dataset, args.size, args.batch, args.input_steps)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested rows (and the input pipeline) and return the JSON-ready report."""
    rows = []
    for fw in args.frameworks:
        reason = missing_reason(fw)
        if reason:
            rows.append({"framework": fw, "status": "skipped", "reason": reason})
            continue
        print(f"[bench] {fw}: size {args.size}, batch {args.batch}, {args.dtype} ...",
              file=sys.stderr, flush=True)
        rows.append(run_worker(fw, args))
    add_ratios(rows)
    report = {"config": {k: getattr(args, k) for k in
                         ("size", "batch", "steps", "warmup", "dtype", "tiny", "dataset")},
              "machine": machine_info(), "rows": rows,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.input_steps > 0:
        report["input_pipeline"] = measure_input_pipeline(args)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                   help=f"comma-separated subset of {','.join(FRAMEWORKS)}")
    p.add_argument("--size", type=int, default=32, help="image height = width")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (after compilation)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--dataset", default="synthetic",
                   help='input-pipeline row: "synthetic", a tfds name or "imagefolder:<dir>"')
    p.add_argument("--input-steps", type=int, default=20,
                   help="batches timed for the input-pipeline row; 0 = skip it")
    p.add_argument("--tiny", action="store_true",
                   help="stage_sizes (1,1,1,1) instead of ResNet50's (tests only)")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"],
                   help="the flax rows' model.conv_impl (auto = im2col for tiny maps on CPU)")
    p.add_argument("--json", default="", help="write the report here")
    args = p.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = sorted(set(args.frameworks) - set(FRAMEWORKS))
    if unknown:
        p.error(f"--frameworks: unknown {unknown}; choose from {','.join(FRAMEWORKS)}")
    if min(args.size, args.batch, args.steps) < 1 or args.warmup < 0:
        p.error("--size, --batch and --steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    m = report["machine"]
    print(f"\nResNet50 training step, {args.size}x{args.size}, batch {args.batch}, {args.dtype}; "
          f"{m.get('cpu')} ({m.get('cpu_count')} cores), backend {m.get('backend')} "
          f"({m.get('device_kind')})\n")
    print(format_table(report["rows"]))
    for r in report["rows"]:
        if "ratio_to_bare" in r:
            print(f"\nour train.py step / bare jit step: {r['ratio_to_bare']:.2f}x (target >= 0.95x)")
    inp = report.get("input_pipeline")
    if inp:
        msg = (f"{inp['images_per_s']:.0f} images/s after a one-off {inp['first_batch_s']:.1f} s "
               "before the first batch" if inp.get("status") == "ok"
               else f"{inp.get('status')}: {inp.get('reason')}")
        print(f"\nhost input pipeline ({args.dataset}, batch {args.batch}): {msg}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
