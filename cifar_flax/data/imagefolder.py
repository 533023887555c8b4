"""``imagefolder:<dir>``: ``<dir>/<split>/<class>/<image>`` trees of JPEG/PNG files.

Class names are the sorted class folder names, and every split the config uses must have the same
class folders. Before any training the split is checked, so data problems surface at once with
the offending path: a missing/empty split folder, a class folder missing from a split, a file
that is not an image, an empty file, a file that does not decode. With ``skip_bad_files`` the bad
files are left out instead, counted and logged. Hidden entries (names starting with ".") are
ignored. The decode check is one parallel ``tf.data`` pass that also records each image's size.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

from cifar_flax.data.types import DataError, SplitSource, Source, decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def source(root: str, splits: list[str], skip_bad_files: bool) -> Source:
    """Scan and check the split folders of ``root``; all must share one class list."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(
            f"ImageFolder directory {root} does not exist (config.dataset=imagefolder:{root})."
        )
    classes = {split: _class_folders(root, split) for split in dict.fromkeys(splits)}
    first = splits[0]
    for split, names in classes.items():
        for missing in sorted(set(classes[first]) - set(names)):
            raise DataError(
                f"Class folder {os.path.join(root, first, missing)} has no counterpart "
                f"{os.path.join(root, split, missing)}; every split needs the same class folders."
            )
        for extra in sorted(set(names) - set(classes[first])):
            raise DataError(
                f"Class folder {os.path.join(root, split, extra)} has no counterpart "
                f"{os.path.join(root, first, extra)}; every split needs the same class folders."
            )
    class_names = tuple(classes[first])
    out = {s: _split_source(root, s, class_names, skip_bad_files) for s in classes}
    return Source(f"imagefolder:{root}", class_names, out)


def _class_folders(root: str, split: str) -> list[str]:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        found = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        raise DataError(
            f"Split folder {path} does not exist (folders found: {found or 'none'}); create it "
            "or set --config.train_split/--config.test_split/--config.val_split."
        )
    names = sorted(
        e for e in os.listdir(path) if not e.startswith(".") and os.path.isdir(os.path.join(path, e))
    )
    if not names:
        raise DataError(f"Split folder {path} has no class folders (expected {path}/<class>/<img>).")
    return names


def _list_files(root: str, split: str, class_names: tuple[str, ...]):
    """Sorted (path, label) of candidate images, plus (path, reason) of obviously bad entries."""
    paths, labels, bad = [], [], []
    split_dir = os.path.join(root, split)
    for entry in sorted(os.listdir(split_dir)):
        full = os.path.join(split_dir, entry)
        if not entry.startswith(".") and not os.path.isdir(full):
            bad.append((full, "is a file outside any class folder"))
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        files = sorted(e for e in os.listdir(class_dir) if not e.startswith("."))
        if not files:
            logging.warning("Class folder %s is empty.", class_dir)
        for f in files:
            full = os.path.join(class_dir, f)
            if os.path.isdir(full):
                bad.append((full, "is a folder inside a class folder"))
            elif not f.lower().endswith(IMAGE_EXTENSIONS):
                bad.append((full, f"is not an image file (expected {'/'.join(IMAGE_EXTENSIONS)})"))
            elif os.path.getsize(full) == 0:
                bad.append((full, "is empty"))
            else:
                paths.append(full)
                labels.append(label)
    return paths, np.asarray(labels, np.int32), bad


def decode_check(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode every file once (parallel); returns (ok mask, (h, w) per file, 0 where bad)."""
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths, object), np.arange(len(paths))))
    ds = ds.map(
        lambda p, i: (i, tf.shape(decode(tf.io.read_file(p)))[:2]),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.ignore_errors().batch(1024)
    sizes = np.zeros((len(paths), 2), np.int64)
    ok = np.zeros(len(paths), bool)
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=None) as bar:
        for idx, hw in ds.as_numpy_iterator():
            ok[idx] = True
            sizes[idx] = hw
            bar.update(len(idx))
    return ok, sizes


def _split_source(
    root: str, split: str, class_names: tuple[str, ...], skip_bad_files: bool
) -> SplitSource:
    paths, labels, bad = _list_files(root, split, class_names)
    ok, sizes = decode_check(paths)
    bad += [(p, "cannot be decoded as an image") for p, good in zip(paths, ok) if not good]
    if bad and not skip_bad_files:
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise DataError(
            f"{bad[0][0]} {bad[0][1]}{more}; fix or remove it, or set "
            "--config.skip_bad_files=True to skip bad files."
        )
    if bad:
        logging.warning(
            "Skipped %d bad files in %s (config.skip_bad_files), e.g. %s %s.",
            len(bad), os.path.join(root, split), bad[0][0], bad[0][1],
        )
    paths = [p for p, good in zip(paths, ok) if good]
    labels, sizes = labels[ok], sizes[ok]
    if not paths:
        raise DataError(f"Split folder {os.path.join(root, split)} has no readable images.")
    read = functools.partial(_read, np.asarray(paths, object), labels)
    return SplitSource(len(paths), read, frozenset(map(tuple, sizes.tolist())), len(bad))


def _read(paths: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((paths[indices], labels[indices]))
    return ds.map(
        lambda p, y: {"image": decode(tf.io.read_file(p)), "label": y},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
