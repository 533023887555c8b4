"""Parameter groups, phase plans, schedules and weight decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifar_flax import train
from cifar_flax.config import assign_groups, default_config, peak_learning_rates, phase
from cifar_flax.models import create_model
from cifar_flax.run import workdir


@pytest.fixture(scope="module")
def params():
    model = create_model(4, stage_sizes=(1, 1, 1, 1), base_width=4, head_hidden=(8,))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes["params"])


def test_default_groups_cover_every_parameter_once(params):
    assignment = assign_groups(train.flat_paths(params), dict(default_config().groups))
    assert set(assignment) == set(train.flat_paths(params))
    assert set(assignment.values()) == {"stem", "stage1", "stage2", "stage3", "stage4", "head"}
    assert assignment["stage4/block1/conv2/kernel"] == "stage4"
    assert assignment["head/hidden1/bias"] == "head"


def test_phase_plan_freezes_untrained_groups(params):
    c = default_config()
    c.phases = [phase("upper", trainable=("stage4", "head"), lr=0.01, group_lr={"head": 0.1})]
    plan = train.build_phase(c, params, 0, steps_per_epoch=10)
    flat = train.flat_paths(plan.labels)
    assert flat["stem/conv/kernel"] == train.FROZEN
    assert flat["stage4/block1/conv1/kernel"] == "stage4"
    assert set(plan.schedules) == {"stage4", "head"}
    assert plan.bn_train_modules == ("stage4",)
    # Frozen groups have no optimizer state; a step leaves them at zero update.
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = plan.tx.update(grads, plan.tx.init(params), params)
    up = train.flat_paths(updates)
    assert not np.any(up["stage3/block1/conv1/kernel"])
    assert np.all(up["stage4/block1/conv1/kernel"] < 0)
    lr = train.learning_rates(plan, 0)
    assert lr["head"] == pytest.approx(0.1) and lr["stage4"] == pytest.approx(0.01)


def test_bn_train_modules_switch(params):
    c = default_config()
    c.phases = [phase("head", trainable=("head",))]
    assert train.build_phase(c, params, 0, 10).bn_train_modules == ()
    c.frozen_bn_inference = False
    assert train.build_phase(c, params, 0, 10).bn_train_modules is None


def test_schedules_warmup_cosine_and_constant():
    p = phase("x", warmup_epochs=1.0, schedule="cosine")
    s = train.make_schedule(p, 0.2, total_steps=100, steps_per_epoch=10)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.1)
    assert float(s(10)) == pytest.approx(0.2)
    assert float(s(55)) == pytest.approx(0.1, rel=1e-3)  # Half-way through the cosine.
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)
    c = train.make_schedule(phase("y", schedule="constant", warmup_epochs=0.5), 0.3, 100, 10)
    assert float(c(0)) == 0.0 and float(c(5)) == pytest.approx(0.3) and float(c(99)) == pytest.approx(0.3)


def test_phase_steps_from_epochs_or_steps():
    assert train.phase_steps(phase("a", epochs=2.5), 10) == 25
    assert train.phase_steps(phase("b", epochs=2.5, steps=7), 10) == 7


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_weight_decay_only_on_kernels(params, opt):
    c = default_config()
    c.phases = [phase("all", optimizer=opt, lr=0.1, weight_decay=0.5, momentum=0.0 if opt == "sgd" else 0.9)]
    plan = train.build_phase(c, params, 0, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = plan.tx.update(zeros, plan.tx.init(params), params)
    new = train.flat_paths(optax.apply_updates(params, updates))
    assert np.all(new["stage1/block1/conv1/kernel"] < 1.0)  # Decayed.
    assert np.all(new["stage1/block1/bn1/scale"] == 1.0)  # Not decayed.
    assert np.all(new["head/out/bias"] == 1.0)


def test_every_rate_scales_linearly_with_the_batch(params):
    """lr and group_lr are stated for lr_batch_size (128): at batch 64 every group's schedule and
    the update it makes are half of batch 128's, which are the rates as given."""
    c = default_config()
    p = phase("upper", trainable=("stage4", "head"), lr=0.01, group_lr={"head": 0.1},
              momentum=0.0, warmup_epochs=1.0, steps=20)
    c.phases = [p]
    plans = {}
    for batch in (128, 64):
        c.batch_size = batch
        plans[batch] = train.build_phase(c, params, 0, steps_per_epoch=10)
    for group, lr in (("stage4", 0.01), ("head", 0.1)):
        stated = train.make_schedule(p, lr, 20, 10)
        halved = train.make_schedule(p, lr / 2, 20, 10)
        for step in (5, 15):  # In the warmup and in the cosine.
            assert float(plans[128].schedules[group](step)) == float(stated(step))  # Exactly.
            assert float(plans[64].schedules[group](step)) == pytest.approx(float(halved(step)))
            assert float(halved(step)) < float(stated(step))
    c.batch_size = 64
    assert peak_learning_rates(c, 0) == {"head": 0.05, "stage4": 0.005}
    grads = jax.tree.map(jnp.ones_like, params)
    moved = {}
    for batch, plan in plans.items():  # Plain SGD at step 10 (the peak): update = -lr * grad.
        state = plan.tx.init(params)
        for _ in range(11):
            updates, state = plan.tx.update(grads, state, params)
        moved[batch] = train.flat_paths(updates)["head/out/bias"]
    assert np.allclose(moved[64], moved[128] / 2) and np.allclose(moved[128], -0.1)


def test_a_checkpoint_from_before_lr_batch_size_resumes_only_at_its_own_rates():
    """A run saved before the field existed trained at its rates as given (stated for its own
    batch): resuming it at batch 32 with lr_batch_size 128 would quarter them, so that is a
    difference; with lr_batch_size 32 it is the same run."""
    c = default_config()
    c.batch_size = 32
    old = {k: v for k, v in workdir.fingerprint(c).items() if k != "lr_batch_size"}
    assert workdir.differences(old, workdir.fingerprint(c)) == ["lr_batch_size: 32 -> 128"]
    c.lr_batch_size = 32
    assert workdir.differences(old, workdir.fingerprint(c)) == []
