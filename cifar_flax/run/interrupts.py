"""Ctrl-C (SIGINT) and SIGTERM (preemption): the one place that handles them.

Every command installs :func:`exit_on_signal` first (run/startup.py, as Python launches it; again
with the command's own line in cli.run). Outside the training steps (start-up, compilation,
feature extraction, the test evaluation, the EDA) a signal ends the process at once with one line,
``Interrupted (Ctrl-C): ...``, and status 130 (SIGINT) or 143 (SIGTERM). It exits with
``os._exit``: no exception travels through library code (TensorFlow's import swallows
exceptions, a GC callback cannot raise, interpreter teardown with XLA's threads can crash), and
what the process holds is released first (:func:`on_abort`: the workdir lock).

Inside the training steps (``with StopRequest() as stop:`` in train.py) the first signal only
asks the loop to stop: it saves at the next step boundary and raises :class:`Interrupted`, which
the command boundary prints (status 130 for Ctrl-C, 0 for SIGTERM or ``stop_after_steps``, so
that a preempted job counts as cleanly stopped). A
second Ctrl-C aborts at once without saving. A signal inherited as ignored (a job started with
``nohup``) stays ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import Any, Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # The shell's status for a signalled process.
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
NOTHING_WRITTEN = "stopped before it wrote anything"  # Every command's line until it runs.


class Interrupted(Exception):
    """Training stopped at a step boundary on request, after saving; the message says how to
    resume. ``status`` is the command's exit status."""

    def __init__(self, step: int, why: str) -> None:
        super().__init__(f"Interrupted at step {step}; checkpoint saved ({why}). Rerun the same "
                         "command to resume.")
        self.step, self.status = step, 130 if why == "SIGINT" else 0


@dataclasses.dataclass
class _Exit:
    """What an immediate exit on a signal needs (one per process: signal handlers are too)."""

    message: str = NOTHING_WRITTEN  # Set by each command as it runs (cli.run's interrupted).
    stderr: int = 2  # A copy of the user's stderr (fd 2 is silenced while TF is imported).
    releases: list[Callable[[], None]] = dataclasses.field(default_factory=list)


_EXIT = _Exit()


def on_abort(release: Callable[[], None]) -> Callable[[], None]:
    """Call ``release`` before an immediate exit on a signal; returns the function that undoes
    the registration (call it once the resource is released normally)."""
    _EXIT.releases.append(release)
    return lambda: release in _EXIT.releases and _EXIT.releases.remove(release)


def abort(signum: int, what: str) -> None:
    """Print ``Interrupted (<signal>): <what>.`` and end the process now (see the docstring)."""
    for release in list(_EXIT.releases):
        with contextlib.suppress(Exception):  # Exiting anyway: a failed release must not stop it.
            release()
    sys.stdout.flush()
    os.write(_EXIT.stderr, f"\nInterrupted ({NAMES[signum]}): {what}.\n".encode())
    os._exit(STATUS[signum])


def _exit_now(signum: int, frame: Any) -> None:
    abort(signum, _EXIT.message)


def _install(handler: Any) -> dict[int, Any]:
    """``handler`` for SIGINT and SIGTERM (main thread only; ignored signals stay ignored);
    returns the previous handlers."""
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # Only the main thread may set handlers (a test calling from a thread).
    for sig in SIGNALS:
        if signal.getsignal(sig) != signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    return previous


def exit_on_signal(message: str | None = None) -> dict[int, Any]:
    """Make SIGINT/SIGTERM end the process at once with one line (``message`` says what happened
    to the work); returns the previous handlers (cli.run restores them after an in-process
    call)."""
    if message:
        _EXIT.message = message
    if _EXIT.stderr == 2:
        _EXIT.stderr = os.dup(2)
    return _install(_exit_now)


def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class StopRequest:
    """``with StopRequest() as stop:`` around the training steps: ``stop.why`` becomes "SIGINT"
    or "SIGTERM" at the first signal (the loop saves and raises Interrupted at the next step
    boundary); a second Ctrl-C aborts at once. On exit the handlers before it are back."""

    def __init__(self) -> None:
        self.why: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.why is not None:
            abort(signum, "stopped again before the checkpoint was saved; rerun the same "
                          "command to resume from the last checkpoint")
        self.why = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disarm()

    def disarm(self) -> None:
        """The training steps are over: signals end the command at once again."""
        restore(self._previous)
        self._previous = {}
