"""Host input pipeline: any source (sources.py) -> per-host numpy batches of uint8 images.

Logical splits: "train" (``config.train_split`` minus the validation hold-out), "validation"
(``config.val_split``, or a seeded ``config.val_fraction`` of the train split, or nothing) and
"test" (``config.test_split``). The hold-out is a permutation drawn from ``config.seed`` alone,
so every run and every host agrees on it. Each host reads and decodes only its own examples,
resizes them if sizes vary (``config.image_size``) and caches them (``config.cache``).

Training batches: per epoch a shuffle seeded by ``(seed, epoch)``, ``steps_per_epoch`` full
batches (remainder dropped), forever; the batch at step ``s`` depends only on ``(seed, s)``, so
``train_batches(..., start_step=k)`` resumes exactly. With several processes each host reads
(epoch by epoch, uncached) its contiguous slice of every global batch (:func:`train_positions`),
so a step's global batch is the same on any topology. Evaluation batches: one pass, no shuffle, each host its
contiguous slice of every global batch (:func:`eval_positions`), the last batch padded and a
boolean ``mask`` marks real examples, so every example counts once (CIFAR-10's test accuracy is
over exactly 10,000 images). All hosts yield the same number of batches (collectives in the step
need that).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from cifar_flax import UserError
from cifar_flax.data.sources import DatasetInfo, SplitSource, data_key, source_for_key

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
        raise UserError(
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
        raise UserError(f"config.val_fraction={val_fraction} must be in [0, 1).")
    n = source_for_key(key).splits[d["train_split"]].num_examples
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise UserError(f"config.val_fraction={val_fraction} leaves none of {n} examples to train.")
    perm = np.random.default_rng([d["seed"], 0xA1]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _logical(key: str, val_fraction: float, split: str) -> tuple[SplitSource, np.ndarray]:
    """(physical split, sorted example indices into it) of a logical split."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    d, source = json.loads(key), source_for_key(key)
    if d["val_split"] and d["val_split"] not in source.splits:
        raise UserError(f"config.val_split={d['val_split']!r} is not a split of {source.name}.")
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
        raise UserError(
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


def check_train_classes(config: Any, info: DatasetInfo) -> None:
    """Before training: UserError (one line) when the dataset has fewer than two classes, or a
    class has no example in the logical train split (where the labels are known without reading
    the images: ImageFolder, synthetic), e.g. all of its few images held out for validation."""
    key, val_fraction = _key(config)
    d = json.loads(key)
    if info.num_classes < 2:
        raise UserError(
            f"{info.name} has {info.num_classes} class ({', '.join(info.class_names)}): a "
            "classifier needs at least two; use a dataset with a folder (or label) per class.")
    s, indices = _logical(key, val_fraction, "train")
    if s.labels is None:
        return
    counts = np.bincount(s.labels[indices], minlength=info.num_classes)
    missing = [i for i, n in enumerate(counts) if n == 0]
    if not missing:
        return
    name, total = info.class_names[missing[0]], int(np.sum(s.labels == missing[0]))
    where = f"the train split {d['train_split']!r} of {info.name}"
    more = f" (nor {len(missing) - 1} more classes)" if len(missing) > 1 else ""
    if total:
        raise UserError(
            f"class {name!r} has no training images{more}: all {total} of its images in {where} "
            f"are held out for validation (val_fraction={val_fraction:g}); add images of that "
            "class, lower --config.val_fraction, or set --config.val_split to a validation split.")
    raise UserError(
        f"class {name!r} has no images in {where}{more} (skipped files: {s.skipped}); add images "
        "of that class, or remove the class from every split.")


def eval_positions(n: int, global_batch: int, shard: Shard) -> np.ndarray:
    """Positions (into a logical split of ``n``) that host ``index`` of ``count`` reads for an
    evaluation pass: its contiguous 1/count of every global batch, so that results gathered over
    the hosts come back in the split's order, whatever the number of processes."""
    index, count = shard
    local = global_batch // count
    pos = np.arange(n)
    return pos[(pos % global_batch) // local == index]


def host_indices(config: Any, split: str, shard: Shard | None = None) -> np.ndarray:
    """Indices (into the physical split) of the examples of ``split`` that this host reads in
    an evaluation pass (:func:`eval_batches`; on one process: all of them). Training on several
    processes reads the train split epoch by epoch instead (:func:`train_positions`)."""
    return _host_indices(*_key(config), split, config.eval_batch_size, _default_shard(shard))


def _host_indices(key: str, val_fraction: float, split: str, eval_batch: int, shard: Shard
                  ) -> np.ndarray:
    indices = _logical(key, val_fraction, split)[1]
    return indices[eval_positions(len(indices), eval_batch, shard)]


def train_positions(config: Any, info: DatasetInfo, epoch: int, shard: Shard) -> np.ndarray:
    """Positions (into the logical train split) that host ``index`` of ``count`` reads in
    ``epoch``, in the order of its batches: its contiguous 1/count of every global batch of the
    epoch's order, so that every step's global batch holds the same examples in the same device
    order on any topology (1 process x 4 devices trains exactly like 2 x 2). Per epoch the
    hosts' positions are disjoint and cover the epoch's batches."""
    index, count = shard
    epoch_steps, batch = steps_per_epoch(config, info), config.batch_size
    local = batch // count
    order = epoch_order(config, epoch)[: epoch_steps * batch].reshape(epoch_steps, batch)
    return order[:, index * local:(index + 1) * local].reshape(-1)


def indices_digest(indices: np.ndarray) -> str:
    """A short digest of an index list (logged per host and split, so that a multi-process run
    shows which examples each host read)."""
    return hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest()[:12]


def host_dataset(
    config: Any, info: DatasetInfo, split: str, shard: Shard | None = None
) -> tf.data.Dataset:
    """This host's examples of ``split``, in order, as fixed-size uint8 (cached if config.cache)."""
    return _host_dataset(*_key(config), split, _default_shard(shard), config.eval_batch_size,
                         info.image_shape, bool(config.cache))


@functools.lru_cache(maxsize=16)
def _host_dataset(key, val_fraction, split, shard, eval_batch, image_shape, cache
                  ) -> tf.data.Dataset:
    # Memoised (on what defines the host's indices, not the indices) so that the in-memory
    # tf.data cache survives across eval passes and epochs.
    s, indices = _logical(key, val_fraction, split)
    mine = np.asarray(_host_indices(key, val_fraction, split, eval_batch, shard), np.int64)
    logging.info("Input shard: process %d of %d reads %d of the %d %s examples (indices sha1 %s)",
                 shard[0], shard[1], len(mine), len(indices), split, indices_digest(mine))
    return _decoded(s, mine, image_shape, cache)


def _decoded(s: SplitSource, indices: np.ndarray, image_shape: tuple, cache: bool
             ) -> tf.data.Dataset:
    """The examples at (sorted) ``indices`` of a physical split as fixed-size uint8."""
    ds = s.read(indices)
    h, w, _ = image_shape
    if s.sizes != frozenset([(h, w)]):
        ds = ds.map(functools.partial(resize_example, h=h, w=w),
                    num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: {"image": tf.ensure_shape(ex["image"], (h, w, 3)), "label": ex["label"]})
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.cache() if cache else ds


def resize_example(ex: dict, h: int, w: int) -> dict:
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


def epoch_order(config: Any, epoch: int) -> np.ndarray:
    """Positions in the logical train split in the order the batches of epoch ``epoch`` take
    them (all of them; the batches use the first ``steps_per_epoch * batch``): the global order,
    which each host of a multi-process run slices (:func:`train_positions`). For consumers of
    the same batches without the images too, such as the feature cache."""
    n = len(_logical(*_key(config), "train")[1])
    ds = _epoch_shuffle(tf.data.Dataset.range(n), config, epoch, n)
    return next(iter(ds.batch(n).as_numpy_iterator()))


def train_batches(
    config: Any, info: DatasetInfo, start_step: int = 0, *, shard: Shard | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite per-host training batches ``{"image": uint8 (B,H,W,3), "label": int32 (B,)}``."""
    shard = _default_shard(shard)
    batch = local_batch_size(config.batch_size, process_count=shard[1])
    epoch_steps = steps_per_epoch(config, info)
    if epoch_steps == 0:
        raise UserError(
            f"The train split has {info.split_sizes['train']} examples, fewer than "
            f"config.batch_size={config.batch_size}; lower --config.batch_size."
        )
    if shard[1] > 1:
        yield from _sliced_train_batches(config, info, start_step, shard)
        return
    base = host_dataset(config, info, "train", shard)
    n = len(host_indices(config, "train", shard))
    epoch, skip = divmod(int(start_step), epoch_steps)
    while True:
        ds = _epoch_shuffle(base, config, epoch, n)
        # take(epoch_steps): every host yields the same number of steps even if its shard is larger.
        ds = ds.batch(batch, drop_remainder=True).take(epoch_steps).skip(skip)
        yield from ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
        epoch, skip = epoch + 1, 0


def _sliced_train_batches(
    config: Any, info: DatasetInfo, start_step: int, shard: Shard
) -> Iterator[dict[str, np.ndarray]]:
    """A multi-process host's train batches: epoch by epoch, its :func:`train_positions`, read
    (only those), decoded and held in memory for the epoch, in batch order."""
    s, indices = _logical(*_key(config), "train")
    epoch_steps, local = steps_per_epoch(config, info), config.batch_size // shard[1]
    epoch, skip = divmod(int(start_step), epoch_steps)
    while True:
        physical = indices[train_positions(config, info, epoch, shard)]
        logging.info("Input shard: process %d of %d reads %d of the %d train examples in epoch "
                     "%d (indices sha1 %s)", shard[0], shard[1], len(physical), len(indices),
                     epoch, indices_digest(physical))
        wanted = np.sort(physical)
        rows = next(iter(_decoded(s, wanted, info.image_shape, False)
                         .batch(max(len(wanted), 1)).as_numpy_iterator()))
        at = np.searchsorted(wanted, physical)  # The sorted read, back in batch order.
        for i in range(skip, epoch_steps):
            sl = at[i * local:(i + 1) * local]
            yield {"image": rows["image"][sl], "label": rows["label"][sl]}
        epoch, skip = epoch + 1, 0


def num_eval_batches(
    eval_batch_size: int, info: DatasetInfo, split: str, process_count: int | None = None
) -> int:
    """Batches every host yields for one pass over ``split`` (the same on all hosts: one per
    global batch of config.eval_batch_size, see :func:`eval_positions`)."""
    process_count = process_count or jax.process_count()
    local_batch_size(eval_batch_size, "eval_batch_size", process_count=process_count)
    return math.ceil(info.split_sizes[split] / eval_batch_size)


def eval_batches(
    config: Any, info: DatasetInfo, split: str, *, shard: Shard | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``split``: ``{"image", "label", "mask"}``, padding masked out."""
    shard = _default_shard(shard)
    batch = local_batch_size(config.eval_batch_size, "eval_batch_size", process_count=shard[1])
    total = num_eval_batches(config.eval_batch_size, info, split, shard[1])
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
    source_for_key.cache_clear()
    _holdout.cache_clear()
    _host_dataset.cache_clear()
