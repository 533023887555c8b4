"""Metrics to ``<workdir>/metrics.jsonl`` and TensorBoard event files, plus progress output.

Only process 0 writes. The JSONL holds one record per line: ``{"step", "kind", ...}`` with kind
"train" (loss, accuracy, lr/<group>, images_per_sec), "eval" (val_loss, val_accuracy),
"phase" (a phase starting: index, name) or "test". The records are also kept in memory (the
history that report.py draws and that checkpoints carry, so a resumed run rewrites the file
without the steps it lost). A non-finite value (NaN, +-inf: a diverged loss) is written as
``null``, so every line stays valid JSON (``json.dumps`` would write the invalid token ``NaN``);
TensorBoard gets the raw value. ``workdir`` may be a ``gs://`` URL (etils.epath).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath
from tensorflow.core.framework import summary_pb2
from tqdm.auto import tqdm


def finite_or_none(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every non-finite float replaced by None (JSON ``null``)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()}


def _scalar_metadata() -> bytes:
    """TensorBoard's scalar-plugin metadata (tf.summary.scalar itself needs the tensorboard
    package, which training does not; the event files are the same)."""
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    ).SerializeToString()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``<workdir>/metrics.jsonl`` in order (only those of ``kind`` if given);
    [] when the file does not exist yet. A torn last line (a run writing it now) is skipped."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return [r for r in rows if kind is None or r["kind"] == kind]


class MetricsWriter:
    def __init__(self, workdir: str, history: list[dict] | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.history: list[dict] = list(history or [])
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite()  # Drops records after the restored step.
        if self.enabled and tensorboard:
            self._tb = tf.summary.create_file_writer(str(epath.Path(workdir) / "tensorboard"))

    def _rewrite(self) -> None:
        self.path.write_text("".join(
            json.dumps(finite_or_none(r), allow_nan=False) + "\n" for r in self.history))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Append one record (history, JSONL, TensorBoard scalars under ``kind/name``)."""
        record = finite_or_none({"step": int(step), "kind": kind, **values})
        self.history.append(record)
        if not self.enabled:
            return
        if "://" in str(self.path):  # Object stores cannot append: rewrite (small files).
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is None:
            return
        with self._tb.as_default(step=int(step)):
            for name, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tf.summary.write(f"{kind}/{name}", tf.constant(v, tf.float32),
                                     metadata=_scalar_metadata())

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class Progress:
    """A tqdm bar with ETA on a terminal; plain log lines every call to ``log`` otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.tty = enabled and sys.stderr.isatty() and jax.process_index() == 0
        self.bar = tqdm(total=total, initial=initial, disable=not self.tty, unit="step",
                        dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, text: str) -> None:
        if self.tty:
            self.bar.set_postfix_str(text, refresh=False)
        elif jax.process_index() == 0:
            logging.info("step %d: %s", step, text)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


class Throughput:
    """Training images/s over timed windows that leave out compilation, evaluation and
    checkpointing: ``step(metrics)`` after each step (the first after ``expect_compile()`` waits
    for its result and opens a new window), ``window()`` once the steps are done (at a log step,
    and before an evaluation or a save) closes the window and returns its rate (None when it
    timed no step), ``restart()`` after an evaluation or a save. ``overall`` is None when no
    step was timed (every step a compilation)."""

    def __init__(self, batch_size: int) -> None:
        self.batch, self.images, self.seconds = batch_size, 0, 0.0
        self.t0, self.steps, self.compiling = time.perf_counter(), 0, False

    def expect_compile(self) -> None:
        self.compiling = True

    def step(self, metrics: Any) -> None:
        if self.compiling:
            jax.block_until_ready(metrics)
            self.compiling = False
            self.restart()
        else:
            self.steps += 1

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def window(self, metrics: Any = None) -> float | None:
        jax.block_until_ready(metrics)  # The steps that produce ``metrics`` are done.
        dt = time.perf_counter() - self.t0
        rate = self.steps * self.batch / dt if dt > 0 and self.steps else None
        self.images += self.steps * self.batch
        self.seconds += dt if self.steps else 0.0
        self.restart()
        return rate

    def overall_rate(self, history: list[dict]) -> float | None:
        """Mean training images/s over the logged windows of all sessions, else over this
        session's timed steps; None when no step was timed (each phase's first step compiles,
        and is not)."""
        rates = [r["images_per_sec"] for r in history
                 if r["kind"] == "train" and r.get("images_per_sec")]
        if rates:
            return float(np.mean(rates))
        return self.images / self.seconds if self.seconds else None
