"""Cached backbone features for phases where the whole backbone is frozen.

Switched by ``config.feature_cache.enabled`` (default on; ``feature_cache.passes`` > 0 caches
augmented passes when augmentation is on). It applies to a phase that trains no backbone group,
with ``frozen_bn_inference``, no mixup/cutmix, on one process (:func:`cache_decision` says why
not); train.py extracts the features at the start of such a phase (a resumed phase extracts them
again), logs, evaluates, checkpoints, stops and resumes as usual, and marks the phase in
metrics.jsonl (``"feature_cache": true/false``). The final test runs the full model.
``configs/baseline.py`` qualifies. Speed-ups (81x per epoch at 32x32): experiments/README.md.

When no backbone parameter trains and frozen BatchNorm runs in inference mode (the original
notebook's baseline phase: frozen ResNet50 + dense head), the backbone computes the same function
of each image in every epoch. Computing the pooled features once per split and training the head on
them gives exactly the same training (with augmentation off) at the cost of the head alone; with
augmentation on, ``num_passes`` augmented copies of the training set are cached and epoch ``e``
uses pass ``e % num_passes`` (an approximation: a fixed set of augmentations instead of fresh
ones).

Public API (train.py uses CachedPhase and cache_decision; config.feature_cache)::

    cache_decision(config, plan) -> (use_cache, reason)
    CachedPhase(config, info, model, mesh, prep, state, head_step)  # extracts train + val features
        .step(state, step) -> (state, metrics)   # the batch of global step ``step``
        .validate(state) -> {"loss", "accuracy"}

and the parts it is built from (tests and bench/fastpaths.py use them directly)::

    backbone_frozen(trainable, bn_train_modules) -> bool
    make_feature_fn(model, preprocess_fn, augment_fn=None) -> jitted (variables, images, rng)
    train_augment_fn(config.augment, num_classes, prep) -> the train cache's augment_fn
    build_cache(model, variables, make_batches, preprocess_fn, num_passes=1, augment_fn=None,
                rng=None, sharding=None) -> FeatureCache
    FeatureCache.take(epoch, rows) -> (features, labels) of pass ``epoch % num_passes``
    evaluate_features(model, params, features, labels, batch_size) -> {"loss", "accuracy"}

The batch order is input_pipeline.epoch_order's (the one train_batches shuffles with).

Batches are dicts with ``"image"`` (uint8-valued NHWC) and ``"label"`` and optionally ``"mask"``
(1 for real examples, 0 for padding, as eval batches are padded); a short last batch is padded to
the first batch's size so the feature function compiles once, and padded rows are dropped.
Single-process only (multi-host runs keep the uncached path). A cached phase (its head step is
train.make_head_step) sees the same batch at the same step as the full step would (the input
pipeline's shuffle order) and, on one device, the same dropout key, so with augmentation off it
is the same training, not merely a similar one (on several devices the full step draws one
dropout mask per device shard: same distribution).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from cifar_flax.data import input_pipeline, preprocessing
from cifar_flax.run.evaluation import batch_sums

PreprocessFn = Callable[[jnp.ndarray], jnp.ndarray]  # uint8-valued images -> normalised float
AugmentFn = Callable[[jax.Array, jnp.ndarray], jnp.ndarray]  # (rng, images) -> images


def backbone_frozen(trainable: Any, bn_train_modules: Any) -> bool:
    """True when caching features is exact: nothing outside ``head`` trains and no BatchNorm runs
    in training mode (``bn_train_modules`` as in train.PhasePlan: ``()`` = none; ``None`` = all).

    ``trainable`` is a param-shaped tree of bools (train.PhasePlan.trainable).
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


