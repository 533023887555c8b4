"""ImageNet ResNet50 weights: sources, download + cache, exact conversion to the Flax model, CLI.

Two sources, each with its own layout and preprocessing (``source_spec``):

- ``torchvision``: ``IMAGENET1K_V1`` / ``IMAGENET1K_V2`` (default) state dicts, layout ``v1.5``,
  torchvision preprocessing;
- ``keras``: the ``keras.applications`` notop release, layout ``v1``, Keras "caffe" preprocessing.

``load_pretrained`` returns the converted backbone, from the cache (``$CIFAR_FLAX_CACHE``, default
``~/.cache/cifar_flax``) when it was converted before, else from a local file or a verified
download. Conversion is strict: every Flax parameter and BatchNorm statistic is filled exactly once
with the right shape, and anything else in the file except the ImageNet classifier is an error.

CLI::

    python -m cifar_flax.pretrained convert --source {keras,torchvision} --input FILE --output DIR
    python -m cifar_flax.pretrained features --weights DIR --images IMAGES.npy --output FEATS.npy
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cifar_flax import models, preprocessing
from cifar_flax.preprocessing import Preprocessing
from cifar_flax.weights_io import WeightsError, download, file_hash, read_state_dict

__all__ = [
    "WeightSpec", "PretrainedWeights", "WeightsError", "RELEASES", "source_spec",
    "load_pretrained", "convert_file", "convert_state_dict", "merge_into", "save_weights",
    "load_weights", "extract_features", "cache_root", "main",
]

SPEC_FILE = "spec.json"
STATE_DIR = "state"


@dataclasses.dataclass(frozen=True)
class Release:
    """A published weight file and its checksum."""

    url: str
    algorithm: str  # "sha256" or "md5"
    digest: str


# torchvision names its files after the sha256 prefix; the full digests are the ones torchvision
# users record for these files. Keras publishes md5 digests (keras.applications.resnet).
RELEASES: dict[str, dict[str, Release]] = {
    "torchvision": {
        "IMAGENET1K_V1": Release(
            "https://download.pytorch.org/models/resnet50-0676ba61.pth", "sha256",
            "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
        "IMAGENET1K_V2": Release(
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "sha256",
            "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca"),
    },
    "keras": {
        "notop": Release(
            "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5",
            "4d473c1dd8becc155b73f8504c6f6626"),
    },
}
DEFAULT_VARIANT = {"torchvision": "IMAGENET1K_V2", "keras": "notop"}
_LAYOUT = {"torchvision": "v1.5", "keras": "v1"}
_PREPROCESSING = {"torchvision": preprocessing.TORCH, "keras": preprocessing.CAFFE}
# Tensors of the published files that are not part of the backbone.
_DROPPED = {"torchvision": ("fc.",), "keras": ("predictions/",)}
_IGNORED_SUFFIX = ".num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where converted weights came from and what they need; stored as spec.json beside them."""

    source: str  # "keras" | "torchvision" | "" (random init)
    variant: str  # e.g. "IMAGENET1K_V2", "notop" or "local"
    layout: str  # "v1" (keras) | "v1.5" (torchvision)
    preprocessing: Preprocessing
    file_sha256: str = ""  # sha256 of the file the weights were converted from

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WeightSpec":
        return cls(d["source"], d["variant"], d["layout"],
                   Preprocessing.from_json(d["preprocessing"]), d.get("file_sha256", ""))


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """Converted backbone variables (``stem``, ``stage1``..``stage4``) as float32 numpy arrays."""

    params: dict
    batch_stats: dict
    spec: WeightSpec


def source_spec(source: str, variant: str = "", layout: str = "v1.5") -> WeightSpec:
    """The spec of a source/variant (no I/O). ``source=""`` is random init: ``layout``, SIMPLE."""
    if source == "":
        return WeightSpec("", "", layout, preprocessing.SIMPLE)
    if source not in RELEASES:
        raise WeightsError(
            f"Unknown pretrained.source {source!r}; expected one of {sorted(RELEASES)} or '' "
            "(random init)."
        )
    variant = variant or DEFAULT_VARIANT[source]
    if variant not in RELEASES[source] and variant != "local":
        raise WeightsError(
            f"Unknown pretrained.variant {variant!r} for source {source!r}; expected one of "
            f"{sorted(RELEASES[source])} or '' (the default, {DEFAULT_VARIANT[source]})."
        )
    return WeightSpec(source, variant, _LAYOUT[source], _PREPROCESSING[source])


