"""Load and run a model written by ``python -m cifar_flax.export``, with jax and numpy only.

    from cifar_flax import exported            # or: this file, copied into the export folder
    model = exported.load("exports/pets")
    out = model(images)                        # uint8 (N, H, W, 3) at model.input_shape
    out["probabilities"].argmax(-1)            # class indices; model.class_names names them

The folder holds ``model.jax`` (jax.export's serialized StableHLO for CPU, CUDA and TPU, with a
symbolic batch dimension; resize and normalisation are inside), ``params.npz`` (the weights as
'/'-joined paths) and ``model.json`` (class names, input shape, provenance). This module imports
nothing but the standard library, numpy and jax (never flax, optax or tensorflow), so the folder
runs wherever jax does. A copy of it is written into every export folder.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

MODEL_FILE, PARAMS_FILE, INFO_FILE = "model.jax", "params.npz", "model.json"


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


class ExportedModel:
    """``model(images) -> {"logits", "probabilities"}`` (numpy float32 (N, C))."""

    def __init__(self, directory: str | pathlib.Path) -> None:
        d = pathlib.Path(directory)
        missing = [f for f in (MODEL_FILE, PARAMS_FILE, INFO_FILE) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} is not a cifar_flax export (missing {missing}); "
                                    "write one with python -m cifar_flax.export.")
        self.info = json.loads((d / INFO_FILE).read_text())
        self.class_names: list[str] = list(self.info["class_names"])
        self.input_shape: tuple[int, int, int] = tuple(self.info["input"]["shape"])
        self._exported = jax.export.deserialize(bytearray((d / MODEL_FILE).read_bytes()))
        with np.load(d / PARAMS_FILE, allow_pickle=False) as npz:
            self.variables = jax.device_put(_unflatten({k: npz[k] for k in npz.files}))
        self._call = jax.jit(self._exported.call)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError(f"images are {images.dtype} {images.shape}; this model takes uint8 "
                             f"(N, {', '.join(map(str, self.input_shape))}) (resize them first).")
        logits, probs = self._call(self.variables, images)
        return {"logits": np.asarray(logits), "probabilities": np.asarray(probs)}

    def predict(self, images: np.ndarray) -> list[str]:
        """The most probable class name of each image."""
        return [self.class_names[i] for i in self(images)["probabilities"].argmax(-1)]


def load(directory: str | pathlib.Path) -> ExportedModel:
    """The exported model in ``directory`` (written by ``python -m cifar_flax.export``)."""
    return ExportedModel(directory)
