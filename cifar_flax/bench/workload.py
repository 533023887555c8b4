"""The work every benchmark row does, defined once: ResNet50 v1.5 with a 10-class linear head,
softmax cross-entropy, SGD momentum 0.9 at lr 0.1; and how a row says its framework is missing.

ResNet50's stage sizes come from ``cifar_flax.models.STAGE_SIZES``; the worker receives them on
its command line so that the Keras and PyTorch processes never import JAX.
"""

from __future__ import annotations

import importlib.util
import os

NUM_CLASSES = 10
LR, MOMENTUM = 0.1, 0.9
TINY_STAGES = (1, 1, 1, 1)  # the tests' stand-in for ResNet50's (3, 4, 6, 3)
HIDE_ENV = "CIFAR_FLAX_BENCH_HIDE"  # Comma-separated frameworks to treat as not installed (tests).


class FrameworkUnavailable(RuntimeError):
    """The framework (or the part of cifar_flax a row needs) is not importable here."""


def hidden() -> set[str]:
    """Frameworks that ``$CIFAR_FLAX_BENCH_HIDE`` marks as not installed."""
    return {s.strip() for s in os.environ.get(HIDE_ENV, "").split(",") if s.strip()}


def require(module: str, framework: str) -> None:
    """Raise FrameworkUnavailable if ``module`` cannot be imported (or ``framework`` is hidden)."""
    if framework in hidden():
        raise FrameworkUnavailable(f"{framework} hidden by ${HIDE_ENV}")
    if importlib.util.find_spec(module) is None:
        raise FrameworkUnavailable(f"python module {module!r} is not installed")


def stage_sizes(tiny: bool) -> tuple[int, ...]:
    """TINY_STAGES for tests, else ResNet50's (from cifar_flax.models, which imports JAX)."""
    if tiny:
        return TINY_STAGES
    from cifar_flax.models import STAGE_SIZES

    return tuple(STAGE_SIZES)
