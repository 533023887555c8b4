"""Cached backbone features for phases where the whole backbone is frozen.

When no backbone parameter trains and frozen BatchNorm runs in inference mode (the seed's
baseline phase: frozen ResNet50 + dense head), the backbone computes the same function of each
image in every epoch. Computing the pooled features once per split and training the head on them
gives exactly the same training (with augmentation off) at the cost of the head alone; with
augmentation on, ``num_passes`` augmented copies of the training set are cached and epoch ``e``
uses pass ``e % num_passes`` (an approximation: a fixed set of augmentations instead of fresh ones).

Public API (train.py wires it in)::

    backbone_frozen(trainable, bn_train_modules) -> bool
    compute_features(model, variables, batches, preprocess_fn, augment_fn=None, rng=None)
        -> (features [N, D] float32, labels [N] int32)
    build_cache(model, variables, make_batches, preprocess_fn, num_passes=1, augment_fn=None,
                rng=None) -> FeatureCache
    make_head_train_step(model, tx) -> step(params, opt_state, features, labels, rng)
        -> (params, opt_state, metrics)
    evaluate_features(model, params, features, labels, batch_size) -> {"loss", "accuracy"}

Batches are dicts with ``"image"`` (uint8-valued NHWC) and ``"label"`` and optionally ``"mask"``
(1 for real examples, 0 for padding, as eval batches are padded); a short last batch is padded to
the first batch's size so the feature function compiles once, and padded rows are dropped.
Single-process only (multi-host runs keep the uncached path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

PreprocessFn = Callable[[jnp.ndarray], jnp.ndarray]  # uint8-valued images -> normalised float
AugmentFn = Callable[[jax.Array, jnp.ndarray], jnp.ndarray]  # (rng, images) -> images


def backbone_frozen(trainable: Any, bn_train_modules: Any) -> bool:
    """True when caching features is exact: nothing outside ``head`` trains and no BatchNorm runs
    in training mode (``bn_train_modules`` as in optim.PhasePlan: ``()`` = none; ``None`` = all).

    ``trainable`` is a param-shaped tree of bools (optim.PhasePlan.trainable).
    """
    if bn_train_modules is None or tuple(bn_train_modules):
        return False
    backbone = {k: v for k, v in dict(trainable).items() if k != "head"}
    return not any(jax.tree.leaves(backbone))


def make_feature_fn(
    model: Any, preprocess_fn: PreprocessFn, augment_fn: AugmentFn | None = None
) -> Callable:
    """jit-compiled ``(variables, images, rng) -> pooled features`` with BatchNorm in eval mode."""

    def features(variables, images, rng):
        if augment_fn is not None:
            images = augment_fn(rng, images)
        x = preprocess_fn(images)
        return model.apply(variables, x, train=False, method="features")

    return jax.jit(features)


def _padded(batch: dict, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images padded to ``size`` rows, labels, boolean mask of real rows)."""
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    n = len(images)
    if n > size:
        raise ValueError(f"batch of {n} examples is larger than the first batch ({size}); "
                         "feed batches of one size (the last may be smaller).")
    mask = np.asarray(batch.get("mask", np.ones(n)), bool)
    if n < size:
        images = np.concatenate([images, np.zeros((size - n,) + images.shape[1:], images.dtype)])
        mask = np.concatenate([mask, np.zeros(size - n, bool)])
        labels = np.concatenate([labels, np.zeros(size - n, labels.dtype)])
    return images, labels, mask


