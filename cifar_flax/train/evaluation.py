"""Evaluation of a model on a split: loss and accuracy summed on the device (big_vision's way).

The model runs through steps.make_logits_step (inference mode, eval preprocessing); each batch's
masked loss / correct / count sums are added up on the device and only those three numbers come
back to the host, so evaluating a large split does not copy its logits. ``keep_logits=True``
(the final test: confusion matrix, predictions.npz) also brings back the logits and labels of
the real (unpadded) examples.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cifar_flax.data import input_pipeline
from cifar_flax.data.preprocessing import Preprocessing
from cifar_flax.data.types import DatasetInfo
from cifar_flax.train import parallel, steps


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
                 preprocessing: Preprocessing) -> None:
        self.config, self.info, self.mesh = config, info, mesh
        self.logits_fn = steps.make_logits_step(model, mesh, config.augment, preprocessing)

    def __call__(self, variables: Any, split: str, keep_logits: bool = False) -> dict[str, Any]:
        totals, logits, labels = None, [], []
        for batch in input_pipeline.eval_batches(self.config, self.info, split):
            dev = parallel.shard_batch(self.mesh, batch)
            out = self.logits_fn(variables, dev["image"])
            sums = batch_sums(out, dev["label"], dev["mask"])
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            if keep_logits:
                mask = parallel.to_host(dev["mask"]).astype(bool)
                logits.append(parallel.to_host(out)[mask].astype(np.float32))
                labels.append(parallel.to_host(dev["label"])[mask])
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
