"""Exact conversion of a published ResNet50 state dict into the Flax model's variables.

Strict both ways: every Flax parameter and BatchNorm statistic of the backbone is filled exactly
once with the right shape, and anything else in the file except the ImageNet classifier is an
error that lists the names. :func:`merge_into` then puts the converted backbone into a model's
variables, with the same strictness.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cifar_flax import UserError, models
from cifar_flax.weights.files import file_hash, read_state_dict
from cifar_flax.weights.registry import PretrainedWeights, source_spec

# Tensors of the published files that are not part of the backbone.
_DROPPED = {"torchvision": ("fc.",), "keras": ("predictions/",)}
_IGNORED_SUFFIX = ".num_batches_tracked"


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


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    s = flax_shape
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s


@functools.lru_cache(maxsize=None)
def backbone_shapes(layout: str) -> dict[tuple[str, ...], tuple[int, ...]]:
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
    for key, shape in backbone_shapes(spec.layout).items():
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
        raise UserError(
            f"{origin} is not a {source} ResNet50 weight file: {len(missing)} missing tensor(s) "
            f"[{_listing(missing)}]; {len(unexpected)} unexpected [{_listing(unexpected)}]; "
            f"{len(wrong)} with the wrong shape [{_listing(wrong, 4)}]. Check --source / "
            "pretrained.source and that the file holds ResNet50 weights."
        )
    nested = traverse_util.unflatten_dict(flat)
    return nested["params"], nested["batch_stats"]


def convert_file(source: str, path: str, variant: str = "local") -> PretrainedWeights:
    """Strictly convert one weight file of ``source`` (formats: weights/files.py)."""
    spec = source_spec(source, variant)
    tensors = read_state_dict(path)
    params, batch_stats = convert_state_dict(source, tensors, origin=repr(str(path)))
    spec = dataclasses.replace(spec, file_sha256=file_hash(path, "sha256"))
    return PretrainedWeights(params, batch_stats, spec)


def _fit_problems(model_flat: dict, new_flat: dict) -> list[tuple[str, str]]:
    """(path, what is wrong) for every backbone entry that the model and the weights disagree on."""
    backbone = {k for k in model_flat if k[0] in models.BACKBONE_MODULES}
    problems = [("/".join(k), "missing in the model") for k in sorted(set(new_flat) - backbone)]
    problems += [("/".join(k), "missing in the weights") for k in sorted(backbone - set(new_flat))]
    problems += [
        ("/".join(k), f"model {tuple(model_flat[k].shape)} vs weights {new_flat[k].shape}")
        for k in sorted(backbone & set(new_flat))
        if tuple(model_flat[k].shape) != tuple(new_flat[k].shape)
    ]
    return problems


def merge_into(variables: dict, weights: PretrainedWeights) -> dict:
    """Model variables with every backbone entry replaced by the pretrained one; head untouched.

    Strict both ways: each backbone parameter/statistic of the model must be in ``weights`` with
    the same shape and vice versa.
    """
    out = {}
    for collection, src in (("params", weights.params), ("batch_stats", weights.batch_stats)):
        model_flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        new_flat = traverse_util.flatten_dict(src)
        problems = _fit_problems(model_flat, new_flat)
        if problems:
            path, what = problems[0]
            raise UserError(
                f"The {weights.spec.source} weights don't fit the model: {collection}/{path} "
                f"{what} ({len(problems)} mismatch(es)). They need model.layout="
                f"{weights.spec.layout!r}, model.stage_sizes=(3, 4, 6, 3) and model.base_width=64."
            )
        filled = traverse_util.unflatten_dict(
            {k: jnp.asarray(v, dtype=model_flat[k].dtype) for k, v in new_flat.items()}
        )
        out[collection] = {**variables.get(collection, {}), **filled}
    return {**variables, **out}
