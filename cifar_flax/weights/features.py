"""Pooled ResNet50 backbone features of uint8 images with converted weights, in inference mode,
normalised with the weights' own preprocessing (the ``features`` command)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cifar_flax import models
from cifar_flax.data import preprocessing
from cifar_flax.weights.files import WeightsError
from cifar_flax.weights.registry import PretrainedWeights


def check_images(images: np.ndarray) -> None:
    """Raise a WeightsError unless ``images`` is uint8 NHWC, 3 channels, at least 32x32."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise WeightsError(
            f"Images must be uint8 NHWC with 3 channels, got {images.dtype} {images.shape}."
        )
    if min(images.shape[1:3]) < 32:
        raise WeightsError(f"Images must be at least 32x32, got {images.shape[1:3]}.")


def extract_features(
    weights: PretrainedWeights, images: np.ndarray, batch_size: int = 64, dtype: str = "float32",
    progress: bool = False,
) -> np.ndarray:
    """Pooled (N, 2048) float32 backbone features of uint8 NHWC images, in inference mode.

    Images run ``batch_size`` at a time; the last batch is padded so that one compiled function
    serves every batch.
    """
    check_images(images)
    spec = weights.spec
    model = models.create_model(num_classes=1, layout=spec.layout, dtype=dtype)
    variables = jax.device_put({"params": weights.params, "batch_stats": weights.batch_stats})

    @jax.jit
    def run(variables: dict, x: jnp.ndarray) -> jnp.ndarray:
        x = preprocessing.normalize(x, spec.preprocessing, model.dtype)
        return model.apply(variables, x, method=model.features)

    n = len(images)
    out = np.zeros((n, models.FEATURE_DIM), np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, unit="batch", desc="features")
    for start in starts:
        batch = np.asarray(images[start:start + batch_size])
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        out[start:start + batch_size] = np.asarray(run(variables, batch))[: batch_size - pad]
    return out
