"""Dataset sources behind one interface: tfds by name, ``imagefolder:<dir>`` and ``synthetic``.

A source hands out, per physical split (a tfds split name or an ImageFolder sub-folder), the
number of examples and a ``tf.data`` reader of decoded uint8 RGB images for any subset of example
indices (:class:`Source`, :class:`SplitSource`; :func:`decode` is the one image decoder).
Everything above that (validation hold-out, host sharding, batching) lives in input_pipeline.py
and is the same for every source.

``imagefolder:<dir>``: ``<dir>/<split>/<class>/<image>`` trees of JPEG/PNG/BMP/GIF files. Class
names are the sorted class folder names, and every split the config uses must have the same
class folders. Before any training the split is checked, so data problems surface at once with
the offending path: a missing/empty split folder, a class folder missing from a split, a file
that is not an image, an empty file, a file that does not decode. With ``skip_bad_files`` the
bad files are left out instead, counted and logged. Hidden entries (names starting with ".") are
ignored. The decode check is one parallel ``tf.data`` pass that also records each image's size.
A class folder of the train split with no images (or a train split with one class folder) is
caught earlier, by config.validate; a class left with no training images (all held out for
validation, or all skipped), when training starts (input_pipeline.check_train_classes).

tfds by name (``cifar10`` by default; ``config.data_dir`` is where tfds keeps it): prepared
(downloaded) on first use. On a machine without network this fails at once, with one line that
names the host that does not resolve and the way out (``--config.data_dir`` pointing at a
prepared copy, or ``imagefolder:<dir>``), instead of tfds retrying for minutes.

``synthetic``: a small generated dataset (``config.synthetic``: classes told apart by colour and
stripe pattern, with noise, drawn from ``config.seed``), no files; for smoke runs and tests.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import urllib.parse
import urllib.request
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core.download import resource
from tqdm import tqdm

from cifar_flax import UserError, brief, user_errors


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
    # Every example's label where known without reading the images (ImageFolder, synthetic).
    labels: np.ndarray | None = dataclasses.field(default=None, compare=False)


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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def imagefolder_source(root: str, splits: list[str], skip_bad_files: bool) -> Source:
    """Scan and check the split folders of ``root``; all must share one class list."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise UserError(
            f"ImageFolder directory {root} does not exist (config.dataset=imagefolder:{root})."
        )
    classes = {split: _class_folders(root, split) for split in dict.fromkeys(splits)}
    first = splits[0]
    for split, names in classes.items():
        mismatched = ([(first, split, n) for n in sorted(set(classes[first]) - set(names))]
                      + [(split, first, n) for n in sorted(set(names) - set(classes[first]))])
        if mismatched:
            have, lack, name = mismatched[0]
            raise UserError(
                f"Class folder {os.path.join(root, have, name)} has no counterpart "
                f"{os.path.join(root, lack, name)}; every split needs the same class folders: "
                f"add {os.path.join(root, lack, name)} with images of that class, or remove "
                "that class's folder from every split."
            )
    class_names = tuple(classes[first])
    out = {s: _split_source(root, s, class_names, skip_bad_files) for s in classes}
    return Source(f"imagefolder:{root}", class_names, out)


