"""What the predict/evaluate/export command lines share: TensorFlow kept off accelerators and
quiet (cifar_flax.cli, data/tf_runtime), and user errors as one ``error: ...`` line, status 1."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from cifar_flax import cli


def user_errors() -> tuple[type[Exception], ...]:
    """Problems of the user's inputs: printed as one line ``error: ...``, exit status 1."""
    from cifar_flax.config import ConfigError
    from cifar_flax.data.sources import DataError
    from cifar_flax.inference.images import InputError
    from cifar_flax.training.checkpoints import RunError
    from cifar_flax.training.workdir import WorkdirError

    return RunError, InputError, ConfigError, DataError, WorkdirError


def run_cli(body: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """``body(argv)`` (argv defaults to sys.argv[1:]); a user error becomes one line on stderr,
    ``error: <message>``, and status 1. The CLI modules import TensorFlow-using modules only
    inside ``body``, after this has imported TensorFlow quietly."""
    cli.prepare_runtime()  # Before anything imports TensorFlow: quiet, and off accelerators.
    try:
        return body(sys.argv[1:] if argv is None else list(argv))
    except user_errors() as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
