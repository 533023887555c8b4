"""The real entry point: the smoke config end to end (with a SIGTERM and a resume), signals,
and errors (flag slips and config errors through its boundary in this process, the rest as
``python -m cifar_flax.main``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_utils import default_sigint

from cifar_flax import cli, main
from cifar_flax.run.metrics import read_metrics
from cifar_flax.run.workdir import LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_FILES = ("curves.png", "confusion_matrix.png", "classification_report.txt",
                "classification_report.json", "results.json", "report.md", "predictions.npz")


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "cifar_flax.main", "--config", "configs/smoke.py",
            "--workdir", str(workdir), *overrides]


def _train_steps(workdir) -> list[int]:
    return [r["step"] for r in read_metrics(str(workdir), "train")]


@pytest.mark.slow  # An end-to-end run: the full suite only.
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
    line = done.stdout.strip().splitlines()[-1]  # Says what each number is (not test images/s).
    assert re.fullmatch(r"test accuracy \d\.\d{4} on 64 images \(training [\d.]+ images/s\); "
                        r"report in .*", line), line
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


def _in_process(capsys, workdir, *overrides, config="configs/smoke.py") -> tuple[int, str]:
    """(status, stderr) of the command called in this process, behind the same boundary
    (cli.run) as ``python -m cifar_flax.main``: its error paths without a 6-second start-up.
    The real entry point's exit status: test_workdir_that_is_a_file_and_quiet_start_up."""
    capsys.readouterr()
    status = cli.run(main.main, main.FLAGS,
                     ["--config", config, "--workdir", str(workdir), *overrides])
    return status, capsys.readouterr().err


def _one_error_line(status: int, err: str) -> str:
    assert status == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_errors_are_one_line_with_exit_code_1(tmp_path, capsys):
    cases = [
        ("--config.dataset=imagefolder:/nonexistent/cifar", "does not exist"),
        ('--config.phases[1].trainable=("stage4","stage7")', "stage7"),
    ]
    for override, expected in cases:
        line = _one_error_line(*_in_process(capsys, tmp_path / "e", override))
        assert expected in line, line


def test_slips_in_flags_and_config_paths_are_one_line(tmp_path, capsys, monkeypatch):
    """Caught while parsing flags (seconds, before JAX, data or weights are touched)."""
    cases = [
        (["--config.batch_sizee=3"], "did you mean --config.batch_size?"),
        (["--config.phases[5].lr=0.1"], "phases[5] is out of range: phases has 2 entries"),
        (["--config.batch_size=abc"], "--config.batch_size=abc"),
        (["--wrkdir=x"], "unknown flag --wrkdir; did you mean --workdir?"),
    ]
    monkeypatch.chdir(ROOT)
    for extra, expected in cases:
        line = _one_error_line(*_in_process(capsys, tmp_path / "w", *extra))
        assert expected in line, (extra, line)
    line = _one_error_line(*_in_process(capsys, tmp_path / "w", config="configs/nope.py"))
    assert f"looked for {ROOT}/configs/nope.py" in line
    monkeypatch.chdir(tmp_path)  # A relative path from another folder.
    line = _one_error_line(*_in_process(capsys, tmp_path / "w"))
    assert f"did you mean --config={ROOT}/configs/smoke.py?" in line
    assert not os.path.exists(tmp_path / "w")  # Nothing was created.


def _exited_with_one_error_line(p: subprocess.CompletedProcess) -> str:
    return _one_error_line(p.returncode, p.stderr)


@pytest.mark.slow  # An end-to-end run: the full suite only.
def test_workdir_that_is_a_file_and_quiet_start_up(tmp_path):
    (tmp_path / "f").write_text("")
    p = subprocess.run(_cmd(tmp_path / "f"), cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert f"--workdir {tmp_path / 'f'} is a file" in _exited_with_one_error_line(p)
    for noise in ("oneDNN", "absl::InitializeLog", "libtpu", "cpu_feature_guard"):
        assert noise not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow  # An end-to-end run: the full suite only.
@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 2.0), (signal.SIGINT, 6.0),
                                        (signal.SIGTERM, 3.0)])
def test_a_signal_during_start_up_is_one_line_and_frees_the_workdir(tmp_path, sig, delay):
    """Importing, reading the data, building the model, compiling: one line, status 130 (Ctrl-C)
    or 143 (SIGTERM), no traceback or crash, the workdir lock released (while the command still
    imports, the start-up's line: nothing written yet). If the signal lands once training has
    begun, the run saves at a step boundary and says so (one line too)."""
    proc = subprocess.Popen(_cmd(tmp_path / "w"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    lines = [ln for ln in (out + err).splitlines() if ln.startswith("Interrupted")]
    assert len(lines) == 1, (out, err[-2000:])
    if lines[0].startswith("Interrupted at step"):  # Training had begun: saved, then stopped.
        assert proc.returncode == (130 if sig == signal.SIGINT else 0), err[-2000:]
    else:
        assert lines[0] in (f"Interrupted ({name}): stopped before it wrote anything.",
                            f"Interrupted ({name}): nothing new was saved; rerun the same command "
                            "to resume from the last checkpoint."), lines
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-2000:]
    for crash in ("Traceback", "KeyboardInterrupt", "Fatal Python error", "Segmentation"):
        assert crash not in err, err[-2000:]
    assert not (tmp_path / "w" / LOCK_NAME).exists()


@pytest.mark.slow  # An end-to-end run: the full suite only.
def test_distributed_without_a_cluster_or_with_a_missing_process_is_one_line(tmp_path):
    p = subprocess.run(_cmd(tmp_path / "w", "--config.distributed.enabled=True"), cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    line = _exited_with_one_error_line(p)
    assert "detected no cluster" in line and "coordinator_address=HOST:PORT" in line
    alone = ["--config.distributed.enabled=True", "--config.distributed.num_processes=2",
             "--config.distributed.coordinator_address=127.0.0.1:29931",
             "--config.distributed.process_id=0", "--config.distributed.timeout_seconds=5"]
    p = subprocess.run(_cmd(tmp_path / "w", *alone), cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    line = _exited_with_one_error_line(p)
    assert "process 1 did not join" in line and "timeout_seconds=5" in line
    printed = [ln for ln in p.stderr.splitlines() if not re.match(r"I\d{4} ", ln)]  # Progress.
    assert "stack trace" not in p.stderr and printed == [line]


@pytest.mark.slow  # An end-to-end run: the full suite only.
def test_an_unreachable_gs_workdir_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    env["EPATH_USE_TF"] = "false"
    p = subprocess.run(_cmd("gs://cifar-flax-no-such-bucket/x"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    line = _exited_with_one_error_line(p)
    assert "gs://cifar-flax-no-such-bucket/x" in line
    assert "offline" in line or "credentials" in line or "gcloud auth" in line


@pytest.mark.slow  # An end-to-end run: the full suite only.
def test_ctrl_c_before_training_exits_130_with_one_line(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path / "w"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    time.sleep(4)  # Importing JAX/TensorFlow or compiling: the loop has not started yet.
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "Interrupted (Ctrl-C)" in err or "Interrupted at step" in out, (out, err[-2000:])
