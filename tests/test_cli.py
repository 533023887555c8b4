"""One line for every slip in flags and config files (cli.py), found without running anything."""

from __future__ import annotations

import os

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
    import subprocess
    import sys

    script = tmp_path / "gc_ctrl_c.py"
    script.write_text(
        "import gc, os, signal, time\n"
        "from cifar_flax.training import interrupts\n"
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
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130, (p.stdout, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "ran on" not in p.stdout, p.stderr[-2000:]
    assert p.stderr.count("Interrupted (Ctrl-C): stopped in a GC callback.") == 1, p.stderr
