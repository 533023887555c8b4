"""Shared helpers of the training tests: a tiny config, fake batches, a tiny model's state."""

from __future__ import annotations

import os
import signal

import jax
import ml_collections
import numpy as np
from conftest import COMPILATION_CACHE_DIR

from cifar_flax import train as step_lib
from cifar_flax.config import default_config, phase
from cifar_flax.data.preprocessing import SIMPLE
from cifar_flax.run import devices
from cifar_flax.run.checkpoints import Checkpointer
from cifar_flax.run.model_setup import build_model


def enable_compilation_cache() -> None:
    """Share compiled steps between the tests' training runs (each run re-jits its steps), in
    the cache the commands the tests start use (conftest.py)."""
    jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE_DIR)
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
    c.lr_batch_size = 16  # The rates the tests give are for this batch.
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


def state_at(workdir: str, step: int | None = None, kind: str = "latest") -> dict:
    """What ``<workdir>/checkpoints/<kind>`` ("latest": the TrainState; "best": the variables)
    holds at ``step`` (default: the newest), as numpy, restored without a target (as saved)."""
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(workdir)
    mngr = ckpt.managers[kind]
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return jax.device_get(out["state"])


def saved_step(workdir: str) -> int:
    """The step of ``<workdir>``'s newest latest checkpoint, from the position it saved."""
    with Checkpointer(workdir) as ckpt:
        return ckpt.latest_meta()["position"]["step"]


def make_image_tree(root, counts: dict, pixels=None, size=(6, 6), sizes=None) -> dict:
    """``<root>/<split>/<class>/<j>.png`` for ``counts = {split: {class: n}}``; returns
    ``{id: (split, class)}``.

    Image ``id`` (numbered in order) is ``pixels(id, split, class)`` (uint8 HxWx3), by default
    one unique constant colour ``(id % 256, id // 256, 7)`` of ``size`` (or ``sizes[id % len]``).
    """
    from PIL import Image

    def by_id(i, split, cls):
        hw = sizes[i % len(sizes)] if sizes else size
        return np.zeros((*hw, 3), np.uint8) + np.array([i % 256, i // 256, 7], np.uint8)

    pixels = pixels or by_id
    ids, next_id = {}, 0
    for split, classes in counts.items():
        for cls, n in classes.items():
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for j in range(n):
                image = np.asarray(pixels(next_id, split, cls), np.uint8)
                Image.fromarray(image).save(os.path.join(root, split, cls, f"{j}.png"))
                ids[next_id] = (split, cls)
                next_id += 1
    return ids


def setup_step(config, mesh, num_classes: int = 4, phase_index: int = 0, seed: int = 0):
    """(model, plan, state, jitted step ``(state, batch, step)``) for ``config`` on ``mesh``."""
    model = build_model(config, num_classes)
    variables = init_variables(model, config.augment.resolution, seed)
    plan = step_lib.build_phase(config, variables["params"], phase_index, steps_per_epoch=10)
    state = devices.replicate(
        mesh, step_lib.create_train_state(variables, plan.tx, jax.random.key(seed + 1))
    )
    fn = step_lib.make_train_step(model, plan, mesh, config.augment, SIMPLE, config.sync_batchnorm)
    return model, plan, state, fn


def default_sigint() -> None:
    """``preexec_fn`` of a child that must get Ctrl-C as in a foreground shell, even when the
    tests run as a background job (started with SIGINT ignored, which a child inherits)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_at(config, workdir: str, stop_after_steps: int) -> int:
    """Run ``main.run`` until it stops at ``stop_after_steps`` (as on SIGTERM: saved, then
    interrupts.Interrupted); the step it stopped at."""
    import pytest

    from cifar_flax import main
    from cifar_flax.run.interrupts import Interrupted

    with pytest.raises(Interrupted) as stopped:
        main.run(config, workdir, stop_after_steps=stop_after_steps)
    return stopped.value.step


def command_status(config, workdir) -> int:
    """``main.run(config, workdir)`` behind the commands' one boundary (cli.run), in this
    process: the exit status ``python -m cifar_flax.main`` would have (its lines go to the
    captured stdout/stderr)."""
    from absl import flags

    from cifar_flax import cli, main

    return cli.run(lambda argv: main.run(config, str(workdir)), flags.FlagValues(), [])


def steps_saved(workdir: str, kind: str = "latest") -> list[int]:
    """The step folders in ``<workdir>/checkpoints/<kind>``, sorted."""
    folder = os.path.join(workdir, "checkpoints", kind)
    return sorted(int(p) for p in os.listdir(folder) if p.isdigit())
