"""Host input pipeline: any source (datasets.py) -> per-host numpy batches of uint8 images.

Logical splits: "train" (``config.train_split`` minus the validation hold-out), "validation"
(``config.val_split``, or a seeded ``config.val_fraction`` of the train split, or nothing) and
"test" (``config.test_split``). The hold-out is a permutation drawn from ``config.seed`` alone,
so every run and every host agrees on it. Each host then takes every ``process_count``-th example
of a logical split, reads and decodes only those, resizes if sizes vary, and caches them.

Training batches: per epoch a shuffle seeded by ``(seed, epoch)``, ``steps_per_epoch`` full
batches (remainder dropped), forever; the batch at step ``s`` depends only on ``(seed, s)``, so
``train_batches(..., start_step=k)`` resumes exactly. Evaluation batches: one pass, no shuffle,
the last batch padded and a boolean ``mask`` marks real examples, so every example counts once.
All hosts yield the same number of batches (collectives in the step need that).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf

from cifar_flax.datasets import DataError, DatasetInfo, SplitSource, source_for_key, data_key

__all__ = [
    "DataError", "DatasetInfo", "get_info", "local_batch_size", "train_batches", "eval_batches",
    "steps_per_epoch", "num_eval_batches", "host_indices", "host_dataset", "clear_caches",
    "epoch_order",
]

SPLITS = ("train", "validation", "test")
Shard = tuple[int, int]  # (index of this host, number of hosts)


def _default_shard(shard: Shard | None) -> Shard:
    return shard if shard is not None else (jax.process_index(), jax.process_count())


def local_batch_size(
    global_batch: int, field: str = "batch_size", *, device_count: int | None = None,
    process_count: int | None = None,
) -> int:
    """Per-host batch of a global batch, which must divide evenly over all devices."""
    devices = device_count or jax.device_count()
    processes = process_count or jax.process_count()
    if global_batch <= 0 or global_batch % devices or global_batch % processes:
        raise DataError(
            f"config.{field}={global_batch} must be a positive multiple of the device count "
            f"({devices}) and host count ({processes}); set --config.{field} accordingly."
        )
    return global_batch // processes


def _key(config: Any) -> tuple[str, float]:
    """Hashable (source key, val_fraction): everything that defines the logical splits."""
    return data_key(config), float(config.val_fraction)


@functools.lru_cache(maxsize=8)
def _holdout(key: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted (train, validation) indices of the train split, or None without a hold-out."""
    d = json.loads(key)
    if d["val_split"] or not val_fraction:
        return None
    if not 0 < val_fraction < 1:
        raise DataError(f"config.val_fraction={val_fraction} must be in [0, 1).")
    n = source_for_key(key).splits[d["train_split"]].num_examples
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise DataError(f"config.val_fraction={val_fraction} leaves none of {n} examples to train.")
    perm = np.random.default_rng([d["seed"], 0xA1]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _logical(key: str, val_fraction: float, split: str) -> tuple[SplitSource, np.ndarray]:
    """(physical split, sorted example indices into it) of a logical split."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    d, source = json.loads(key), source_for_key(key)
    if d["val_split"] and d["val_split"] not in source.splits:
        raise DataError(f"config.val_split={d['val_split']!r} is not a split of {source.name}.")
    physical = {"train": d["train_split"], "test": d["test_split"]}
    physical["validation"] = d["val_split"] or d["train_split"]
    s = source.splits[physical[split]]
    holdout = _holdout(key, val_fraction)
    if split == "test" or d["val_split"]:
        return s, np.arange(s.num_examples)
    if holdout is None:
        return s, np.arange(s.num_examples if split == "train" else 0)
    return s, holdout[0 if split == "train" else 1]


def get_info(config: Any) -> DatasetInfo:
    """Class names, image shape and logical split sizes of the dataset the config selects."""
    key, val_fraction = _key(config)
    source = source_for_key(key)
    used = {_logical(key, val_fraction, s)[0] for s in SPLITS}
    sizes = set().union(*[s.sizes or {(None, None)} for s in used])
    uniform = len(sizes) == 1 and None not in next(iter(sizes))
    if config.image_size:
        hw = (config.image_size, config.image_size)
    elif uniform:
        hw = next(iter(sizes))
    else:
        example = ", ".join(f"{h}x{w}" for h, w in sorted(sizes, key=str)[:3])
        raise DataError(
            f"Images of {source.name} have different sizes ({example}, ...); set "
            "--config.image_size=N to resize them to NxN on the host."
        )
    return DatasetInfo(
        name=source.name,
        class_names=source.class_names,
        image_shape=(int(hw[0]), int(hw[1]), 3),
        split_sizes={s: len(_logical(key, val_fraction, s)[1]) for s in SPLITS},
        uniform_size=uniform,
        skipped_files={k: v.skipped for k, v in source.splits.items() if v.skipped},
    )


def host_indices(config: Any, split: str, shard: Shard | None = None) -> np.ndarray:
    """Indices (into the physical split) of the examples of ``split`` that this host reads."""
    index, count = _default_shard(shard)
    return _logical(*_key(config), split)[1][index::count]


def host_dataset(
    config: Any, info: DatasetInfo, split: str, shard: Shard | None = None
) -> tf.data.Dataset:
    """This host's examples of ``split``, in order, as fixed-size uint8 (cached if config.cache)."""
    return _host_dataset(
        *_key(config), split, _default_shard(shard), info.image_shape, bool(config.cache)
    )


@functools.lru_cache(maxsize=16)
def _host_dataset(key, val_fraction, split, shard, image_shape, cache) -> tf.data.Dataset:
    # Memoised so that the in-memory tf.data cache survives across eval passes and epochs.
    s, indices = _logical(key, val_fraction, split)
    ds = s.read(indices[shard[0] :: shard[1]])
    h, w, _ = image_shape
    if s.sizes != frozenset([(h, w)]):
        ds = ds.map(functools.partial(_resize, h=h, w=w), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: {"image": tf.ensure_shape(ex["image"], (h, w, 3)), "label": ex["label"]})
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.cache() if cache else ds


def _resize(ex: dict, h: int, w: int) -> dict:
    """Resize (antialiased bilinear) only the images whose size differs from (h, w)."""
    image = ex["image"]
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [h, w]))
    resized = lambda: tf.cast(  # noqa: E731
        tf.round(tf.clip_by_value(tf.image.resize(image, [h, w], antialias=True), 0, 255)),
        tf.uint8,
    )
    return {"image": tf.cond(same, lambda: image, resized), "label": ex["label"]}


