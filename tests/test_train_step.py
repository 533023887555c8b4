"""The data-parallel train step: it learns, freezing is exact and cheap, bf16 keeps f32 params."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from test_layout import road_in
from train_utils import fake_batch, setup_step, tiny_config

from cifar_flax import train as step_lib
from cifar_flax.config import phase
from cifar_flax.data import preprocessing
from cifar_flax.data.preprocessing import SIMPLE
from cifar_flax.run import devices
from cifar_flax.run.evaluation import make_logits_step


@pytest.fixture(scope="module")
def mesh():
    return devices.make_mesh()


@pytest.mark.slow
def test_overfits_a_small_batch_to_full_accuracy(mesh):
    config = tiny_config()
    config.phases = [phase("all", steps=60, optimizer="adamw", lr=3e-3, schedule="constant")]
    model, _, state, fn = setup_step(config, mesh)
    batch = devices.shard_batch(mesh, fake_batch())
    losses = []
    for step in range(60):
        state, metrics = fn(state, batch, step)
        losses.append(float(metrics["loss"]))
    logits_fn = make_logits_step(model, mesh, config.augment, SIMPLE)
    logits = logits_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"])
    accuracy = np.mean(np.asarray(logits).argmax(-1) == fake_batch()["label"])
    assert accuracy == 1.0, (accuracy, losses[::10])
    assert losses[-1] < 0.25 * losses[0]


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_frozen_groups_stay_bit_identical(mesh):
    config = tiny_config()
    config.phases = [phase("upper", steps=3, trainable=("stage4", "head"), lr=0.1)]
    _, plan, state, fn = setup_step(config, mesh)
    before_p, before_s = _flat(state.params), _flat(state.batch_stats)
    batch = devices.shard_batch(mesh, fake_batch())
    for step in range(3):
        state, _ = fn(state, batch, step)
    after_p, after_s = _flat(state.params), _flat(state.batch_stats)
    trainable = ("stage4/", "head/")
    for k, v in before_p.items():
        if k.startswith(trainable):
            if not k.startswith("head/out/bias"):
                assert not np.array_equal(v, after_p[k]), k
        else:
            assert np.array_equal(v, after_p[k]), k  # bit-identical
    for k, v in before_s.items():  # Frozen modules' BatchNorm ran in inference mode.
        assert np.array_equal(v, after_s[k]) != k.startswith("stage4/"), k
    assert plan.bn_train_modules == ("stage4",)


def _flops(config, mesh) -> float:
    _, _, state, fn = setup_step(config, mesh)
    batch = devices.shard_batch(mesh, fake_batch(size=32))
    cost = fn.lower(state, batch, 0).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.slow
def test_frozen_backbone_step_costs_far_fewer_flops(mesh):
    config = tiny_config(**{"augment.resolution": 32})
    config.model.base_width = 8
    all_flops = _flops(config, mesh)
    config.phases = [phase("head", steps=1, trainable=("head",))]
    head_flops = _flops(config, mesh)
    config.phases = [phase("upper", steps=1, trainable=("stage4", "head"))]
    upper_flops = _flops(config, mesh)
    # Forward only (~1/3 of forward+backward) vs everything; stage4+head: no backward below it.
    assert head_flops < 0.6 * all_flops, (head_flops, all_flops)
    assert head_flops < upper_flops < 0.9 * all_flops, (head_flops, upper_flops, all_flops)


def test_bfloat16_computes_in_bf16_with_float32_params(mesh):
    config = tiny_config(dtype="bfloat16")
    _, _, state, fn = setup_step(config, mesh)
    batch = devices.shard_batch(mesh, fake_batch())
    new_state, metrics = jax.eval_shape(fn, state, batch, 0)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(new_state.params))
    assert metrics["loss"].dtype == np.float32
    hlo = fn.lower(state, batch, 0).as_text()
    assert hlo.count("bf16") > 50  # The convolutions run in bf16.


def test_step_keys_are_fold_ins_of_step_then_device():
    """The per-step RNG, pinned directly: keys depend on (rng, step, device) and nothing else,
    derived as fold_in(fold_in(rng, step), device) then split (what resume relies on)."""
    rng = jax.random.key_data(jax.random.key(7))
    aug, drop = step_lib.step_keys(rng, 5, 2)
    base = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), 5), 2)
    want_aug, want_drop = jax.random.split(base)
    assert np.array_equal(jax.random.key_data(aug), jax.random.key_data(want_aug))
    assert np.array_equal(jax.random.key_data(drop), jax.random.key_data(want_drop))
    datas = {tuple(np.asarray(jax.random.key_data(k)).ravel())
             for s, d in [(5, 2), (6, 2), (5, 3), (2, 5)] for k in step_lib.step_keys(rng, s, d)}
    assert len(datas) == 8  # Every (step, device) pair and both uses get their own key.


@pytest.mark.slow
def test_train_step_draws_dropout_from_its_step_key(mesh):
    """The full step's loss equals a forward pass with step_keys(rng, step, device 0)'s dropout
    key, and differs from the one of the neighbouring step (dropout is on, so keys matter)."""
    config = tiny_config()
    config.model.head_hidden = (8,)
    config.model.head_dropout = 0.5
    config.model.zero_init_head = False
    model, plan, state, fn = setup_step(config, mesh)
    batch, step = fake_batch(), 4
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    rng = np.asarray(state.rng)

    @jax.jit  # One program (eagerly, every layer's ops would compile on their own).
    def loss_with(key_step):
        aug_key, dropout_key = step_lib.step_keys(rng, key_step, 0)
        x, soft = preprocessing.train_augment(batch["image"], batch["label"], aug_key, config.augment,
                                        4, SIMPLE)  # Augmentation off: resize + normalise.
        logits, _ = model.clone(bn_axis_name=None).apply(  # One device: same statistics.
            variables, x, train=True, bn_train_modules=plan.bn_train_modules,
            mutable=["batch_stats"], rngs={"dropout": dropout_key})
        return step_lib.cross_entropy(logits, soft)

    expected, other = float(loss_with(step)), float(loss_with(step + 1))
    _, metrics = fn(state, devices.shard_batch(mesh, batch), step)
    assert abs(float(metrics["loss"]) - expected) < 1e-5 * max(1.0, abs(expected))
    assert abs(other - expected) > 1e-3  # The test can tell the keys apart.


@pytest.mark.slow
def test_head_dropout_acts_before_the_output_layer():
    """With no hidden layer the only dropout is the one before ``out``: training-mode logits must
    differ from inference-mode ones and from another dropout key's."""
    config = tiny_config()
    config.model.head_hidden = ()
    config.model.head_dropout = 0.5
    config.model.zero_init_head = False
    model, _, state, _ = setup_step(config, devices.make_mesh())
    params = {"head": jax.device_get(state.params["head"])}
    width = params["head"]["out"]["kernel"].shape[0]
    feats = np.random.default_rng(0).normal(size=(8, width)).astype(np.float32) + 1.0
    run = lambda train, k=0: np.asarray(model.apply(  # noqa: E731
        {"params": params}, feats, train=train, method="classify",
        rngs={"dropout": jax.random.key(k)}))
    assert not np.allclose(run(True), run(False))
    assert not np.allclose(run(True, 0), run(True, 1))


def test_tracing_the_step_runs_only_code_on_the_road_in(mesh):
    """Every function of ours that runs while the full step is traced (augmentation,
    normalisation, the model, the loss, the update) lives in a file of the README's road in, so
    a reader who follows those files sees the whole step."""
    repo = Path(__file__).resolve().parent.parent
    _, _, state, fn = setup_step(tiny_config(), mesh)
    batch = devices.shard_batch(mesh, fake_batch())
    ran: set[str] = set()

    def profile(frame, event, arg):
        path = Path(frame.f_code.co_filename)
        if event == "call" and path.is_relative_to(repo / "cifar_flax"):
            ran.add(path.relative_to(repo).as_posix())

    sys.setprofile(profile)
    try:
        fn.lower(state, batch, 0)
    finally:
        sys.setprofile(None)
    assert {"cifar_flax/train.py", "cifar_flax/data/preprocessing.py",
            "cifar_flax/models.py"} <= ran, ran  # The profile saw the step being traced.
    assert ran <= set(road_in()), f"the step runs code outside the road in: {ran - set(road_in())}"
