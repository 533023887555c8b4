"""The real entry point: the smoke config end to end (with a SIGTERM and a resume), and errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_FILES = ("curves.png", "confusion_matrix.png", "classification_report.txt",
                "classification_report.json", "results.json", "report.md", "predictions.npz")


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "cifar_flax.main", "--config", "configs/smoke.py",
            "--workdir", str(workdir), *overrides]


def _train_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln)["step"] for ln in f if ln.strip() and '"train"' in ln]


def test_smoke_run_survives_sigterm_resumes_and_reports(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(s >= 8 for s in _train_steps(tmp_path)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # In phase 2 (it starts at step 6).
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Interrupted at step" in out
    stopped = int(out.split("Interrupted at step ")[1].split(";")[0])
    assert 8 <= stopped < 18
    assert not os.path.exists(tmp_path / "report")

    done = subprocess.run(_cmd(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy" in done.stdout
    for name in REPORT_FILES:
        assert os.path.getsize(tmp_path / "report" / name) > 0, name
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    pred = np.load(tmp_path / "report" / "predictions.npz")
    assert len(pred["labels"]) == results["test_examples"] == 64  # Every test image once.
    assert results["test_accuracy"] == float(np.mean(pred["predictions"] == pred["labels"]))
    assert results["steps"] == 18 and results["images_per_sec"] > 0
    steps = _train_steps(tmp_path)
    assert steps == sorted(set(steps)) and steps[-1] == 18  # No duplicates from the lost steps.
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_errors_are_one_line_with_exit_code_1(tmp_path):
    cases = [
        ("--config.dataset=imagefolder:/nonexistent/cifar", "does not exist"),
        ('--config.phases[1].trainable=("stage4","stage7")', "stage7"),
    ]
    for override, expected in cases:
        p = subprocess.run(_cmd(tmp_path / "e", override), cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 1, p.stderr[-2000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr
