"""Load and run a model written by ``python -m cifar_flax.export``, with jax and numpy only.

    from cifar_flax import exported            # or: this file, copied into the export folder
    model = exported.load("exports/pets")
    out = model(images)                        # uint8 (N, H, W, 3), any H and W
    out["probabilities"].argmax(-1)            # class indices; model.class_names names them

The folder holds ``model.jax`` (jax.export's serialized StableHLO for CPU, CUDA and TPU, with a
symbolic batch dimension, taking uint8 images at ``model.input_shape``; the resize to the
model's resolution and the normalisation are inside), ``params.npz`` (the weights as '/'-joined
paths), ``model.json`` (class names, input shape, provenance) and ``requirements.txt``. Images
of another size are first resized to ``model.input_shape`` by :func:`resize` (antialiased
bilinear, rounded to uint8: what predict's host resize computes, to a rounding step of 1 in a few
pixels). This module imports nothing but the standard library, numpy and jax (never flax, optax
or tensorflow); jax's deserializer also needs ``flatbuffers``, which jax does not install:
``pip install -r <folder>/requirements.txt`` installs all three. A copy of this module is
written into every export folder.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODEL_FILE, PARAMS_FILE, INFO_FILE = "model.jax", "params.npz", "model.json"
REQUIREMENTS_FILE = "requirements.txt"


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


@functools.partial(jax.jit, static_argnames=("height", "width"))
def resize(images: jax.Array, height: int, width: int) -> jax.Array:
    """uint8 (N, h, w, 3) -> uint8 (N, height, width, 3): antialiased bilinear, rounded (the
    host resize of the run's pipeline and of predict, which TensorFlow computes)."""
    x = jax.image.resize(images.astype(jnp.float32), (images.shape[0], height, width, 3),
                         "linear", antialias=True)
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


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
        try:
            self._exported = jax.export.deserialize(bytearray((d / MODEL_FILE).read_bytes()))
        except ImportError as e:  # flatbuffers: jax's deserializer needs it, jax lacks it.
            raise ImportError(f"{e}; install what {d / REQUIREMENTS_FILE} lists: pip install -r "
                              f"{d / REQUIREMENTS_FILE}") from e
        with np.load(d / PARAMS_FILE, allow_pickle=False) as npz:
            self.variables = jax.device_put(_unflatten({k: npz[k] for k in npz.files}))
        self._call = jax.jit(self._exported.call)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images are {images.dtype} {images.shape}; this model takes uint8 "
                             "(N, H, W, 3) RGB images (pixel values 0..255).")
        height, width, _ = self.input_shape
        if images.shape[1:3] != (height, width):
            images = resize(images, height, width)
        logits, probs = self._call(self.variables, images)
        return {"logits": np.asarray(logits), "probabilities": np.asarray(probs)}

    def predict(self, images: np.ndarray) -> list[str]:
        """The most probable class name of each image."""
        return [self.class_names[i] for i in self(images)["probabilities"].argmax(-1)]


def load(directory: str | pathlib.Path) -> ExportedModel:
    """The exported model in ``directory`` (written by ``python -m cifar_flax.export``)."""
    return ExportedModel(directory)