# ---- name mapping: Flax path -> name in the published file ----

def _keras_name(module: tuple[str, ...], leaf: str) -> str:
    if module[0] == "stem":
        layer = f"conv1_{module[1]}"
    else:
        stage, block, name = int(module[0][5:]), int(module[1][5:]), module[2]
        kind = "conv" if "conv" in name else "bn"
        index = "0" if name.startswith("proj") else name[-1]
        layer = f"conv{stage + 1}_block{block}_{index}_{kind}"
    weight = {"kernel": "kernel", "scale": "gamma", "mean": "moving_mean",
              "var": "moving_variance"}.get(leaf, "beta" if layer.endswith("bn") else "bias")
    return f"{layer}/{weight}"


def _torch_name(module: tuple[str, ...], leaf: str) -> str:
    if module[0] == "stem":
        prefix = "conv1" if module[1] == "conv" else "bn1"
    else:
        stage, block, name = int(module[0][5:]), int(module[1][5:]), module[2]
        name = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}.get(name, name)
        prefix = f"layer{stage}.{block - 1}.{name}"
    weight = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}[leaf]
    return f"{prefix}.{weight}"


def _source_name(source: str, key: tuple[str, ...]) -> tuple[str, Callable[[tuple], tuple]]:
    """File tensor name for a flat Flax key, and the map from file shape to Flax shape."""
    module, leaf = key[1:-1], key[-1]
    if source == "keras":
        return _keras_name(module, leaf), lambda s: s
    # torch conv weights are OIHW, Flax kernels HWIO.
    perm = (lambda s: (s[2], s[3], s[1], s[0]) if len(s) == 4 else s) if leaf == "kernel" else (
        lambda s: s)
    return _torch_name(module, leaf), perm


@functools.lru_cache(maxsize=None)
def _backbone_shapes(layout: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{(collection, module..., leaf): shape}`` of the ResNet50 backbone in ``layout``."""
    model = models.ResNet50(layout=layout)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), method=model.features)
    )
    flat = traverse_util.flatten_dict(dict(abstract))
    return {k: tuple(v.shape) for k, v in flat.items()}


def _natural(name: str) -> list:
    """Sort key that orders layer2 before layer10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _listing(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names, key=_natural)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def convert_state_dict(
    source: str, tensors: dict[str, np.ndarray], origin: str = "the file"
) -> tuple[dict, dict]:
    """Strictly map a flat state dict onto the Flax backbone: ``(params, batch_stats)``."""
    spec = source_spec(source)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    used, missing, wrong = set(), [], []
    for key, shape in _backbone_shapes(spec.layout).items():
        name, to_flax = _source_name(source, key)
        if name not in tensors:
            missing.append(name)
            continue
        used.add(name)
        value = np.asarray(tensors[name])
        if to_flax(value.shape) != shape or value.ndim != len(shape):
            need = shape if source == "keras" else _torch_shape(shape)
            wrong.append(f"{name} {tuple(value.shape)} (ResNet50: {need})")
            continue
        if source == "torchvision" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        flat[key] = np.ascontiguousarray(value, dtype=np.float32)
    unexpected = [
        n for n in tensors
        if n not in used and not n.startswith(_DROPPED[source]) and not n.endswith(_IGNORED_SUFFIX)
    ]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{origin} is not a {source} ResNet50 weight file: {len(missing)} missing tensor(s) "
            f"[{_listing(missing)}]; {len(unexpected)} unexpected [{_listing(unexpected)}]; "
            f"{len(wrong)} with the wrong shape [{_listing(wrong, 4)}]. Check --source / "
            "pretrained.source and that the file holds ResNet50 weights."
        )
    nested = traverse_util.unflatten_dict(flat)
    return nested["params"], nested["batch_stats"]


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    s = flax_shape
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s


def convert_file(source: str, path: str, variant: str = "local") -> PretrainedWeights:
    """Strictly convert one local weight file of ``source`` (see weights_io for formats)."""
    spec = source_spec(source, variant)
    tensors = read_state_dict(path)
    params, batch_stats = convert_state_dict(source, tensors, origin=repr(path))
    spec = dataclasses.replace(spec, file_sha256=file_hash(path, "sha256"))
    return PretrainedWeights(params, batch_stats, spec)


