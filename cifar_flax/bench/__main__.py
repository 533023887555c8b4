"""Training throughput of the same ResNet50 step in Flax (ours and a bare jit), Keras and PyTorch.

    python -m cifar_flax.bench --frameworks=flax,flax_bare,keras,torch --size=32 --batch=128 \
        --steps=20 --warmup=3 --json=bench.json

Each framework runs in its own subprocess (bench/frameworks.py) so that peak memory and thread
pools are separate; compile / warm-up time is excluded from images/s and reported on its own. A
framework that is not installed is reported as skipped with the pip extra that installs it. The
host input pipeline (input_pipeline.train_batches) is measured separately for the same batch, so a
reader sees whether the input keeps up with the step (``--input_steps=0`` leaves it out).
"""

import json
import os
import sys
import time
from typing import Any, Iterator

from absl import flags

from cifar_flax import UserError, cli
from cifar_flax import config as config_lib
from cifar_flax.bench.frameworks import run_worker
from cifar_flax.bench.workload import (
    define_workload_flags,
    FRAMEWORKS,
    TINY_STAGES,
    Workload,
    machine_info,
    missing_reason,
    stage_sizes,
)
from cifar_flax.data import input_pipeline
from cifar_flax.models import CONV_IMPLS

FLAGS = flags.FlagValues()
flags.DEFINE_list("frameworks", list(FRAMEWORKS), f"Rows to run, a subset of "
                  f"{','.join(FRAMEWORKS)}.", flag_values=FLAGS)
define_workload_flags(FLAGS)
flags.DEFINE_string("dataset", "synthetic", 'The input-pipeline row: "synthetic", a tfds name or '
                    '"imagefolder:<dir>".', flag_values=FLAGS)
flags.DEFINE_integer("input_steps", 20, "Batches timed for the input-pipeline row; 0 = skip it.",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_boolean("tiny", False, "stage_sizes (1,1,1,1) instead of ResNet50's (tests only).",
                     flag_values=FLAGS)
flags.DEFINE_enum("conv_impl", "auto", list(CONV_IMPLS), "The flax rows' model.conv_impl (auto = "
                  "im2col for tiny maps on CPU).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the report here.", flag_values=FLAGS)


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


# ---- the host input pipeline ----


def _train_batches(dataset: str, size: int, batch: int) -> Iterator[Any]:
    """The project's training batches for ``dataset``, via input_pipeline.train_batches
    (``synthetic`` is generated at ``size``; other datasets are read as the config says)."""
    cfg = config_lib.default_config()
    cfg.dataset = dataset
    cfg.batch_size = batch
    cfg.synthetic.size = size
    cfg.synthetic.num_train = max(cfg.synthetic.num_train, 4 * batch)
    return input_pipeline.train_batches(cfg, input_pipeline.get_info(cfg))


def measure_input_pipeline(dataset: str, size: int, batch: int, steps: int) -> dict[str, Any]:
    """Host images/s of ``input_pipeline.train_batches`` (no model) for the benchmark's batch:
    ``steps`` batches after two warm-up batches; never raises (status says why).

    ``first_batch_s`` is the one-off cost before the first batch (listing, and for in-memory
    sources decoding the whole split); ``images_per_s`` is the steady state after it.
    """
    try:
        t0 = time.perf_counter()
        it = _train_batches(dataset, size, batch)
        next(it)
        first = time.perf_counter() - t0
        next(it)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            n += len(next(it)["image"])
        dt = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - reported in the table, the framework rows still count
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    return {"status": "ok", "dataset": dataset, "batch": batch, "images_per_s": n / dt,
            "first_batch_s": first}


# ---- the command ----


def run(frameworks: list[str], w: Workload, dataset: str = "synthetic",
        input_steps: int = 0) -> dict[str, Any]:
    """Run the requested rows (and the input pipeline) and return the JSON-ready report."""
    rows = []
    for fw in frameworks:
        reason = missing_reason(fw)
        if reason:
            rows.append({"framework": fw, "status": "skipped", "reason": reason})
            continue
        print(f"[bench] {fw}: size {w.size}, batch {w.batch}, {w.dtype} ...",
              file=sys.stderr, flush=True)
        rows.append(run_worker(fw, w))
    add_ratios(rows)
    report = {"config": {"size": w.size, "batch": w.batch, "steps": w.steps, "warmup": w.warmup,
                         "dtype": w.dtype, "tiny": w.stage_sizes == TINY_STAGES,
                         "dataset": dataset},
              "machine": machine_info(), "rows": rows,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if input_steps > 0:
        report["input_pipeline"] = measure_input_pipeline(dataset, w.size, w.batch, input_steps)
    return report


def _frameworks() -> list[str]:
    """``--frameworks`` checked: known names, at least one."""
    chosen = [f.strip() for f in FLAGS.frameworks if f.strip()]
    unknown = [f for f in chosen if f not in FRAMEWORKS]
    if unknown or not chosen:
        raise UserError(f"--frameworks={','.join(FLAGS.frameworks)}: "
                        f"{'unknown ' + ','.join(unknown) if unknown else 'none given'}; "
                        f"choose from {','.join(FRAMEWORKS)}.")
    return chosen


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    frameworks = _frameworks()
    w = Workload(FLAGS.size, FLAGS.batch, FLAGS.steps, FLAGS.warmup, FLAGS.dtype,
                 stage_sizes(FLAGS.tiny), FLAGS.conv_impl)
    if FLAGS.json:  # Before the measurements: a report that cannot be written fails first.
        if os.path.isdir(FLAGS.json):
            raise UserError(f"--json={FLAGS.json} is a folder; give the report file's path.")
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    report = run(frameworks, w, FLAGS.dataset, FLAGS.input_steps)
    m = report["machine"]
    print(f"\nResNet50 training step, {w.size}x{w.size}, batch {w.batch}, {w.dtype}; "
          f"{m.get('cpu')} ({m.get('cpu_count')} cores), backend {m.get('backend')} "
          f"({m.get('device_kind')})\n")
    print(format_table(report["rows"]))
    for r in report["rows"]:
        if "ratio_to_bare" in r:
            print(f"\nour train.py step / bare jit step: {r['ratio_to_bare']:.2f}x "
                  "(target >= 0.95x)")
    inp = report.get("input_pipeline")
    if inp:
        msg = (f"{inp['images_per_s']:.0f} images/s after a one-off {inp['first_batch_s']:.1f} s "
               "before the first batch" if inp.get("status") == "ok"
               else f"{inp.get('status')}: {inp.get('reason')}")
        print(f"\nhost input pipeline ({FLAGS.dataset}, batch {w.batch}): {msg}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    """The comparison; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
