"""The data-parallel train step and the logits step (loop.py, evaluation.py, the benchmark).

One definition of each piece of a training step, shared by every path that trains (this full
step and feature_cache.py's cached-feature head step): :func:`step_keys` (the per-step RNG),
:func:`cross_entropy` and :func:`step_metrics` (loss and metrics), and
:func:`trainable_value_and_grad` + :func:`masked_update` (the frozen-aware update).

The full step is written per device: on-device augmentation -> model -> softmax cross-entropy on soft
labels -> gradients of the trainable parameters only -> ``jax.lax.pmean(grads, "data")`` -> optax
update. It is mapped over a ``Mesh(jax.devices(), ("data",))`` with ``jax.shard_map`` inside
``jax.jit``: the batch is split on the ``data`` axis, the state is replicated. BatchNorm averages
its statistics over ``data`` (the model's ``bn_axis_name``), so one step gives the same result on
any number of devices. The state buffers are donated.

Usage (what the benchmark does)::

    mesh = parallel.make_mesh()
    plan = optim.build_phase(config, variables["params"], 0, steps_per_epoch)
    state = create_train_state(variables, plan.tx, jax.random.key(0))
    step = make_train_step(model, plan, mesh, config.augment, preprocessing, num_classes)
    state, metrics = step(state, parallel.shard_batch(mesh, {"image": u8, "label": y}))
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cifar_flax.data import augment
from cifar_flax.training.optim import PhasePlan
from cifar_flax.training.devices import AXIS
from cifar_flax.data.preprocessing import Preprocessing



class TrainState(flax.struct.PyTreeNode):
    """What a step reads and writes; all of it is checkpointed."""

    step: jax.Array  # Global step (int32), continues across phases.
    params: Any
    batch_stats: Any
    opt_state: Any  # State of the current phase's optimizer (new at each phase start).
    rng: jax.Array  # Base key (uint32[2]); step s uses fold_in(rng, s): resuming needs only step.



def create_train_state(
    variables: Any, tx: optax.GradientTransformation, rng: jax.Array, step: int = 0
) -> TrainState:
    """A fresh state: ``variables`` = {"params", "batch_stats"}; new optimizer state from ``tx``."""
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        rng=jnp.asarray(jax.random.key_data(rng) if _is_typed_key(rng) else rng, jnp.uint32),
    )


def _is_typed_key(k: jax.Array) -> bool:
    return jnp.issubdtype(k.dtype, jax.dtypes.prng_key)





def step_keys(rng: jax.Array, step: jax.Array, device_index: Any) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, dropout key) of global step ``step`` on device ``device_index``.

    ``rng`` is TrainState.rng (raw uint32[2]); the keys depend only on (rng, step, device), so a
    resumed run draws the same augmentations and dropout masks as an uninterrupted one. Every
    path that trains (the full step, the cached-feature head step) derives its keys here."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    key = jax.random.fold_in(key, device_index)
    aug_key, dropout_key = jax.random.split(key)
    return aug_key, dropout_key


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """The training loss: mean softmax cross-entropy against soft (one-hot or mixed) labels."""
    return optax.softmax_cross_entropy(logits, soft_labels).mean()


def step_metrics(
    loss: jax.Array, logits: jax.Array, labels: jax.Array, grads: Any
) -> dict[str, jax.Array]:
    """The metrics every train step reports: its loss, the batch accuracy on hard labels and the
    global norm of the (trainable) gradients (the loop's divergence check reads loss and norm)."""
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": optax.tree.norm(grads)}


def _split(tree: Any, mask: Any) -> tuple[dict, dict]:
    flat, flat_mask = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(mask)
    train = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return train, frozen


def trainable_value_and_grad(
    loss_fn: Callable[[Any], tuple[jax.Array, Any]], params: Any, trainable: Any
) -> tuple[tuple[jax.Array, Any], dict]:
    """``((loss, aux), grads)`` of ``loss_fn(params)`` w.r.t. the trainable leaves only.

    ``trainable`` is a param-shaped tree of bools (optim.PhasePlan.trainable); ``grads`` is flat
    (``{path tuple: grad}``, trainable leaves only). Frozen leaves enter as constants
    (stop_gradient), so no backward pass runs through a frozen prefix of the network."""
    train_p, frozen_p = _split(params, trainable)
    frozen_p = jax.lax.stop_gradient(frozen_p)

    def on_trainable(train_p: dict):
        return loss_fn(traverse_util.unflatten_dict({**frozen_p, **train_p}))

    return jax.value_and_grad(on_trainable, has_aux=True)(train_p)


def masked_update(
    tx: optax.GradientTransformation, params: Any, opt_state: Any, train_grads: dict
) -> tuple[Any, Any]:
    """(new params, new opt_state): ``tx`` on the full tree, frozen leaves passed through as-is.

    ``train_grads`` is flat as from :func:`trainable_value_and_grad`; frozen leaves get zero
    gradients (their ``set_to_zero`` transform ignores them) and keep their exact values."""
    flat_params = traverse_util.flatten_dict(params)
    grads = {k: train_grads[k] if k in train_grads else jnp.zeros_like(v)
             for k, v in flat_params.items()}
    updates, opt_state = tx.update(traverse_util.unflatten_dict(grads), opt_state, params)
    flat_updates = traverse_util.flatten_dict(updates)
    new_params = {
        k: (v + flat_updates[k].astype(v.dtype)) if k in train_grads else v
        for k, v in flat_params.items()
    }
    return traverse_util.unflatten_dict(new_params), opt_state


def make_train_step(
    model: Any,
    plan: PhasePlan,
    mesh: Mesh,
    aug_config: Any,
    preprocessing: Preprocessing,
    num_classes: int,
    sync_batchnorm: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted data-parallel step ``(state, batch) -> (state, metrics)`` (step_metrics).

    ``model`` must be built with ``bn_axis_name="data"`` when ``sync_batchnorm``; ``batch`` holds
    uint8 ``image`` (N, H, W, 3) and int ``label`` (N,) sharded with :func:`shard_batch`.
    """

    def per_device(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        aug_key, dropout_key = step_keys(state.rng, state.step, jax.lax.axis_index(AXIS))
        images, soft = augment.train_augment(
            batch["image"], batch["label"], aug_key, aug_config, num_classes, preprocessing
        )

        def loss_fn(params: Any):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                bn_train_modules=plan.bn_train_modules,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            return cross_entropy(logits, soft), (logits, new_vars["batch_stats"])

        (loss, (logits, stats)), grads = trainable_value_and_grad(
            loss_fn, state.params, plan.trainable)
        grads = jax.lax.pmean(grads, AXIS)
        if not sync_batchnorm:
            stats = jax.lax.pmean(stats, AXIS)
        metrics = jax.lax.pmean(step_metrics(loss, logits, batch["label"], grads), AXIS)
        params, opt_state = masked_update(plan.tx, state.params, state.opt_state, grads)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                                  opt_state=opt_state)
        return new_state, metrics

    # check_vma=False: the pmap programming model. Gradients are per-device and averaged by the
    # explicit pmean above; with check_vma=True, JAX would already psum the gradients of the
    # replicated params (its transpose of the implicit broadcast) and the pmean would not divide.
    mapped = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(mapped, donate_argnums=(0,))


def make_logits_step(
    model: Any, mesh: Mesh, aug_config: Any, preprocessing: Preprocessing
) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``(variables, images) -> logits`` in inference mode: uint8 NHWC ``images`` sharded
    on ``data`` (parallel.shard_batch) -> float logits (N, C) sharded on ``data``.

    Preprocessing is augment.eval_preprocess (resize to ``aug_config.resolution``, normalise):
    what evaluation and prediction apply to every image."""

    def per_device(variables: Any, images: jax.Array) -> jax.Array:
        x = augment.eval_preprocess(images, aug_config, preprocessing)
        return model.apply(variables, x, train=False)

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
    return jax.jit(mapped)

