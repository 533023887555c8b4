"""What every command-line entry point shares (main, eda, and any other ``python -m`` tool).

- One line for a user's slip, never a traceback: an unknown or misspelled ``--config.field``
  (with the near name, difflib), an index out of range (``--config.phases[5].lr``), a value of the
  wrong type, a config file that is not there (with where it was looked for, and the project's
  own ``configs/`` file when a relative path was given from another directory).
- Ctrl-C outside the training loop (compilation, feature extraction, EDA) exits with one line and
  status 130; the loop itself saves first (train/loop.py).
- Quiet start-up: TensorFlow's import-time C++ notices (oneDNN, CPU features) and JAX's libtpu
  probe and Orbax's per-save INFO lines do not reach the user. ``CIFAR_FLAX_VERBOSE=1`` keeps them.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
from typing import Any, Callable, NoReturn

from absl import app, flags, logging

INTERRUPTED_EXIT = 130  # The shell's status for a process ended by SIGINT.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # configs/ lives here.


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``error: <first line of message>`` (and its further lines) to stderr and exit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


_real_stderr = [2]  # The file descriptor of the user's stderr (fd 2 is silenced during imports).


def verbose() -> bool:
    return os.environ.get("CIFAR_FLAX_VERBOSE", "") not in ("", "0")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (when installed) with the process's stderr silenced: its C++ start-up
    notices are printed before any log level applies. Errors still surface (as exceptions)."""
    if verbose() or "tensorflow" in sys.modules:
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(null, 2)
    _real_stderr[0] = saved  # Where a Ctrl-C during the import still reports.
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    finally:
        os.dup2(saved, 2)
        _real_stderr[0] = 2
        os.close(saved)
        os.close(null)


def _quiet_record(record: Any) -> bool:
    """Drop INFO chatter of Orbax (dozens of lines per save) and JAX's backend probe."""
    noisy = "orbax" in record.pathname or record.pathname.endswith("xla_bridge.py")
    return not noisy or record.levelno >= logging.logging.WARNING  # Python's level, not absl's.


def prepare_runtime() -> None:
    """What every command does first: quiet logs, TensorFlow imported quietly and kept off
    every accelerator (data/tf_runtime.py) before any TensorFlow op."""
    quiet_logs()
    import_tensorflow_quietly()
    from cifar_flax.data.tf_runtime import hide_accelerators

    hide_accelerators()


def quiet_logs() -> None:
    if not verbose():
        logging.get_absl_handler().addFilter(_quiet_record)


# ---- flags and config files ----
_OVERRIDE = re.compile(r"^--?(\w+)\.([^=]+)(?:=.*)?$")


def _config_flag_names() -> list[str]:
    """The flags defined with ml_collections' DEFINE_config_file (their type names it)."""
    return [name for name, f in flags.FLAGS._flags().items() if f.flag_type() == "config object"]


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name=v`` or ``--name v`` in argv (the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def missing_config_file(path: str) -> str | None:
    """The one-line error for a config path that is not a file (None when it is one)."""
    file = path.split(":", 1)[0]
    if os.path.isfile(file):
        return None
    where = os.path.abspath(file)
    msg = (f"config file {file!r} not found (looked for {where}; relative paths start at "
           f"{os.getcwd()})")
    ours = os.path.join(_PROJECT_ROOT, file)
    if not os.path.isabs(file) and os.path.isfile(ours):
        return f"{msg}: did you mean --config={ours}{path[len(file):]}?"
    shipped = os.path.join(_PROJECT_ROOT, "configs")
    return f"{msg}; the project's configs are in {shipped}."


def _split_path(path: str) -> list[str | int]:
    """``phases[1].lr`` -> ["phases", 1, "lr"]."""
    parts: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(index) if index else name)
    return parts


def override_error(config: Any, path: str) -> str | None:
    """Why ``--config.<path>`` names no field of ``config`` (None when it does)."""
    node, done = config, ""
    for part in _split_path(path):
        if isinstance(part, int):
            if not isinstance(node, (list, tuple)) or part >= len(node):
                n = len(node) if isinstance(node, (list, tuple)) else 0
                return (f"--config.{path}: {done}[{part}] is out of range: {done} has {n} "
                        f"entries ({done}[0]..{done}[{n - 1}])" if n else
                        f"--config.{path}: {done} is not a list")
            node, done = node[part], f"{done}[{part}]"
            continue
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = f"{done}." if done else ""
            near = difflib.get_close_matches(part, [str(k) for k in keys], 1, 0.6)
            hint = f"; did you mean --config.{where}{near[0]}?" if near else (
                f"; {done or 'the config'} has: {', '.join(map(str, keys))}" if keys else "")
            return f"--config.{path}: no field {part!r} in {done or 'the config'}{hint}"
        node, done = node[part], f"{done}.{part}" if done else part
    return None


