"""The workdir: one run at a time (an atomic lock), stale locks, unusable paths, moving a run aside."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from cifar_flax import UserError
from cifar_flax.run.workdir import LOCK_NAME, WorkdirLock, check_workdir, move_aside

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # Exited and reaped: no process has this pid now (until reused).


def test_a_second_run_is_refused_naming_pid_and_host(tmp_path):
    with WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(UserError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
        assert "\n" not in str(e.value)
    assert not (tmp_path / LOCK_NAME).exists()  # Released on exit ...
    with WorkdirLock(str(tmp_path)):  # ... so the next run gets it.
        pass


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started": 0.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with WorkdirLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock.record
    assert f"pid {stale['pid']}" in caplog.text and "no longer running" in caplog.text
    assert sorted(os.listdir(tmp_path)) == []  # The stale lock was not left behind.


def test_a_lock_from_another_host_is_never_taken(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(UserError) as e:
        WorkdirLock(str(tmp_path)).acquire()
    assert "pid 1 on host elsewhere" in str(e.value) and f"delete {tmp_path / LOCK_NAME}" in str(e.value)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"


@pytest.mark.slow
def test_of_many_processes_starting_at_once_exactly_one_gets_the_lock(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from cifar_flax.run.workdir import WorkdirLock
        from cifar_flax import UserError
        time.sleep(max(0.0, {__import__('time').time() + 3.0} - time.time()))  # Start together.
        try:
            WorkdirLock({str(tmp_path)!r}).acquire()
            print("got it")
            time.sleep(2)
        except UserError as e:
            print("refused:", e)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum("got it" in o for o in outs) == 1, outs
    assert sum("refused: workdir" in o and "in use by pid" in o for o in outs) == 3, outs


def test_unusable_workdirs_are_one_clear_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_workdir(str(a_file))
    with pytest.raises(UserError, match="not a writable folder"):
        check_workdir(str(a_file / "below_a_file"))
    with pytest.raises(UserError, match="not a writable folder"):
        check_workdir("/proc/self")  # Exists, is a folder, refuses new files (even for root).
    assert check_workdir(str(tmp_path / "new" / "run")).is_dir()
    assert os.listdir(tmp_path / "new" / "run") == []  # The write probe is cleaned up.


def test_move_aside_keeps_every_run_file(tmp_path):
    (tmp_path / "checkpoints" / "latest").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")  # Not a run file: stays.
    dest = move_aside(str(tmp_path))
    assert sorted(os.listdir(dest)) == ["checkpoints", "metrics.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "previous"]
    assert move_aside(str(tmp_path)) is None  # Nothing left to move.
