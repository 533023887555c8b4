"""Corrupted copies of a test split: the 15 corruptions of Hendrycks & Dietterich (ICLR 2019) at
severities 1-5, generated for any split by the maintained library ``imagecorruptions-imaug``
(the ``robustness`` extra), or read as released (tfds' prepared ``cifar10_corrupted``).

**Generated** (:class:`GeneratedSet`):

- Applied to each image as its source stores it (uint8 at its own size, :func:`read_images`),
  before the run's host resize (:func:`to_run_shape`) and the model's resize, as the released
  32x32 set was made from the 32x32 test images.
- Severity scale: the library's, which are ImageNet-C's constants (gaussian noise sigma 0.08 to
  0.38), not the smaller ones the released 32x32 set used (0.04 to 0.10): the numbers do not
  compare with published ones, and :func:`severity_scale` says so in every result.
- Reproducible bit for bit: each (image, corruption, severity) draws from its own seed,
  :func:`image_seed` ``= SeedSequence([seed, corruption number, severity, image index])``, the
  index in the physical split (a subset's images are those of the full set). Most corruptions
  draw from NumPy's global RNG (seeded around each call, its state put back after);
  impulse_noise draws from scikit-image's own generator and glass_blur from numba's, both
  seeded through the library's ``seed`` argument; the others draw nothing. The pixels also
  depend on the versions of what the library computes with (:func:`versions`), so they are part
  of the cache key.
- Cached in :func:`cache_folder` (``<$CIFAR_FLAX_CACHE>/corruptions/<key>/``; evaluate refuses
  one inside a run's workdir), ``key`` a hash of the images (pixels, sizes, indices), the seed
  and the versions; one file per corruption x severity (``<corruption>_<severity>.npz``),
  written under a temporary name and renamed when complete (``cifar_flax.atomic_file``): an
  interrupted generation resumes at the first missing file and a rerun generates nothing.

**Released** (:func:`released_config`): tfds' ``cifar10_corrupted/<name>_<severity>``, read
as it is from a ``data_dir`` that has it prepared (never downloaded here: :func:`check_released`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import zipfile
from typing import Any, Callable, Iterable, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tqdm import tqdm

from cifar_flax import UserError, atomic_file, brief, user_errors
from cifar_flax.data import sources
from cifar_flax.data.input_pipeline import resize_example
from cifar_flax.weights.store import cache_root

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
LIBRARY = "imagecorruptions-imaug"
INSTALL = "pip install -e '.[robustness]'"
MIN_SIZE = 32  # The library refuses smaller images.
_OWN_RNG = ("impulse_noise", "glass_blur")  # Draw from scikit-image's / numba's RNG: seed=.
# What the library computes with (module: distribution), recorded with its own version.
_COMPUTES_WITH = {"numpy": "numpy", "scipy": "scipy", "skimage": "scikit-image",
                  "cv2": "opencv", "PIL": "pillow", "numba": "numba"}
SUBSET_RULE = ("a seeded choice: numpy.random.default_rng([seed, 0xC0]).choice(n, num_images, "
               "replace=False), sorted")
# tfds' names of the released set's corruptions, where they differ from the library's.
RELEASED_NAMES = {"glass_blur": "frosted_glass_blur", "elastic_transform": "elastic"}
RELEASED = "cifar10_corrupted"


def library() -> Any:
    """The ``imagecorruptions`` module; UserError naming the extra to install when missing."""
    with user_errors(lambda e: f"generating corruptions needs the {LIBRARY} package, which is "
                     f"not installed here ({brief(e)}); install it with: {INSTALL}", ImportError):
        # Optional (the robustness extra) and slow to import (OpenCV, numba): only when used.
        import imagecorruptions
    return imagecorruptions


def cache_folder() -> epath.Path:
    """Where generated sets are cached: ``corruptions/`` in the project's one cache root
    (weights/store.cache_root: ``$CIFAR_FLAX_CACHE``, else ``~/.cache/cifar_flax``)."""
    return cache_root() / "corruptions"


def versions() -> dict[str, str]:
    """The library's version and those of the packages it computes with."""
    library()
    out = {LIBRARY: importlib.metadata.version(LIBRARY)}
    for module, name in _COMPUTES_WITH.items():
        out[name] = str(getattr(sys.modules.get(module), "__version__", "unknown"))
    return out


