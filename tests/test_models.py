"""The Flax ResNet50's head (hidden layers, dropout, zero init, output shape) and its two layouts.

Tiny networks of the same structure (``stage_sizes=(1, 1, 1, 1)``, ``base_width=8``, so 256
features) keep this fast; the full-size network is checked against Keras and PyTorch in
test_pretrained_keras.py / test_pretrained_torch.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_flax import models

TINY = dict(stage_sizes=(1, 1, 1, 1), base_width=8)
FEATURES = 8 * 8 * 4


def _abstract(model, size=32):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _random_variables(model, size=32):
    """Random parameters (unit BatchNorm variances) without running ``init``, which is slow on
    CPU (compiling the random initialisers); enough for shape and mode tests."""
    rng = np.random.default_rng(0)
    abstract = _abstract(model, size)
    params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32),
                          abstract["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda p, s: np.full(s.shape, 1.0 if p[-1].key == "var" else 0.0, np.float32),
        abstract["batch_stats"],
    )
    return {"params": params, "batch_stats": stats}


def _head_variables(model):
    """Real ``init`` of the head alone (fast): ``classify`` only touches the head."""
    return model.init(jax.random.key(0), jnp.zeros((1, FEATURES)), method=model.classify)


def test_hidden_layers_have_the_right_shapes():
    model = models.create_model(num_classes=5, head_hidden=(32, 16), **TINY)
    shapes = jax.tree.map(lambda a: a.shape, _abstract(model)["params"]["head"])
    assert shapes == {
        "hidden1": {"kernel": (FEATURES, 32), "bias": (32,)},
        "hidden2": {"kernel": (32, 16), "bias": (16,)},
        "out": {"kernel": (16, 5), "bias": (5,)},
    }


@pytest.mark.slow
@pytest.mark.parametrize("layout", models.LAYOUTS)
def test_output_shape_in_train_and_eval(layout):
    model = models.create_model(num_classes=7, layout=layout, head_hidden=(16,),
                                 head_dropout=0.5, **TINY)
    variables = _random_variables(model)
    x = jax.random.normal(jax.random.key(1), (3, 40, 40, 3))
    apply = jax.jit(model.apply, static_argnames=("train", "mutable", "method"))  # Not per op.
    logits = apply(variables, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    logits, updates = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)},
                            mutable=("batch_stats",))
    assert logits.shape == (3, 7)
    # Training mode updates the BatchNorm statistics; inference mode does not touch them.
    before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    assert apply(variables, x, method="features").shape == (3, FEATURES)


def test_dropout_is_active_only_in_training():
    model = models.create_model(num_classes=4, head_hidden=(32,), head_dropout=0.5,
                                zero_init_head=False, **TINY)
    variables = _head_variables(model)
    feats = jax.random.normal(jax.random.key(3), (8, FEATURES))

    def classify(train, key):
        return np.asarray(model.apply(variables, feats, train, method=model.classify,
                                      rngs={"dropout": key}))

    k1, k2 = jax.random.key(10), jax.random.key(11)
    assert not np.allclose(classify(True, k1), classify(True, k2))  # different masks
    np.testing.assert_array_equal(classify(True, k1), classify(True, k1))  # same key, same mask
    eval1, eval2 = classify(False, k1), classify(False, k2)
    np.testing.assert_array_equal(eval1, eval2)
    # In eval the head is exactly the dropout-free head with the same parameters.
    no_dropout = models.create_model(num_classes=4, head_hidden=(32,), head_dropout=0.0,
                                     zero_init_head=False, **TINY)
    np.testing.assert_allclose(
        eval1, no_dropout.apply(variables, feats, True, method=no_dropout.classify), rtol=1e-6
    )


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_head_gives_zero_logits(zero_init):
    model = models.create_model(num_classes=3, head_hidden=(8,), zero_init_head=zero_init, **TINY)
    variables = _head_variables(model)
    feats = jax.random.normal(jax.random.key(4), (2, FEATURES))
    logits = model.apply(variables, feats, method=model.classify)
    assert np.all(np.asarray(logits) == 0) == zero_init


@pytest.mark.parametrize("layout, conv1_stride, conv2_stride", [("v1", 2, 1), ("v1.5", 1, 2)])
def test_stride_placement_and_biases(layout, conv1_stride, conv2_stride):
    """v1 (Keras) downsamples in the first 1x1 conv, v1.5 (torchvision) in the 3x3 conv."""
    model = models.create_model(num_classes=2, layout=layout, **TINY)
    variables = _random_variables(model, 64)
    _, state = model.apply(variables, jnp.ones((1, 64, 64, 3)), capture_intermediates=True)
    block = state["intermediates"]["stage2"]["block1"]
    size_in = 64 // 4  # after the stem: conv /2, max pool /2
    h = lambda name: block[name]["__call__"][0].shape[1]  # noqa: E731
    assert h("conv1") == size_in // conv1_stride
    assert h("conv2") == size_in // (conv1_stride * conv2_stride) == size_in // 2
    assert h("proj_conv") == size_in // 2
    conv = variables["params"]["stage2"]["block1"]["conv1"]
    assert ("bias" in conv) == (layout == "v1")


@pytest.mark.parametrize("k,hw,stride,bias", [
    (3, 2, 1, False), (3, 1, 1, True), (3, 2, 2, False), (3, 4, 1, True),  # small maps (or not)
    (3, 4, 2, False), (3, 3, 2, True),  # stride 2 onto a 2x2 output
    (1, 5, 1, False), (1, 6, 2, True), (1, 5, 2, False),  # 1x1 as a matmul, odd sizes too
])
def test_matmul_conv_matches_conv(k, hw, stride, bias):
    """MatmulConv computes the same convolution with the same parameters, and the same
    gradients, for every rule it has and where it falls back to XLA's convolution."""
    import flax.linen as nn

    from cifar_flax.models import MatmulConv

    pad = (k - 1) // 2
    kw = dict(features=6, kernel_size=(k, k), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), use_bias=bias)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, hw, hw, 5))
    ref, fast = nn.Conv(**kw), MatmulConv(**kw)
    variables = ref.init(jax.random.PRNGKey(1), x)
    variables = jax.tree.map(lambda a: a + 0.1, variables)  # non-zero bias
    assert jax.tree.structure(fast.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)
    assert jnp.allclose(fast.apply(variables, x), ref.apply(variables, x), atol=1e-5)
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
    g_fast = jax.grad(loss(fast), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_fast)):
        assert jnp.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("k,hw,stride,rule", [
    (1, 16, 1, "one_by_one"), (1, 16, 2, "one_by_one"), (3, 2, 1, "small_map"),
    (3, 4, 2, "small_map"), (3, 4, 1, None), (3, 8, 2, None), (7, 64, 2, None),
])
def test_matmul_rules_pick_the_slow_convolutions(k, hw, stride, rule):
    """Which convolutions become matmuls: 1x1s, and 3x3s onto a <= 2x2 output (README Levers)."""
    pad = ((k - 1) // 2,) * 2
    assert models._matmul_rule((k, k), (stride, stride), (pad, pad), (hw, hw)) == rule


@pytest.mark.slow
def test_conv_impl_gives_the_same_model():
    """conv_impl="im2col" and "xla" are one model: same params, same outputs and gradients."""
    from cifar_flax.models import create_model

    kw = dict(num_classes=3, layout="v1", stage_sizes=(1, 1, 1, 1), base_width=8, zero_init_head=False)
    a, b = create_model(**kw, conv_impl="xla"), create_model(**kw, conv_impl="im2col")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    variables = jax.jit(a.init)(jax.random.PRNGKey(1), x)  # Jitted: one program, not per op.
    assert jax.tree.structure(jax.eval_shape(b.init, jax.random.PRNGKey(1), x)) == \
        jax.tree.structure(variables)
    loss = lambda m: lambda p: jnp.sum(m.apply({**variables, "params": p}, x) ** 2)  # noqa: E731
    la, ga = jax.jit(jax.value_and_grad(loss(a)))(variables["params"])
    lb, gb = jax.jit(jax.value_and_grad(loss(b)))(variables["params"])
    assert jnp.allclose(la, lb, rtol=1e-5)
    for x1, x2 in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert jnp.allclose(x1, x2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride,hw", [(1, 2), (2, 4), (2, 3)])
def test_patches_as_slices_match_xla_patches(stride, hw, monkeypatch):
    """The 9-slice patches (the default) equal XLA's patches op in the kernel's (kh, kw, C) order."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, hw, hw, 5))
    args = ((stride, stride), ((1, 1), (1, 1)))
    slices = models._patches_3x3(x, *args)
    monkeypatch.setattr(models, "MATMUL_RULES", models.MatmulRules(patches="op"))
    assert slices.shape == (2, -(-hw // stride), -(-hw // stride), 45)
    assert jnp.allclose(slices, models._patches_3x3(x, *args))


def test_dropout_follows_the_hidden_layer_not_the_features():
    """The original notebook's Keras head: Dense(256, relu) -> Dropout(0.5) -> Dense. The hidden
    layer sees every pooled feature; dropout zeroes hidden units (scaled survivors), once, before
    `out`."""
    head = models.Head(num_classes=3, hidden=(16,), dropout=0.5, zero_init=False)
    feats = jax.random.normal(jax.random.key(4), (6, FEATURES))
    variables = head.init(jax.random.key(0), feats)
    _, state = head.apply(variables, feats, True, rngs={"dropout": jax.random.key(5)},
                          capture_intermediates=True, mutable=["intermediates"])
    hidden_in = state["intermediates"]["hidden1"]["__call__"][0]
    p = variables["params"]["hidden1"]
    np.testing.assert_allclose(hidden_in, feats @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-5)
    dropped = [v["__call__"][0] for k, v in state["intermediates"].items() if "Dropout" in k]
    assert len(dropped) == 1  # Once: after the hidden layer, not also on the features.
    relu, kept = np.maximum(np.asarray(hidden_in), 0), np.asarray(dropped[0])
    active = relu > 1e-3
    ratio = kept[active] / relu[active]  # 0 (dropped) or 2 (kept, scaled by 1 / (1 - 0.5)).
    assert np.all(np.isclose(ratio, 0, atol=1e-4) | np.isclose(ratio, 2, atol=1e-4))
    assert np.any(np.isclose(ratio, 0, atol=1e-4)) and np.any(np.isclose(ratio, 2, atol=1e-4))
