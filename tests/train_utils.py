"""Shared helpers of the training tests: a tiny config, fake batches, a tiny model's state."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from cifar_flax import optim, step as step_lib
from cifar_flax.config import default_config, phase
from cifar_flax.preprocessing import SIMPLE
from cifar_flax.train import build_model


def enable_compilation_cache() -> None:
    """Share compiled steps between the tests' training runs (each run re-jits its steps)."""
    import tempfile

    path = os.path.join(tempfile.gettempdir(), "cifar_flax_test_jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """Tiny ResNet (same parameter paths), 16px synthetic data, no augmentation, no dropout."""
    c = default_config()
    c.dataset = "synthetic"
    c.synthetic.num_classes = 4
    c.synthetic.num_train = 64
    c.synthetic.num_test = 24
    c.synthetic.size = 16
    c.val_fraction = 0.25
    c.batch_size = 16
    c.eval_batch_size = 16
    c.augment.resolution = 16
    c.augment.crop_padding = 0
    c.augment.flip = False
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.base_width = 4
    c.model.head_hidden = ()
    c.model.head_dropout = 0.0
    c.pretrained.source = ""
    c.phases = [phase("all", steps=10, lr=0.05, schedule="constant")]
    c.checkpoint.async_save = False
    c.log_every_steps = 1
    c.progress_bar = False
    c.update_from_flattened_dict(overrides)
    return c


def fake_batch(n: int = 16, size: int = 16, classes: int = 4, seed: int = 0) -> dict:
    """Learnable uint8 images: the class sets the mean brightness of one colour channel."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    images[np.arange(n), :, :, labels % 3] += (60 + 60 * (labels // 3)).astype(np.uint8)[:, None, None]
    return {"image": images, "label": labels.astype(np.int32)}


_INIT_CACHE: dict = {}


def init_variables(model, res: int, seed: int = 0) -> dict:
    """The model's initial variables as numpy (cached: compiling an init costs seconds)."""
    key = (repr(model.clone(dtype=np.float32, bn_axis_name=None)), res, seed)  # Same params.
    if key not in _INIT_CACHE:
        v = jax.jit(model.init)(jax.random.key(seed), np.zeros((1, res, res, 3), np.float32))
        _INIT_CACHE[key] = jax.device_get(v)
    return _INIT_CACHE[key]


def setup_step(config, mesh, num_classes: int = 4, phase_index: int = 0, seed: int = 0):
    """(model, plan, state, jitted step) for ``config`` on ``mesh``."""
    model = build_model(config, num_classes)
    variables = init_variables(model, config.augment.resolution, seed)
    plan = optim.build_phase(config, variables["params"], phase_index, steps_per_epoch=10)
    state = step_lib.replicate(
        mesh, step_lib.create_train_state(variables, plan.tx, jax.random.key(seed + 1))
    )
    fn = step_lib.make_train_step(model, plan, mesh, config.augment, SIMPLE, num_classes,
                                  config.sync_batchnorm)
    return model, plan, state, fn