def severity_scale(images: Sequence[np.ndarray]) -> str:
    """How severe the generated corruptions are, and at which size they were applied."""
    sizes = sorted({im.shape[:2] for im in images})
    at = (f"{sizes[0][0]}x{sizes[0][1]}" if len(sizes) == 1 else
          f"each image's own size ({sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]})")
    return f"ImageNet-C constants via {LIBRARY} {versions()[LIBRARY]}, applied at {at}"


def image_seed(seed: int, index: int, corruption: str, severity: int) -> int:
    """The seed of one image's corruption: from (seed, corruption number, severity, index)."""
    entropy = [seed, CORRUPTIONS.index(corruption), severity, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def corrupt(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 (h, w, 3)) with ``corruption`` at ``severity``, every draw from ``seed``;
    NumPy's global RNG is left as it was."""
    lib = library()
    extra = {"seed": seed} if corruption in _OWN_RNG else {}
    with contextlib.ExitStack() as restore:  # NumPy's global RNG, however the call ends.
        restore.callback(np.random.set_state, np.random.get_state())
        np.random.seed(seed)
        out = lib.corrupt(image, severity=severity, corruption_name=corruption, **extra)
    if out.shape != image.shape:
        raise ValueError(f"{corruption} changed an image's shape {image.shape} -> {out.shape}.")
    return out


def choose(n: int, num_images: int, seed: int) -> np.ndarray:
    """Sorted indices of the images to corrupt: all ``n``, or ``num_images`` of them by
    SUBSET_RULE (the same for every run given the same split and seed)."""
    if not num_images or num_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0xC0]).choice(n, num_images, replace=False))