# ---- converted weights on disk: <dir>/spec.json + <dir>/state (Orbax) ----

def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    # Process-local: every host of a multi-host job reads and writes its own cache.
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def is_converted(directory: str) -> bool:
    """Whether ``directory`` holds converted weights (written by :func:`save_weights`)."""
    return os.path.isfile(os.path.join(directory, SPEC_FILE)) and os.path.isdir(
        os.path.join(directory, STATE_DIR)
    )


def save_weights(weights: PretrainedWeights, directory: str) -> None:
    """Write converted weights to ``directory`` atomically (a temp dir renamed into place)."""
    directory = os.path.abspath(directory)
    if os.path.isdir(directory) and os.listdir(directory) and not is_converted(directory):
        raise WeightsError(
            f"{directory} exists and does not hold converted weights; choose a new or empty "
            "output directory."
        )
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp")
    try:
        ckptr = _checkpointer()
        ckptr.save(os.path.join(tmp, STATE_DIR),
                   {"params": weights.params, "batch_stats": weights.batch_stats})
        ckptr.wait_until_finished()
        ckptr.close()
        with open(os.path.join(tmp, SPEC_FILE), "w") as f:
            json.dump(weights.spec.to_json(), f, indent=2)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_weights(directory: str) -> PretrainedWeights:
    """Read weights written by :func:`save_weights` (or the ``convert`` CLI)."""
    if not is_converted(directory):
        raise WeightsError(
            f"{directory!r} does not hold converted weights (no {SPEC_FILE} + {STATE_DIR}/); "
            "create it with: python -m cifar_flax.pretrained convert --source ... --input FILE "
            f"--output {directory}"
        )
    with open(os.path.join(directory, SPEC_FILE)) as f:
        spec = WeightSpec.from_json(json.load(f))
    target = traverse_util.unflatten_dict({
        k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in _backbone_shapes(spec.layout).items()
    })
    ckptr = _checkpointer()
    state = ckptr.restore(os.path.abspath(os.path.join(directory, STATE_DIR)), target)
    ckptr.close()
    return PretrainedWeights(state["params"], state["batch_stats"], spec)


# ---- the cache and the one call the trainer makes ----

def cache_root(cache_dir: str = "") -> str:
    """``cache_dir``, else ``$CIFAR_FLAX_CACHE``, else ``~/.cache/cifar_flax``."""
    return os.path.expanduser(
        cache_dir or os.environ.get("CIFAR_FLAX_CACHE") or "~/.cache/cifar_flax"
    )


def _offline_hint(source: str, url: str) -> str:
    name = os.path.basename(url)
    return (
        f"Offline? Download {name} elsewhere and pass it with --config.pretrained.file=/path/to/"
        f"{name} (or convert it: python -m cifar_flax.pretrained convert --source {source} "
        f"--input /path/to/{name} --output DIR)."
    )


def load_pretrained(
    source: str, variant: str = "", file: str = "", cache_dir: str = ""
) -> PretrainedWeights:
    """Converted ImageNet weights of ``source``: cached, else converted from ``file`` or a download.

    ``file`` may be a weight file of the source (converted once, cached by its sha256) or a
    directory written by the ``convert`` CLI (used as is).
    """
    if not source:
        raise WeightsError("pretrained.source is '' (random init): there are no weights to load.")
    spec = source_spec(source, variant)
    if file and os.path.isdir(file):
        weights = load_weights(file)
        if weights.spec.source != source:
            raise WeightsError(f"{file!r} holds {weights.spec.source} weights, not {source}; "
                               "set pretrained.source to match.")
        return weights
    root = cache_root(cache_dir)
    if file:
        if not os.path.isfile(file):
            raise WeightsError(f"pretrained.file {file!r} does not exist.")
        target = os.path.join(root, "converted", f"{source}-file-{file_hash(file, 'sha256')[:16]}")
    else:
        target = os.path.join(root, "converted", f"{source}-{spec.variant}")
    if is_converted(target):
        return load_weights(target)
    if file:
        weights = convert_file(source, file)
    else:
        release = RELEASES[source][spec.variant]
        path = os.path.join(root, "downloads", os.path.basename(release.url))
        if not (os.path.isfile(path) and file_hash(path, release.algorithm) == release.digest):
            download(release.url, path, release.algorithm, release.digest,
                     _offline_hint(source, release.url))
        weights = convert_file(source, path, spec.variant)
    try:
        save_weights(weights, target)
    except OSError as e:  # A read-only or full cache only costs a conversion next time.
        logging.warning("Could not cache converted weights in %s: %s", target, e)
    return weights


