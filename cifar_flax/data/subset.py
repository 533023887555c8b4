"""Subsets of an ImageFolder as symlinks: some of its classes, at most N images per class.

Experiments (a class-split transfer benchmark, a small-data fine-tune) need a smaller dataset
than the one on disk; symlinks make one in a second, copy no image and keep the source's layout
(``<root>/<split>/<class>/<image>``), so ``--config.dataset=imagefolder:<dst>`` reads it as is.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from cifar_flax.data.types import DataError


def link_subset(
    src: str,
    dst: str,
    classes: Sequence[str],
    splits: Sequence[str] = ("train", "test"),
    per_class: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Build ``dst`` from ``src``'s ``classes`` in ``splits``; returns images per split.

    ``per_class`` caps a split (``{"train": 1000}``) to a seeded sample of that many images of
    every class; an uncapped class folder is linked whole. Rebuilding with the same arguments is
    a no-op; a ``dst`` built with other arguments is an error (never silently mixed).
    """
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    recipe = {"src": src, "classes": list(classes), "splits": list(splits),
              "per_class": dict(per_class or {}), "seed": seed}
    marker = os.path.join(dst, "subset.json")
    if os.path.exists(marker):
        with open(marker) as f:
            built = json.load(f)
        if built["recipe"] != recipe:
            raise DataError(f"{dst} holds another subset ({built['recipe']}); remove it or pick "
                            "another folder.")
        return built["counts"]
    if os.path.exists(dst) and os.listdir(dst):
        raise DataError(f"{dst} exists and is not a subset built by link_subset; remove it or "
                        "pick another folder.")
    counts = {split: _link_split(src, dst, split, classes, (per_class or {}).get(split), seed)
              for split in splits}
    with open(marker, "w") as f:
        json.dump({"recipe": recipe, "counts": counts}, f, indent=1)
    return counts


def _link_split(src: str, dst: str, split: str, classes: Sequence[str], cap: int | None,
                seed: int) -> int:
    total = 0
    for label, name in enumerate(classes):
        folder = os.path.join(src, split, name)
        if not os.path.isdir(folder):
            raise DataError(f"class folder {folder} does not exist (classes of "
                            f"{os.path.join(src, split)}: {sorted(os.listdir(os.path.join(src, split)))}).")
        target = os.path.join(dst, split, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        if cap is None or cap >= len(files):
            os.symlink(folder, target, target_is_directory=True)
            total += len(files)
            continue
        rng = np.random.default_rng([seed, label])
        os.makedirs(target)
        for f in sorted(rng.choice(files, size=cap, replace=False)):
            os.symlink(os.path.join(folder, f), os.path.join(target, f))
        total += cap
    return total
