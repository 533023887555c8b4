"""The `flax_bare` benchmark row: our models.ResNet50 under a plain ``jax.jit`` step with
``optax.sgd`` (no shard_map, no multi_transform, no augmentation); the gap to the `flax` row is
the cost of the training step's abstractions. Its process never loads TensorFlow."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cifar_flax import models
from cifar_flax.bench.workload import LR, MOMENTUM, NUM_CLASSES, Workload, compile_then_time


def make_bare_step(model: Any, tx: Any) -> Callable:
    """``step(state, x, y) -> (state, loss)`` with ``state = (params, batch_stats, opt_state)``."""

    def step(state, x, y):
        params, batch_stats, opt_state = state

        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return step


def random_batch(batch: int, size: int, seed: int = 0) -> tuple[Any, Any]:
    """A float32 NHWC batch and integer labels, generated on the device."""
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
    return x, y


def bare_model(w: Workload) -> Any:
    """The ResNet50 the bare step trains: v1.5, linear head, ``w``'s dtype, stages, conv_impl."""
    return models.create_model(
        NUM_CLASSES, "v1.5", head_hidden=(), head_dropout=0.0, zero_init_head=False,
        dtype=w.dtype, stage_sizes=w.stage_sizes, conv_impl=w.conv_impl,
    )


def build(w: Workload) -> tuple[Callable, Any, Any, Any]:
    """(jitted step donating its state, state, x, y) for ``w`` (size, batch, dtype, ...)."""
    model = bare_model(w)
    x, y = random_batch(w.batch, w.size)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])
    tx = optax.sgd(LR, momentum=MOMENTUM)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    return jax.jit(make_bare_step(model, tx), donate_argnums=0), state, x, y


def run(w: Workload) -> dict:
    """Compile, then time the bare step on one batch already on the device."""
    fn, state, x, y = build(w)
    out = compile_then_time(fn, state, x, y, warmup=w.warmup, steps=w.steps)
    return {"layout": "v1.5 (NHWC)", "mode": "jax.jit, donated state", **out}
