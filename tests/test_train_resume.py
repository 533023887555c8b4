"""Interrupt-and-resume gives exactly the uninterrupted run; the loop's bookkeeping is right."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from train_utils import enable_compilation_cache, interrupted_at, saved_step, state_at, tiny_config

from cifar_flax.config import phase
from cifar_flax.main import run as train_and_evaluate
from cifar_flax import train
from cifar_flax.run.metrics import read_metrics

pytestmark = pytest.mark.slow  # End-to-end runs: the full suite only.

enable_compilation_cache()


def _config():
    c = tiny_config()
    c.augment.crop_padding = 2  # Random augmentation and dropout: the RNG must resume too.
    c.augment.flip = True
    c.model.head_hidden = (8,)
    c.model.head_dropout = 0.2
    c.phases = [  # 48 train images / 16 = 3 steps per epoch.
        phase("head", epochs=1, trainable=("head",), lr=0.1, schedule="constant"),
        phase("all", epochs=2, lr=0.05, warmup_epochs=0.5, weight_decay=1e-4),
    ]
    c.checkpoint.every_steps = 2
    c.early_stopping.patience = 5
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight = str(tmp_path_factory.mktemp("straight"))
    resumed = str(tmp_path_factory.mktemp("resumed"))
    full = train_and_evaluate(_config(), straight)
    first = interrupted_at(_config(), resumed, 5)  # Inside phase 2.
    second = train_and_evaluate(_config(), resumed)
    return straight, resumed, full, first, second


def test_resumed_run_ends_with_identical_parameters(runs):
    straight, resumed, full, first, second = runs
    assert first == 5
    a, b = state_at(straight), state_at(resumed)
    assert saved_step(straight) == saved_step(resumed) == full["steps"] == 9
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 30
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # Bit for bit.
    assert second["test_accuracy"] == full["test_accuracy"]
    assert second["test_loss"] == full["test_loss"]


def test_history_is_continuous_after_resume(runs):
    straight, resumed, *_ = runs

    def records(workdir, kind):
        return [{k: v for k, v in r.items() if k != "images_per_sec"}
                for r in read_metrics(workdir, kind)]

    for kind in ("train", "eval", "phase"):
        assert records(straight, kind) == records(resumed, kind), kind
    phases = records(straight, "phase")
    assert [(p["step"], p["name"]) for p in phases] == [(0, "head"), (3, "all")]
    assert [r["step"] for r in records(straight, "eval")] == [3, 6, 9]


def test_rerun_of_a_finished_run_only_reports(runs):
    straight, _, full, *_ = runs
    again = train_and_evaluate(_config(), straight)
    assert again["steps"] == full["steps"]
    assert again["test_accuracy"] == full["test_accuracy"]
    assert os.path.exists(os.path.join(straight, "report", "report.md"))


def test_early_stopping_ends_the_phase_and_moves_on(tmp_path):
    c = _config()
    c.early_stopping.patience = 1
    c.early_stopping.min_delta = 10.0  # Nothing counts as an improvement after the first eval.
    c.phases[0].epochs = 3
    c.checkpoint.every_steps = 0
    result = train_and_evaluate(c, str(tmp_path))
    rows = read_metrics(str(tmp_path))
    starts = [(r["step"], r["name"]) for r in rows if r["kind"] == "phase"]
    # Phase "head": eval at 3 (best), eval at 6 (no improvement, patience 1) -> stop at 6.
    assert starts == [(0, "head"), (6, "all")]
    assert result["steps"] == 12  # The second phase runs its 6 steps (eval 9: best, 12: stop).
    assert result["tested_checkpoint"] == "best"
    assert result["tested_step"] == result["best_step"]


def test_logged_learning_rates_follow_the_phase_step(runs):
    """lr/<group> in the train records is the phase's schedule at the phase-relative step (phase
    "all" starts at step 3 with a warmup: the global step would give other values)."""
    straight, *_ = runs
    c = _config()
    spe = 3
    head = train.make_schedule(c.phases[0], 0.1, 3, spe)
    warm = train.make_schedule(c.phases[1], 0.05, 6, spe)
    records = read_metrics(straight, "train")
    assert [r["step"] for r in records] == list(range(1, 10))
    for r in records:
        lrs = {k: v for k, v in r.items() if k.startswith("lr/")}
        if r["phase"] == 0:
            assert lrs == {"lr/head": pytest.approx(float(head(r["step"])))}
        else:
            want = float(warm(r["step"] - 3))
            assert len(lrs) == len(c.groups), r
            assert all(v == pytest.approx(want) for v in lrs.values()), r
    late = [r for r in records if r["phase"] == 1]
    assert any(float(warm(r["step"])) != pytest.approx(float(warm(r["step"] - 3))) for r in late)
