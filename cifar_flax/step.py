"""The data-parallel train and eval steps (the exact functions train.py runs; bench.py reuses them).

The step is written per device: on-device augmentation -> model -> softmax cross-entropy on soft
labels -> gradients of the trainable parameters only -> ``jax.lax.pmean(grads, "data")`` -> optax
update. It is mapped over a ``Mesh(jax.devices(), ("data",))`` with ``jax.shard_map`` inside
``jax.jit``: the batch is split on the ``data`` axis, the state is replicated. BatchNorm averages
its statistics over ``data`` (the model's ``bn_axis_name``), so one step gives the same result on
any number of devices. The state buffers are donated.

Usage (what the benchmark does)::

    mesh = make_mesh()
    plan = optim.build_phase(config, variables["params"], 0, steps_per_epoch)
    state = create_train_state(variables, plan.tx, jax.random.key(0))
    step = make_train_step(model, plan, mesh, config.augment, preprocessing, num_classes)
    state, metrics = step(state, shard_batch(mesh, {"image": u8, "label": y}))
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cifar_flax import augment
from cifar_flax.optim import PhasePlan
from cifar_flax.preprocessing import Preprocessing

AXIS = "data"


class TrainState(flax.struct.PyTreeNode):
    """What a step reads and writes; all of it is checkpointed."""

    step: jax.Array  # Global step (int32), continues across phases.
    params: Any
    batch_stats: Any
    opt_state: Any  # State of the current phase's optimizer (new at each phase start).
    rng: jax.Array  # Base key (uint32[2]); step s uses fold_in(rng, s): resuming needs only step.


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh named ``data`` over all devices (of all hosts)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


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


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Place a pytree fully replicated on the mesh (for the state)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def abstract(mesh: Mesh, tree: Any) -> Any:
    """Shapes/dtypes of a pytree as replicated ShapeDtypeStructs (restore targets, templates)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def shard_batch(mesh: Mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's numpy batch -> global arrays split on ``data`` (multi-host safe)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _split(tree: Any, mask: Any) -> tuple[dict, dict]:
    flat, flat_mask = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(mask)
    train = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return train, frozen


def _update(state: TrainState, plan: PhasePlan, train_grads: dict, new_stats: Any) -> TrainState:
    """Optimizer update; frozen leaves get zero grads (set_to_zero) and are passed through as-is."""
    flat_params = traverse_util.flatten_dict(state.params)
    grads = {k: train_grads.get(k, None) for k in flat_params}
    grads = {k: jnp.zeros_like(flat_params[k]) if g is None else g for k, g in grads.items()}
    updates, opt_state = plan.tx.update(
        traverse_util.unflatten_dict(grads), state.opt_state, state.params
    )
    flat_updates = traverse_util.flatten_dict(updates)
    new_params = {
        k: (v + flat_updates[k].astype(v.dtype)) if k in train_grads else v
        for k, v in flat_params.items()
    }
    return state.replace(
        step=state.step + 1,
        params=traverse_util.unflatten_dict(new_params),
        batch_stats=new_stats,
        opt_state=opt_state,
    )


def make_train_step(
    model: Any,
    plan: PhasePlan,
    mesh: Mesh,
    aug_config: Any,
    preprocessing: Preprocessing,
    num_classes: int,
    sync_batchnorm: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted data-parallel step ``(state, batch) -> (state, {"loss", "accuracy"})``.

    ``model`` must be built with ``bn_axis_name="data"`` when ``sync_batchnorm``; ``batch`` holds
    uint8 ``image`` (N, H, W, 3) and int ``label`` (N,) sharded with :func:`shard_batch`.
    """

    def per_device(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        aug_key, dropout_key = jax.random.split(key)
        images, soft = augment.train_augment(
            batch["image"], batch["label"], aug_key, aug_config, num_classes, preprocessing
        )
        train_p, frozen_p = _split(state.params, plan.trainable)
        frozen_p = jax.lax.stop_gradient(frozen_p)

        def loss_fn(train_p: dict):
            params = traverse_util.unflatten_dict({**frozen_p, **train_p})
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                bn_train_modules=plan.bn_train_modules,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            loss = optax.softmax_cross_entropy(logits, soft).mean()
            return loss, (logits, new_vars["batch_stats"])

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_p)
        grads = jax.lax.pmean(grads, AXIS)
        if not sync_batchnorm:
            stats = jax.lax.pmean(stats, AXIS)
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        metrics = jax.lax.pmean({"loss": loss, "accuracy": acc}, AXIS)
        return _update(state, plan, grads, stats), metrics

    # check_vma=False: the pmap programming model. Gradients are per-device and averaged by the
    # explicit pmean above; with check_vma=True, JAX would already psum the gradients of the
    # replicated params (its transpose of the implicit broadcast) and the pmean would not divide.
    mapped = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(mapped, donate_argnums=(0,))


def make_eval_step(
    model: Any, mesh: Mesh, aug_config: Any, preprocessing: Preprocessing
) -> Callable[[Any, dict], dict]:
    """Jitted ``(variables, batch) -> {"logits", "loss"}`` per example, sharded on ``data``."""

    def per_device(variables: Any, batch: dict) -> dict:
        images = augment.eval_preprocess(batch["image"], aug_config, preprocessing)
        logits = model.apply(variables, images, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"logits": logits, "loss": loss}

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
    return jax.jit(mapped)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every host (gathers across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
