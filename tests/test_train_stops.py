"""Runs that end early end cleanly: divergence, Ctrl-C, early stopping with the best weights."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_utils import (command_status, default_sigint, enable_compilation_cache, state_at,
                         steps_saved, tiny_config)

from cifar_flax import UserError, train
from cifar_flax.config import phase
from cifar_flax.main import run as train_and_evaluate
from cifar_flax.training import interrupts
from cifar_flax.training.checkpoints import Checkpointer
from cifar_flax.training.metrics import read_metrics

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
    ckpt.close()
    state = state_at(str(workdir))
    assert int(state["step"]) == good
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
    assert int(resumed["step"]) == int(straight["step"]) == 18
    leaves_r, leaves_s = jax.tree.leaves(resumed), jax.tree.leaves(straight)
    assert len(leaves_r) == len(leaves_s) > 30
    for a, b in zip(leaves_r, leaves_s):
        np.testing.assert_array_equal(a, b)  # Bit for bit.


_TWO_CTRL_C = """
import os, signal, sys, time
from cifar_flax.training import interrupts
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
    assert 3 in ckpt.managers["best"].all_steps()  # (6 too if its accuracy beat 3's by less than min_delta.)
    ckpt.close()
    best = state_at(str(tmp_path), 3, kind="best")
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
        train._check_finite(pending, 7, c, 1, _NoCheckpoints())
    msg = str(e.value)
    assert f"diverged at step 6 in phase 1 (all): {what}" in msg
    assert "last good checkpoint (step 4)" in msg and "--config.phases[1].lr" in msg
    train._check_finite([{"loss": 1e30, "grad_norm": 1e30}], 7, c, 1, _NoCheckpoints())