def describe_flag_error(error: BaseException, argv: list[str]) -> str:
    """One line for a failure while parsing flags: config-file or override problems first."""
    for name in _config_flag_names():
        path = _flag_value(argv, name)
        if path is None:
            continue
        missing = missing_config_file(path)
        if missing:
            return missing
        try:
            from cifar_flax.config import load_config_file

            config = load_config_file(path)
        except Exception as e:  # noqa: BLE001 - the config file itself raised.
            return f"config file {path!r} failed to load: {type(e).__name__}: {_last_line(e)}"
        for arg in argv[1:]:
            m = _OVERRIDE.match(arg)
            if m and m.group(1) == name:
                problem = override_error(config, m.group(2))
                if problem:
                    return problem
    return _last_line(error)


def _last_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure turned into one ``error:`` line and status 1."""
    try:
        rest = flags.FLAGS(argv)
        for name in _config_flag_names():
            config = flags.FLAGS[name].value
            if config is not None:
                config.keys()  # A config file that failed to load raises here.
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - every parsing failure is a user's slip.
        fail(describe_flag_error(e, argv))
    return rest


# ---- Ctrl-C and running an entry point ----
_interrupted = ["nothing new was saved"]
_ctrl_c_seen = [False]  # Set by the handler: a library may swallow the SystemExit it raises.


def _exit_on_ctrl_c(signum: int, frame: Any) -> None:
    """SIGINT outside the training loop (start-up, compilation, feature extraction, EDA): one
    line and status 130. SystemExit unwinds normally (pending checkpoint writes are waited for)
    and prints no traceback. The training loop installs its own handler while it trains."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # A second Ctrl-C aborts at once.
    if not _ctrl_c_seen[0]:
        os.write(_real_stderr[0], f"\nInterrupted (Ctrl-C): {_interrupted[0]}.\n".encode())
    _ctrl_c_seen[0] = True
    sys.exit(INTERRUPTED_EXIT)


def _retry_swallowed_exit(unraisable: Any) -> None:
    """``sys.unraisablehook``: our SystemExit raised where Python cannot raise (a GC callback,
    e.g. JAX's ``_xla_gc_callback``; a ``__del__``) is printed as "Exception ignored" and lost.
    Print nothing and deliver the Ctrl-C again a moment later, from another thread, so that it
    runs once the callback has returned."""
    if _ctrl_c_seen[0] and isinstance(unraisable.exc_value, SystemExit):
        import threading
        import time

        signal.signal(signal.SIGINT, _exit_on_ctrl_c)
        resend = lambda: (time.sleep(0.05), os.kill(os.getpid(), signal.SIGINT))  # noqa: E731
        threading.Thread(target=resend, daemon=True).start()
        return
    sys.__unraisablehook__(unraisable)


def _exit_if_swallowed() -> None:
    """Exit 130 when a Ctrl-C was seen but its SystemExit did not stop us: TensorFlow's import
    swallows exceptions raised inside it (seen when Ctrl-C lands during ``import tensorflow``)."""
    if _ctrl_c_seen[0]:
        sys.exit(INTERRUPTED_EXIT)


def install_ctrl_c_handler(message: str | None = None) -> None:
    """Make Ctrl-C exit with one line (``message`` completes "Interrupted (Ctrl-C): ...")."""
    if message:
        _interrupted[0] = message
    try:
        signal.signal(signal.SIGINT, _exit_on_ctrl_c)
    except ValueError:  # Not the main thread (imported by tests from a worker thread).
        return
    sys.unraisablehook = _retry_swallowed_exit


def run(main: Callable[[list[str]], None], interrupted: str = "nothing new was saved") -> None:
    """``app.run(main)`` with one-line flag errors, quiet start-up and Ctrl-C as one line
    (``interrupted`` says what happened to the work)."""
    install_ctrl_c_handler(interrupted)

    def guarded(argv: list[str]) -> None:
        prepare_runtime()  # After flag parsing: a slip in the flags stops sooner.
        _exit_if_swallowed()
        try:
            main(argv)
        except KeyboardInterrupt:  # A handler restored to Python's default raised it.
            print(f"Interrupted (Ctrl-C): {_interrupted[0]}.", file=sys.stderr, flush=True)
            sys.exit(INTERRUPTED_EXIT)
        _exit_if_swallowed()

    app.run(guarded, flags_parser=parse_flags)
