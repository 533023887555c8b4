"""One framework's ResNet50 training step, timed; run by bench.py in its own subprocess.

Every row does the same work: ResNet50 in the torchvision v1.5 layout (stride in the 3x3 conv, no
conv bias, BatchNorm eps 1e-5 / momentum 0.9, 2048 -> num_classes linear head), random init,
softmax cross-entropy, SGD with momentum 0.9, forward + backward + update on one synthetic batch
that already sits on the device, channels-last activations (NHWC) in every framework.

Running each framework in its own process keeps their peak memory (``ru_maxrss``) and thread
pools apart. The worker prints one line ``BENCH_RESULT <json>`` that bench.py parses::

    python -m cifar_flax.bench_frameworks --framework torch --size 32 --batch 128 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Callable, Sequence

RESULT_PREFIX = "BENCH_RESULT "
HIDE_ENV = "CIFAR_FLAX_BENCH_HIDE"  # Comma-separated frameworks to treat as not installed (tests).
NUM_CLASSES = 10
LR, MOMENTUM = 0.1, 0.9
TINY_STAGES = (1, 1, 1, 1)
FULL_STAGES = (3, 4, 6, 3)


class FrameworkUnavailable(RuntimeError):
    """The framework (or the part of cifar_flax a row needs) is not importable here."""


def _require(module: str, framework: str) -> None:
    hidden = {s.strip() for s in os.environ.get(HIDE_ENV, "").split(",") if s.strip()}
    if framework in hidden:
        raise FrameworkUnavailable(f"{framework} hidden by ${HIDE_ENV}")
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise FrameworkUnavailable(f"python module {module!r} is not installed")


def time_steps(
    step: Callable[[], Any], sync: Callable[[Any], None], warmup: int, steps: int
) -> dict[str, float]:
    """Run ``warmup`` untimed steps (the first one also traces/compiles where a framework does it
    lazily), then ``steps`` steps timed as one block with a single sync at the end, so that
    asynchronous dispatch (JAX, CUDA) overlaps as it would in training."""
    t0 = time.perf_counter()
    out = None
    for i in range(max(warmup, 1)):
        out = step()
        sync(out)
        if i == 0:
            first = time.perf_counter() - t0
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    total = time.perf_counter() - t0
    return {"first_step_s": first, "warmup_s": warm, "timed_s": total}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------- JAX


def _jax_inputs(batch: int, size: int, seed: int = 0):
    import jax
    import jax.numpy as jnp

    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
    return x, y


def make_bare_step(model: Any, tx: Any) -> Callable:
    """A plain ResNet50 training step: no shard_map, no multi_transform, no augmentation.

    ``state`` is ``(params, batch_stats, opt_state)``; returns ``(state, loss)``.
    """
    import jax
    import optax

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


def _jax_memory() -> dict[str, float]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"device_peak_mb": stats["peak_bytes_in_use"] / 2**20}
    return {}


def _run_compiled(step_fn: Callable, state: Any, x: Any, y: Any, args: argparse.Namespace) -> dict:
    """jit (donating the state), compile ahead of time (timed separately), then time the steps."""
    import jax

    jitted = jax.jit(step_fn, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state, "losses": []}

    def one():
        holder["state"], loss = compiled(holder["state"], x, y)
        holder["losses"].append(loss)
        return loss

    timing = time_steps(one, lambda out: out.block_until_ready(), args.warmup, args.steps)
    return {
        "compile_s": compile_s,
        "gflops_per_step": float((cost or {}).get("flops", 0.0)) / 1e9,
        "first_loss": float(holder["losses"][0]),
        "final_loss": float(holder["losses"][-1]),
        **timing,
        **_jax_memory(),
    }


def run_flax_bare(args: argparse.Namespace) -> dict:
    """Our models.ResNet50 under a bare ``jax.jit`` step with ``optax.sgd`` (momentum)."""
    _require("flax", "flax_bare")
    import jax
    import optax

    from cifar_flax import models

    model = models.create_model(
        NUM_CLASSES, "v1.5", head_hidden=(), head_dropout=0.0, zero_init_head=False,
        dtype=args.dtype, stage_sizes=args.stage_sizes, conv_impl=args.conv_impl,
    )
    x, y = _jax_inputs(args.batch, args.size)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])
    tx = optax.sgd(LR, momentum=MOMENTUM)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    out = _run_compiled(make_bare_step(model, tx), state, x, y, args)
    return {"layout": "v1.5 (NHWC)", "mode": "jax.jit, donated state", **out}


def run_flax(args: argparse.Namespace) -> dict:
    """The real cifar_flax train step, as train.py builds it (see bench_train_step.py)."""
    _require("flax", "flax")
    from cifar_flax import bench_train_step

    return bench_train_step.run(args)


# -------------------------------------------------------------------------------------- Keras


def build_keras_resnet50(
    size: int, num_classes: int = NUM_CLASSES, stage_sizes: Sequence[int] = FULL_STAGES
) -> Any:
    """ResNet50 v1.5 (torchvision layout) with the Keras functional API, NHWC.

    ``keras.applications.ResNet50`` is the v1 layout (stride in the first 1x1 conv, conv biases),
    which does ~5-10% fewer FLOPs, so it would not be a like-for-like row.
    """
    import keras
    from keras import layers

    def bn(x):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

    def conv(x, filters, kernel, stride=1):
        if kernel > 1:
            x = layers.ZeroPadding2D((kernel - 1) // 2)(x)
        return layers.Conv2D(
            filters, kernel, strides=stride, use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "normal"),
        )(x)

    inputs = keras.Input((size, size, 3))
    x = layers.ReLU()(bn(conv(inputs, 64, 7, 2)))
    x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1)(x))
    for i, n in enumerate(stage_sizes):
        width = 64 * 2**i
        for b in range(n):
            stride = 2 if (b == 0 and i > 0) else 1
            shortcut = bn(conv(x, 4 * width, 1, stride)) if b == 0 else x
            y = layers.ReLU()(bn(conv(x, width, 1)))
            y = layers.ReLU()(bn(conv(y, width, 3, stride)))
            y = bn(conv(y, 4 * width, 1))
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, dtype="float32")(x)
    return keras.Model(inputs, outputs, name="resnet50_v15")


def run_keras(args: argparse.Namespace) -> dict:
    """Keras 3 on TensorFlow, ``model.train_on_batch`` with Keras' default ``jit_compile``."""
    _require("keras", "keras")
    _require("tensorflow", "keras")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise FrameworkUnavailable(f"KERAS_BACKEND={keras.backend.backend()}, need tensorflow")
    if args.dtype == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = build_keras_resnet50(args.size, stage_sizes=args.stage_sizes)
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = tf.random.normal((args.batch, args.size, args.size, 3))
    y = tf.random.uniform((args.batch,), 0, NUM_CLASSES, dtype=tf.int32)
    timing = time_steps(lambda: model.train_on_batch(x, y), lambda out: None, args.warmup,
                        args.steps)
    out = {"layout": "v1.5 (NHWC), functional API",
           "mode": f"train_on_batch, jit_compile={model.jit_compile}"}
    out["compile_s"] = timing["first_step_s"]  # tf.function tracing + graph build on first call
    out["final_loss"] = float(model.train_on_batch(x, y))
    if tf.config.list_physical_devices("GPU"):
        out["device_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return {**out, **timing}


# -------------------------------------------------------------------------------------- torch


def run_torch(args: argparse.Namespace) -> dict:
    """PyTorch eager (torch_resnet.ResNet50, torchvision layout), channels_last, SGD momentum."""
    _require("torch", "torch")
    import torch

    from cifar_flax.torch_resnet import ResNet50

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ResNet50(NUM_CLASSES, stage_sizes=args.stage_sizes).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = args.dtype == "bfloat16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def sync(_):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    timing = time_steps(step, sync, args.warmup, args.steps)
    out = {
        "layout": "v1.5 (channels_last)",
        "mode": "eager" + (", autocast bf16" if amp else ""),
        "compile_s": 0.0,
        "final_loss": float(step()),
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**out, **timing}


RUNNERS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "flax": run_flax,
    "flax_bare": run_flax_bare,
    "keras": run_keras,
    "torch": run_torch,
}


def finish(framework: str, args: argparse.Namespace, out: dict) -> dict:
    """Derive images/s and ms/step from the timed block; add the process' peak RSS."""
    out = dict(out)
    out.update(framework=framework, status="ok", size=args.size, batch=args.batch,
               steps=args.steps, dtype=args.dtype, peak_rss_mb=_peak_rss_mb())
    out["ms_per_step"] = 1000.0 * out["timed_s"] / args.steps
    out["images_per_s"] = args.batch * args.steps / out["timed_s"]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", required=True, choices=sorted(RUNNERS))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tiny", action="store_true", help="stage_sizes (1,1,1,1) (tests only)")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
    args = p.parse_args(argv)
    args.stage_sizes = TINY_STAGES if args.tiny else FULL_STAGES
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = finish(args.framework, args, RUNNERS[args.framework](args))
    except FrameworkUnavailable as e:
        result = {"framework": args.framework, "status": "skipped", "reason": str(e)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Run the imported module's main so that exception classes match those other modules raise.
    from cifar_flax import bench_frameworks

    sys.exit(bench_frameworks.main())