def steps_per_epoch(config: Any, info: DatasetInfo) -> int:
    """Full global batches per epoch of the logical train split."""
    return info.split_sizes["train"] // config.batch_size


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 0x5F]).generate_state(1)[0])


def _epoch_shuffle(ds: tf.data.Dataset, config: Any, epoch: int, n: int) -> tf.data.Dataset:
    """``ds`` (``n`` examples) shuffled as train_batches shuffles epoch ``epoch``.

    The one place of the rule: a buffer of ``min(config.shuffle_buffer, n)`` and a seed drawn
    from ``(config.seed, epoch)``. tf.data draws the order from (seed, buffer, length) only, so
    any dataset of ``n`` elements is permuted the same way (epoch_order relies on it).
    """
    buffer = max(1, min(config.shuffle_buffer, n))
    seed = _epoch_seed(config.seed, epoch)
    return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)


def epoch_order(config: Any, epoch: int, shard: Shard | None = None) -> np.ndarray:
    """Positions in ``host_dataset(config, info, "train", shard)`` in the order train_batches
    yields them in epoch ``epoch`` (all of them; its batches use the first
    ``steps_per_epoch * batch``). For consumers of the same batches without the images, such
    as the feature cache."""
    n = len(host_indices(config, "train", shard))
    ds = _epoch_shuffle(tf.data.Dataset.range(n), config, epoch, n)
    return next(iter(ds.batch(n).as_numpy_iterator()))


def train_batches(
    config: Any, info: DatasetInfo, start_step: int = 0, *, shard: Shard | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite per-host training batches ``{"image": uint8 (B,H,W,3), "label": int32 (B,)}``."""
    shard = _default_shard(shard)
    batch = local_batch_size(config.batch_size, process_count=shard[1])
    spe = steps_per_epoch(config, info)
    if spe == 0:
        raise DataError(
            f"The train split has {info.split_sizes['train']} examples, fewer than "
            f"config.batch_size={config.batch_size}; lower --config.batch_size."
        )
    base = host_dataset(config, info, "train", shard)
    n = len(host_indices(config, "train", shard))
    epoch, skip = divmod(int(start_step), spe)
    while True:
        ds = _epoch_shuffle(base, config, epoch, n)
        # take(spe): every host yields the same number of steps even if its shard is larger.
        ds = ds.batch(batch, drop_remainder=True).take(spe).skip(skip)
        yield from ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
        epoch, skip = epoch + 1, 0


def num_eval_batches(
    config: Any, info: DatasetInfo, split: str, process_count: int | None = None
) -> int:
    """Batches every host yields for one pass over ``split`` (the same on all hosts)."""
    process_count = process_count or jax.process_count()
    batch = local_batch_size(
        config.eval_batch_size, "eval_batch_size", process_count=process_count
    )
    return math.ceil(math.ceil(info.split_sizes[split] / process_count) / batch)


def eval_batches(
    config: Any, info: DatasetInfo, split: str, *, shard: Shard | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``split``: ``{"image", "label", "mask"}``, padding masked out."""
    shard = _default_shard(shard)
    batch = local_batch_size(config.eval_batch_size, "eval_batch_size", process_count=shard[1])
    total = num_eval_batches(config, info, split, shard[1])
    ds = host_dataset(config, info, split, shard).batch(batch).prefetch(tf.data.AUTOTUNE)
    empty = {
        "image": np.zeros((batch, *info.image_shape), np.uint8),
        "label": np.zeros((batch,), np.int32),
    }
    count = 0
    for b in ds.as_numpy_iterator():
        n = len(b["label"])
        out = {k: np.concatenate([v, empty[k][: batch - n]]) for k, v in b.items()}
        out["mask"] = np.arange(batch) < n
        count += 1
        yield out
    for _ in range(total - count):
        yield {**empty, "mask": np.zeros(batch, bool)}


def clear_caches() -> None:
    """Forget memoised sources, hold-outs and cached datasets (tests; changed files on disk)."""
    from cifar_flax import datasets

    datasets.source_for_key.cache_clear()
    _holdout.cache_clear()
    _host_dataset.cache_clear()
