"""A command's process start-up: a signal ends it with one line, quiet logs, TensorFlow imported
quietly and kept off every accelerator.

cifar_flax/__init__.py calls :func:`start` when Python launches ``python -m cifar_flax.<command>``
(and only then), before the command module's imports bring TensorFlow in; cli.run calls
:func:`prepare_runtime` again (idempotent: a command called in-process, as the tests do).

- Quiet: TensorFlow's import-time C++ notices (oneDNN, CPU features), JAX's backend probe and
  Orbax's per-save lines do not reach the user (``CIFAR_FLAX_VERBOSE=1`` keeps them).
- TensorFlow runs only the host input pipeline, so it is kept off every accelerator (on a GPU it
  would take memory JAX needs; two runtimes opening one TPU fail).

It imports nothing of the package but run/interrupts.py, so that the package's ``__init__`` can
import it without an import circle (cli.py, the command boundary, imports the package's names).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from typing import Any

from absl import flags, logging

from cifar_flax.run import interrupts

WITHOUT_TENSORFLOW = "CIFAR_FLAX_WITHOUT_TENSORFLOW"  # Set (to 1): start() keeps TF out.


def start() -> None:
    """What a command does first, before its module's imports: a signal ends it with one line,
    ``Interrupted (Ctrl-C): stopped before it wrote anything.`` (until cli.run sets the
    command's own line); :func:`prepare_runtime`. With ``$CIFAR_FLAX_WITHOUT_TENSORFLOW`` set,
    TensorFlow is kept out of the process instead (its import fails): the benchmark's rows that
    never use it (bench/frameworks.py), whose peak memory must not count it."""
    if os.environ.get(WITHOUT_TENSORFLOW, "") not in ("", "0"):
        sys.modules.setdefault("tensorflow", None)
    interrupts.exit_on_signal(interrupts.NOTHING_WRITTEN)
    prepare_runtime()


def verbose() -> bool:
    """Whether ``$CIFAR_FLAX_VERBOSE`` asks for every notice and log line (debugging)."""
    return os.environ.get("CIFAR_FLAX_VERBOSE", "") not in ("", "0")


def prepare_runtime() -> None:
    """Quiet logs; TensorFlow imported quietly and kept off every accelerator (before any of its
    ops). Idempotent."""
    if not flags.FLAGS.is_parsed():  # (Else absl warns "Logging before flag parsing".)
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    if not verbose() and _quiet_record not in logging.get_absl_handler().filters:
        logging.get_absl_handler().addFilter(_quiet_record)
        _drop_background_noise()
    _import_tensorflow_quietly()
    hide_accelerators()


def _quiet_record(record: Any) -> bool:
    """Drop Orbax's records (dozens of INFO lines per save; when a background write fails, its
    own error logs and tracebacks: the run reports that failure as one error line) and the INFO
    of JAX's backend probe."""
    if "orbax" in record.pathname:
        return record.levelno >= logging.logging.CRITICAL  # Python's levels, not absl's.
    if record.pathname.endswith("_flagvalues.py"):  # "unparse_flags() called": our config_flag.
        return record.levelno >= logging.logging.WARNING
    probe = record.pathname.endswith("xla_bridge.py")
    return not probe or record.levelno >= logging.logging.WARNING


def _drop_background_noise() -> None:
    """When a background write fails (a full disk, a damaged checkpoint being read), tensorstore
    callbacks still in flight hit a closed event loop and print tracebacks ("Event loop is
    closed"), and asyncio logs "Future exception was never retrieved": the failure itself reaches
    the user as one error line, so these are dropped; any other exception is printed as usual."""
    def noise(value: Any) -> bool:
        return isinstance(value, RuntimeError) and "Event loop is closed" in str(value)

    excepthook, thread_hook, unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook
    sys.excepthook = lambda t, v, tb: None if noise(v) else excepthook(t, v, tb)
    threading.excepthook = lambda a: None if noise(a.exc_value) else thread_hook(a)
    sys.unraisablehook = lambda u: None if noise(u.exc_value) else unraisable(u)
    logging.logging.getLogger("asyncio").setLevel(logging.logging.CRITICAL)


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow (when installed) with the process's stderr silenced: its C++ start-up
    notices are printed before any log level applies. Errors still surface (as exceptions)."""
    if verbose() or "tensorflow" in sys.modules or not _tensorflow_available():
        return  # (The Colab TPU runtime has no TensorFlow.)
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401 - the import is the point (quiet, before anyone else's).
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _tensorflow_available() -> bool:
    """Whether TensorFlow can be imported: installed, and not blocked by a process that keeps it
    out (``sys.modules["tensorflow"] = None``, as the benchmark's TensorFlow-free rows do)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"] is not None
    return importlib.util.find_spec("tensorflow") is not None


def hide_accelerators() -> list[str]:
    """Make TensorFlow see only the CPU; returns the device types TF still sees (["CPU"]). A
    no-op without TensorFlow; once TF is initialised its visible devices cannot change, and the
    returned list says what it sees."""
    if not _tensorflow_available():
        return []
    import tensorflow as tf  # Optional: the Colab TPU runtime and exported models lack it.

    for kind in ("GPU", "TPU"):
        with contextlib.suppress(RuntimeError, ValueError):  # Already initialised; or no such type.
            tf.config.set_visible_devices([], kind)
    return sorted({d.device_type for d in tf.config.get_visible_devices()})