def _one_pass(fn: Callable, variables: Any, batches: Iterable[dict], rng: jax.Array,
              sharding: Any, should_stop: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of every real example of one pass over ``batches``, in order, on the
    host (``fn`` built once for all passes: one compilation); ``sharding`` places each batch,
    each batch gets its own fold of ``rng``. It ends early (what it has so far) when
    ``should_stop()`` turns true: a stop request, which the training loop honours before the
    next step, without using the cache."""
    feats, labels, size, pending = [], [], None, None
    for i, batch in enumerate(batches):
        if should_stop() and feats:
            break
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
        raise ValueError("feature cache: the batch iterator was empty.")
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

    def take(self, epoch: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of ``rows`` in the pass of ``epoch``: ``epoch % num_passes``, so
        augmented passes cycle over the epochs."""
        p = epoch % self.num_passes
        return self.features[p, rows], self.labels[p, rows]


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

    Batches are padded to the first one's size (one compilation) and their masked rows dropped;
    ``augment_fn`` draws from pass ``p``'s fold of ``rng``."""
    if num_passes < 1:
        raise ValueError(f"feature cache: num_passes must be >= 1, got {num_passes}.")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    fn = make_feature_fn(model, preprocess_fn, augment_fn)
    passes = [
        _one_pass(fn, variables, make_batches(p), jax.random.fold_in(rng, p), sharding,
                  should_stop)
        for p in range(num_passes)
    ]
    n = min(len(lab) for _, lab in passes)
    return FeatureCache(np.stack([f[:n] for f, _ in passes]),
                        np.stack([lab[:n] for _, lab in passes]))


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(model, params, feat, lab, mask):
    logits = model.apply({"params": params}, feat, train=False, method="classify")
    sums = batch_sums(logits, lab, mask)  # The Evaluator's loss and accuracy, on features.
    return sums["loss"], sums["correct"]


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


def train_augment_fn(aug_config: Any, num_classes: int, prep: Any) -> AugmentFn:
    """The train cache's ``augment_fn``: the train step's augmentation (``aug_config``:
    config.augment) and preprocessing (preprocessing.train_augment: crops/flips when on, resize,
    normalise); labels are not needed."""
    def fn(rng, images):
        labels = jnp.zeros(images.shape[:1], jnp.int32)
        return preprocessing.train_augment(images, labels, rng, aug_config, num_classes, prep)[0]

    return fn


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


class CachedPhase:
    """One phase's train step and validation on features cached at its start (and on resume).

    ``step(state, s)`` trains the head on the batch of global step ``s`` (the rows
    train_batches would give at ``s``, from pass ``epoch % passes``); ``validate(state)`` gives
    {"loss", "accuracy"} on the cached validation features. The backbone is frozen for the whole
    phase, so the features are a deterministic function of the weights: a resumed phase rebuilds
    the same cache. ``head_step`` is train.make_head_step's jitted step for this phase;
    ``should_stop`` (a stop request) cuts the extraction short.
    """

    def __init__(self, config, info, model, mesh, prep, state, head_step: Callable,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        t0 = time.perf_counter()
        self.config, self.model = config, model
        self.batch = config.batch_size
        self.epoch_steps = input_pipeline.steps_per_epoch(config, info)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        sharding = NamedSharding(mesh, PartitionSpec("data"))
        self.cache = build_cache(
            model, variables, lambda p: input_pipeline.eval_batches(config, info, "train"),
            lambda x: x, max(1, config.feature_cache.passes) if augmented(config.augment) else 1,
            train_augment_fn(config.augment, info.num_classes, prep),
            jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xFCACE), sharding, should_stop)
        self.val = None
        if info.split_sizes.get("validation", 0) > 0:
            self.val = build_cache(
                model, variables, lambda p: input_pipeline.eval_batches(config, info, "validation"),
                lambda im: preprocessing.eval_preprocess(im, config.augment, prep), sharding=sharding,
                should_stop=should_stop)
        self.fn = head_step
        self.cut_short = should_stop()  # A stop request: the loop stops before using the cache.
        self._epoch, self._order = -1, None
        self.extract_seconds = time.perf_counter() - t0

    def _rows(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(int(s), self.epoch_steps)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, input_pipeline.epoch_order(self.config, epoch)
        return self.cache.take(epoch, self._order[i * self.batch:(i + 1) * self.batch])

    def step(self, state: Any, s: int) -> tuple[Any, dict]:
        """One head step on the cached batch of global step ``s``; the state keeps its type."""
        features, labels = self._rows(s)
        head, opt_state, metrics = self.fn(
            state.params["head"], state.opt_state, s, state.rng, features, labels)
        return state.replace(params={**state.params, "head": head}, opt_state=opt_state), metrics

    def log(self, writer: Any, plan: Any, why: str, step: int) -> None:
        """Say (log line and metrics record) that phase ``plan`` trains on this cache, and why."""
        if self.cut_short:
            return  # A stop request ended the extraction: the loop stops before the next step.
        n, passes = self.cache.num_examples, self.cache.num_passes
        logging.info("Phase %d (%s) trains on cached backbone features (%s): %d train examples "
                     "x %d passes extracted in %.1f s", plan.index, plan.name, why, n, passes,
                     self.extract_seconds)
        writer.write(step, "feature_cache", {"phase": plan.index, "train_examples": n,
                                             "extract_seconds": self.extract_seconds,
                                             "passes": passes})

    def validate(self, state: Any) -> dict[str, float]:
        """Validation loss/accuracy of the current head on the cached validation features."""
        return evaluate_features(self.model, {"head": state.params["head"]},
                                 self.val.features[0], self.val.labels[0],
                                 self.config.eval_batch_size)
