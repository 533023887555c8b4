"""Runs that end early end cleanly: divergence, Ctrl-C, early stopping with the best weights."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_utils import (command_status, default_sigint, enable_compilation_cache,
                         interrupted_at, saved_step, state_at, steps_saved, tiny_config)

from cifar_flax import UserError, cli, main, train
from cifar_flax.config import phase
from cifar_flax.main import run as train_and_evaluate
from cifar_flax.run import divergence, interrupts
from cifar_flax.run.checkpoints import Checkpointer
from cifar_flax.run.metrics import read_metrics

enable_compilation_cache()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")

@pytest.mark.slow
def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    c = tiny_config()
    c.phases = [phase("head", steps=3, trainable=("head",), lr=0.05, schedule="constant"),
                phase("all", steps=6, lr=1e6, schedule="constant")]
    workdir = tmp_path / "run"
    assert command_status(c, workdir) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    line = errors[0]
    assert line.startswith("error: training diverged at step ") and "phase 1 (all)" in line
    assert "--config.phases[1].lr" in line and "warmup_epochs" in line
    # Where exactly lr 1e6 turns the loss non-finite depends on float rounding; what matters
    # is that the line names it and the newest checkpoint is the last one before it.
    m = re.search(r"diverged at step (\d+) .*last good checkpoint \(step (\d+)\)", line)
    assert m, line
    diverged, good = int(m.group(1)), int(m.group(2))
    assert 3 <= good < diverged <= 9
    assert not (workdir / "report").exists()  # Nothing that looks like a finished result.
    ckpt = Checkpointer(str(workdir))
    assert max(ckpt.managers["latest"].all_steps()) == good  # The diverged steps were never saved.
    assert ckpt.latest_meta()["position"]["step"] == good
    ckpt.close()
    state = state_at(str(workdir))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    # The metrics show the divergence coming: a finite but exploding loss after the lr jump.
    losses = [r["loss"] for r in read_metrics(str(workdir), "train")]
    assert len(losses) >= 4 and losses[-1] > 100 * losses[0]


def _smoke(workdir):
    return [sys.executable, "-m", "cifar_flax.main", "--config", "configs/smoke.py",
            "--workdir", str(workdir)]


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_the_rerun_is_bit_identical(tmp_path, smoke_run):
    proc = subprocess.Popen(_smoke(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 300
    while time.time() < deadline and not any(
            r["step"] >= 8 for r in read_metrics(str(tmp_path), "train")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Mid phase 2 (it runs steps 6..18).
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Rerun the same command to resume" in out
    stopped = int(out.split("Interrupted at step ")[1].split(";")[0])
    assert 8 <= stopped < 18 and "(SIGINT)" in out
    assert stopped in steps_saved(str(tmp_path))  # The line's promise: that step is on disk.
    assert not (tmp_path / "report").exists()

    done = subprocess.run(_smoke(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, straight = state_at(str(tmp_path)), state_at(str(smoke_run))
    assert saved_step(str(tmp_path)) == saved_step(str(smoke_run)) == 18
    leaves_r, leaves_s = jax.tree.leaves(resumed), jax.tree.leaves(straight)
    assert len(leaves_r) == len(leaves_s) > 30
    for a, b in zip(leaves_r, leaves_s):
        np.testing.assert_array_equal(a, b)  # Bit for bit.


_TWO_CTRL_C = """
import os, signal, sys, time
from cifar_flax.run import interrupts
signal.signal(signal.SIGINT, signal.default_int_handler)  # As in a foreground shell.
with interrupts.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    print("requested", stop.why, flush=True)  # The first only asks the loop to stop ...
    os.kill(os.getpid(), signal.SIGINT)  # ... the second aborts at once.
    time.sleep(5)
