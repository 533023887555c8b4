"""TensorFlow (the host input pipeline only) never takes a GPU or a TPU: every command hides them
before any TF op, at its start (cli.start), and runs through the one boundary (cli.run)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import types

from cifar_flax import cli

PACKAGE = pathlib.Path(cli.__file__).resolve().parent
COMMANDS = ("main.py", "eda.py", "predict.py", "evaluate.py", "export.py", "pretrained.py",
            "bench/__main__.py")


def test_hides_every_accelerator_type(monkeypatch):
    hidden = []

    def set_visible_devices(devices, kind):
        assert devices == []
        hidden.append(kind)

    fake_config = types.SimpleNamespace(
        set_visible_devices=set_visible_devices,
        get_visible_devices=lambda: [types.SimpleNamespace(device_type="CPU")])
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(config=fake_config))
    assert cli.hide_accelerators() == ["CPU"]
    assert sorted(hidden) == ["GPU", "TPU"]


def test_real_tensorflow_sees_only_the_cpu_after_hiding():
    code = ("from cifar_flax.cli import hide_accelerators; import tensorflow as tf; "
            "print(hide_accelerators(), sorted({d.device_type for d in "
            "tf.config.get_visible_devices()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['CPU'] ['CPU']"


def test_every_command_starts_and_runs_through_the_boundary(monkeypatch):
    """cli.start hides the accelerators (before the imports that bring TensorFlow), and every
    command's ``__main__`` calls it first and runs its body through cli.run."""
    calls = []
    monkeypatch.setattr(cli, "hide_accelerators", lambda: calls.append("hidden"))
    monkeypatch.setattr(cli.interrupts, "exit_on_signal", lambda *a: {})
    cli.start()
    assert calls == ["hidden"]
    for name in COMMANDS:
        source = (PACKAGE / name).read_text()
        code = [ln for ln in source.split('"""', 2)[2].splitlines() if ln.strip()]
        assert code[:3] == ["from cifar_flax import cli", code[1], code[2]], name
        assert code[1].startswith('if __name__ == "__main__":'), name  # Before any other import.
        assert code[2].strip().startswith("cli.start("), name
        assert "cli.run(" in source, f"{name} bypasses the boundary"
