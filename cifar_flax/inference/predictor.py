"""Logits and class probabilities of a loaded run on uint8 images (the evaluation step's model).

The images go through steps.make_logits_step, the step the run's own evaluation uses (eval
preprocessing, inference-mode BatchNorm, no dropout), sharded over the mesh's devices; a batch
is padded to a multiple of the device count and the padding dropped from the result.
"""

from __future__ import annotations

import jax
import numpy as np

from cifar_flax.inference.run import LoadedRun
from cifar_flax.train import parallel, steps

TTA_MODES = ("none", "flip")  # Also in predict.py (its --tta choices).


class Predictor:
    """``predictor.logits(images)``, ``predictor.probabilities(images, tta)`` for a LoadedRun."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self.fn = steps.make_logits_step(run.model, run.mesh, run.config.augment,
                                         run.preprocessing)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) at the run's image shape -> float32 logits (n, C)."""
        n = len(images)
        pad = -n % self.run.mesh.size
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        dev = parallel.shard_batch(self.run.mesh, {"image": np.ascontiguousarray(images)})
        out = self.fn(self.run.variables, dev["image"])
        return np.asarray(parallel.to_host(out), np.float32)[:n]

    def probabilities(self, images: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities); ``tta="flip"`` averages the probabilities (and logits) of
        each image and its horizontal mirror."""
        if tta not in TTA_MODES:
            raise ValueError(f"tta={tta!r} must be one of {TTA_MODES}.")
        logits = self.logits(images)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        if tta == "flip":
            flipped = self.logits(images[:, :, ::-1])
            logits = (logits + flipped) / 2
            probs = (probs + np.asarray(jax.nn.softmax(flipped, axis=-1))) / 2
        return logits, probs
