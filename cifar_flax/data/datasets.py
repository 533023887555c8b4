"""Dataset sources behind one interface: tfds by name, ``imagefolder:<dir>`` and ``synthetic``.

A source hands out, per physical split (a tfds split name or an ImageFolder sub-folder), the
number of examples and a ``tf.data`` reader of decoded uint8 RGB images for any subset of example
indices. Everything above that (validation hold-out, host sharding, batching) lives in
input_pipeline.py and is the same for every source.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import tensorflow as tf

from cifar_flax.data import imagefolder
from cifar_flax.data.types import DataError, Source, SplitSource, decode


def data_key(config: Any) -> str:
    """A hashable summary of the config fields that define the data (for memoisation)."""
    fields = ("dataset", "data_dir", "train_split", "test_split", "val_split", "skip_bad_files")
    d = {f: config[f] for f in fields}
    d["seed"] = config.seed
    d["synthetic"] = config.synthetic.to_dict() if config.dataset == "synthetic" else None
    return json.dumps(d, sort_keys=True, default=str)


def get_source(config: Any) -> Source:
    """The source that ``config.dataset`` selects, with the splits the config uses."""
    return source_for_key(data_key(config))


@functools.lru_cache(maxsize=8)
def source_for_key(key: str) -> Source:
    d = json.loads(key)
    splits = [d["train_split"], d["test_split"]] + ([d["val_split"]] if d["val_split"] else [])
    name = d["dataset"]
    if not name:
        raise DataError("config.dataset is empty; use a tfds name, imagefolder:<dir> or synthetic.")
    if name.startswith("imagefolder:"):
        return imagefolder.source(name.split(":", 1)[1], splits, d["skip_bad_files"])
    if name == "synthetic":
        return _synthetic_source(d["synthetic"], d["seed"], d["train_split"], d["test_split"])
    return _tfds_source(name, d["data_dir"], splits)


# ---------------------------------------------------------------------------------------- tfds


def _tfds_source(name: str, data_dir: str, splits: list[str]) -> Source:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # tfds raises several types for unknown or broken names.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"config.dataset={name!r} is not a tfds dataset ({first}); use a tfds name, "
            "imagefolder:<dir> or synthetic."
        ) from None
    try:
        builder.download_and_prepare()  # No-op when already prepared in data_dir.
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"tfds dataset {name!r} is not in data_dir {builder.data_dir!r} and its download "
            f"failed ({type(e).__name__}: {first[:200]}). Set --config.data_dir to a directory "
            "holding the prepared dataset, or use --config.dataset=imagefolder:<dir>."
        ) from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    if image_key not in features or label_key not in features:
        raise DataError(f"tfds dataset {name!r} has no {image_key!r}/{label_key!r} features.")
    h, w, _ = features[image_key].shape
    sizes = frozenset([(h, w)]) if h and w else None
    out = {}
    for split in dict.fromkeys(splits):
        try:
            full = builder.as_dataset(
                split=split,
                shuffle_files=False,
                decoders={image_key: tfds.decode.SkipDecoding()},
            )
        except Exception as e:
            raise DataError(
                f"tfds dataset {name!r} has no split {split!r} ({e}); available: "
                f"{sorted(builder.info.splits)}. Fix config.train_split/test_split/val_split."
            ) from None
        n = int(full.cardinality().numpy())
        if n < 0:
            n = builder.info.splits[split].num_examples
        read = functools.partial(_tfds_read, full, n, image_key, label_key)
        out[split] = SplitSource(n, read, sizes)
    return Source(name, tuple(features[label_key].names), out)


def _tfds_read(
    full: tf.data.Dataset, n: int, image_key: str, label_key: str, indices: np.ndarray
) -> tf.data.Dataset:
    """Read the examples at ``indices``: filter by index on the encoded records, then decode."""
    mask = np.zeros(n, bool)
    mask[indices] = True
    mask_t = tf.constant(mask)
    ds = full.enumerate().filter(lambda i, ex: tf.gather(mask_t, i))
    return ds.map(
        lambda i, ex: {"image": decode(ex[image_key]), "label": tf.cast(ex[label_key], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


# ----------------------------------------------------------------------------------- synthetic


def synthetic_images(cfg: dict, seed: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy dataset: class colour + class-specific stripes + noise, uint8.

    Class colours and stripe periods depend only on ``seed`` (shared by all splits); the examples
    of each split come from ``(seed, split_id)``. Labels are balanced.
    """
    k, n, s = int(cfg["num_classes"]), int(cfg["num_train" if split_id == 0 else "num_test"]), int(
        cfg["size"]
    )
    classes = np.random.default_rng([seed, 1000])
    colours = classes.uniform(50, 205, size=(k, 3))
    periods = 2 + np.arange(k) % 5
    vertical = (np.arange(k) // 5) % 2 == 1
    rng = np.random.default_rng([seed, split_id])
    labels = rng.permutation(np.arange(n) % k).astype(np.int32)
    coords = np.arange(s)
    stripes = np.where((coords[None, :] // periods[:, None]) % 2 == 0, 40.0, -40.0)  # (k, s)
    pattern = np.where(vertical[:, None, None], stripes[:, None, :], stripes[:, :, None])
    images = colours[labels][:, None, None, :] + pattern[labels][..., None]
    images = images + rng.normal(0, 25, size=(n, s, s, 3))
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels


def _synthetic_source(cfg: dict, seed: int, train_split: str, test_split: str) -> Source:
    k = int(cfg["num_classes"])
    if k < 2 or cfg["num_train"] < 1 or cfg["num_test"] < 1 or cfg["size"] < 1:
        raise DataError(f"config.synthetic={cfg} needs num_classes >= 2 and positive sizes.")
    out = {}
    for split_id, split in enumerate((train_split, test_split)):
        images, labels = synthetic_images(cfg, seed, split_id)

        def read(indices: np.ndarray, images=images, labels=labels) -> tf.data.Dataset:
            return tf.data.Dataset.from_tensor_slices(
                {"image": images[indices], "label": labels[indices]}
            )

        out[split] = SplitSource(len(labels), read, frozenset([(cfg["size"], cfg["size"])]))
    return Source("synthetic", tuple(f"class_{i}" for i in range(k)), out)
