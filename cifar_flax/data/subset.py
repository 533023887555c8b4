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

from cifar_flax import UserError


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
    done = _built(dst, recipe)
    if done is not None:
        return done
    counts = {split: _link_split(src, dst, split, classes, (per_class or {}).get(split), seed)
              for split in splits}
    with open(os.path.join(dst, "subset.json"), "w") as f:
        json.dump({"recipe": recipe, "counts": counts}, f, indent=1)
    return counts


def _link_split(src: str, dst: str, split: str, classes: Sequence[str], cap: int | None,
                seed: int) -> int:
    total = 0
    for label, name in enumerate(classes):
        folder = os.path.join(src, split, name)
        if not os.path.isdir(folder):
            raise UserError(f"class folder {folder} does not exist (classes of "
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


VAL_SEED = 20261130  # Picks the fixed validation images of link_few_shot (the same for all runs).


def link_few_shot(src: str, dst: str, per_class: int, seed: int, val_per_class: int) -> dict:
    """A small-data ImageFolder of ``src`` (``train/`` and ``test/``) in ``dst``, as symlinks.

    ``dst/val``: ``val_per_class`` images of each class of ``src/train``, the same for every
    ``per_class`` and ``seed`` (drawn with VAL_SEED); ``dst/train``: ``per_class`` other images
    of each class, the first ``per_class`` of a ``seed``-shuffled order (so a seed's smaller
    subsets lie inside its larger ones); ``dst/test``: ``src/test`` whole. Returns images per
    split; a rebuild with the same arguments is a no-op, one with others an error.
    """
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    recipe = {"src": src, "per_class": per_class, "seed": seed, "val_per_class": val_per_class,
              "val_seed": VAL_SEED}
    done = _built(dst, recipe)
    if done is not None:
        return done
    classes = sorted(e for e in os.listdir(os.path.join(src, "train")) if not e.startswith("."))
    counts = {"train": 0, "val": 0, "test": 0}
    for label, name in enumerate(classes):
        folder = os.path.join(src, "train", name)
        files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        val = set(np.random.default_rng([VAL_SEED, label]).permutation(files)[:val_per_class])
        pool = [f for f in files if f not in val]
        if per_class > len(pool):
            raise UserError(f"{folder} has {len(files)} images: not enough for {per_class} "
                            f"training + {val_per_class} validation images per class.")
        train = np.random.default_rng([seed, label]).permutation(pool)[:per_class]
        for split, chosen in (("train", train), ("val", sorted(val))):
            os.makedirs(os.path.join(dst, split, name))
            for f in chosen:
                os.symlink(os.path.join(folder, f), os.path.join(dst, split, name, f))
            counts[split] += len(chosen)
        os.makedirs(os.path.join(dst, "test"), exist_ok=True)
        test = os.path.join(src, "test", name)
        os.symlink(test, os.path.join(dst, "test", name), target_is_directory=True)
        counts["test"] += len([f for f in os.listdir(test) if not f.startswith(".")])
    with open(os.path.join(dst, "subset.json"), "w") as f:
        json.dump({"recipe": recipe, "counts": counts}, f, indent=1)
    return counts


def _built(dst: str, recipe: dict) -> dict | None:
    """The counts of a subset already built in ``dst`` with ``recipe`` (None when ``dst`` is
    new or empty); UserError when ``dst`` holds something else."""
    marker = os.path.join(dst, "subset.json")
    if os.path.exists(marker):
        with open(marker) as f:
            built = json.load(f)
        if built["recipe"] != recipe:
            raise UserError(f"{dst} holds another subset ({built['recipe']}); remove it or pick "
                            "another folder.")
        return built["counts"]
    if os.path.exists(dst) and os.listdir(dst):
        raise UserError(f"{dst} exists and is not a subset built here; remove it or pick "
                        "another folder.")
    return None
