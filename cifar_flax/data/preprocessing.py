"""Input normalisation that each pretrained weight source expects.

The weights only compute what ImageNet training computed if the images are preprocessed the way
their authors did: Keras' "caffe" mode (RGB->BGR, subtract the BGR ImageNet mean, no scaling) or
torchvision's (scale to [0, 1], subtract the RGB mean, divide by the RGB std). Both are written as
one affine map per channel, ``(x[..., order] - mean) / std``, so that the host side and the device
side (augment.py) share one definition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Per-channel affine normalisation on uint8-valued pixels: ``(x[..., order] - mean) / std``.

    ``mean`` and ``std`` are in the 0..255 pixel scale and in the *output* channel order.
    """

    name: str
    channel_order: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            name=d["name"],
            channel_order=tuple(d["channel_order"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


CAFFE = Preprocessing("caffe", (2, 1, 0), CAFFE_BGR_MEAN, (1.0, 1.0, 1.0))
TORCH = Preprocessing(
    "torch",
    (0, 1, 2),
    tuple(255.0 * m for m in IMAGENET_RGB_MEAN),
    tuple(255.0 * s for s in IMAGENET_RGB_STD),
)
# For random init: centre and scale roughly to [-1, 1].
SIMPLE = Preprocessing("simple", (0, 1, 2), (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))

BY_NAME = {p.name: p for p in (CAFFE, TORCH, SIMPLE)}


def get(name: str) -> Preprocessing:
    """Look a preprocessing up by name ("caffe", "torch" or "simple")."""
    if name not in BY_NAME:
        raise ValueError(f"Unknown preprocessing {name!r}; expected one of {sorted(BY_NAME)}.")
    return BY_NAME[name]


def normalize(images: Any, spec: Preprocessing, dtype: Any = jnp.float32) -> jnp.ndarray:
    """Normalise NHWC images with pixel values in [0, 255] (any dtype) as ``spec`` says (jax)."""
    x = jnp.asarray(images, jnp.float32)[..., jnp.array(spec.channel_order)]
    x = (x - jnp.array(spec.mean, jnp.float32)) / jnp.array(spec.std, jnp.float32)
    return x.astype(dtype)

