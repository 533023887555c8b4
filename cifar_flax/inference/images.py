"""Images for prediction, read and sized exactly as the run's input pipeline read its own.

Inputs are image files, folders (searched recursively; hidden entries ignored) or ``.npy`` files
of uint8 images (N, H, W, 3) or (H, W, 3). Files are decoded by the pipeline's own decoder
(data/sources.decode: JPEG/PNG/BMP/GIF; grayscale becomes RGB, an alpha channel is dropped) and
every image whose size differs from the run's input shape is resized with the pipeline's own host
resize (antialiased bilinear, rounded to uint8; data/input_pipeline.resize_example). The model
step then applies the run's evaluation preprocessing (resize to ``augment.resolution``,
normalisation). Each real file is read once, whatever names (symlinks, inputs given twice) lead
to it; a symlink that leads back into a folder containing it (a loop) is not followed. Problems
raise UserError naming the file or the loop; with ``skip_bad`` undecodable files and loops are
skipped and counted instead.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
from etils import epath

from cifar_flax import UserError, user_errors
from cifar_flax.data.input_pipeline import resize_example
from cifar_flax.data.sources import IMAGE_EXTENSIONS, decode


def _real(path: epath.Path) -> str:
    """The path with every symlink resolved (local files; a URL has no symlinks)."""
    return str(path) if "://" in str(path) else os.path.realpath(path)


class _Walk:
    """Files under inputs, each real file once (deduplicated by real path). A symlinked folder
    is followed only when its real path is not a folder already walked; one that leads back into
    a folder being walked is a loop: a UserError naming it, or with ``loops`` given, added there
    (``"<link> -> <folder>"``) and skipped."""

    def __init__(self, loops: list[str] | None) -> None:
        self.loops = loops
        self.files: list[epath.Path] = []
        self.seen: set[str] = set()  # Real paths of the files listed.
        self.found = 0  # Files met, second names included.
        self.walked: set[str] = set()  # Real paths of the folders entered.

    def add_file(self, path: epath.Path) -> None:
        """List ``path`` unless its real file is listed already."""
        self.found += 1
        real = _real(path)
        if real not in self.seen:
            self.seen.add(real)
            self.files.append(path)

    def walk(self, folder: epath.Path, ancestors: dict[str, epath.Path]) -> None:
        """Every non-hidden file under ``folder`` (sorted by path); ``ancestors``: real path ->
        path as walked of the folders that contain it (itself included)."""
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                self.add_file(entry)
                continue
            real = _real(entry)
            if real in ancestors:
                self.loop(entry, ancestors[real])
            elif real not in self.walked:  # Else a second name of a folder already listed.
                self.walked.add(real)
                self.walk(entry, {**ancestors, real: entry})

    def loop(self, link: epath.Path, target: epath.Path) -> None:
        """A symlink that leads back into a folder being walked: an error, or skipped."""
        if self.loops is None:
            raise UserError(f"symlink loop: {link} -> {target} (a folder that contains it); "
                            "remove the link, or pass --skip_bad to skip it.")
        self.loops.append(f"{link} -> {target}")


def collect(inputs: Sequence[str], loops: list[str] | None = None) -> list[epath.Path]:
    """The files that ``inputs`` (files and folders) name, in order, each real file once;
    folders recursively. A symlink loop in a folder is a UserError, or with ``loops`` given is
    skipped and described there."""
    found = _Walk(loops)
    for name in inputs:
        path = epath.Path(name)
        if not path.exists():
            raise UserError(f"{name} does not exist; pass image files, folders or .npy files.")
        if not path.is_dir():
            found.add_file(path)
            continue
        before, real = found.found, _real(path)
        found.walked.add(real)
        found.walk(path, {real: path})
        if found.found == before:
            raise UserError(f"folder {name} contains no files; put images in it.")
    return found.files


def load_npy(path: epath.Path) -> np.ndarray:
    """A .npy of uint8 images as (N, H, W, 3); UserError on another dtype or shape."""
    with (user_errors(lambda e: f"{path} is not a readable .npy file ({e}).", ValueError, OSError),
          path.open("rb") as f):
        array = np.load(f, allow_pickle=False)
    shape = array.shape
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape:
        raise UserError(
            f"{path} holds {array.dtype} {shape}; expected uint8 images (N, H, W, 3) or "
            "(H, W, 3) with pixel values 0..255 (e.g. np.save(path, images.astype(np.uint8)))."
        )
    return array


def resize_like_pipeline(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (height, width, 3) exactly as the host pipeline resizes (unchanged when
    the size already matches)."""
    out = resize_example({"image": tf.constant(image), "label": 0}, h=height, w=width)
    return out["image"].numpy()


def decode_file(path: epath.Path) -> np.ndarray:
    """One image file as uint8 (h, w, 3); UserError when it is not a decodable image."""
    image, problem = _decoded(path)
    if image is None:
        raise UserError(problem)
    return image


def _decoded(path: epath.Path) -> tuple[np.ndarray | None, str]:
    """``(uint8 (h, w, 3), "")``, or ``(None, why)`` when ``path`` is not a decodable image
    (the line that names it): the caller raises it, or with --skip_bad counts the file."""
    if not path.name.lower().endswith(IMAGE_EXTENSIONS):
        return None, (f"{path} is not an image file (expected {'/'.join(IMAGE_EXTENSIONS)} "
                      "or .npy); remove it or pass --skip_bad to skip bad files.")
    try:
        return decode(tf.constant(path.read_bytes())).numpy(), ""
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, (f"{path} cannot be decoded as an image ({reason[:120]}); fix or "
                      "remove it, or pass --skip_bad to skip bad files.")


class ImageInputs:
    """Named uint8 images of one shape, in batches; ``skipped`` lists bad files left out,
    ``loops`` the symlink loops not followed (``"<link> -> <folder>"``; with ``skip_bad``)."""

    def __init__(self, inputs: Sequence[str], image_shape: Sequence[int], skip_bad: bool = False):
        self.loops: list[str] = []
        self.files = collect(inputs, self.loops if skip_bad else None)
        self.height, self.width = int(image_shape[0]), int(image_shape[1])
        self.skip_bad = skip_bad
        self.skipped: list[str] = []
        for f in self.files:  # Array files are checked up front: a wrong one is never skipped.
            if f.name.lower().endswith(".npy"):
                load_npy(f)

    def _items(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in self.files:
            if f.name.lower().endswith(".npy"):
                for i, image in enumerate(load_npy(f)):
                    yield f"{f}[{i}]", image
                continue
            image, problem = _decoded(f)
            if image is not None:
                yield str(f), image
            elif self.skip_bad:
                self.skipped.append(str(f))
            else:
                raise UserError(problem)

    def batches(self, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """(names, uint8 (n, H, W, 3)) with n <= batch_size, in input order."""
        names, images = [], []
        for name, image in self._items():
            names.append(name)
            images.append(resize_like_pipeline(image, self.height, self.width))
            if len(names) == batch_size:
                yield names, np.stack(images)
                names, images = [], []
        if names:
            yield names, np.stack(images)