print("not reached", flush=True)
"""


def test_second_ctrl_c_aborts_and_first_one_only_requests_a_stop():
    p = subprocess.run([sys.executable, "-c", _TWO_CTRL_C], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, preexec_fn=default_sigint)
    assert p.returncode == 130 and p.stdout.split() == ["requested", "SIGINT"], (p.stdout, p.stderr)
    assert p.stderr.strip().startswith("Interrupted (Ctrl-C): stopped again")
    assert "Traceback" not in p.stderr


def test_a_signal_inherited_as_ignored_stays_ignored():
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)  # A job started with nohup or `&`.
    before = signal.getsignal(signal.SIGTERM)
    try:
        with interrupts.StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGTERM) == before  # Restored.
    finally:
        signal.signal(signal.SIGINT, outer)


def _early_stop_config(first=("head",)):
    c = tiny_config()
    c.model.head_hidden = (8,)
    c.phases = [  # 48 train images / 16 = 3 steps per epoch.
        phase("first", epochs=3, trainable=first, lr=0.1, schedule="constant"),
        phase("all", epochs=2, lr=0.05),
    ]
    c.early_stopping.patience = 1
    c.early_stopping.min_delta = 10.0  # Nothing counts as an improvement after the first eval.
    c.checkpoint.keep = 5
    c.checkpoint.every_steps = 0
    return c


@pytest.mark.slow
@pytest.mark.parametrize("restore, first", [(True, ("head",)), (False, ("head",)),
                                            (True, ALL_GROUPS), (False, ALL_GROUPS)])
def test_early_stopping_restores_the_phase_best_weights(tmp_path, restore, first):
    """The phase that early stopping ends trains the head alone (BatchNorm frozen) or every
    layer (BatchNorm statistics change every step): its best params AND statistics come back."""
    c = _early_stop_config(first)
    c.early_stopping.restore_best = restore
    # Phase "head": eval at 3 (its best), at 6 (no improvement, patience 1) -> it stops at 6;
    # stopping at 7 keeps the best checkpoint of step 3 (phase "all" evaluates first at 9).
    with pytest.raises(interrupts.Interrupted) as stopped:
        train_and_evaluate(c, str(tmp_path), stop_after_steps=7)
    assert stopped.value.step == 7
    ckpt = Checkpointer(str(tmp_path))
    best_steps = ckpt.managers["best"].all_steps()
    ckpt.close()
    if restore:  # (6 too if its accuracy beat 3's by less than min_delta.)
        assert 3 in best_steps
        best = state_at(str(tmp_path), 3, kind="best")
    else:  # The run tests its last weights: no best checkpoint; step 3's weights from latest.
        assert list(best_steps) == []
        best = _variables(state_at(str(tmp_path), 3))
    at_6 = _variables(state_at(str(tmp_path), 6))  # The phase boundary: phase "all" starts here.
    same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at_6), jax.tree.leaves(best))]
    assert len(same) > 20
    records = read_metrics(str(tmp_path), "restore_best")
    if first == ALL_GROUPS and not restore:  # The statistics moved after step 3, so the
        stats_6 = jax.tree.leaves(at_6["batch_stats"])  # restore above is not vacuous.
        assert any(not np.array_equal(a, b) for a, b in
                   zip(stats_6, jax.tree.leaves(best["batch_stats"])))
    if restore:
        assert all(same)  # Bit for bit: params and BatchNorm statistics.
        assert [(r["step"], r["phase"], r["restored_step"]) for r in records] == [(6, 0, 3)]
    else:
        assert not all(same) and records == []


def _variables(state: dict) -> dict:
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


class _NoCheckpoints:
    root = "runs/x/checkpoints"

    def latest_step(self):
        return 4


@pytest.mark.parametrize("metrics, what", [
    ({"loss": np.inf, "grad_norm": 1.0}, "the training loss is inf"),
    ({"loss": 2.0, "grad_norm": np.inf}, "the gradient norm is inf"),
    ({"loss": np.nan, "grad_norm": np.nan}, "the training loss is nan"),
])
def test_any_non_finite_loss_or_gradient_norm_stops_the_run(metrics, what):
    """+inf, not only NaN; a finite loss with an infinite gradient norm too: the step named is
    the first bad one of those fetched, the last good checkpoint is named."""
    c = _early_stop_config()
    pending = [{"loss": 1.0, "grad_norm": 1.0}, metrics, {"loss": 1.0, "grad_norm": 1.0}]
    with pytest.raises(UserError) as e:
        divergence.Watch(c, 4, _NoCheckpoints(), []).check(pending, None, 7, 1)
    msg = str(e.value)
    assert f"diverged at step 6 in phase 1 (all): {what}" in msg
    assert "last good checkpoint (step 4)" in msg and "--config.phases[1].lr" in msg
    divergence.Watch(c, 4, _NoCheckpoints(), []).check([{"loss": 1e30, "grad_norm": 1e30}], None, 7, 1)


def test_the_divergence_line_names_the_rates_the_batch_made():
    c = _early_stop_config()
    c.lr_batch_size = 32  # Batch 16: phase "all" (lr 0.05) trains at 0.025.
    with pytest.raises(UserError) as e:
        divergence.Watch(c, 4, _NoCheckpoints(), []).check([{"loss": np.nan, "grad_norm": 1.0}], None, 7, 1)
    assert ("--config.phases[1].lr, now 0.05: peak lr 0.025 (the config's rates are for "
            "--config.lr_batch_size=32, x 16/32 at batch_size 16)") in str(e.value)


@pytest.mark.slow
def test_a_resumed_run_scales_its_rates_once_and_remembers_it_was_unstable(tmp_path, caplog):
    """Batch 16 with rates stated for 32: the head trains at half its lr 2000, before and after
    a resume (never halved twice). That lr blows the loss up (finite, far above chance): one
    warning in the first session, none after the resume; results.json and report.md name the
    first record above 100 x ln(4), which the resumed run knows from the metrics history."""
    c = tiny_config()
    c.lr_batch_size = 32
    c.phases = [phase("head", steps=8, trainable=("head",), lr=2e3, schedule="cosine")]
    assert interrupted_at(c, str(tmp_path), stop_after_steps=4) == 4
    first = caplog.text
    caplog.clear()
    results = train_and_evaluate(c, str(tmp_path))
    assert first.count("unstable run:") == 1 and "unstable run:" not in caplog.text
    assert "peak lr 1000 (the config's rates are for --config.lr_batch_size=32" in first
    halved = train.make_schedule(c.phases[0], 1e3, 8, 3)
    records = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert r["lr/head"] == pytest.approx(float(halved(r["step"]))), r
    assert results["learning_rates"] == [{"phase": 0, "name": "head", "peak": {"head": 1000.0}}]
    limit = 100 * np.log(4)
    over = [(r["step"], r["loss"]) for r in records if r["loss"] > limit]
    assert over and over[0][0] <= 4 and all(np.isfinite(r["loss"]) for r in records)
    bad = results["unstable"]
    assert (bad["step"], bad["value"], bad["what"]) == (*over[0], "training loss")
    assert bad["limit"] == pytest.approx(limit)
    warned = re.search(r"unstable run: the training loss at step (\d+) is ([0-9.e+]+), above "
                       r"138\.6 .*lower --config\.phases\[0\]\.lr \(now 2000: peak lr 1000", first)
    assert warned and int(warned.group(1)) == over[0][0], first[-3000:]
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["unstable"] == bad and saved["learning_rates"] == results["learning_rates"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"**Unstable run**: the training loss reached {bad['value']:.4g} at step {bad['step']}" \
        in report


@pytest.mark.slow
@pytest.mark.parametrize("steps, timed", [(10, True), (1, False)])
def test_a_run_shorter_than_a_log_window_reports_only_what_was_timed(tmp_path, capsys, steps,
                                                                      timed, monkeypatch):
    """Fewer steps than log_every_steps: the steps between evaluations are timed; a run whose
    only step compiled timed nothing and says nothing about images/s (never "0.0 images/s"),
    in report.md nor in the command's last line (main.main's, given this run's results)."""
    c = tiny_config(log_every_steps=100)
    c.phases = [phase("all", steps=steps, lr=0.05, schedule="constant")]
    assert command_status(c, tmp_path / "run") == 0
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    monkeypatch.setattr(main, "run", lambda config, workdir: results)
    capsys.readouterr()
    assert cli.run(main.main, main.FLAGS, ["--config", os.path.join(ROOT, "configs", "smoke.py"),
                                           "--workdir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    rate = results["images_per_sec"]
    if timed:
        assert rate > 0 and f"training throughput {rate:.1f} images/s" in report
        assert f"(training {rate:.1f} images/s)" in out
    else:
        assert rate is None and "images/s" not in report + out
    assert "test accuracy" in out and results["unstable"] is None
    assert "Unstable" not in report and "UNSTABLE" not in out


def test_the_last_line_says_when_a_run_was_unstable(monkeypatch, capsys):
    """The warning can scroll away in a long log: the command's last line repeats it."""
    bad = {"step": 2, "phase": 0, "what": "training loss", "value": 381.85, "limit": 138.6,
           "chance_loss": 1.386}
    results = {"test_accuracy": 0.25, "test_examples": 64, "images_per_sec": 1900.0,
               "unstable": bad}
    monkeypatch.setattr(main, "run", lambda config, workdir: results)
    argv = ["--config", os.path.join(ROOT, "configs", "smoke.py"), "--workdir", "unused"]
    assert cli.run(main.main, main.FLAGS, argv) == 0
    out = capsys.readouterr().out
    assert "UNSTABLE: the training loss reached 381.9 at step 2 (lower the learning rate)" in out


def test_unstable_is_the_first_training_or_validation_loss_above_100_ln_classes():
    history = [{"step": 0, "kind": "phase", "index": 0, "name": "a"},
               {"step": 2, "kind": "train", "loss": 5.0},
               {"step": 3, "kind": "eval", "val_loss": None},  # Non-finite: the divergence check's.
               {"step": 3, "kind": "phase", "index": 1, "name": "b"},
               {"step": 4, "kind": "train", "loss": 200.0},
               {"step": 4, "kind": "eval", "val_loss": 240.0}]
    assert divergence.unstable_loss(history, 10) == {
        "step": 4, "phase": 1, "what": "validation loss", "value": 240.0,
        "limit": pytest.approx(100 * np.log(10)), "chance_loss": pytest.approx(np.log(10))}
    assert divergence.unstable_loss(history, 4)["what"] == "training loss"  # 200 > 138.6.
    assert divergence.unstable_loss(history[:3], 4) is None
