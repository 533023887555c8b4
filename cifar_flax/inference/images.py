"""Images for prediction, read and sized exactly as the run's input pipeline read its own.

Inputs are image files, folders (searched recursively; hidden entries ignored) or ``.npy`` files
of uint8 images (N, H, W, 3) or (H, W, 3). Files are decoded by the pipeline's own decoder
(data/types.decode: JPEG/PNG/BMP/GIF; grayscale becomes RGB, an alpha channel is dropped) and
every image whose size differs from the run's input shape is resized with the pipeline's own host
resize (antialiased bilinear, rounded to uint8; data/input_pipeline.resize_example). The model step then
applies the run's evaluation preprocessing (resize to ``augment.resolution``, normalisation).
Problems raise UserError naming the file; with ``skip_bad`` undecodable files are skipped and
counted instead.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
from etils import epath

from cifar_flax import UserError
from cifar_flax.data.input_pipeline import resize_example
from cifar_flax.data.sources import IMAGE_EXTENSIONS, decode


def _walk(folder: epath.Path) -> list[epath.Path]:
    """Every non-hidden file under ``folder``, sorted by path."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        out += _walk(entry) if entry.is_dir() else [entry]
    return out


def collect(inputs: Sequence[str]) -> list[epath.Path]:
    """The files that ``inputs`` (files and folders) name, in order; folders recursively."""
    files = []
    for name in inputs:
        path = epath.Path(name)
        if not path.exists():
            raise UserError(f"{name} does not exist; pass image files, folders or .npy files.")
        if path.is_dir():
            found = _walk(path)
            if not found:
                raise UserError(f"folder {name} contains no files; put images in it.")
            files += found
        else:
            files.append(path)
    return files


def load_npy(path: epath.Path) -> np.ndarray:
    """A .npy of uint8 images as (N, H, W, 3); UserError on another dtype or shape."""
    try:
        with path.open("rb") as f:
            array = np.load(f, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npy file ({e}).") from None
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
    if not path.name.lower().endswith(IMAGE_EXTENSIONS):
        raise UserError(f"{path} is not an image file (expected {'/'.join(IMAGE_EXTENSIONS)} "
                         "or .npy); remove it or pass --skip-bad to skip bad files.")
    try:
        return decode(tf.constant(path.read_bytes())).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be decoded as an image ({reason[:120]}); fix or "
                         "remove it, or pass --skip-bad to skip bad files.") from None


class ImageInputs:
    """Named uint8 images of one shape, in batches; ``skipped`` lists bad files left out."""

    def __init__(self, inputs: Sequence[str], image_shape: Sequence[int], skip_bad: bool = False):
        self.files = collect(inputs)
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
            try:
                yield str(f), decode_file(f)
            except UserError:
                if not self.skip_bad:
                    raise
                self.skipped.append(str(f))

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
