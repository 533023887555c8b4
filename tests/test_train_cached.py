"""The cached-feature fast path inside train_and_evaluate: same training as the full step.

A tiny ResNet (stage_sizes 1,1,1,1, width 8) on 32px synthetic data: 48 train images, batch 16,
so 3 steps per epoch. Phase "head" (6 epochs, head only, dropout 0.5, no augmentation) qualifies
for the cache; phase "all" (2 steps) does not. Tolerances: the cached and the full path compute
the same float32 functions in differently fused XLA programs (features on eval-sized batches vs
inside the train step); here they agree bit for bit, but fusion may differ elsewhere, so head
parameters are compared with rtol 1e-4 / atol 1e-5 after the head phase and rtol/atol 1e-3 after
the all-layers phase that follows (a wrong dropout key or batch order is off by ~1e-1).
"""

from __future__ import annotations

import os
import signal

import jax
import ml_collections
import numpy as np
import pytest
from train_utils import (enable_compilation_cache, interrupted_at, saved_step, state_at,
                         steps_saved, tiny_config)

from cifar_flax import UserError
from cifar_flax import train as step_lib
from cifar_flax.config import phase, validate
from cifar_flax.data import input_pipeline
from cifar_flax.main import run as train_and_evaluate
from cifar_flax.run import devices, feature_cache
from cifar_flax.run.model_setup import build_model, init_variables, input_preprocessing
from cifar_flax.run.interrupts import Interrupted
from cifar_flax.run.metrics import read_metrics
from cifar_flax.run.workdir import LOCK_NAME

pytestmark = pytest.mark.slow  # End-to-end runs: the full suite only.

enable_compilation_cache()
HEAD_END, END = 18, 20  # Last steps of the head phase and of the run.


def _config(cache: bool = True):
    c = tiny_config()
    c.synthetic.size = c.augment.resolution = 32
    c.model.base_width = 8
    c.model.head_hidden = (8,)
    c.model.head_dropout = 0.5  # Same dropout masks as the full step (one device).
    c.phases = [
        phase("head", epochs=6, trainable=("head",), optimizer="adamw", lr=3e-2,
              schedule="constant"),
        phase("all", steps=2, lr=0.01),
    ]
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 3
    c.early_stopping.patience = 10  # The head phase runs to its end.
    c.feature_cache.enabled = cache
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dirs = {k: str(tmp_path_factory.mktemp(k)) for k in ("cached", "full", "resumed")}
    results = {
        "cached": train_and_evaluate(_config(True), dirs["cached"]),
        "full": train_and_evaluate(_config(False), dirs["full"]),
        "first": interrupted_at(_config(True), dirs["resumed"], 10),
        "resumed": train_and_evaluate(_config(True), dirs["resumed"]),
    }
    return dirs, results


def test_cached_head_phase_matches_the_full_step(runs):
    dirs, results = runs
    cached, full = state_at(dirs["cached"], HEAD_END), state_at(dirs["full"], HEAD_END)
    c = _config()
    initial = init_variables(c, build_model(c, c.synthetic.num_classes))
    initial = jax.device_get(initial)
    head_c = jax.tree.leaves(cached["params"]["head"])
    head_f = jax.tree.leaves(full["params"]["head"])
    head_0 = jax.tree.leaves(initial["params"]["head"])
    moved = [not np.allclose(a, b) for a, b in zip(head_c, head_0)]
    assert len(head_c) == 4 and all(moved), "the head did not train; the comparison is vacuous"
    for a, b in zip(head_c, head_f):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for part in ("params", "batch_stats"):  # The backbone is bit-identical to the initial one.
        before = {k: v for k, v in initial[part].items() if k != "head"}
        after = {k: v for k, v in cached[part].items() if k != "head"}
        assert len(jax.tree.leaves(after)) == len(jax.tree.leaves(before)) > 10
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(x, y)
    # Cached validation = full-model validation; the train metrics agree step by step.
    ev_c, ev_f = read_metrics(dirs["cached"], "eval"), read_metrics(dirs["full"], "eval")
    assert [r["step"] for r in ev_c] == [r["step"] for r in ev_f] == [*range(3, 19, 3), END]
    for a, b in zip(ev_c, ev_f):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    tr_c, tr_f = read_metrics(dirs["cached"], "train"), read_metrics(dirs["full"], "train")
    assert [r["loss"] for r in tr_c] == pytest.approx([r["loss"] for r in tr_f], rel=1e-4)
    last_c, last_f = state_at(dirs["cached"]), state_at(dirs["full"])
    for a, b in zip(jax.tree.leaves(last_c), jax.tree.leaves(last_f)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)  # After phase "all" too.
    assert results["cached"]["test_accuracy"] == results["full"]["test_accuracy"] > 0.5
    assert results["cached"]["test_loss"] == pytest.approx(results["full"]["test_loss"], rel=1e-4)


def test_only_the_qualifying_phase_uses_the_cache(runs):
    dirs, _ = runs
    phases = {k: [(r["name"], r["feature_cache"]) for r in read_metrics(dirs[k], "phase")]
              for k in ("cached", "full")}
    assert phases["cached"] == [("head", True), ("all", False)]
    assert phases["full"] == [("head", False), ("all", False)]
    extracted = read_metrics(dirs["cached"], "feature_cache")
    assert [(r["step"], r["phase"], r["train_examples"], r["passes"]) for r in extracted] == [
        (0, 0, 48, 1)]
    assert extracted[0]["extract_seconds"] > 0
    assert read_metrics(dirs["full"], "feature_cache") == []


