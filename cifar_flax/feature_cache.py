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

The training loop's side (train.py; config.feature_cache)::

    cache_decision(config, plan) -> (use_cache, reason)
    CachedPhase(config, info, model, mesh, prep, state, plan)   # extracts train + val features
        .step(state, step) -> (state, metrics)   # the batch of global step ``step``
        .validate(state) -> {"loss", "accuracy"}
    train_order(config, info, epoch) -> rows in input_pipeline.train_batches' order
    make_state_head_step(model, plan, mesh, params, num_classes) -> jitted head step

Batches are dicts with ``"image"`` (uint8-valued NHWC) and ``"label"`` and optionally ``"mask"``
(1 for real examples, 0 for padding, as eval batches are padded); a short last batch is padded to
the first batch's size so the feature function compiles once, and padded rows are dropped.
Single-process only (multi-host runs keep the uncached path). A cached phase sees the same batch
at the same step as the full step would (the input pipeline's shuffle order) and, on one device,
the same dropout key, so with augmentation off it is the same training, not merely a similar one
(on several devices the full step draws one dropout mask per device shard: same distribution).
"""

from __future__ import annotations

import dataclasses
import functools
import time
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
    return _features_with(fn, variables, batches, rng, sharding)


class Interrupted(Exception):
    """Raised when ``should_stop()`` turned true during an extraction (SIGTERM in train.py)."""


def _features_with(fn: Callable, variables: Any, batches: Iterable[dict], rng: jax.Array | None,
                   sharding: Any, should_stop: Callable[[], bool] = lambda: False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """compute_features with an already built feature function (one compilation for all passes);
    checks ``should_stop`` before every batch and raises :class:`Interrupted` when it is true."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    feats, labels, size, pending = [], [], None, None
    for i, batch in enumerate(batches):
        if should_stop():
            raise Interrupted(f"feature extraction stopped after {i} batches")
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
    should_stop: Callable[[], bool] = lambda: False,
) -> FeatureCache:
    """Cache ``num_passes`` passes over ``make_batches(pass_index)`` (one epoch of the split).

    ``should_stop`` is polled before every batch; :class:`Interrupted` is raised when true."""
    if num_passes < 1:
        raise ValueError(f"feature cache: num_passes must be >= 1, got {num_passes}.")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    fn = make_feature_fn(model, preprocess_fn, augment_fn)
    passes = [
        _features_with(fn, variables, make_batches(p), jax.random.fold_in(rng, p), sharding,
                       should_stop)
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


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(model, params, feat, lab, mask):
    loss, logits = _head_loss(model, params, feat, lab, False, None)
    correct = (jnp.argmax(logits, -1) == lab) * mask
    return jnp.sum(loss * mask), jnp.sum(correct)


def evaluate_features(
    model: Any, params: Any, features: np.ndarray, labels: np.ndarray, batch_size: int = 1024
) -> dict[str, float]:
    """Mean loss and accuracy of the head on cached features (the last batch padded, masked).

    ``params`` may be the full tree or just ``{"head": ...}`` (only the head runs).
    """
    total_loss = total_correct = 0.0
    for start in range(0, len(labels), batch_size):
        f, lab, m = _padded({"image": features[start:start + batch_size],
                             "label": labels[start:start + batch_size]}, batch_size)
        loss, correct = _eval_sums(model, params, f, lab, m.astype(np.float32))
        total_loss += float(loss)
        total_correct += float(correct)
    n = max(len(labels), 1)
    return {"loss": total_loss / n, "accuracy": total_correct / n}


# ---- The training loop's cached phase (train.py) ----------------------------------------------


def augmented(aug_config: Any) -> bool:
    """True when the training step draws random crops or flips (the features differ per epoch)."""
    return bool(aug_config.crop_padding > 0 or aug_config.flip or aug_config.random_resized_crop)


def cache_decision(config: Any, plan: Any) -> tuple[bool, str]:
    """(train phase ``plan`` on cached features?, why) from ``config.feature_cache`` and the phase.

    Qualifies: the cache is enabled, no backbone parameter trains and no BatchNorm runs in
    training mode, no mixup/cutmix (they mix images before the backbone), augmentation off
    (exact) or ``feature_cache.passes > 0`` (approximate), and a single process.
    """
    fc, aug = config.feature_cache, config.augment
    if not fc.enabled:
        return False, "feature_cache.enabled=False"
    if not backbone_frozen(plan.trainable, plan.bn_train_modules):
        return False, "backbone parameters or BatchNorm statistics train in this phase"
    if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
        return False, "mixup/cutmix mix images before the backbone"
    if augmented(aug) and fc.passes == 0:
        return False, "augmentation is on and feature_cache.passes=0"
    if jax.process_count() > 1:
        return False, "multi-host run (the cache is single-process)"
    if augmented(aug):
        return True, f"{fc.passes} augmented passes, cycled per epoch (an approximation)"
    return True, "exact: augmentation is off"


def train_order(config: Any, info: Any, epoch: int) -> np.ndarray:
    """Row order of ``epoch`` as input_pipeline.train_batches shuffles it (single host).

    Rows index the train split in ``eval_batches(..., "train")`` order. tf.data's shuffle draws
    its order from (seed, buffer size, length) only, so shuffling ``range(n)`` the same way gives
    the permutation train_batches applies to the images: cached and uncached phases see the same
    batch at the same step (tests/test_train_cached.py checks it against train_batches).
    """
    import tensorflow as tf

    from cifar_flax import input_pipeline

    n = len(input_pipeline.host_indices(config, "train"))
    buffer = max(1, min(config.shuffle_buffer, n))
    seed = input_pipeline._epoch_seed(config.seed, epoch)  # noqa: SLF001 (the pipeline's seed)
    ds = tf.data.Dataset.range(n).shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
    return next(iter(ds.batch(n).as_numpy_iterator()))


def make_state_head_step(model: Any, plan: Any, mesh: Any, params: Any, num_classes: int):
    """jit ``(head, opt_state, step, rng, features, labels) -> (head, opt_state, step, metrics)``.

    The head-only counterpart of step.make_train_step for a TrainState: the same loss (soft
    one-hot cross-entropy), the same dropout key (device 0's key of step ``step``), ``plan.tx``
    on the full param tree (the backbone enters as zeros that only ``set_to_zero`` sees, so XLA
    drops them) and trainable head leaves updated as ``p + u``. Inputs and outputs are replicated
    on ``mesh`` (what the checkpoints and the next phase expect); head and opt_state are donated.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    trainable = plan.trainable["head"]
    frozen = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
              for k, v in params.items() if k != "head"}

    def zeros():
        return jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), frozen)

    def step(head, opt_state, step, rng, features, labels):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), 0)
        _, dropout_key = jax.random.split(key)

        def loss_fn(h):
            logits = model.apply({"params": {"head": h}}, features, train=True,
                                 method="classify", rngs={"dropout": dropout_key})
            soft = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
            return optax.softmax_cross_entropy(logits, soft).mean(), logits

        (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(head)
        g = jax.tree.map(lambda x, t: x if t else jnp.zeros_like(x), g, trainable)
        updates, opt_state = plan.tx.update({**zeros(), "head": g}, opt_state,
                                            {**zeros(), "head": head})
        head = jax.tree.map(lambda p, u, t: p + u.astype(p.dtype) if t else p,
                            head, updates["head"], trainable)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return head, opt_state, step + 1, {"loss": loss, "accuracy": acc}

    return jax.jit(step, in_shardings=replicated, out_shardings=replicated,
                   donate_argnums=(0, 1))


class CachedPhase:
    """One phase's train step and validation on features cached at its start (and on resume).

    ``step(state, s)`` trains the head on the batch of global step ``s`` (the rows
    train_batches would give at ``s``, from pass ``epoch % passes``); ``validate(state)`` gives
    {"loss", "accuracy"} on the cached validation features. The backbone is frozen for the whole
    phase, so the features are a deterministic function of the weights: a resumed phase rebuilds
    the same cache. ``should_stop`` (SIGTERM) is polled per batch during the extraction, which
    raises :class:`Interrupted`.
    """

    def __init__(self, config, info, model, mesh, prep, state, plan,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        from jax.sharding import NamedSharding, PartitionSpec

        from cifar_flax import augment, input_pipeline

        t0 = time.perf_counter()
        self.config, self.info, self.model = config, info, model
        self.batch, self.spe = config.batch_size, input_pipeline.steps_per_epoch(config, info)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        sharding = NamedSharding(mesh, PartitionSpec("data"))
        labels0 = lambda im: jnp.zeros(im.shape[:1], jnp.int32)  # noqa: E731 (unused by features)
        train_aug = lambda rng, im: augment.train_augment(  # noqa: E731 (the step's geometry)
            im, labels0(im), rng, config.augment, info.num_classes, prep)[0]
        self.cache = build_cache(
            model, variables, lambda p: input_pipeline.eval_batches(config, info, "train"),
            lambda x: x, max(1, config.feature_cache.passes) if augmented(config.augment) else 1,
            train_aug, jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xFCACE), sharding,
            should_stop)
        self.val = None
        if info.split_sizes.get("validation", 0) > 0:
            val_fn = make_feature_fn(
                model, lambda im: augment.eval_preprocess(im, config.augment, prep))
            self.val = _features_with(
                val_fn, variables, input_pipeline.eval_batches(config, info, "validation"), None,
                sharding, should_stop)
        self.fn = make_state_head_step(model, plan, mesh, state.params, info.num_classes)
        self._epoch, self._order = -1, None
        self.extract_seconds = time.perf_counter() - t0

    def _rows(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(int(s), self.spe)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, train_order(self.config, self.info, epoch)
        rows = self._order[i * self.batch:(i + 1) * self.batch]
        p = epoch % self.cache.num_passes
        return self.cache.features[p, rows], self.cache.labels[p, rows]

    def step(self, state: Any, s: int) -> tuple[Any, dict]:
        """One head step on the cached batch of global step ``s``; the state keeps its type."""
        features, labels = self._rows(s)
        head, opt_state, step, metrics = self.fn(
            state.params["head"], state.opt_state, state.step, state.rng, features, labels)
        params = {**state.params, "head": head}
        return state.replace(params=params, opt_state=opt_state, step=step), metrics

    def validate(self, state: Any) -> dict[str, float]:
        """Validation loss/accuracy of the current head on the cached validation features."""
        return evaluate_features(self.model, {"head": state.params["head"]}, *self.val,
                                 self.config.eval_batch_size)