def compute_features(
    model: Any,
    variables: Any,
    batches: Iterable[dict],
    preprocess_fn: PreprocessFn,
    augment_fn: AugmentFn | None = None,
    rng: jax.Array | None = None,
    sharding: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of every real example in ``batches``, in order, on the host.

    ``sharding`` (e.g. a NamedSharding over the data axis) places each batch across devices.
    ``augment_fn`` needs ``rng``; each batch gets its own fold of it.
    """
    if augment_fn is not None and rng is None:
        raise ValueError("compute_features: augment_fn needs an rng.")
    fn = make_feature_fn(model, preprocess_fn, augment_fn)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    feats, labels, size, pending = [], [], None, None
    for i, batch in enumerate(batches):
        size = size or len(batch["image"])
        images, lab, mask = _padded(batch, size)
        x = jax.device_put(images, sharding) if sharding is not None else images
        out = fn(variables, x, jax.random.fold_in(rng, i))  # async: overlaps the next batch
        if pending is not None:
            feats.append(np.asarray(pending[0])[pending[1]])
        pending = (out, mask)
        labels.append(lab[mask])
    if pending is not None:
        feats.append(np.asarray(pending[0])[pending[1]])
    if not feats:
        raise ValueError("compute_features: the batch iterator was empty.")
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


@dataclasses.dataclass
class FeatureCache:
    """``num_passes`` cached copies of a split: features [P, N, D], labels [P, N]."""

    features: np.ndarray
    labels: np.ndarray

    @property
    def num_passes(self) -> int:
        return self.features.shape[0]

    @property
    def num_examples(self) -> int:
        return self.features.shape[1]

    def batches(self, epoch: int, batch_size: int, seed: int = 0,
                shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of full batches from pass ``epoch % num_passes`` (remainder dropped, like
        the training input pipeline), shuffled with ``(seed, epoch)``; ``index`` gives the rows."""
        p = epoch % self.num_passes
        n = self.num_examples
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {"features": self.features[p, idx], "label": self.labels[p, idx], "index": idx}


def build_cache(
    model: Any,
    variables: Any,
    make_batches: Callable[[int], Iterable[dict]],
    preprocess_fn: PreprocessFn,
    num_passes: int = 1,
    augment_fn: AugmentFn | None = None,
    rng: jax.Array | None = None,
    sharding: Any = None,
) -> FeatureCache:
    """Cache ``num_passes`` passes over ``make_batches(pass_index)`` (one epoch of the split)."""
    if num_passes < 1:
        raise ValueError(f"feature cache: num_passes must be >= 1, got {num_passes}.")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    passes = [
        compute_features(model, variables, make_batches(p), preprocess_fn, augment_fn,
                         jax.random.fold_in(rng, p), sharding)
        for p in range(num_passes)
    ]
    n = min(len(lab) for _, lab in passes)
    return FeatureCache(np.stack([f[:n] for f, _ in passes]),
                        np.stack([lab[:n] for _, lab in passes]))


def _head_loss(model, params, features, labels, train, rng):
    logits = model.apply({"params": params}, features, train=train, method="classify",
                         rngs={"dropout": rng} if train else None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss, logits


def make_head_train_step(model: Any, tx: optax.GradientTransformation) -> Callable:
    """jit step training ``params["head"]`` on feature batches; other params pass through.

    ``params`` is the full param tree and ``tx`` any optimizer over it (e.g. optim.PhasePlan.tx,
    whose frozen groups are ``set_to_zero``): gradients are taken w.r.t. the head only and zeros
    are fed for the rest. params and opt_state are donated.
    """

    def step(params, opt_state, features, labels, rng):
        def loss_fn(head):
            loss, logits = _head_loss(model, {**params, "head": head}, features, labels, True, rng)
            return loss.mean(), logits

        (loss, logits), g_head = jax.value_and_grad(loss_fn, has_aux=True)(params["head"])
        grads = {k: (g_head if k == "head" else jax.tree.map(jnp.zeros_like, v))
                 for k, v in params.items()}
        updates, opt_state = tx.update(grads, opt_state, params)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": acc}

    return jax.jit(step, donate_argnums=(0, 1))


def evaluate_features(
    model: Any, params: Any, features: np.ndarray, labels: np.ndarray, batch_size: int = 1024
) -> dict[str, float]:
    """Mean loss and accuracy of the head on cached features (the last batch padded, masked)."""

    @jax.jit
    def sums(params, feat, lab, mask):
        loss, logits = _head_loss(model, params, feat, lab, False, None)
        correct = (jnp.argmax(logits, -1) == lab) * mask
        return jnp.sum(loss * mask), jnp.sum(correct)

    total_loss = total_correct = 0.0
    for start in range(0, len(labels), batch_size):
        f, lab, m = _padded({"image": features[start:start + batch_size],
                             "label": labels[start:start + batch_size]}, batch_size)
        loss, correct = sums(params, f, lab, m.astype(np.float32))
        total_loss += float(loss)
        total_correct += float(correct)
    n = max(len(labels), 1)
    return {"loss": total_loss / n, "accuracy": total_correct / n}
