"""TensorFlow (the host input pipeline only) never takes a GPU or a TPU: every command hides them
before any TF op, at its start (run/startup.py, begun by the package as Python launches the
command), and runs through the one boundary (cli.run)."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import types

from train_utils import default_sigint

from cifar_flax import cli
from cifar_flax.run import startup

PACKAGE = pathlib.Path(cli.__file__).resolve().parent
ROOT = PACKAGE.parent
COMMANDS = ("main.py", "eda.py", "predict.py", "evaluate.py", "export.py", "pretrained.py",
            "bench/__main__.py", "bench/frameworks.py", "bench/fastpaths.py")


def test_hides_every_accelerator_type(monkeypatch):
    hidden = []

    def set_visible_devices(devices, kind):
        assert devices == []
        hidden.append(kind)

    fake_config = types.SimpleNamespace(
        set_visible_devices=set_visible_devices,
        get_visible_devices=lambda: [types.SimpleNamespace(device_type="CPU")])
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(config=fake_config))
    assert startup.hide_accelerators() == ["CPU"]
    assert sorted(hidden) == ["GPU", "TPU"]


def test_real_tensorflow_sees_only_the_cpu_after_hiding():
    code = ("from cifar_flax.run.startup import hide_accelerators; import tensorflow as tf; "
            "print(hide_accelerators(), sorted({d.device_type for d in "
            "tf.config.get_visible_devices()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['CPU'] ['CPU']"


def test_the_start_up_hides_the_accelerators(monkeypatch):
    calls = []
    monkeypatch.setattr(startup, "hide_accelerators", lambda: calls.append("hidden"))
    monkeypatch.setattr(startup.interrupts, "exit_on_signal", lambda *a: {})
    startup.start()
    assert calls == ["hidden"]


def test_every_command_imports_first_and_runs_through_the_boundary():
    """No command starts itself up above its imports any more (the package does, below): after
    the docstring come the imports, and ``__main__`` runs the command through cli.run."""
    for name in COMMANDS:
        source = (PACKAGE / name).read_text()
        body = ast.parse(source).body[1:]  # After the docstring.
        assert isinstance(body[0], (ast.Import, ast.ImportFrom)), name
        assert not re.search(r"\b(cli|startup)\.start\(", source), f"{name} starts itself up"
        main = body[-1]
        assert isinstance(main, ast.If) and ast.unparse(main.test) == "__name__ == '__main__'", name
        assert "cli.run(" in source, f"{name} bypasses the boundary"


def _state_after(*command: str, env: dict | None = None) -> list[str]:
    """What the process of ``python <command>`` holds once its module ran (``-i`` reads the
    check from stdin): the SIGINT handler's name, and whether TensorFlow is imported."""
    check = ("import signal, sys; print('STATE', signal.getsignal(signal.SIGINT).__name__, "
             "sys.modules.get('tensorflow', 'absent'))")
    p = subprocess.run([sys.executable, "-i", *command], input=check, capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})},
                       preexec_fn=default_sigint)  # As in a shell, even under a background job.
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("STATE")]
    assert p.returncode == 0 and len(lines) == 1, (p.stdout, p.stderr[-2000:])
    return lines[0].split(None, 2)[1:]


def test_python_m_starts_a_command_up_in_the_package_and_a_plain_import_does_not():
    """``python -m cifar_flax.<module>``: the package's ``__init__`` ran the start-up before the
    module's imports (a Ctrl-C is one line; here TensorFlow is kept out, as the benchmark's rows
    without it ask); ``import cifar_flax`` (a library user, a notebook, the tests) changes
    nothing."""
    launched = _state_after("-m", "cifar_flax.exported", env={startup.WITHOUT_TENSORFLOW: "1"})
    assert launched == ["_exit_now", "None"]
    imported = _state_after("-c", "import cifar_flax", env={startup.WITHOUT_TENSORFLOW: "1"})
    assert imported == ["default_int_handler", "absent"]