def _class_folders(root: str, split: str) -> list[str]:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        found = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        raise UserError(
            f"Split folder {path} does not exist (folders found: {found or 'none'}); create it "
            "or set --config.train_split/--config.test_split/--config.val_split."
        )
    names = sorted(
        e for e in os.listdir(path) if not e.startswith(".") and os.path.isdir(os.path.join(path, e))
    )
    if not names:
        raise UserError(f"Split folder {path} has no class folders (expected {path}/<class>/<img>).")
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
        raise UserError(
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
        raise UserError(f"Split folder {os.path.join(root, split)} has no readable images.")
    read = functools.partial(_read, np.asarray(paths, object), labels)
    return SplitSource(len(paths), read, frozenset(map(tuple, sizes.tolist())), len(bad), labels)


def _read(paths: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((paths[indices], labels[indices]))
    return ds.map(
        lambda p, y: {"image": decode(tf.io.read_file(p)), "label": y},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


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
        raise UserError("config.dataset is empty; use a tfds name, imagefolder:<dir> or synthetic.")
    if name.startswith("imagefolder:"):
        return imagefolder_source(name.split(":", 1)[1], splits, d["skip_bad_files"])
    if name == "synthetic":
        return _synthetic_source(d["synthetic"], d["seed"], d["train_split"], d["test_split"])
    return _tfds_source(name, d["data_dir"], splits)


# ---------------------------------------------------------------------------------------- tfds


def _tfds_source(name: str, data_dir: str, splits: list[str]) -> Source:
    """A tfds dataset, prepared in ``data_dir`` first when it is not there yet (a download)."""
    builder = _tfds_prepared(name, data_dir)
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    if image_key not in features or label_key not in features:
        raise UserError(f"tfds dataset {name!r} has no {image_key!r}/{label_key!r} features.")
    h, w, _ = features[image_key].shape
    sizes = frozenset([(h, w)]) if h and w else None
    out = {}
    for split in dict.fromkeys(splits):
        with user_errors(lambda e: f"tfds dataset {name!r} has no split {split!r} ({e}); "
                         f"available: {sorted(builder.info.splits)}. Fix "
                         "config.train_split/test_split/val_split.",
                         Exception):  # tfds raises several types for a bad split.
            full = builder.as_dataset(split=split, shuffle_files=False,
                                      decoders={image_key: tfds.decode.SkipDecoding()})
        n = int(full.cardinality().numpy())
        if n < 0:
            n = builder.info.splits[split].num_examples
        out[split] = SplitSource(n, functools.partial(_tfds_read, full, n, image_key, label_key),
                                 sizes)
    return Source(name, tuple(features[label_key].names), out)


def _tfds_prepared(name: str, data_dir: str) -> Any:
    """The tfds builder of ``name``, prepared (downloaded) in ``data_dir`` if it was not.

    Without a network the download would retry for minutes before it fails: when a host it
    needs does not resolve (DNS), this fails at once instead, naming the host. Errors name tfds'
    root data_dir (what ``--config.data_dir`` takes), not its ``<root>/<name>/<version>``."""
    builder, problem = _tfds_builder(name, data_dir)
    if builder is None:
        raise UserError(f"config.dataset={name!r} is not a tfds dataset ({problem}); use "
                        "a tfds name, imagefolder:<dir> or synthetic.")
    host = _unresolved_host(builder)
    try:
        if host is None:
            builder.download_and_prepare()  # A no-op when already prepared in data_dir.
    except Exception as e:  # noqa: BLE001 - any failure to download is the same story.
        if not _dns_failed(e):
            raise UserError(_not_prepared(builder, f"its download or preparation failed "
                                          f"({type(e).__name__}: {brief(e)})")) from None
        host = next(iter(_resolving_host(u) for u in builder.url_infos or {}), "its host")
    if host is not None:
        raise UserError(_not_prepared(builder, f"its download host {host} cannot be resolved "
                                      "(DNS): this machine seems to be offline"))
    return builder


def _tfds_builder(name: str, data_dir: str) -> tuple[Any, str]:
    """``(builder, "")`` of the tfds dataset ``name`` in ``data_dir``, or ``(None, why)`` when
    tfds has no such dataset (it raises several types for unknown names)."""
    try:
        return tfds.builder(name, data_dir=data_dir or None), ""
    except Exception as e:  # noqa: BLE001 - any of them means: not a tfds dataset here.
        return None, brief(e)


def _not_prepared(builder: Any, why: str) -> str:
    return (f"tfds dataset {builder.name!r} is not prepared in data_dir "
            f"{os.fspath(builder.data_dir_root)!r} and {why}. Set --config.data_dir to a folder "
            f"holding a prepared copy (with {builder.info.full_name}/ in it), or use "
            "--config.dataset=imagefolder:<dir>.")


def unprepared(config: Any) -> str | None:
    """Why reading ``config.dataset`` would download it first (a tfds dataset not prepared in
    ``config.data_dir``: the sentence), else None (prepared, ImageFolder, synthetic, a name
    get_source refuses, or tfds.testing.mock_data). For readers that must never download."""
    name = config.dataset
    if not name or name == "synthetic" or name.startswith("imagefolder:"):
        return None
    builder, _ = _tfds_builder(name, config.data_dir)
    if builder is None or _mocked() or builder.is_prepared():  # (get_source says what is wrong.)
        return None
    return (f"tfds dataset {name!r} is not prepared in data_dir "
            f"{os.fspath(builder.data_dir_root)!r}")


def _mocked() -> bool:
    """Whether tfds.testing.mock_data is active (it downloads nothing)."""
    return tfds.core.DatasetBuilder.download_and_prepare.__name__.startswith("mock_")


def _unresolved_host(builder: Any) -> str | None:
    """A host the preparation needs whose name does not resolve: the dataset is not prepared,
    one of its files (tfds' checksums list) is not in the download cache, and that file's host
    does not resolve. None when nothing says the download must fail (or under
    tfds.testing.mock_data, which downloads nothing)."""
    if _mocked() or builder.is_prepared():
        return None
    downloads = builder.data_dir_root / "downloads"
    for url, info in (builder.url_infos or {}).items():
        names = {resource.get_dl_fname(url, info.checksum), resource.get_dl_fname(url)}
        cached = [downloads / "manual" / info.filename] if info.filename else []
        cached += [d / n for d in (downloads, downloads / builder.name) for n in names]
        if any(p.exists() for p in cached):
            continue
        host = _resolving_host(url)
        if does_not_resolve(host, urllib.parse.urlsplit(url).port or 443):
            return host
    return None


def does_not_resolve(host: str, port: int = 443) -> bool:
    """Whether DNS says that ``host`` does not resolve (socket.gaierror: this machine is offline,
    or the name is wrong). Any other failure to ask is no DNS answer: False, and the download or
    request itself decides."""
    try:
        socket.getaddrinfo(host, port)
    except OSError as e:
        return isinstance(e, socket.gaierror)
    return False


def _resolving_host(url: str) -> str:
    """The host a download of ``url`` resolves: its own, or its proxy's (*_proxy variables)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and parts.hostname and not urllib.request.proxy_bypass(parts.hostname):
        return urllib.parse.urlsplit(proxy if "://" in proxy else f"//{proxy}").hostname or ""
    return parts.hostname or ""


def _dns_failed(error: BaseException) -> bool:
    """Whether ``error`` wraps a DNS failure (its ``reason``, cause or context chain)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if isinstance(e, BaseException) and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
                return True
            todo += [getattr(e, "reason", None), e.__cause__, e.__context__]
    return False


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
        raise UserError(f"config.synthetic={cfg} needs num_classes >= 2 and positive sizes.")
    out = {}
    for position, split in enumerate((train_split, test_split)):
        # "train" and "test" are always the same images, whatever the other split is called
        # (evaluate reads one split as both: --split train must give the training images).
        split_id = {"train": 0, "test": 1}.get(split, position)
        images, labels = synthetic_images(cfg, seed, split_id)

        def read(indices: np.ndarray, images=images, labels=labels) -> tf.data.Dataset:
            return tf.data.Dataset.from_tensor_slices(
                {"image": images[indices], "label": labels[indices]}
            )

        out[split] = SplitSource(len(labels), read, frozenset([(cfg["size"], cfg["size"])]),
                                 labels=labels)
    return Source("synthetic", tuple(f"class_{i}" for i in range(k)), out)
