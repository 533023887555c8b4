"""One line for every slip in flags and config files (cli.py), found without running anything;
every command's --help."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from train_utils import default_sigint

from cifar_flax import cli
from cifar_flax.cli import missing_config_file, override_error
from cifar_flax.config import default_config, phase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    c = default_config()
    c.phases = [phase("a"), phase("b")]
    return c


def test_a_misspelled_field_suggests_the_near_name():
    c = _config()
    assert override_error(c, "batch_sizee") == (
        "--config.batch_sizee: no field 'batch_sizee' in the config; did you mean "
        "--config.batch_size?")
    assert override_error(c, "model.head_hiden").endswith("did you mean --config.model.head_hidden?")
    assert override_error(c, "phases[1].lrr").endswith("did you mean --config.phases[1].lr?")
    far = override_error(c, "augment.zzz")
    assert "no field 'zzz' in augment" in far and "resolution" in far  # Lists what there is.


def test_a_phase_index_out_of_range_says_how_many_there_are():
    msg = override_error(_config(), "phases[5].lr")
    assert msg == ("--config.phases[5].lr: phases[5] is out of range: phases has 2 entries "
                   "(phases[0]..phases[1])")


def test_existing_fields_are_fine():
    c = _config()
    for path in ("batch_size", "phases[1].lr", "model.head_hidden", "groups.head", "phases[0]"):
        assert override_error(c, path) is None, path


def test_a_missing_config_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = missing_config_file("configs/smoke.py:arg")  # The project's file, from elsewhere.
    assert f"looked for {tmp_path}/configs/smoke.py" in msg
    assert f"did you mean --config={ROOT}/configs/smoke.py:arg?" in msg
    msg = missing_config_file("configs/nope.py")
    assert "nope.py" in msg and f"configs are in {ROOT}/configs" in msg
    assert missing_config_file(f"{ROOT}/configs/smoke.py") is None


def test_ctrl_c_landing_in_a_gc_callback_still_exits_130_without_a_traceback(tmp_path):
    """Python cannot raise out of a GC callback (JAX registers one): the SystemExit of our Ctrl-C
    handler would be printed as "Exception ignored ... Traceback" and the program would run on."""
    script = tmp_path / "gc_ctrl_c.py"
    script.write_text(
        "import gc, os, signal, time\n"
        "from cifar_flax.run import interrupts\n"
        "interrupts.exit_on_signal('stopped in a GC callback')\n"
        "def callback(phase, info):\n"
        "    if phase == 'start':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        sum(range(1000))  # The handler runs here, inside the callback.\n"
        "gc.callbacks.append(callback)\n"
        "gc.collect()\n"
        "gc.callbacks.clear()\n"
        "time.sleep(60)\n"
        "print('ran on')\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       preexec_fn=default_sigint)  # Not the worker's SIGINT disposition.
    assert p.returncode == 130, (p.stdout, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "ran on" not in p.stdout, p.stderr[-2000:]
    assert p.stderr.count("Interrupted (Ctrl-C): stopped in a GC callback.") == 1, p.stderr


def _wait_for_tensorflow(pid: int, timeout: float = 120) -> None:
    """Until the process has TensorFlow's library mapped (its import has begun: the package's
    start-up imports it before the command's own imports, which take seconds more)."""
    maps = f"/proc/{pid}/maps"
    if not os.path.exists(maps):
        pytest.skip("needs /proc to see the child's imports")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(maps) as f:
            if "tensorflow" in f.read():
                return
        time.sleep(0.05)
    raise AssertionError("TensorFlow was never imported")


def test_ctrl_c_while_a_command_imports_is_one_line(tmp_path):
    """``python -m cifar_flax.main``: a Ctrl-C while the command is still importing (the package
    started it up, run/startup.py) ends it with the start-up's one line and status 130, no
    traceback, nothing written."""
    proc = subprocess.Popen([sys.executable, "-m", "cifar_flax.main", "--config",
                             "configs/smoke.py", "--workdir", str(tmp_path / "w")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        _wait_for_tensorflow(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err[-2000:])
    assert err.strip() == "Interrupted (Ctrl-C): stopped before it wrote anything.", err[-2000:]
    assert out == "" and not (tmp_path / "w").exists()


# ---- --help and unknown flags ----

COMMANDS = ("main", "eda", "predict", "evaluate", "export", "pretrained", "bench.__main__")
CONFIG_PY = os.path.join(ROOT, "cifar_flax", "config.py")


def _help_lines(text: str, module) -> None:
    """--help opens with the command's one line (its docstring's first paragraph) and says
    where the config fields are documented."""
    first = text.strip().splitlines()[0]
    assert first == cli.description(module) and first.endswith(".") and len(first) > 20, first
    assert f"is documented in {CONFIG_PY}." in text
    assert "--" in text.split(CONFIG_PY, 1)[1]  # The flags follow.


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_says_what_it_does_and_where_config_fields_are(name, capsys):
    module = importlib.import_module(f"cifar_flax.{name}")
    with pytest.raises(SystemExit) as e:
        if name == "main":  # (Its main is the command's body: cli.run is in __main__.)
            cli.run(module.main, module.FLAGS, ["--help"])
        else:
            module.main(["--help"])
    assert e.value.code == 0
    _help_lines(capsys.readouterr().out, module)


def test_help_of_the_real_entry_point():
    from cifar_flax import main

    p = subprocess.run([sys.executable, "-m", "cifar_flax.main", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    _help_lines(p.stdout, main)
    assert p.stdout.strip().splitlines()[0].startswith("Train a model")


def test_an_unknown_plain_flag_suggests_the_near_name(capsys):
    from cifar_flax import export

    assert export.main(["--workdri=run", "--output", "out"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown flag --workdri; did you mean --workdir? --help lists this "
                   "command's flags."]


def test_unknown_flag_error_reads_argv_as_absl_does():
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    flags.DEFINE_boolean("force", False, "", flag_values=fv)
    cli.config_flag(fv, "config", required=False)
    ok = ["prog", "--workdir", "-odd-name", "--noforce", "--force", "--config.batch_sizee=3",
          "--config.phases[0].lr", "-1", "--verbosity=1", "--nologtostderr", "image.png", "--",
          "--not-a-flag"]
    assert cli.unknown_flag_error(ok, fv) is None  # Values, absl's flags, overrides, "--".
    assert cli.unknown_flag_error(["prog", "--forse"], fv).startswith(
        "unknown flag --forse; did you mean --force?")
    assert cli.unknown_flag_error(["prog", "--confg.seed=1"], fv).startswith(
        "unknown flag --confg.seed; did you mean --config.seed?")
    assert cli.unknown_flag_error(["prog", "--zzz"], fv) == (
        "unknown flag --zzz; --help lists this command's flags.")
