"""TensorFlow (the host input pipeline only) never takes a GPU or a TPU: every entry point hides
them before any TF op, in one place (data/tf_runtime.py)."""

from __future__ import annotations

import inspect
import pathlib
import subprocess
import sys
import types

from cifar_flax.data import tf_runtime

PACKAGE = pathlib.Path(tf_runtime.__file__).resolve().parents[1]
ENTRY_POINTS = ("main.py", "eda.py", "predict.py", "evaluate.py", "export.py")


def test_hides_every_accelerator_type(monkeypatch):
    hidden = []

    def set_visible_devices(devices, kind):
        assert devices == []
        hidden.append(kind)

    fake_config = types.SimpleNamespace(
        set_visible_devices=set_visible_devices,
        get_visible_devices=lambda: [types.SimpleNamespace(device_type="CPU")])
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(config=fake_config))
    assert tf_runtime.hide_accelerators() == ["CPU"]
    assert sorted(hidden) == ["GPU", "TPU"]


def test_real_tensorflow_sees_only_the_cpu_after_hiding():
    code = ("from cifar_flax.data.tf_runtime import hide_accelerators; import tensorflow as tf; "
            "print(hide_accelerators(), sorted({d.device_type for d in "
            "tf.config.get_visible_devices()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['CPU'] ['CPU']"


def test_every_command_prepares_the_runtime_first(monkeypatch):
    """cli.prepare_runtime hides the accelerators, and every command's ``__main__`` goes through
    cli.run or inference.cli.run_cli, which call it before the command's body."""
    from cifar_flax import cli
    from cifar_flax.inference import cli as inference_cli

    calls = []
    monkeypatch.setattr(tf_runtime, "hide_accelerators", lambda: calls.append("hidden"))
    cli.prepare_runtime()
    assert calls == ["hidden"]
    for runner in (cli.run, inference_cli.run_cli):
        assert "prepare_runtime()" in inspect.getsource(runner), runner.__name__
    for name in ENTRY_POINTS:
        source = (PACKAGE / name).read_text()
        assert "cli.run(" in source or "run_cli(" in source, f"{name} bypasses cli.run/run_cli"
