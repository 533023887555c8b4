"""Reruns of a workdir that must not mislead or lose work: changed configs, damaged checkpoints,
failed saves (a full disk), a workdir in use. Tiny runs through main.run, behind the commands'
one boundary (cli.run), or through ``python -m cifar_flax.main``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_utils import (command_status, enable_compilation_cache, interrupted_at, steps_saved,
                         tiny_config)

from cifar_flax import UserError, main
from cifar_flax.config import phase
from cifar_flax.training.checkpoints import Checkpointer
from cifar_flax.training.metrics import read_metrics
from cifar_flax.training.workdir import LOCK_NAME, WorkdirLock

enable_compilation_cache()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    """48 train images / batch 16 = 3 steps per epoch; two phases, 9 steps; saves every 2."""
    c = tiny_config()
    c.phases = [
        phase("head", epochs=1, trainable=("head",), lr=0.1, schedule="constant"),
        phase("all", epochs=2, lr=0.05, warmup_epochs=0.5),
    ]
    c.checkpoint.every_steps = 2
    c.early_stopping.patience = 5
    c.update_from_flattened_dict(overrides)
    return c


def _steps(workdir) -> list[int]:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints", "latest"))
                  if p.isdigit())


def _params(workdir) -> list[np.ndarray]:
    ckpt = Checkpointer(str(workdir))
    latest = ckpt.managers["latest"]
    out = latest.restore(latest.latest_step(),
                         args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return jax.tree.leaves(jax.device_get(out["state"].get("params", out["state"])))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    results = main.run(_config(), str(workdir))
    assert results["steps"] == 9
    return workdir, results


@pytest.mark.slow
def test_rerun_of_a_finished_run_with_new_lr_or_epochs_is_refused(finished):
    workdir, results = finished
    before = (workdir / "report" / "results.json").read_text()
    for override, field in (({"phases[1].lr": 0.5}, "phases[1].lr: 0.05 -> 0.5"),
                            ({"phases[1].epochs": 4.0}, "phases[1].epochs: 2.0 -> 4.0")):
        with pytest.raises(UserError) as e:
            main.run(_config(**override), str(workdir))
        assert field in str(e.value) and "--config.resume=replace" in str(e.value)
    assert (workdir / "report" / "results.json").read_text() == before
    assert _steps(workdir)[-1] == 9 and not (workdir / LOCK_NAME).exists()


@pytest.mark.slow
def test_plain_rerun_of_a_finished_run_keeps_its_wall_time(finished):
    workdir, results = finished
    again = main.run(_config(log_every_steps=3), str(workdir))  # A harmless change is fine.
    assert again["wall_seconds"] == results["wall_seconds"]
    assert again["steps"] == 9 and again["test_accuracy"] == results["test_accuracy"]


@pytest.mark.slow
def test_other_batch_size_refused_then_damaged_newest_checkpoint_falls_back(finished, tmp_path):
    straight, _ = finished
    assert interrupted_at(_config(), str(tmp_path), 5) == 5 and _steps(tmp_path) == [4, 5]
    with pytest.raises(UserError, match="batch_size: 16 -> 32"):
        main.run(_config(batch_size=32, eval_batch_size=32), str(tmp_path))
    assert _steps(tmp_path) == [4, 5]  # Nothing touched.

    state = tmp_path / "checkpoints" / "latest" / "5" / "state"
    data = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(data, 100)  # A copy cut short.
    second = main.run(_config(), str(tmp_path))
    assert second["steps"] == 9
    for a, b in zip(_params(straight), _params(tmp_path), strict=True):
        np.testing.assert_array_equal(a, b)  # Resumed from step 4: the uninterrupted result.
    kept = os.listdir(tmp_path / "checkpoints" / "unreadable")
    assert len(kept) == 1 and kept[0].startswith("latest-5-")  # Kept, never deleted.


@pytest.mark.slow
def test_no_readable_checkpoint_stops_naming_the_folder_and_changes_nothing(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    for step in _steps(workdir):
        shutil.rmtree(workdir / "checkpoints" / "latest" / str(step) / "meta")
    files = sorted(str(p) for p in workdir.rglob("*"))
    with pytest.raises(UserError) as e:
        main.run(_config(), str(workdir))
    assert f"no readable checkpoint in {workdir / 'checkpoints' / 'latest'}" in str(e.value)
    assert sorted(str(p) for p in workdir.rglob("*")) == files


@pytest.mark.slow
def test_resume_replace_moves_the_old_run_aside_and_starts_the_new_one(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    new = _config(resume="replace", seed=1)
    results = main.run(new, str(workdir))
    assert results["steps"] == 9 and results["config"]["seed"] == 1
    (previous,) = os.listdir(workdir / "previous")
    old = json.loads((workdir / "previous" / previous / "report" / "results.json").read_text())
    assert old["config"]["seed"] == 0 and old["test_accuracy"] == finished[1]["test_accuracy"]
    assert main.run(new, str(workdir))["steps"] == 9  # Same config again: resumes, no new move.
    assert os.listdir(workdir / "previous") == [previous]


@pytest.mark.slow
def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                     capsys):
    real_save, calls = ocp.CheckpointManager.save, []

    def full_disk(self, step, *args, **kwargs):
        calls.append(step)
        if step >= 4:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    assert command_status(_config(), tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("error:")]) == 1
    assert "saving checkpoint step 4" in err[-1] and "No space left on device" in err[-1]
    monkeypatch.undo()
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_meta()["step"] == 3  # The previous checkpoint reads back whole.
    ckpt.close()


def test_a_workdir_in_use_or_a_file_is_one_line(tmp_path, capsys):
    with WorkdirLock(str(tmp_path)):
        assert command_status(_config(), tmp_path) == 1
    assert f"in use by pid {os.getpid()}" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        main.run(_config(), str(tmp_path / "file"))


_CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
import test_never_lose_work as t


def get_config():
    return t._config()
"""


