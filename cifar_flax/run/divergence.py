"""What watches a run's losses: the divergence check (the run stops) and the unstable-run
warning (the run goes on, reported).

Diverged: a training loss or gradient norm that is not finite (read on the host from the step
metrics fetched anyway at a log, evaluation, save or stop: no extra device sync per step), or a
validation loss that is not finite. train.py calls :meth:`Watch.check` at one site, before
anything of that step is recorded or saved, so the last good checkpoint stays the newest; the
UserError names the step, the value and what to try.

Unstable: the first logged training loss (the mean of a log window) or validation loss above
``UNSTABLE_FACTOR`` x ln(num_classes), 100 times the loss of a chance-level prediction (230 for
10 classes), prints one warning naming the step, the value and the learning rate to lower;
results.json's ``unstable`` (null when stable) and report.md record it (:func:`unstable_loss`,
derived from the metrics history, so a resumed run knows it).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cifar_flax import UserError
from cifar_flax import config as config_lib

UNSTABLE_FACTOR = 100.0  # A loss above this x ln(num_classes) marks the run unstable.


def unstable_loss(history: list[dict], num_classes: int, phase: int = 0
                  ) -> dict[str, Any] | None:
    """The first record of ``history`` (records from phase ``phase`` on) whose training loss (a
    "train" record's window mean) or validation loss exceeds UNSTABLE_FACTOR x ln(num_classes):
    {"step", "phase", "what", "value", "limit", "chance_loss"}; None when there is none
    (results.json's ``unstable``)."""
    chance = math.log(num_classes)
    limit = UNSTABLE_FACTOR * chance
    keys = {"train": ("loss", "training loss"), "eval": ("val_loss", "validation loss")}
    for r in history:
        if r["kind"] == "phase":
            phase = r["index"]
        key, what = keys.get(r["kind"], (None, None))
        value = r.get(key) if key else None
        if value is not None and value > limit:
            return {"step": r["step"], "phase": phase, "what": what, "value": value,
                    "limit": limit, "chance_loss": chance}
    return None


class Watch:
    """The losses of one run: :meth:`check` stops a diverged run, :meth:`note` warns once about
    an unstable one. ``checkpoints`` (a Checkpointer) names the last good checkpoint."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, checkpoints: Any,
                 history: list[dict]) -> None:
        self.config, self.num_classes, self.checkpoints = config, num_classes, checkpoints
        self.unstable = unstable_loss(history, num_classes)  # Warned once, also on resume.

    def check(self, pending: list[dict], validation: dict | None, step: int, phase: int) -> None:
        """UserError at the first non-finite training loss or gradient norm of ``pending`` (the
        metrics of the steps ending at ``step``) or a non-finite validation loss."""
        values = jax.device_get(pending)
        for i, m in enumerate(values):
            for name, label in (("loss", "training loss"), ("grad_norm", "gradient norm")):
                if not np.isfinite(m[name]):
                    self._diverged(step - len(values) + 1 + i, label, m[name], phase)
        if validation is not None and not np.isfinite(validation["loss"]):
            self._diverged(step, "validation loss", validation["loss"], phase)

    def _diverged(self, step: int, what: str, value: Any, i: int) -> None:
        phase, last = self.config.phases[i], self.checkpoints.latest_step()
        kept = (f"the last good checkpoint (step {last}) is kept in {self.checkpoints.root}"
                if last is not None else "no checkpoint had been saved yet")
        raise UserError(
            f"training diverged at step {step} in phase {i} ({phase.name}): the {what} is "
            f"{float(value)}; {kept}. Try a lower learning rate (--config.phases[{i}].lr, now "
            f"{phase.lr:g}: {config_lib.lr_text(self.config, i)}) or a warmup "
            f"(--config.phases[{i}].warmup_epochs, now {phase.warmup_epochs:g}), in a new "
            "--workdir or with --config.resume=replace.")

    def note(self, records: list[dict], phase: int) -> None:
        """Warn once, at the first unstable one of the new ``records`` of phase ``phase``."""
        if self.unstable is not None:
            return
        found = self.unstable = unstable_loss(records, self.num_classes, phase)
        if found is not None:
            i, c = found["phase"], self.config
            logging.warning(
                "unstable run: the %s at step %d is %.4g, above %.4g (%g x ln(%d), the loss of "
                "a chance-level guess); the learning rate is too high for batch_size %d: lower "
                "--config.phases[%d].lr (now %g: %s) in a new --workdir.", found["what"],
                found["step"], found["value"], found["limit"], UNSTABLE_FACTOR,
                self.num_classes, c.batch_size, i, c.phases[i].lr, config_lib.lr_text(c, i))
