"""The data-parallel train step: it learns, freezing is exact and cheap, bf16 keeps f32 params."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from cifar_flax import step as step_lib
from cifar_flax.config import phase
from cifar_flax.preprocessing import SIMPLE
from train_utils import fake_batch, setup_step, tiny_config


@pytest.fixture(scope="module")
def mesh():
    return step_lib.make_mesh()


def test_overfits_a_small_batch_to_full_accuracy(mesh):
    config = tiny_config()
    config.phases = [phase("all", steps=60, optimizer="adamw", lr=3e-3, schedule="constant")]
    model, _, state, fn = setup_step(config, mesh)
    batch = step_lib.shard_batch(mesh, fake_batch())
    losses = []
    for _ in range(60):
        state, metrics = fn(state, batch)
        losses.append(float(metrics["loss"]))
    evaluate = step_lib.make_eval_step(model, mesh, config.augment, SIMPLE)
    out = evaluate({"params": state.params, "batch_stats": state.batch_stats}, batch)
    accuracy = np.mean(np.asarray(out["logits"]).argmax(-1) == fake_batch()["label"])
    assert accuracy == 1.0, (accuracy, losses[::10])
    assert losses[-1] < 0.25 * losses[0]
    assert int(state.step) == 60


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_frozen_groups_stay_bit_identical(mesh):
    config = tiny_config()
    config.phases = [phase("upper", steps=3, trainable=("stage4", "head"), lr=0.1)]
    _, plan, state, fn = setup_step(config, mesh)
    before_p, before_s = _flat(state.params), _flat(state.batch_stats)
    batch = step_lib.shard_batch(mesh, fake_batch())
    for _ in range(3):
        state, _ = fn(state, batch)
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
    batch = step_lib.shard_batch(mesh, fake_batch(size=32))
    cost = fn.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


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
    batch = step_lib.shard_batch(mesh, fake_batch())
    new_state, metrics = jax.eval_shape(fn, state, batch)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(new_state.params))
    assert metrics["loss"].dtype == np.float32
    hlo = fn.lower(state, batch).as_text()
    assert hlo.count("bf16") > 50  # The convolutions run in bf16.
