"""Helpers of the predict/evaluate/export tests: image files of mixed sizes and modes."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

# (height, width, PIL mode, suffix): grayscale, RGBA, RGB, JPEG, the run's size and others.
MIXED = [(32, 32, "RGB", ".png"), (40, 52, "L", ".png"), (20, 30, "RGBA", ".png"),
         (64, 64, "RGB", ".jpg"), (17, 33, "RGB", ".bmp"), (32, 32, "L", ".jpg")]


def write_image(path: pathlib.Path, h: int, w: int, mode: str, seed: int) -> None:
    """A smooth random image (so resizing matters) of the given size and PIL mode."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    small = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
    img = Image.fromarray(small.squeeze(-1) if channels == 1 else small, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((w, h), Image.BILINEAR).save(path)


def image_folder(root: pathlib.Path, class_names: list[str], split: str = "test") -> list[str]:
    """``root/<split>/<class>/<i><suffix>``: every MIXED kind in every class; the file paths in
    ImageFolder order (class, then name)."""
    paths = []
    for c, name in enumerate(class_names):
        for i, (h, w, mode, suffix) in enumerate(MIXED):
            p = root / split / name / f"img{i}{suffix}"
            write_image(p, h, w, mode, seed=100 * c + i)
            paths.append(str(p))
    return paths
