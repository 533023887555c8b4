"""The types every data source shares (and the one image decoder), so that the sources
(datasets.py, imagefolder.py) and the pipeline import them from one place."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf


class DataError(ValueError):
    """Bad data or a bad data config; the message names the file/folder/field and the fix."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the project needs to know about the selected dataset."""

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # uint8 HWC the host pipeline yields.
    split_sizes: dict[str, int]  # Logical splits: "train", "validation" (0 if none), "test".
    uniform_size: bool = True  # Whether all source images have one size (before any resize).
    skipped_files: dict[str, int] = dataclasses.field(default_factory=dict)  # Per split folder.

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        """Bad files skipped because of ``config.skip_bad_files`` (ImageFolder only)."""
        return sum(self.skipped_files.values())


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """One physical split: its size and a reader for a sorted subset of example indices.

    ``read(indices)`` returns a ``tf.data.Dataset`` of ``{"image": uint8 (h, w, 3), "label":
    int32}`` in the order of ``indices``; image sizes may vary (``sizes`` says whether they do).
    """

    num_examples: int
    read: Callable[[np.ndarray], tf.data.Dataset]
    sizes: frozenset[tuple[int, int]] | None  # Distinct (h, w); None = unknown (may vary).
    skipped: int = 0


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    class_names: tuple[str, ...]
    splits: dict[str, SplitSource]


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes -> uint8 (h, w, 3) (grayscale expanded, first GIF frame)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image
