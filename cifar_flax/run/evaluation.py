"""Evaluation of a model on a split, and early stopping on its validation metric.

:func:`make_logits_step` is the model in inference mode (eval preprocessing, running BatchNorm
statistics, no dropout), data-parallel over the mesh; evaluation, prediction and the report use
it. :class:`Evaluator` sums each batch's masked loss / correct / count on the device (big_vision's
way) and brings only those three numbers back to the host, so evaluating a large split does not
copy its logits; ``keep_logits=True`` (the final test: confusion matrix, predictions.npz) also
brings back the logits and labels of the real (unpadded) examples.

:class:`EarlyStopping`: patience counts evaluations (one per epoch unless
``config.eval_every_steps`` is set). Stopping ends the *current phase*; the run moves on to the
next phase. The phase's best is reset at every phase start; the run's best (over all phases)
decides which checkpoint the final test evaluation uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cifar_flax.data import input_pipeline, preprocessing
from cifar_flax.data.preprocessing import Preprocessing
from cifar_flax.data.sources import DatasetInfo
from cifar_flax.run import devices
from cifar_flax.run.devices import AXIS


def make_logits_step(
    model: Any, mesh: Mesh, aug_config: Any, prep: Preprocessing
) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``(variables, images) -> logits`` in inference mode: uint8 NHWC ``images`` sharded
    on ``data`` (devices.shard_batch) -> float logits (N, C) sharded on ``data``.

    Preprocessing is preprocessing.eval_preprocess with ``prep`` (resize to
    ``aug_config.resolution``, normalise): what evaluation and prediction apply to every image."""

    def per_device(variables: Any, images: jax.Array) -> jax.Array:
        x = preprocessing.eval_preprocess(images, aug_config, prep)
        return model.apply(variables, x, train=False)

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
    return jax.jit(mapped)


@jax.jit
def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """{"loss", "correct", "count"} summed over the real (``mask``) examples of one batch."""
    m = mask.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss": jnp.sum(loss * m), "correct": jnp.sum(correct * m), "count": jnp.sum(m)}


def _host_scalar(x: jax.Array) -> float:
    """A replicated scalar as a float (multi-host safe: every process holds a copy)."""
    return float(np.asarray(x.addressable_data(0)))


class Evaluator:
    """``evaluator(variables, split, keep_logits=False) -> {"loss", "accuracy", "count"}``.

    ``loss`` is the mean cross-entropy over the real examples (padding excluded), ``count`` how
    many there were; with ``keep_logits`` also ``logits`` (N, C) float32 and ``labels`` (N,).
    """

    def __init__(self, config: Any, info: DatasetInfo, model: Any, mesh: Mesh,
                 prep: Preprocessing) -> None:
        self.config, self.info, self.mesh = config, info, mesh
        self.logits_fn = make_logits_step(model, mesh, config.augment, prep)

    def __call__(self, variables: Any, split: str, keep_logits: bool = False) -> dict[str, Any]:
        totals, logits, labels = None, [], []
        for batch in input_pipeline.eval_batches(self.config, self.info, split):
            dev = devices.shard_batch(self.mesh, batch)
            out = self.logits_fn(variables, dev["image"])
            sums = batch_sums(out, dev["label"], dev["mask"])
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            if keep_logits:
                mask = devices.to_host(dev["mask"]).astype(bool)
                logits.append(devices.to_host(out)[mask].astype(np.float32))
                labels.append(devices.to_host(dev["label"])[mask])
        if totals is None:
            raise ValueError(f"evaluation: the {split!r} split has no batches.")
        count = int(round(_host_scalar(totals["count"])))
        n = max(count, 1)
        result = {"loss": _host_scalar(totals["loss"]) / n,
                  "accuracy": _host_scalar(totals["correct"]) / n, "count": count}
        if keep_logits:
            result["logits"] = np.concatenate(logits)
            result["labels"] = np.concatenate(labels)
        return result


@dataclasses.dataclass
class EarlyStopping:
    metric: str = "val_accuracy"  # "val_accuracy" (max) or "val_loss" (min).
    patience: int = 3
    min_delta: float = 0.0
    phase_best: float | None = None
    phase_best_step: int = -1  # Step of the phase's best (what restore_best restores).
    bad_evals: int = 0
    run_best: float | None = None
    run_best_step: int = -1

    def _better(self, value: float, ref: float | None, delta: float) -> bool:
        if ref is None:
            return True
        if self.metric.endswith("loss"):
            return value < ref - delta
        return value > ref + delta

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """Record one evaluation; return (new run best, phase should stop)."""
        if self._better(value, self.phase_best, self.min_delta):
            self.phase_best, self.bad_evals, self.phase_best_step = value, 0, step
        else:
            self.bad_evals += 1
        run_improved = self._better(value, self.run_best, 0.0)
        if run_improved:
            self.run_best, self.run_best_step = value, step
        return run_improved, self.bad_evals >= self.patience

    @property
    def exhausted(self) -> bool:
        """True when the phase has used up its patience (the phase should have stopped)."""
        return self.bad_evals >= self.patience

    def start_phase(self) -> None:
        """Forget the phase's best and patience (the run's best is kept)."""
        self.phase_best, self.bad_evals, self.phase_best_step = None, 0, -1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EarlyStopping":
        return cls(**d)
