"""The model a config describes and its initial variables: random init, then the pretrained
backbone (cifar_flax.weights) when ``config.pretrained.source`` is set, or an earlier run's
variables when ``config.init_from`` names one (backbone always; head when its shapes and class
names match).

Starting from an earlier run (to continue a training, or to fine-tune your model on a new label
set)::

    python -m cifar_flax.main --config configs/finetune.py --workdir runs/pets \\
        --config.dataset=imagefolder:/data/pets --config.init_from=runs/finetune

``init_from`` is a workdir (its best checkpoint, else its last) or a checkpoint folder
(``runs/finetune/checkpoints/latest`` or one step in it). The backbone is always loaded, strictly:
a backbone that does not fit (another ``model.layout``, ``stage_sizes`` or ``base_width``) is an
error listing the differing names. The head is loaded only when its shapes match (class count,
``model.head_hidden``) and the earlier run trained on the same class names (its
``run_info.json``); otherwise it is freshly initialised and one log line says why (a head trained
on other classes of the same count, as in a class split, would map features to the wrong labels).
The earlier run's weight source must be ``pretrained.source`` (the inputs must be normalised the
same way). Checkpoints restore onto the current devices whatever device count wrote them.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cifar_flax import UserError, user_errors
from cifar_flax.models import create_model
from cifar_flax.run import checkpoints
from cifar_flax.run.devices import AXIS
from cifar_flax.run.workdir import read_run_info
from cifar_flax.weights.convert import merge_into
from cifar_flax.weights.registry import source_spec
from cifar_flax.weights.store import load_pretrained


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """The model a config describes (synchronised BatchNorm over ``data`` when configured)."""
    m = config.model
    return create_model(
        num_classes, m.layout, m.head_hidden, m.head_dropout, m.zero_init_head, config.dtype,
        m.stage_sizes, m.base_width, AXIS if config.sync_batchnorm else None,
        m.conv_impl,
    )


@functools.partial(jax.jit, static_argnums=(0, 2))
def _random_init(model: Any, key: jax.Array, resolution: int) -> dict[str, Any]:
    """``model.init`` as one compiled program (run eagerly, each layer's ops compile on their own:
    seconds more at every start); the model is static, so equal models reuse the program."""
    return model.init(key, jnp.zeros((1, resolution, resolution, 3), jnp.float32), train=False)


def init_variables(config: ml_collections.ConfigDict, model: Any, load_weights: bool = True,
                   class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """{"params", "batch_stats"}: random init, then the pretrained backbone when configured.

    ``load_weights=False`` skips loading (a resumed run restores every value from its checkpoint).
    ``class_names`` (the dataset's) decide whether an ``init_from`` run's head is kept.
    """
    res = config.augment.resolution
    variables = _random_init(model, jax.random.key(config.seed), res)
    source = config.pretrained.source
    if config.init_from and load_weights:
        variables = variables_from_run(config, variables, config.init_from, class_names)
    elif source and load_weights:
        weights = load_pretrained(
            source, config.pretrained.variant, config.pretrained.file, config.pretrained.cache_dir
        )
        variables = merge_into(variables, weights)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def input_preprocessing(config: ml_collections.ConfigDict) -> Any:
    """The normalisation the configured weights expect (SIMPLE for random init)."""
    p = config.pretrained
    return source_spec(p.source, p.variant, config.model.layout).preprocessing


def _check_preprocessing(config: ml_collections.ConfigDict, ckpt: checkpoints.RunCheckpoint):
    """The earlier run must have normalised its inputs as this config will (same weight source)."""
    if ckpt.workdir is None or not (ckpt.workdir / "config.json").exists():
        return
    old = json.loads((ckpt.workdir / "config.json").read_text())
    p_old, p_new = old.get("pretrained", {}), config.pretrained
    before = source_spec(p_old.get("source", ""), p_old.get("variant", ""),
                         old.get("model", {}).get("layout", "v1.5")).preprocessing
    now = input_preprocessing(config)
    if before != now:
        raise UserError(
            f"init_from={config.init_from!r} was trained with pretrained.source="
            f"{p_old.get('source', '')!r} ({before.name} preprocessing) but this config uses "
            f"{p_new.source!r} ({now.name}); set --config.pretrained.source="
            f"{p_old.get('source', '')!r} so the images are normalised as the weights expect."
        )


def variables_from_run(config: ml_collections.ConfigDict, variables: dict, run: str,
                       class_names: Sequence[str] | None = None) -> dict:
    """``variables`` with an earlier run's checkpoint values: every backbone entry (names and
    shapes must match, else UserError listing them) and the head when it fits (else the fresh
    head, said in one log line). The head fits when its shapes match and, where both are known,
    the earlier run's class names are ``class_names``: a head trained on other classes (a class
    split with the same count) maps features to the wrong labels."""
    with user_errors(lambda e: f"init_from={run!r}: {e}", UserError):
        ckpt = checkpoints.find_checkpoint(run, "best")
        stored = checkpoints.stored_shapes(ckpt)
    _check_preprocessing(config, ckpt)
    target = {k: variables[k] for k in ("params", "batch_stats")}
    backbone = lambda tree: {k: {m: v for m, v in tree[k].items() if m != "head"}  # noqa: E731
                             for k in ("params", "batch_stats")}
    problems = checkpoints.shape_differences(backbone(stored), backbone(target))
    if problems:
        raise UserError(
            f"init_from={run!r}: its backbone does not fit this model ({len(problems)} "
            f"differences: {'; '.join(problems[:8])}); use the same model.layout, stage_sizes "
            "and base_width as that run."
        )
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    loaded = jax.device_get(checkpoints.restore_variables(ckpt, mesh))
    head = lambda tree: {k: tree[k].get("head", {}) for k in ("params", "batch_stats")}  # noqa
    same_shapes = not checkpoints.shape_differences(head(stored), head(target))
    old_names = _run_class_names(ckpt)
    same_classes = class_names is None or old_names is None or list(class_names) == old_names
    keep_head = same_shapes and same_classes
    out = {}
    for k in ("params", "batch_stats"):
        out[k] = {m: jax.tree.map(lambda new, old: jnp.asarray(old, new.dtype), v, loaded[k][m])
                  if (m != "head" or keep_head) else v for m, v in target[k].items()}
    log = logging.info if keep_head else logging.warning
    log("init_from %s (%s checkpoint, step %d): backbone loaded; head %s.", run,
        ckpt.kind or "given", ckpt.step, "loaded" if keep_head else
        "freshly initialised (its shapes differ: another class count or head_hidden)"
        if not same_shapes else f"freshly initialised (trained on other classes: {old_names})")
    return out


def _run_class_names(ckpt: checkpoints.RunCheckpoint) -> list[str] | None:
    """The class names the checkpoint's run trained on (None when its workdir does not say)."""
    facts = read_run_info(str(ckpt.workdir)) if ckpt.workdir is not None else None
    return facts["class_names"] if facts else None