def merge_into(variables: dict, weights: PretrainedWeights) -> dict:
    """Model variables with every backbone entry replaced by the pretrained one; head untouched.

    Strict both ways: each backbone parameter/statistic of the model must be in ``weights`` with
    the same shape and vice versa.
    """
    out = {}
    for collection, src in (("params", weights.params), ("batch_stats", weights.batch_stats)):
        model_flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        new_flat = traverse_util.flatten_dict(src)
        backbone = {k for k in model_flat if k[0] in models.BACKBONE_MODULES}
        problems = [("/".join(k), "missing in the model") for k in sorted(set(new_flat) - backbone)]
        problems += [
            ("/".join(k), "missing in the weights") for k in sorted(backbone - set(new_flat))
        ]
        problems += [
            ("/".join(k), f"model {tuple(model_flat[k].shape)} vs weights {new_flat[k].shape}")
            for k in sorted(backbone & set(new_flat))
            if tuple(model_flat[k].shape) != tuple(new_flat[k].shape)
        ]
        if problems:
            path, what = problems[0]
            raise WeightsError(
                f"The {weights.spec.source} weights don't fit the model: {collection}/{path} "
                f"{what} ({len(problems)} mismatch(es)). They need model.layout="
                f"{weights.spec.layout!r}, model.stage_sizes=(3, 4, 6, 3) and model.base_width=64."
            )
        filled = traverse_util.unflatten_dict(
            {k: jnp.asarray(new_flat[k], dtype=model_flat[k].dtype) for k in backbone}
        )
        out[collection] = {**variables.get(collection, {}), **filled}
    return {**variables, **out}


# ---- features ----

def extract_features(
    weights: PretrainedWeights, images: np.ndarray, batch_size: int = 64, dtype: str = "float32",
    progress: bool = False,
) -> np.ndarray:
    """Pooled (N, 2048) float32 backbone features of uint8 NHWC images, in inference mode.

    Images are normalised with the weights' own preprocessing and run ``batch_size`` at a time
    (the last batch is padded so that one compiled function serves every batch).
    """
    _check_images(images)
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
        from tqdm import tqdm

        starts = tqdm(starts, unit="batch", desc="features")
    for start in starts:
        batch = np.asarray(images[start:start + batch_size])
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        out[start:start + batch_size] = np.asarray(run(variables, batch))[: batch_size - pad]
    return out


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise WeightsError(
            f"Images must be uint8 NHWC with 3 channels, got {images.dtype} {images.shape}."
        )
    if min(images.shape[1:3]) < 32:
        raise WeightsError(f"Images must be at least 32x32, got {images.shape[1:3]}.")


# ---- CLI ----

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_flax.pretrained", description=__doc__.split(
        "\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a published weight file to a Flax weights dir")
    c.add_argument("--source", required=True, choices=sorted(RELEASES))
    c.add_argument("--input", required=True, help=".h5 / .pth / .safetensors / .npz file")
    c.add_argument("--output", required=True, help="directory to write (spec.json + state/)")
    c.add_argument("--variant", default="local", help="recorded in spec.json (default: local)")
    f = sub.add_parser("features", help="pooled backbone features of uint8 NHWC images")
    f.add_argument("--weights", required=True, help="directory written by `convert`")
    f.add_argument("--images", required=True, help="uint8 (N, H, W, 3) .npy, H, W >= 32")
    f.add_argument("--output", required=True, help="float32 (N, 2048) .npy to write")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (errors: one line on stderr, status 1)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            weights = convert_file(args.source, args.input, args.variant)
            save_weights(weights, args.output)
            n = sum(v.size for v in jax.tree.leaves((weights.params, weights.batch_stats)))
            print(f"Converted {args.input} -> {args.output}: {n:,} values, layout "
                  f"{weights.spec.layout}, preprocessing {weights.spec.preprocessing.name}.")
        else:
            weights = load_weights(args.weights)
            try:
                images = np.load(args.images, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise WeightsError(f"Could not read --images {args.images!r}: {e}") from e
            feats = extract_features(weights, images, args.batch_size, args.dtype, progress=True)
            np.save(args.output, feats)
            print(f"Wrote {feats.shape} features to {args.output}.")
    except (WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
