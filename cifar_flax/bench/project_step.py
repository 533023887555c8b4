"""The `flax` benchmark row: the real training step, built exactly as train.py builds it.

model_setup.build_model (synchronised BatchNorm over the ``data`` axis), train.build_phase (regex
parameter groups -> optax.multi_transform), train.make_train_step (jax.shard_map over a mesh of
all devices inside jax.jit, on-device augmentation: padded random crop + flip, soft-label
cross-entropy, pmean of the gradients) and devices.shard_batch (uint8 images on the mesh).
The work per step otherwise matches the bare row: ResNet50 v1.5, linear head, all layers
trainable, SGD momentum 0.9 (no Nesterov, no weight decay), lr 0.1.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from cifar_flax import config as config_lib
from cifar_flax import train
from cifar_flax.bench.workload import LR, MOMENTUM, NUM_CLASSES, Workload, compile_then_time
from cifar_flax.run import devices, model_setup

GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
STEP = np.int32(0)  # The global step the timed step is told (it draws its keys from it).


def bench_config(size: int, batch: int, dtype: str, stage_sizes: Sequence[int],
                 trainable: Sequence[str] | None = None, head_hidden: Sequence[int] = (),
                 head_dropout: float = 0.0, augment: bool = True,
                 conv_impl: str = "auto") -> ml_collections.ConfigDict:
    """A config whose phase 0 trains ``trainable`` groups (default all) like the bare step;
    ``augment=False`` turns crop and flip off."""
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
    c.phases = [config_lib.phase("bench", steps=1000, trainable=tuple(trainable or GROUPS),
                                 lr=LR, schedule="constant", momentum=MOMENTUM, nesterov=False,
                                 weight_decay=0.0)]
    return c


def build(config: ml_collections.ConfigDict, seed: int = 0) -> tuple[Any, Any, Any, dict]:
    """(jitted step fn ``(state, batch, step)``, replicated state, sharded synthetic uint8 batch, parts) where ``parts``
    holds model, variables, plan, prep (preprocessing), mesh (for the fast-path benchmarks)."""
    model = model_setup.build_model(config, NUM_CLASSES)
    variables = model_setup.init_variables(config, model, load_weights=False)
    prep = model_setup.input_preprocessing(config)
    plan = train.build_phase(config, variables["params"], 0, steps_per_epoch=100)
    mesh = devices.make_mesh()
    state = devices.replicate(mesh, train.create_train_state(
        variables, plan.tx, jax.random.PRNGKey(seed)))
    fn = train.make_train_step(model, plan, mesh, config.augment, prep, config.sync_batchnorm)
    rng = np.random.default_rng(seed)
    size = config.augment.resolution
    batch = devices.shard_batch(mesh, {
        "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, config.batch_size).astype(np.int32)})
    parts = {"model": model, "variables": variables, "plan": plan, "prep": prep, "mesh": mesh}
    return fn, state, batch, parts


def run(w: Workload) -> dict:
    """Compile, then time the real step on one synthetic batch already on the device(s)."""
    config = bench_config(w.size, w.batch, w.dtype, w.stage_sizes, conv_impl=w.conv_impl)
    fn, state, batch, _ = build(config)
    out = compile_then_time(fn, state, batch, STEP, warmup=w.warmup, steps=w.steps,
                            loss_of=lambda metrics: metrics["loss"])
    return {
        "layout": "v1.5 (NHWC)",
        "mode": f"train.py step: shard_map over {jax.device_count()} device(s), multi_transform, "
                "crop+flip on device",
        **out,
    }
