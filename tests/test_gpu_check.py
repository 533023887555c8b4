"""experiments/gpu_check.sh (the first-GPU check) and its summary, tested on the CPU: the
argument handling, the plan it runs, that a tiny ``--cpu-smoke`` run writes every file, and the
MFU arithmetic of experiments/gpu_summary.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "gpu_check.sh")


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([SCRIPT, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _summary_module():
    spec = importlib.util.spec_from_file_location(
        "gpu_summary", os.path.join(REPO, "experiments", "gpu_summary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_every_benchmark_and_the_training_run(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path), "--sizes", "32 160", "--dtypes",
                "bfloat16", "--train-steps", "50", "--data", "/data/cifar")
    assert proc.returncode == 0, proc.stderr
    plan = (tmp_path / "plan.txt").read_text().splitlines()
    bench = [line for line in plan if "-m cifar_flax.bench" in line]
    assert [b.split("--size ")[1].split()[0] for b in bench] == ["32", "160"]
    assert all("--dtype bfloat16" in b and "--frameworks flax,torch" in b for b in bench)
    train = [line for line in plan if "-m cifar_flax.main" in line]
    assert len(train) == 1 and "configs/scratch.py" in train[0]
    assert "--config.dataset=imagefolder:/data/cifar" in train[0]
    assert "--config.phases[0].steps=50" in train[0]
    assert plan[-1].endswith(f"gpu_summary.py --out {tmp_path}")
    assert not list(tmp_path.glob("*.json"))  # nothing ran


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--sizes", "32 big"], "--sizes must be a positive integer"),
    (["--dtypes", "float16"], "'float16' is not float32 or bfloat16"),
    (["--out"], "--out needs a value"),
    (["--bogus"], "unknown option '--bogus'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    proc = _run("--dry-run", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]


@pytest.mark.slow
def test_cpu_smoke_writes_its_files(tmp_path, smoke_run):
    """The script on a CPU: one tiny benchmark and the summary (the training command is checked
    in the dry-run test; its metrics come from the session's smoke run, read by the summary)."""
    proc = _run("--cpu-smoke", "--out", str(tmp_path), "--sizes", "32", "--dtypes", "float32",
                "--frameworks", "flax_bare", "--batch", "8", "--steps", "1", "--warmup", "1",
                "--train-steps", "0", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bench = json.loads((tmp_path / "bench_32_float32.json").read_text())
    assert [r["status"] for r in bench["rows"]] == ["ok"]
    assert "jax" in (tmp_path / "env.txt").read_text()
    assert len((tmp_path / "plan.txt").read_text().splitlines()) == 2  # bench + summary
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bench"][0]["framework"] == "flax_bare" and summary["train"] is None
    assert summary["bench"][0]["images_per_s"] > 0 and "mfu" not in summary["bench"][0]  # CPU
    assert "| 32 | float32 | flax_bare |" in (tmp_path / "summary.md").read_text()
    (tmp_path / "train").mkdir()
    shutil.copy(smoke_run / "metrics.jsonl", tmp_path / "train" / "metrics.jsonl")
    assert _summary_module().main(["--out", str(tmp_path)]) == 0
    train = json.loads((tmp_path / "summary.json").read_text())["train"]
    assert train["status"] == "ok" and train["images_per_s"] > 0 and train["steps"] > 0


def test_summary_mfu_arithmetic(tmp_path):
    """MFU = FLOPs per step / step time / the chip's bf16 peak; the training run's MFU scales
    the 32px float32 benchmark's by its images/s."""
    gs = _summary_module()
    rows = [{"framework": "flax", "status": "ok", "images_per_s": 1000.0, "ms_per_step": 128.0,
             "gflops_per_step": 989e3 * 0.128 * 0.5, "compile_s": 9.0},
            {"framework": "torch", "status": "ok", "images_per_s": 500.0, "ms_per_step": 256.0,
             "compile_s": 0.0}]
    (tmp_path / "bench_32_float32.json").write_text(json.dumps({
        "config": {"size": 32, "dtype": "float32"}, "machine": {"device_kind": "NVIDIA H200"},
        "rows": rows}))
    train = tmp_path / "train"
    train.mkdir()
    records = [{"step": s, "kind": "train", "images_per_sec": r}
               for s, r in ((10, 50.0), (20, 2000.0), (30, 2000.0))]
    (train / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert gs.main(["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    flax, torch = summary["bench"]
    assert flax["mfu"] == pytest.approx(0.5) and torch["mfu"] == pytest.approx(0.25)
    assert summary["train"]["images_per_s"] == 2000.0  # the first (compiling) window is left out
    assert summary["train"]["mfu"] == pytest.approx(1.0)
    assert gs.peak_flops("cpu") is None