def test_resume_inside_a_cached_phase_is_exact(runs):
    dirs, results = runs
    assert results["first"] == 10
    a, b = state_at(dirs["cached"]), state_at(dirs["resumed"])
    assert saved_step(dirs["cached"]) == saved_step(dirs["resumed"]) == results["resumed"]["steps"]
    assert results["resumed"]["steps"] == END
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # Bit for bit: the rebuilt cache is the same.
    assert results["resumed"]["test_accuracy"] == results["cached"]["test_accuracy"]
    # The resumed run rebuilt the cache at step 10, in the same phase.
    assert [(r["step"], r["phase"]) for r in read_metrics(dirs["resumed"], "feature_cache")] == [
        (0, 0), (10, 0)]


def test_cached_batches_follow_the_input_pipeline_order():
    c = _config()
    info = input_pipeline.get_info(c)
    images = np.concatenate([b["image"][b["mask"]]
                             for b in input_pipeline.eval_batches(c, info, "train")])
    spe = input_pipeline.steps_per_epoch(c, info)
    stream = input_pipeline.train_batches(c, info)
    for epoch in range(2):
        order = input_pipeline.epoch_order(c, epoch)
        assert sorted(order.tolist()) == list(range(len(images)))
        for i in range(spe):
            rows = order[i * c.batch_size:(i + 1) * c.batch_size]
            np.testing.assert_array_equal(images[rows], next(stream)["image"])


def test_cache_decision():
    c = _config()
    params = jax.eval_shape(lambda: init_variables(c, build_model(c, 4)))["params"]
    head = step_lib.build_phase(c, params, 0, 3)
    every = step_lib.build_phase(c, params, 1, 3)
    assert feature_cache.cache_decision(c, head) == (True, "exact: augmentation is off")
    assert not feature_cache.cache_decision(c, every)[0]
    c.augment.flip = True
    assert "passes=0" in feature_cache.cache_decision(c, head)[1]
    c.feature_cache.passes = 3
    assert feature_cache.cache_decision(c, head)[0]
    c.augment.mixup_alpha = 0.2
    assert "mixup" in feature_cache.cache_decision(c, head)[1]
    c.augment.mixup_alpha, c.feature_cache.enabled = 0.0, False
    assert not feature_cache.cache_decision(c, head)[0]


@pytest.mark.parametrize("bad", [{"passes": -1}, {"passes": 1.5}, {"enabled": "yes"}])
def test_config_rejects_bad_feature_cache_values(bad):
    c = _config()
    c.feature_cache = ml_collections.ConfigDict({"enabled": True, "passes": 0, **bad})
    field = next(iter(bad))
    with pytest.raises(UserError, match=f"feature_cache.{field}="):
        validate(c, num_devices=1)
    c.feature_cache = ml_collections.ConfigDict({"enabled": False, "passes": 2})
    validate(c, num_devices=1)  # Valid values pass.


def test_augmented_passes_cycle_per_epoch():
    c = _config()
    c.augment.flip, c.feature_cache.passes = True, 2
    info, mesh = input_pipeline.get_info(c), devices.make_mesh()
    model = build_model(c, info.num_classes)
    variables, prep = init_variables(c, model), input_preprocessing(c)
    plan = step_lib.build_phase(c, variables["params"], 0, 3)
    state = devices.replicate(
        mesh, step_lib.create_train_state(variables, plan.tx, jax.random.key(1)))
    head_step = step_lib.make_head_step(model, plan, mesh, state.params)
    cached = feature_cache.CachedPhase(c, info, model, mesh, prep, state, head_step)
    feats = cached.cache.features
    assert feats.shape[:2] == (2, 48)
    same = np.all(np.isclose(feats[0], feats[1], rtol=1e-5, atol=1e-6), axis=1)
    assert 0 < same.sum() < 48, "flip should change some examples' features and not others"
    for s, p in ((0, 0), (3, 1), (6, 0)):  # Epochs 0, 1, 2 -> passes 0, 1, 0.
        rows = input_pipeline.epoch_order(c, s // 3)[:16]
        np.testing.assert_array_equal(cached._rows(s)[0], feats[p, rows])
    new_state, metrics = cached.step(state, 0)
    assert type(new_state) is type(state)
    assert np.isfinite(float(metrics["loss"]))
    sharding = new_state.params["head"]["out"]["kernel"].sharding
    assert sharding.is_equivalent_to(state.params["stem"]["conv"]["kernel"].sharding, 2)


def test_sigterm_during_extraction_saves_and_stops(tmp_path, monkeypatch):
    real = input_pipeline.eval_batches

    def signalling(config, info, split, **kw):  # SIGTERM once the first batch is read.
        for i, batch in enumerate(real(config, info, split, **kw)):
            yield batch
            if i == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(input_pipeline, "eval_batches", signalling)
    c = _config()
    c.phases = c.phases[:1]
    with pytest.raises(Interrupted) as stopped:
        train_and_evaluate(c, str(tmp_path))
    assert stopped.value.step == 0 and stopped.value.status == 0
    assert steps_saved(str(tmp_path)) == [0]  # Resumable from the start.
    assert read_metrics(str(tmp_path), "feature_cache") == []  # The extraction did not finish.
    assert not (tmp_path / LOCK_NAME).exists()