def _command_line(tmp_path, workdir, *extra) -> list[str]:
    """``python -m cifar_flax.main`` on this file's _config (a config file that imports it)."""
    config = tmp_path / "config.py"
    config.write_text(_CONFIG_FILE.format(tests=os.path.dirname(__file__)))
    return [sys.executable, "-m", "cifar_flax.main", f"--config={config}", f"--workdir={workdir}",
            *extra]


def _problems(stderr: str) -> list[str]:
    """What a run printed besides its progress (absl INFO lines) and TensorFlow's AutoGraph
    notices: warnings and errors."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and "AutoGraph" not in ln and not re.match(r"I\d{4} ", ln)]


@pytest.mark.slow
def test_a_damaged_newest_step_is_one_warning_line_and_the_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    assert interrupted_at(_config(), str(workdir), 5) == 5
    state = workdir / "checkpoints" / "latest" / "5" / "state"
    data = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(data, 100)  # The newest step's largest array file, cut short.
    p = subprocess.run(_command_line(tmp_path, workdir), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = _problems(p.stderr)
    assert len(lines) == 1 and "latest/5 is unreadable" in lines[0], p.stderr[-3000:]
    assert "using step 4" in lines[0] and "Traceback" not in p.stderr
    assert json.loads((workdir / "report" / "results.json").read_text())["steps"] == 9


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only: skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_error_line_and_a_rerun_with_space_resumes(tmp_path, small_disk):
    workdir = small_disk / "run"
    p = subprocess.run(_command_line(tmp_path, workdir, "--config.checkpoint.keep=5"), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    lines = _problems(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    assert "No space left on device" in lines[0] and "rerun the same command" in lines[0]
    saved = steps_saved(str(workdir))
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    again = subprocess.run(_command_line(tmp_path, workdir, "--config.checkpoint.keep=5"),
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    history = read_metrics(str(workdir), "train")
    assert history[-1]["step"] == 9 and (not saved or history[0]["step"] == 1)


def test_the_entry_point_holds_the_workdir_lock_while_it_trains(tmp_path, monkeypatch):
    """main.run takes the lock before training and gives it back after (fast: no training)."""
    seen = []

    def fake_training(config, workdir, stop_after_steps, report_fn):
        seen.append(json.loads((tmp_path / LOCK_NAME).read_text()))
        return {"steps": 0}

    monkeypatch.setattr(main, "train_and_evaluate", fake_training)
    assert main.run(_config(), str(tmp_path)) == {"steps": 0}
    assert [(r["pid"]) for r in seen] == [os.getpid()]
    assert not (tmp_path / LOCK_NAME).exists()