def read_images(config: ml_collections.ConfigDict, split: str, indices: np.ndarray
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """(images, labels) at sorted ``indices`` of the physical ``split`` of ``config.dataset``,
    uint8 at the size the source stores them (no resize)."""
    images, labels = [], []
    read = sources.get_source(config).splits[split].read(np.asarray(indices, np.int64))
    for ex in read.as_numpy_iterator():
        images.append(ex["image"])
        labels.append(ex["label"])
    return images, np.asarray(labels, np.int32)


def split_size(config: ml_collections.ConfigDict, split: str) -> int:
    """The number of examples of the physical ``split`` of ``config.dataset``."""
    return sources.get_source(config).splits[split].num_examples


def to_run_shape(images: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
    """(N, h, w, 3) uint8: each image resized as the host pipeline resizes (resize_example),
    unchanged where it already has that size."""
    out = np.empty((len(images), h, w, 3), np.uint8)
    groups = collections.defaultdict(list)
    for i, image in enumerate(images):
        groups[image.shape].append(i)
    for shape, idx in groups.items():
        group = np.stack([images[i] for i in idx])
        if shape[:2] != (h, w):
            ds = tf.data.Dataset.from_tensor_slices({"image": group, "label": np.zeros(len(idx))})
            ds = ds.map(functools.partial(resize_example, h=h, w=w)).batch(512)
            group = np.concatenate([b["image"] for b in ds.as_numpy_iterator()])
        out[idx] = group
    return out


@dataclasses.dataclass
class GeneratedSet:
    """The corrupted copies of ``images`` (at ``indices`` of their split) under ``root``."""

    root: epath.Path  # cache_folder(), or any folder
    images: Sequence[np.ndarray]
    indices: np.ndarray
    seed: int = 0
    calls: int = 0  # Images corrupted by this object (a resumed set generates none).

    def __post_init__(self) -> None:
        small = [im.shape[:2] for im in self.images if min(im.shape[:2]) < MIN_SIZE]
        if small:
            raise UserError(f"{len(small)} of the images are smaller than {MIN_SIZE}x{MIN_SIZE} "
                            f"(e.g. {small[0][0]}x{small[0][1]}), which {LIBRARY} cannot "
                            "corrupt; evaluate images of at least that size.")
        digest = hashlib.sha256(np.asarray(self.indices, np.int64).tobytes())
        for image in self.images:
            digest.update(np.asarray(image.shape, np.int64).tobytes())
            digest.update(np.ascontiguousarray(image).tobytes())
        self.key = {"images": digest.hexdigest(), "count": len(self.images), "seed": self.seed,
                    "versions": versions()}
        name = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = epath.Path(self.root) / name

    def path(self, corruption: str, severity: int) -> epath.Path:
        return self.folder / f"{corruption}_{severity}.npz"

    def generate(self, cells: Iterable[tuple[str, int]], progress: bool = True) -> None:
        """Write the files of ``cells`` ((corruption, severity) pairs) that are not there yet."""
        todo = [c for c in cells if not self.path(*c).exists()]
        if not todo:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "key.json").write_text(json.dumps(self.key, indent=2))
        logging.info("Generating %d corruption x severity files of %d images in %s.",
                     len(todo), len(self.images), self.folder)
        with tqdm(total=len(todo) * len(self.images), desc="generating corruptions",
                  unit="img", disable=None if progress else True) as bar:
            for corruption, severity in todo:
                out = []
                for image, index in zip(self.images, self.indices):
                    seed = image_seed(self.seed, int(index), corruption, severity)
                    out.append(corrupt(image, corruption, severity, seed))
                    self.calls += 1
                    bar.update(1)
                _write(self.path(corruption, severity), out)

    def load(self, corruption: str, severity: int) -> list[np.ndarray]:
        """The corrupted images of one cell (generated first when missing)."""
        path = self.path(corruption, severity)
        self.generate([(corruption, severity)], progress=False)
        with (user_errors(lambda e: f"the cached corruptions {path} cannot be read ({brief(e)}); "
                          "delete that file and rerun to generate it again.",
                          OSError, ValueError, KeyError, zipfile.BadZipFile),
              path.open("rb") as f, np.load(f, allow_pickle=False) as z):
            pixels, shapes = z["pixels"], z["shapes"]
            ends = np.cumsum([np.prod(s) for s in shapes])
            if len(shapes) != len(self.images) or sum(ends[-1:]) != pixels.size:
                raise ValueError(f"{len(shapes)} images of {pixels.size} pixels in all, where "
                                 f"{len(self.images)} images were cached")
            return [p.reshape(s) for p, s in zip(np.split(pixels, ends[:-1]), shapes)]


def _write(path: epath.Path, images: list[np.ndarray]) -> None:
    """Save ``images`` (any sizes) at ``path`` atomically (a temporary file, then renamed)."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        np.savez(f, pixels=np.concatenate([im.reshape(-1) for im in images]),
                 shapes=np.asarray([im.shape for im in images], np.int64))


def released_name(corruption: str, severity: int) -> str:
    """tfds' name of one cell of the released set, e.g. ``cifar10_corrupted/fog_3``."""
    return f"{RELEASED}/{RELEASED_NAMES.get(corruption, corruption)}_{severity}"


def check_released(data_dir: str, cells: Iterable[tuple[str, int]]) -> None:
    """UserError unless every cell of the released set is prepared in ``data_dir`` (it is not
    downloaded here: 2.9 GB, and this may be an offline machine)."""
    for corruption, severity in cells:
        name = released_name(corruption, severity)
        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():
            raise UserError(
                f"the released set {name} is not prepared in data_dir "
                f"{os.fspath(builder.data_dir_root)!r}; prepare it on a machine with network "
                f"(tfds build {RELEASED} --config {name.split('/')[1]} --data_dir DIR, or all "
                f"of it) and pass --config.data_dir=DIR, or use --corruption_set=generated.")


def released_config(config: ml_collections.ConfigDict, corruption: str, severity: int
                    ) -> ml_collections.ConfigDict:
    """``config`` reading one cell of the released set as its (test) split."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.dataset = released_name(corruption, severity)
    out.train_split = out.test_split = "test"
    out.val_split = ""
    return out


def released(config: ml_collections.ConfigDict, cells: Sequence[tuple[str, int]],
             indices: np.ndarray, labels: np.ndarray) -> Callable[[str, int], list[np.ndarray]]:
    """``load(corruption, severity)``: the images at ``indices`` of one cell of the released
    set, checked to carry ``labels`` (the clean split's: the same images in the same order)."""
    check_released(config.data_dir, cells)

    def load(corruption: str, severity: int) -> list[np.ndarray]:
        images, got = read_images(released_config(config, corruption, severity), "test", indices)
        if not np.array_equal(got, labels):
            raise UserError(
                f"{released_name(corruption, severity)} has other labels than split "
                f"{config.test_split!r} of {config.dataset} at the same indices (not the same "
                "images in the same order): evaluate tfds' CIFAR-10 test split "
                "(--config.dataset=cifar10) with the released set.")
        return images

    return load
