"""The `flax` benchmark row: the real training step, built exactly as train.py builds it.

initialize.build_model (synchronised BatchNorm over the ``data`` axis), optim.build_phase (regex
parameter groups -> optax.multi_transform), steps.make_train_step (jax.shard_map over a mesh of
all devices inside jax.jit, on-device augmentation: padded random crop + flip, soft-label
cross-entropy, pmean of the gradients) and devices.shard_batch (uint8 images on the mesh).
The work per step otherwise matches the bare row: ResNet50 v1.5, linear head, all layers
trainable, SGD momentum 0.9 (no Nesterov, no weight decay), lr 0.1.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import numpy as np

from cifar_flax.bench.timing import compile_then_time
from cifar_flax.bench.workload import LR, MOMENTUM, NUM_CLASSES, FrameworkUnavailable


def bench_config(size: int, batch: int, dtype: str, stage_sizes: Sequence[int],
                 trainable: Sequence[str] | None = None, head_hidden: Sequence[int] = (),
                 head_dropout: float = 0.0, augment: bool = True,
                 conv_impl: str = "auto") -> Any:
    """A config whose phase 0 trains ``trainable`` groups (default all) like the bare step;
    ``augment=False`` turns crop and flip off."""
    from cifar_flax import config as config_lib

    c = config_lib.default_config()
    c.dataset, c.batch_size, c.dtype = "synthetic", batch, dtype
    c.augment.resolution = size
    c.model.layout, c.model.head_hidden, c.model.head_dropout = "v1.5", head_hidden, head_dropout
    if not augment:
        c.augment.crop_padding, c.augment.flip = 0, False
    c.model.zero_init_head = False
    c.model.stage_sizes = tuple(stage_sizes)
    c.model.conv_impl = conv_impl
    c.pretrained.source = ""
    groups = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
    c.phases = [config_lib.phase("bench", steps=1000, trainable=tuple(trainable or groups),
                                 lr=LR, schedule="constant", momentum=MOMENTUM, nesterov=False,
                                 weight_decay=0.0)]
    return c


def build(config: Any, seed: int = 0) -> tuple[Any, Any, Any, dict]:
    """(jitted step fn, replicated state, sharded synthetic uint8 batch, parts) where ``parts``
    holds model, variables, plan, preprocessing, mesh (for the fast-path benchmarks)."""
    import jax

    from cifar_flax.training import initialize as train, optim, devices, steps as step_lib

    model = train.build_model(config, NUM_CLASSES)
    variables, prep = train.init_variables(config, model, load_weights=False)
    plan = optim.build_phase(config, variables["params"], 0, steps_per_epoch=100)
    mesh = devices.make_mesh()
    state = devices.replicate(mesh, step_lib.create_train_state(
        variables, plan.tx, jax.random.PRNGKey(seed)))
    fn = step_lib.make_train_step(model, plan, mesh, config.augment, prep, NUM_CLASSES,
                                  config.sync_batchnorm)
    rng = np.random.default_rng(seed)
    size = config.augment.resolution
    batch = devices.shard_batch(mesh, {
        "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, config.batch_size).astype(np.int32)})
    parts = {"model": model, "variables": variables, "plan": plan, "prep": prep, "mesh": mesh}
    return fn, state, batch, parts


def run(args: argparse.Namespace) -> dict:
    """Compile, then time the real step on one synthetic batch already on the device(s)."""
    try:
        from cifar_flax.training import initialize
        from cifar_flax.train import steps  # noqa: F401
    except ImportError as e:
        raise FrameworkUnavailable(f"cifar_flax.train not importable ({e})") from e
    import jax

    config = bench_config(args.size, args.batch, args.dtype, args.stage_sizes,
                          conv_impl=args.conv_impl)
    fn, state, batch, _ = build(config)
    out = compile_then_time(fn, state, batch, warmup=args.warmup, steps=args.steps,
                            loss_of=lambda metrics: metrics["loss"])
    return {
        "layout": "v1.5 (NHWC)",
        "mode": f"train.py step: shard_map over {jax.device_count()} device(s), multi_transform, "
                "crop+flip on device",
        **out,
    }
