"""Summarise a gpu_check.sh run: throughput table and MFU, from the files it wrote.

    python experiments/gpu_summary.py --out experiments/results/gpu

Reads ``bench_<size>_<dtype>.json`` (python -m cifar_flax.bench) and, if present, the training
run's ``train/metrics.jsonl``; writes ``summary.md`` and ``summary.json`` into ``--out``.

MFU is the model FLOPs actually needed (XLA's cost analysis of our step, ``gflops_per_step``; the
PyTorch row does the same network work) per second, over the chip's dense bf16 tensor-core peak
(the one denominator for both dtypes: XLA runs float32 convolutions on TF32 tensor cores by
default on Ampere and later). Chips not in PEAK_TFLOPS (and CPUs) show no MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

# Dense bf16 (fp16 before Ampere) tensor-core peak, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0,
               "T4": 65.0}


def peak_flops(device_kind: str) -> float | None:
    """The chip's peak FLOP/s by its ``jax.devices()[0].device_kind``, or None if unknown."""
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_kind:
            return tflops * 1e12
    return None


def bench_rows(out: Path) -> list[dict[str, Any]]:
    """One row per framework per benchmark JSON, with MFU where the chip is known."""
    rows = []
    for path in sorted(out.glob("bench_*_*.json")):
        report = json.loads(path.read_text())
        peak = peak_flops(report["machine"].get("device_kind", ""))
        ok = {r["framework"]: r for r in report["rows"] if r.get("status") == "ok"}
        flops = next((r["gflops_per_step"] * 1e9 for r in ok.values() if r.get("gflops_per_step")),
                     None)
        for r in report["rows"]:
            row = {"size": report["config"]["size"], "dtype": report["config"]["dtype"],
                   "framework": r["framework"], "status": r.get("status")}
            if r.get("status") == "ok":
                row.update(images_per_s=r["images_per_s"], ms_per_step=r["ms_per_step"],
                           compile_s=r.get("compile_s", 0.0))
                if peak and flops:
                    row["mfu"] = flops / (r["ms_per_step"] / 1000.0) / peak
            rows.append(row)
    return rows


def train_summary(out: Path, bench: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Images/s of the training run (median of its logged windows after the first) and MFU."""
    metrics = out / "train" / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["images_per_sec"] for r in records
             if r.get("kind") == "train" and r.get("images_per_sec")]
    if not rates:
        return {"status": "no train records"}
    rate = statistics.median(rates[1:] or rates)
    result = {"status": "ok", "images_per_s": rate, "windows": len(rates),
              "steps": max(r["step"] for r in records)}
    env = (out / "env.txt").read_text() if (out / "env.txt").is_file() else ""
    ref = [b for b in bench if b["size"] == 32 and b["dtype"] == "float32" and "mfu" in b
           and b["framework"] == "flax"]
    if ref:  # FLOPs per image from the 32px float32 benchmark of the same step
        result["mfu"] = ref[0]["mfu"] * rate / ref[0]["images_per_s"]
    result["device"] = next((line for line in env.splitlines() if line.startswith("jax ")), "")
    return result


def format_markdown(rows: list[dict[str, Any]], train: dict[str, Any] | None) -> str:
    lines = ["| size | dtype | framework | images/s | ms/step | compile s | MFU |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['size']} | {r['dtype']} | {r['framework']} | {r['status']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        lines.append(f"| {r['size']} | {r['dtype']} | {r['framework']} | {r['images_per_s']:.0f} "
                     f"| {r['ms_per_step']:.1f} | {r['compile_s']:.1f} | {mfu} |")
    if train:
        lines.append("")
        if train.get("status") == "ok":
            mfu = f", MFU {100 * train['mfu']:.1f}%" if "mfu" in train else ""
            lines.append(f"Training run (configs/scratch.py, {train['steps']} steps): "
                         f"{train['images_per_s']:.0f} images/s{mfu}.")
        else:
            lines.append(f"Training run: {train['status']}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the directory gpu_check.sh wrote")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: --out {out} is not a directory; run experiments/gpu_check.sh first.",
              file=sys.stderr)
        return 1
    rows = bench_rows(out)
    train = train_summary(out, rows)
    text = format_markdown(rows, train)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"bench": rows, "train": train}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
