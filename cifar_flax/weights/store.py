"""Converted weights on disk and the cache: ``<dir>/spec.json`` + ``<dir>/state`` (Orbax).

:func:`load_pretrained` is the one call the trainer makes: the converted weights of a source from
the cache (``$CIFAR_FLAX_CACHE``, default ``~/.cache/cifar_flax``) when they were converted
before, else converted once from a local file or a verified download and cached. Every path may
be local or remote (``gs://...``): paths go through ``etils.epath``. :func:`extract_features`:
the pooled backbone features of uint8 images with converted weights (the ``features`` command).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from tqdm import tqdm

from cifar_flax import UserError, models
from cifar_flax.data import preprocessing
from cifar_flax.weights.convert import backbone_shapes, convert_file
from cifar_flax.weights.files import as_path, download, file_hash
from cifar_flax.weights.registry import RELEASES, PretrainedWeights, WeightSpec, source_spec

SPEC_FILE = "spec.json"
STATE_DIR = "state"


def _checkpointer() -> Any:
    # Process-local: every host of a multi-host job reads and writes its own cache.
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def is_converted(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds converted weights (written by :func:`save_weights`)."""
    d = as_path(directory)
    return (d / SPEC_FILE).is_file() and (d / STATE_DIR).is_dir()


def save_weights(weights: PretrainedWeights, directory: str | os.PathLike) -> None:
    """Write converted weights to ``directory`` atomically (a temp dir renamed into place)."""
    directory = as_path(directory)
    if directory.is_dir() and any(directory.iterdir()) and not is_converted(directory):
        raise UserError(
            f"{directory} exists and does not hold converted weights; choose a new or empty "
            "output directory."
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp{uuid.uuid4().hex[:8]}"
    try:
        ckptr = _checkpointer()
        ckptr.save(tmp / STATE_DIR,
                   {"params": weights.params, "batch_stats": weights.batch_stats})
        ckptr.wait_until_finished()
        ckptr.close()
        (tmp / SPEC_FILE).write_text(json.dumps(weights.spec.to_json(), indent=2))
        if directory.is_dir():
            directory.rmtree()
        tmp.rename(directory)
    finally:
        if tmp.exists():
            tmp.rmtree()


def load_weights(directory: str | os.PathLike) -> PretrainedWeights:
    """Read weights written by :func:`save_weights` (or the ``convert`` CLI)."""
    if not is_converted(directory):
        raise UserError(
            f"{str(directory)!r} does not hold converted weights (no {SPEC_FILE} + {STATE_DIR}/); "
            "create it with: python -m cifar_flax.pretrained convert --source=... --input=FILE "
            f"--output={directory}"
        )
    d = as_path(directory)
    spec = WeightSpec.from_json(json.loads((d / SPEC_FILE).read_text()))
    target = traverse_util.unflatten_dict({
        k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in backbone_shapes(spec.layout).items()
    })
    ckptr = _checkpointer()
    state = ckptr.restore(d / STATE_DIR, target)
    ckptr.close()
    return PretrainedWeights(state["params"], state["batch_stats"], spec)


def cache_root(cache_dir: str = "") -> epath.Path:
    """``cache_dir``, else ``$CIFAR_FLAX_CACHE``, else ``~/.cache/cifar_flax``."""
    return as_path(cache_dir or os.environ.get("CIFAR_FLAX_CACHE") or "~/.cache/cifar_flax")


def _offline_hint(source: str, url: str) -> str:
    """How to pass a copy of the release file ``url`` instead of downloading it (a sentence)."""
    name = os.path.basename(url)
    return (
        f"Download {name} elsewhere and pass it with --config.pretrained.file=/path/to/{name} "
        f"(or convert it first: python -m cifar_flax.pretrained convert --source={source} "
        f"--input=/path/to/{name} --output=DIR, then --config.pretrained.file=DIR)."
    )


def _downloaded(source: str, variant: str, root: epath.Path) -> epath.Path:
    """The cached release file of ``source``/``variant``, downloaded and verified if needed."""
    release = RELEASES[source][variant]
    path = root / "downloads" / os.path.basename(release.url)
    if not (path.is_file() and file_hash(path, release.algorithm) == release.digest):
        download(release.url, path, release.algorithm, release.digest,
                 _offline_hint(source, release.url))
    return path


def load_pretrained(
    source: str, variant: str = "", file: str = "", cache_dir: str = ""
) -> PretrainedWeights:
    """Converted ImageNet weights of ``source``: cached, else converted from ``file`` or a download.

    ``file`` may be a weight file of the source (converted once, cached by its sha256) or a
    directory written by the ``convert`` CLI (used as is).
    """
    if not source:
        raise UserError("pretrained.source is '' (random init): there are no weights to load.")
    spec = source_spec(source, variant)
    if file and as_path(file).is_dir():
        weights = load_weights(file)
        if weights.spec.source != source:
            raise UserError(f"{file!r} holds {weights.spec.source} weights, not {source}; "
                            "set pretrained.source to match.")
        return weights
    if file and not as_path(file).is_file():
        raise UserError(f"pretrained.file {file!r} does not exist.")
    root = cache_root(cache_dir)
    name = f"file-{file_hash(file, 'sha256')[:16]}" if file else spec.variant
    target = root / "converted" / f"{source}-{name}"
    if is_converted(target):
        return load_weights(target)
    if file:
        weights = convert_file(source, file)
    else:
        weights = convert_file(source, _downloaded(source, spec.variant, root), spec.variant)
    try:
        save_weights(weights, target)
    except OSError as e:  # A read-only or full cache only costs a conversion next time.
        logging.warning("Could not cache converted weights in %s: %s", target, e)
    return weights


def check_images(images: np.ndarray) -> None:
    """Raise a UserError unless ``images`` is uint8 NHWC, 3 channels, at least 32x32."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(
            f"Images must be uint8 NHWC with 3 channels, got {images.dtype} {images.shape}."
        )
    if min(images.shape[1:3]) < 32:
        raise UserError(f"Images must be at least 32x32, got {images.shape[1:3]}.")


def extract_features(
    weights: PretrainedWeights, images: np.ndarray, batch_size: int = 64, dtype: str = "float32",
    progress: bool = False,
) -> np.ndarray:
    """Pooled (N, 2048) float32 backbone features of uint8 NHWC images, in inference mode.

    Images run ``batch_size`` at a time; the last batch is padded so that one compiled function
    serves every batch.
    """
    check_images(images)
    spec = weights.spec
    model = models.create_model(num_classes=1, layout=spec.layout, dtype=dtype)
    variables = jax.device_put({"params": weights.params, "batch_stats": weights.batch_stats})

    @jax.jit
    def run(variables: dict, x: jnp.ndarray) -> jnp.ndarray:
        x = preprocessing.normalize(x, spec.preprocessing, model.dtype)
        return model.apply(variables, x, method=model.features)

    n = len(images)
    out = np.zeros((n, models.FEATURE_DIM), np.float32)
    starts = range(0, n, batch_size)
    if progress:
        starts = tqdm(starts, unit="batch", desc="features")
    for start in starts:
        batch = np.asarray(images[start:start + batch_size])
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        out[start:start + batch_size] = np.asarray(run(variables, batch))[: batch_size - pad]
    return out
