"""Reruns of a workdir that must not mislead or lose work: changed configs, damaged checkpoints,
failed saves (a full disk), a workdir in use. Tiny runs through main.run, behind the commands'
one boundary (cli.run), or through ``python -m cifar_flax.main``."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from train_utils import (command_status, default_sigint, enable_compilation_cache, interrupted_at,
                         steps_saved, tiny_config)

from cifar_flax import UserError, main
from cifar_flax.config import phase
from cifar_flax.run import evaluation
from cifar_flax.run.checkpoints import Checkpointer
from cifar_flax.run.metrics import read_metrics
from cifar_flax.run.workdir import LOCK_NAME, WorkdirLock

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
    assert ckpt.latest_meta()["position"]["step"] == 3  # The previous checkpoint reads back whole.
    ckpt.close()


@pytest.mark.slow
def test_an_infinite_validation_loss_stops_the_run_keeping_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    """The first validation (step 3) is real, the second (step 6) says inf: the run stops there
    with one error line naming the validation loss, and its newest checkpoint is the one before."""
    real, calls = evaluation.Evaluator.__call__, []

    def inf_after_the_first(self, variables, split, keep_logits=False):
        calls.append(split)
        result = real(self, variables, split, keep_logits)
        return result if len(calls) == 1 else {**result, "loss": float("inf")}

    monkeypatch.setattr(evaluation.Evaluator, "__call__", inf_after_the_first)
    c = _config(eval_every_steps=3)
    c.phases = [phase("all", steps=9, lr=0.05, schedule="constant")]
    assert command_status(c, tmp_path) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    good = steps_saved(str(tmp_path))[-1]
    assert errors[0].startswith("error: training diverged at step 6 in phase 0 (all): the "
                                "validation loss is inf; the last good checkpoint (step "
                                f"{good}) is kept in "), errors[0]
    assert calls == ["validation", "validation"] and good == 4  # Saved every 2 steps.
    monkeypatch.undo()
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_meta()["position"]["step"] == good  # It reads back whole.
    ckpt.close()
    assert not (tmp_path / "report").exists()
    assert [r["step"] for r in read_metrics(str(tmp_path), "eval")] == [3]  # inf not recorded.


# What tensorstore raised when a real disk filled up (a 3 MB tmpfs, tensorstore 0.1.86): the OS's
# words are inside a ValueError's text, with no OSError anywhere in the chain.
TENSORSTORE_DISK_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT database at local file "{path}": '
    f'Failed to write 739651 bytes to file 14: {os.strerror(errno.ENOSPC)} '
    f"[os_error_code='{errno.ENOSPC}']")


def _disk_full_from(step: int, failed: list[int]):
    """A ``tensorstore.open`` whose array writes into ``latest`` at ``step`` or later fail the
    way a full disk fails them (the save's own path through Orbax; no root, no tmpfs)."""
    real_open = ts.open

    def open_(spec, *args, **kwargs):
        text = json.dumps(spec.to_json() if hasattr(spec, "to_json") else spec)
        m = re.search(r'"path": "([^"]*/latest/(\d+)\.orbax-checkpoint-tmp[^"]*)"', text)
        if kwargs.get("create") and m and int(m.group(2)) >= step:
            failed.append(int(m.group(2)))
            raise ValueError(TENSORSTORE_DISK_FULL.format(path=m.group(1)))
        return real_open(spec, *args, **kwargs)

    return open_


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_is_one_line_in_the_disks_words_and_a_rerun_resumes(tmp_path, monkeypatch,
                                                                         capsys, async_save):
    """The message a user sees when the disk fills up (pinned without root: the tmpfs test
    needs it), with the save in the foreground or in Orbax's background thread; the checkpoints
    before are intact and the same command resumes from them once there is space."""
    failed = []
    monkeypatch.setattr(ts, "open", _disk_full_from(4, failed))
    c = _config(**{"checkpoint.async_save": async_save})
    assert command_status(c, tmp_path) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert failed and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(
        r"error: saving checkpoint step \d+ in \S+/checkpoints/latest failed \(No space left on "
        r"device\); the checkpoints saved before are intact: fix that \(free space, "
        r"permissions\) and rerun the same command to resume\.", errors[0]), errors[0]
    assert f"saving checkpoint step {failed[0]} in" in errors[0] or async_save
    monkeypatch.undo()  # Space again.
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_meta()["position"]["step"] == steps_saved(str(tmp_path))[-1] == 3  # Whole.
    ckpt.close()
    assert command_status(c, tmp_path) == 0
    assert [r["step"] for r in read_metrics(str(tmp_path), "train")] == list(range(1, 10))


def _write_steps(workdir, steps) -> dict[int, dict]:
    """Checkpoints of ``latest`` at ``steps`` (random arrays, as a real state: they do not
    compress away), written as a run writes them; each step's state."""
    states = {s: {"params": {"w": np.random.default_rng(s).standard_normal((64, 64), np.float32)},
                  "step": np.array(s, np.int32)} for s in steps}
    with Checkpointer(str(workdir), keep=len(steps), async_save=False) as ckpt:
        for s, state in states.items():
            ckpt.save("latest", s, state, {"step": s})
    return states


def _damage(workdir, step: int, part: str) -> None:
    """``arrays``: the step's largest array file cut short; ``meta``: its meta not JSON."""
    folder = workdir / "checkpoints" / "latest" / str(step)
    if part == "arrays":
        data = max((p for p in (folder / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
        os.truncate(data, 100)
    else:
        (folder / "meta" / "metadata").write_text('{"step": ')


@pytest.mark.parametrize("damaged, resumes", [
    ({5: "arrays"}, 4), ({5: "meta"}, 4), ({5: "arrays", 4: "meta"}, 3)])
def test_damaged_steps_are_moved_aside_newest_first_and_the_next_older_one_is_used(
        tmp_path, caplog, damaged, resumes):
    """Steps 3, 4, 5: each damaged step, newest first, is one warning naming why (the failure's
    kind), moved to checkpoints/unreadable/; the run resumes from the newest step that reads
    back, with that step's values; the older steps stay where they were."""
    states = _write_steps(tmp_path, (3, 4, 5))
    for step, part in damaged.items():
        _damage(tmp_path, step, part)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    try:
        meta = ckpt.latest_meta()
        restored = ckpt.restore("latest", states[5])
    except Exception as e:  # noqa: BLE001 - the point: not an exception, a fallback.
        pytest.fail(f"a damaged newest step must be moved aside, not raise {type(e).__name__}: "
                    f"{e}")
    finally:
        ckpt.close()
    assert meta["step"] == resumes and int(restored["step"]) == resumes
    np.testing.assert_array_equal(restored["params"]["w"], states[resumes]["params"]["w"])
    assert steps_saved(str(tmp_path)) == [s for s in (3, 4, 5) if s <= resumes]
    moved = sorted(os.listdir(tmp_path / "checkpoints" / "unreadable"))
    assert [name.rsplit("-", 2)[0] for name in moved] == [f"latest-{s}" for s in sorted(damaged)]
    warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert [int(re.search(r"latest/(\d+) is unreadable", w).group(1)) for w in warnings] == sorted(
        damaged, reverse=True)  # Newest first, one line each.
    for w, step in zip(warnings, sorted(damaged, reverse=True)):
        kind = "JSONDecodeError" if damaged[step] == "meta" else "ValueError"  # tensorstore's.
        assert f"is unreadable ({kind}: " in w and f"using step {resumes}." in w, w


def test_no_step_that_reads_back_stops_naming_the_folder_and_moves_nothing(tmp_path):
    _write_steps(tmp_path, (3, 4))
    _damage(tmp_path, 4, "meta")
    _damage(tmp_path, 3, "arrays")
    with Checkpointer(str(tmp_path), keep=2) as ckpt, pytest.raises(UserError) as e:
        ckpt.latest_meta()
    assert str(e.value).startswith(f"no readable checkpoint in {tmp_path}/checkpoints/latest "
                                   "(steps [4, 3]; newest: JSONDecodeError: ")
    assert steps_saved(str(tmp_path)) == [3, 4]
    assert not (tmp_path / "checkpoints" / "unreadable").exists()


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


_STARTING_UP = """
import sys, time
from cifar_flax.run import startup
startup.start()  # What the package does first for ``python -m cifar_flax.main`` (TF quiet).
from absl import flags
from cifar_flax import cli, main
from cifar_flax.config import load_config_file


def starting_up(config, workdir, stop_after_steps, report_fn):  # Data, model, compiling ...
    print("locked", flush=True)
    time.sleep(300)


main.train_and_evaluate = starting_up
config = load_config_file({config!r})
cli.exit(cli.run(lambda argv: main.run(config, {workdir!r}), flags.FlagValues(),
                 interrupted="nothing new was saved; rerun the same command to resume"))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT,
                                 pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_releases_the_workdir_lock(tmp_path, caplog, sig):
    """The lock taken, training not begun (the signal ends the process at once, os._exit): the
    lock is gone, and a rerun takes it without a takeover warning (a "killed run")."""
    workdir = tmp_path / "run"
    script = tmp_path / "starting_up.py"
    script.write_text(_STARTING_UP.format(config=os.path.join(ROOT, "configs", "smoke.py"),
                                          workdir=str(workdir)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        assert proc.stdout.readline() == "locked\n", proc.communicate()[1][-3000:]
        assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == proc.pid
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-3000:]
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"[IW]\d{4} ", ln)]
    assert lines == [f"Interrupted ({name}): nothing new was saved; rerun the same command to "
                     "resume."], err[-3000:]
    assert not (workdir / LOCK_NAME).exists()
    with WorkdirLock(str(workdir)):  # The rerun.
        pass
    assert "Taking over" not in caplog.text and "no longer running" not in caplog.text
