"""Metrics to ``<workdir>/metrics.jsonl`` and TensorBoard event files, plus progress output.

Only process 0 writes. The JSONL holds one record per line: ``{"step", "kind", ...}`` with kind
"train" (loss, accuracy, lr/<group>, images_per_sec), "eval" (val_loss, val_accuracy),
"phase" (a phase starting: index, name) or "test". The records are also kept in memory (the
history that report.py draws and that checkpoints carry, so a resumed run rewrites the file
without the steps it lost).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
from absl import logging


def _scalar_metadata() -> bytes:
    """TensorBoard's scalar-plugin metadata (tf.summary.scalar itself needs the tensorboard
    package, which training does not; the event files are the same)."""
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    ).SerializeToString()


class MetricsWriter:
    def __init__(self, workdir: str, history: list[dict] | None = None):
        self.enabled = jax.process_index() == 0
        self.history: list[dict] = list(history or [])
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            with open(self.path, "w") as f:  # Rewrite: drops records after the restored step.
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Append one record (history, JSONL, TensorBoard scalars under ``kind/name``)."""
        record = {"step": int(step), "kind": kind, **values}
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        import tensorflow as tf

        with self._tb.as_default(step=int(step)):
            for name, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tf.summary.write(f"{kind}/{name}", tf.constant(v, tf.float32),
                                     metadata=_scalar_metadata())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class Progress:
    """A tqdm bar with ETA on a terminal; plain log lines every call to ``log`` otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        from tqdm.auto import tqdm

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

    def close(self) -> None:
        self.bar.close()
