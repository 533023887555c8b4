"""Cached-feature head training matches recomputing the frozen backbone every step.

These use the parts CachedPhase (the training loop's cached phase) is built from: build_cache,
FeatureCache.take, train.make_head_step and evaluate_features; tests/test_train_cached.py checks
CachedPhase itself inside train_and_evaluate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifar_flax import models, train
from cifar_flax.data import preprocessing
from cifar_flax.run import devices, feature_cache

NUM_CLASSES, N, SIZE, BATCH, EPOCHS = 4, 96, 16, 16, 12


def _preprocess(images):
    return preprocessing.normalize(images, preprocessing.SIMPLE)


@pytest.fixture(scope="module")
def setup():
    """A tiny network and a learnable tiny dataset (class = dominant colour, plus noise)."""
    rs = np.random.RandomState(0)
    labels = np.arange(N) % NUM_CLASSES
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[labels]
    images = base[:, None, None, :] + rs.randint(-40, 40, (N, SIZE, SIZE, 3))
    images = np.clip(images, 0, 255).astype(np.uint8)
    model = models.create_model(NUM_CLASSES, stage_sizes=(1, 1, 1, 1), base_width=8,
                                head_hidden=(), head_dropout=0.0)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    return model, variables, images, labels.astype(np.int32)


def _batches(images, labels, bs):
    for s in range(0, len(images), bs):
        yield {"image": images[s:s + bs], "label": labels[s:s + bs]}


def _head_plan(params):
    """An train.PhasePlan training only the head (SGD momentum; frozen groups set_to_zero)."""
    labels = {k: jax.tree.map(lambda _: "head" if k == "head" else train.FROZEN, v)
              for k, v in params.items()}
    tx = optax.multi_transform({"head": optax.sgd(0.05, momentum=0.9),
                                train.FROZEN: optax.set_to_zero()}, labels)
    return train.PhasePlan(index=0, name="head", steps=0, tx=tx, labels=labels,
                           trainable=jax.tree.map(lambda g: g == "head", labels), schedules={},
                           bn_train_modules=())


def test_build_cache_pads_and_masks_last_batch(setup):
    model, variables, images, labels = setup
    cache = feature_cache.build_cache(
        model, variables, lambda p: _batches(images[:40], labels[:40], 16), _preprocess)
    feats, labs = cache.features[0], cache.labels[0]
    direct = model.apply(variables, _preprocess(images[:40]), train=False, method="features")
    assert feats.shape == (40, 8 * 8 * 4) and labs.tolist() == labels[:40].tolist()
    np.testing.assert_allclose(feats, np.asarray(direct), rtol=1e-4, atol=1e-5)
    # An explicit mask (padded eval batches) drops the masked rows.
    masked = [{"image": images[:16], "label": labels[:16], "mask": np.arange(16) < 10}]
    c2 = feature_cache.build_cache(model, variables, lambda p: masked, _preprocess)
    assert c2.features.shape[:2] == c2.labels.shape == (1, 10)


@pytest.mark.slow
def test_cached_head_training_matches_uncached(setup):
    model, variables, images, labels = setup
    params, batch_stats = variables["params"], variables["batch_stats"]
    cache = feature_cache.build_cache(
        model, variables, lambda p: _batches(images, labels, BATCH), _preprocess)
    plan = _head_plan(params)
    tx = plan.tx

    @jax.jit
    def uncached_step(params, opt_state, x, y):  # train.py's frozen path: BN in inference mode
        def loss_fn(head):
            logits = model.apply({"params": {**params, "head": head}, "batch_stats": batch_stats},
                                 _preprocess(x), train=True, bn_train_modules=())
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss_fn)(params["head"])
        grads = {k: g if k == "head" else jax.tree.map(jnp.zeros_like, v)
                 for k, v in params.items()}
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    head_step = train.make_head_step(model, plan, devices.make_mesh(), params)
    h_c, s_c, step = jax.tree.map(jnp.copy, params["head"]), tx.init(params), 0
    p_u, s_u = params, tx.init(params)
    rng = jax.random.key_data(jax.random.key(1))
    for epoch in range(EPOCHS):
        order = np.random.default_rng([0, epoch]).permutation(N)
        for start in range(0, N - BATCH + 1, BATCH):
            rows = order[start:start + BATCH]
            h_c, s_c, metrics = head_step(h_c, s_c, step, rng, *cache.take(epoch, rows))
            step += 1
            p_u, s_u = uncached_step(p_u, s_u, images[rows], labels[rows])
    assert int(step) == EPOCHS * (N // BATCH)
    # batch_size 40: two full batches and a padded, masked one of 16 examples.
    acc_c = feature_cache.evaluate_features(model, {"head": h_c}, cache.features[0],
                                            cache.labels[0], batch_size=40)
    logits = model.apply({"params": p_u, "batch_stats": batch_stats}, _preprocess(images))
    acc_u = float(np.mean(np.argmax(logits, -1) == labels))
    assert acc_c["accuracy"] > 0.6, "the head did not learn; the comparison would be vacuous"
    assert abs(acc_c["accuracy"] - acc_u) <= 0.03
    np.testing.assert_allclose(h_c["out"]["kernel"], p_u["head"]["out"]["kernel"],
                               rtol=2e-3, atol=2e-4)
    # The cached step returns the head alone: the backbone it stands for stays bit-identical in
    # the full path too (frozen groups get set_to_zero updates), so the comparison is exact.
    for k in models.BACKBONE_MODULES:
        assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                                p_u[k], params[k])))


def test_augmented_passes_cycle(setup):
    model, variables, images, labels = setup

    def flip(rng, x):  # a deterministic-per-pass augmentation: flip everything on odd rngs
        return jnp.where(jax.random.bernoulli(rng), x[:, :, ::-1], x)

    cache = feature_cache.build_cache(
        model, variables, lambda p: _batches(images[:32], labels[:32], 16), _preprocess,
        num_passes=3, augment_fn=flip, rng=jax.random.PRNGKey(3))
    assert cache.features.shape[:2] == (3, 32) and cache.num_passes == 3
    differs = [not np.allclose(cache.features[0], cache.features[p]) for p in (1, 2)]
    assert any(differs), "augmented passes should not all be identical"
    rows = np.arange(8)
    for epoch, p in ((3, 0), (4, 1), (5, 2)):  # epoch e -> pass e % 3
        f, lab = cache.take(epoch, rows)
        np.testing.assert_array_equal(f, cache.features[p, :8])
        np.testing.assert_array_equal(lab, labels[:8])


def test_backbone_frozen():
    head_only = {"stem": {"w": False}, "stage4": {"w": False}, "head": {"w": True}}
    stage4 = {"stem": {"w": False}, "stage4": {"w": True}, "head": {"w": True}}
    assert feature_cache.backbone_frozen(head_only, ())
    assert not feature_cache.backbone_frozen(head_only, None)  # BN trains: features change
    assert not feature_cache.backbone_frozen(stage4, ())
    assert not feature_cache.backbone_frozen(stage4, ("stage4",))
