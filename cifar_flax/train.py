"""Training: the optimizer of each phase, the data-parallel step, and ``train_and_evaluate``,
the run from init to the test.

Phases (:func:`build_phase`): each parameter belongs to one group of ``config.groups``; a phase
trains some groups at their learning rates (which follow the batch: config.py), the others get
``optax.set_to_zero()`` in an ``optax.multi_transform`` (no optimizer state, no update).

The step (:func:`make_train_step`), per device: on-device augmentation -> model -> softmax
cross-entropy on soft labels -> gradients of the trainable parameters only (frozen ones enter as
constants: no backward pass through a frozen prefix) -> ``jax.lax.pmean(grads, "data")`` -> the
phase's update. ``jax.shard_map`` inside ``jax.jit`` maps it over all devices (batch split on
``data``, state replicated; BatchNorm statistics averaged over ``data``): the same result on any
number of devices. Step ``s`` draws its randomness from ``fold_in(rng, s)``: a resumed run
repeats an uninterrupted one bit for bit.

:func:`train_and_evaluate` runs the phases in order, each with a fresh optimizer state; per step:
train, then at a log, validation, save or stop: check, record, early-stop, save. A phase with a
frozen backbone trains its head on cached features (run/feature_cache.py). At the end the best
checkpoint (by the validation metric) or the last weights are tested. Guards, one seam each:
the workdir, its lock and the resume check (run/workdir.py), checkpoints (run/checkpoints.py),
the losses (run/divergence.py, checked before anything is recorded or saved), signals
(run/interrupts.py: a stop at a step boundary, after saving). :class:`Position`, where the run
stands, holds the one step counter.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cifar_flax import config as config_lib
from cifar_flax.data import input_pipeline, preprocessing
from cifar_flax.models import BACKBONE_MODULES
from cifar_flax.run import checkpoints, devices, divergence, evaluation, feature_cache
from cifar_flax.run import interrupts, metrics, model_setup
from cifar_flax.run import workdir as workdir_lib
from cifar_flax.run.devices import AXIS

# (history, test labels, test logits, class names, results, the tested weights' validation
# {"labels", "logits", ...} or None without a validation split: calibration's temperature).
ReportFn = Callable[[list, np.ndarray, np.ndarray, list, dict, dict | None], None]


# ---- the optimizer of each phase ----------------------------------------------------------------


FROZEN = "__frozen__"


def flat_paths(params: Any) -> dict[str, Any]:
    """``{"stage1/block1/conv1/kernel": leaf, ...}`` for a nested param dict."""
    return traverse_util.flatten_dict(params, sep="/")


def phase_steps(phase: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Length of a phase in steps (``steps`` if set, else ``epochs`` x steps per epoch, >= 1)."""
    if phase.steps > 0:
        return int(phase.steps)
    return max(1, round(phase.epochs * steps_per_epoch))


def make_schedule(
    phase: ml_collections.ConfigDict, lr: float, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to 0 at ``total_steps`` or constant."""
    warmup = min(round(phase.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    if phase.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, 1), 0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
    )


def _kernel_mask(params: Any) -> Any:
    """Weight decay applies to conv/dense kernels only, not to BatchNorm scales or biases."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def _group_optimizer(phase: ml_collections.ConfigDict, schedule: optax.Schedule):
    if phase.optimizer == "adamw":
        return optax.adamw(
            schedule, b1=phase.momentum, weight_decay=phase.weight_decay, mask=_kernel_mask
        )
    momentum = phase.momentum or None
    sgd = optax.sgd(schedule, momentum=momentum, nesterov=bool(momentum and phase.nesterov))
    if phase.weight_decay:
        return optax.chain(optax.add_decayed_weights(phase.weight_decay, _kernel_mask), sgd)
    return sgd


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """Everything a phase needs: its optimizer, which params train, which BatchNorms train."""

    index: int
    name: str
    steps: int  # Planned length (early stopping may end it sooner).
    tx: optax.GradientTransformation
    labels: Any  # Param tree of group names (FROZEN for frozen groups).
    trainable: Any  # Param tree of bools.
    schedules: dict[str, Callable[[int], Any]]  # Trainable group -> lr schedule (phase-relative step).
    bn_train_modules: tuple[str, ...] | None  # For ResNet50.__call__; None = every module.


def bn_train_modules(
    assignment: Mapping[str, str], trainable: Sequence[str], frozen_bn_inference: bool
) -> tuple[str, ...] | None:
    """Backbone modules whose BatchNorm runs in training mode: those holding a trainable param."""
    if not frozen_bn_inference:
        return None
    mods = {path.split("/")[0] for path, g in assignment.items() if g in trainable}
    return tuple(m for m in BACKBONE_MODULES if m in mods)


def build_phase(
    config: ml_collections.ConfigDict, params: Any, index: int, steps_per_epoch: int
) -> PhasePlan:
    """The optimizer and masks of phase ``index`` of ``config.phases`` for these params."""
    phase = config.phases[index]
    assignment = config_lib.assign_groups(flat_paths(params), dict(config.groups))
    trainable = tuple(phase.trainable)
    steps = phase_steps(phase, steps_per_epoch)
    schedules = {g: make_schedule(phase, lr, steps, steps_per_epoch)
                 for g, lr in config_lib.peak_learning_rates(config, index).items()}
    transforms = {g: _group_optimizer(phase, s) for g, s in schedules.items()}
    transforms[FROZEN] = optax.set_to_zero()
    label_of = {p: (g if g in trainable else FROZEN) for p, g in assignment.items()}
    labels = traverse_util.unflatten_dict(label_of, sep="/")
    return PhasePlan(
        index=index,
        name=phase.name,
        steps=steps,
        tx=optax.multi_transform(transforms, labels),
        labels=labels,
        trainable=jax.tree.map(lambda g: g != FROZEN, labels),
        schedules=schedules,
        bn_train_modules=bn_train_modules(assignment, trainable, config.frozen_bn_inference),
    )


def learning_rates(plan: PhasePlan, phase_step: int) -> dict[str, float]:
    """Each trainable group's learning rate at a phase-relative step (for logging)."""
    return {g: float(s(phase_step)) for g, s in plan.schedules.items()}


# ---- the step -----------------------------------------------------------------------------------


class TrainState(flax.struct.PyTreeNode):
    """What a step reads and writes; all of it is checkpointed."""

    params: Any
    batch_stats: Any
    opt_state: Any  # State of the current phase's optimizer (new at each phase start).
    rng: jax.Array  # Base key (uint32[2]); step s uses fold_in(rng, s): resuming needs only s.


def create_train_state(variables: Any, tx: optax.GradientTransformation, rng: jax.Array
                       ) -> TrainState:
    """A fresh state: ``variables`` = {"params", "batch_stats"}; new optimizer state from ``tx``.
    The step is not in it: the loop's Position counts steps and passes each to the step."""
    return TrainState(params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]),
                      rng=jnp.asarray(jax.random.key_data(rng) if _typed(rng) else rng, jnp.uint32))


def _typed(key: jax.Array) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def step_keys(rng: jax.Array, step: jax.Array, device_index: Any) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, dropout key) of global step ``step`` on device ``device_index``: they
    depend only on (rng, step, device), for every path that trains."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), device_index)
    aug_key, dropout_key = jax.random.split(key)
    return aug_key, dropout_key


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """The training loss: mean softmax cross-entropy against soft (one-hot or mixed) labels."""
    return optax.softmax_cross_entropy(logits, soft_labels).mean()


def step_metrics(loss: jax.Array, logits: jax.Array, labels: jax.Array,
                 grads: Any) -> dict[str, jax.Array]:
    """Loss, batch accuracy on hard labels, and the global norm of the trainable gradients (the
    divergence check reads loss and norm)."""
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": optax.tree.norm(grads)}


def trainable_value_and_grad(loss_fn: Callable[[Any], tuple[jax.Array, Any]], params: Any,
                             trainable: Any) -> tuple[tuple[jax.Array, Any], dict]:
    """``((loss, aux), grads)`` of ``loss_fn(params)`` w.r.t. the leaves ``trainable`` (a
    param-shaped tree of bools) marks; ``grads`` is flat ({path tuple: grad}). Frozen leaves enter
    as constants, so no backward pass runs through a frozen prefix of the network."""
    flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(trainable)
    train = {k: v for k, v in flat.items() if mask[k]}
    frozen = jax.lax.stop_gradient({k: v for k, v in flat.items() if not mask[k]})
    on_trainable = lambda t: loss_fn(traverse_util.unflatten_dict({**frozen, **t}))  # noqa: E731
    return jax.value_and_grad(on_trainable, has_aux=True)(train)


def masked_update(tx: optax.GradientTransformation, params: Any, opt_state: Any,
                  train_grads: dict) -> tuple[Any, Any]:
    """(new params, new opt_state): ``tx`` on the full tree; frozen leaves get zero gradients
    (their ``set_to_zero`` transform ignores them) and keep their exact values."""
    flat = traverse_util.flatten_dict(params)
    grads = {k: train_grads[k] if k in train_grads else jnp.zeros_like(v) for k, v in flat.items()}
    updates, opt_state = tx.update(traverse_util.unflatten_dict(grads), opt_state, params)
    flat_updates = traverse_util.flatten_dict(updates)
    new = {k: v + flat_updates[k].astype(v.dtype) if k in train_grads else v
           for k, v in flat.items()}
    return traverse_util.unflatten_dict(new), opt_state


def make_train_step(model: Any, plan: PhasePlan, mesh: jax.sharding.Mesh, aug_config: Any,
                    prep: preprocessing.Preprocessing, sync_batchnorm: bool = True,
                    ) -> Callable[[TrainState, dict, int], tuple[TrainState, dict]]:
    """The jitted data-parallel step ``(state, batch, step) -> (state, metrics)`` of global step
    ``step``; ``batch`` holds uint8 ``image`` (N, H, W, 3) and int ``label`` (N,) placed by
    devices.shard_batch. The state buffers are donated."""

    def per_device(state: TrainState, batch: dict, step: jax.Array) -> tuple[TrainState, dict]:
        aug_key, dropout_key = step_keys(state.rng, step, jax.lax.axis_index(AXIS))
        images, soft = preprocessing.train_augment(batch["image"], batch["label"], aug_key,
                                                   aug_config, model.num_classes, prep)

        def loss_fn(params: Any):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                bn_train_modules=plan.bn_train_modules, mutable=["batch_stats"],
                rngs={"dropout": dropout_key})
            return cross_entropy(logits, soft), (logits, new_vars["batch_stats"])

        (loss, (logits, stats)), grads = trainable_value_and_grad(loss_fn, state.params,
                                                                  plan.trainable)
        grads = jax.lax.pmean(grads, AXIS)
        if not sync_batchnorm:
            stats = jax.lax.pmean(stats, AXIS)
        metrics_ = jax.lax.pmean(step_metrics(loss, logits, batch["label"], grads), AXIS)
        params, opt_state = masked_update(plan.tx, state.params, state.opt_state, grads)
        return state.replace(params=params, batch_stats=stats, opt_state=opt_state), metrics_

    # check_vma=False: the pmap programming model. Gradients are per device and averaged by the
    # explicit pmean; with check_vma=True JAX would already psum the gradients of the replicated
    # params (its transpose of the implicit broadcast) and the pmean would not divide.
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                           out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))


def make_head_step(model: Any, plan: PhasePlan, mesh: jax.sharding.Mesh, params: Any
                   ) -> Callable:
    """The head-only step of a cached-feature phase, ``(head, opt_state, step, rng, features,
    labels) -> (head, opt_state, metrics)``, from the same pieces as the full step (device
    0's keys, the loss, the frozen-aware update on the full tree, the backbone entering as zeros
    that only ``set_to_zero`` sees). Replicated on ``mesh``; head and opt_state are donated."""
    replicated = NamedSharding(mesh, P())
    frozen = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
              for k, v in params.items() if k != "head"}

    def head_step(head, opt_state, step, rng, features, labels):
        _, dropout_key = step_keys(rng, step, 0)
        full = {**jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), frozen), "head": head}

        def loss_fn(p):
            logits = model.apply({"params": {"head": p["head"]}}, features, train=True,
                                 method="classify", rngs={"dropout": dropout_key})
            soft = jax.nn.one_hot(labels, model.num_classes, dtype=jnp.float32)
            return cross_entropy(logits, soft), logits

        (loss, logits), grads = trainable_value_and_grad(loss_fn, full, plan.trainable)
        new, opt_state = masked_update(plan.tx, full, opt_state, grads)
        return new["head"], opt_state, step_metrics(loss, logits, labels, grads)

    return jax.jit(head_step, in_shardings=replicated, out_shardings=replicated,
                   donate_argnums=(0, 1))


# ---- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Position:
    """Where the run stands, saved in every checkpoint's meta and restored as one thing: the one
    step counter (global steps done), the phase being trained, the step it began at, and early
    stopping's record."""

    step: int
    phase: int
    phase_start: int
    stopper: evaluation.EarlyStopping

    @classmethod
    def start(cls, early_stopping: ml_collections.ConfigDict) -> "Position":
        e = early_stopping
        return cls(0, 0, 0, evaluation.EarlyStopping(e.metric, e.patience, e.min_delta))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Position":
        return cls(d["step"], d["phase"], d["phase_start"],
                   evaluation.EarlyStopping.from_json(d["stopper"]))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None,
                       report_fn: ReportFn | None = None) -> dict[str, Any]:
    """Train every phase (resuming from ``workdir``'s latest checkpoint), test, report.

    Returns results.json's content (``report_fn`` writes the report: main.py). Raises UserError
    when the run diverges (its last good checkpoint stays the newest) and interrupts.Interrupted
    after saving at a step boundary when a signal asked it to stop, or at ``stop_after_steps``
    (tests interrupt runs with it). ``config`` is valid and the workdir checked: main.run."""
    # ---- set-up: data, model, checkpoints, and where the run stands ----
    wall_start = time.time()
    mesh = devices.make_mesh()
    info = input_pipeline.get_info(config)
    input_pipeline.check_train_classes(config, info)  # Two classes or more, each with images.
    model = model_setup.build_model(config, info.num_classes)
    prep = model_setup.input_preprocessing(config)
    epoch_steps = input_pipeline.steps_per_epoch(config, info)
    eval_every = config.eval_every_steps or epoch_steps
    has_val = info.split_sizes.get("validation", 0) > 0
    run_fingerprint = workdir_lib.fingerprint(config, info)
    workdir_lib.check_previous_run(config, info, workdir)  # Refused, moved aside, or resumable.
    stopping = config.early_stopping
    ckpt = checkpoints.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save,
                                    phase_best=stopping.enabled and stopping.restore_best and has_val)
    saved = ckpt.latest_meta()  # Where a rerun resumes (damaged newer steps moved aside).
    pos = Position.from_json(saved["position"]) if saved else Position.start(stopping)
    state = _initial_state(config, model, mesh, ckpt, info, pos.phase if saved else None)
    wall_before = wall_saved = saved["wall_seconds"] if saved else 0.0
    train_before = saved.get("train_seconds", 0.0) if saved else 0.0
    workdir_lib.write_run_files(workdir, config, info)
    writer = metrics.MetricsWriter(workdir, saved["history"] if saved else None, config.tensorboard)
    evaluator = evaluation.Evaluator(config, info, model, mesh, prep)
    throughput = metrics.Throughput(config.batch_size)
    watch = divergence.Watch(config, info.num_classes, ckpt, writer.history)
    batches = _TrainBatches(config, info)
    total = sum(phase_steps(p, epoch_steps) for p in config.phases)  # The bar's: at most.

    def save(state: TrainState, kind: str = "latest") -> None:
        """A checkpoint of ``kind`` (latest, best, phase_best): the state, where the run stands."""
        nonlocal wall_saved
        wall_saved = wall_before + time.time() - wall_start
        ckpt.save(kind, pos.step, state, {
            "position": pos.to_json(), "history": writer.history, "fingerprint": run_fingerprint,
            "train_seconds": train_before + throughput.seconds, "wall_seconds": wall_saved})

    if saved is None:
        state = _start_phase(config, state, pos, writer, mesh, epoch_steps)
    else:
        rates = config_lib.lr_text(config, pos.phase) if pos.phase < len(config.phases) else "done"
        logging.info("Resuming from step %d (phase %d, %s) in %s", pos.step, pos.phase, rates,
                     workdir)
    # ---- phases: each a fresh optimizer state, on cached features or the full step ----
    with ckpt, writer, interrupts.StopRequest() as stop, metrics.Progress(
            total, min(pos.step, total), config.progress_bar) as progress:
        while pos.phase < len(config.phases):
            plan = build_phase(config, state.params, pos.phase, epoch_steps)
            use_cache, why = feature_cache.cache_decision(config, plan)
            if use_cache:
                cached = feature_cache.CachedPhase(
                    config, info, model, mesh, prep, state,
                    make_head_step(model, plan, mesh, state.params),
                    should_stop=lambda: stop.why is not None)
                cached.log(writer, plan, why, pos.step)
                train_step, validate = cached.step, cached.validate
            else:
                logging.info("Phase %d (%s): full train step (%s)", plan.index, plan.name, why)
                full = make_train_step(model, plan, mesh, config.augment, prep,
                                       config.sync_batchnorm)
                train_step = lambda s, i: full(s, devices.shard_batch(mesh, batches.at(i)), i)  # noqa
                validate = lambda s: evaluator(_variables(s), "validation")  # noqa: E731
            throughput.expect_compile()
            why_stop = _stop_reason(stop, pos.step, stop_after_steps, config.log_every_steps)
            # ---- steps: train; at a log, validation, save or stop: check, record, save ----
            end, pending, every = pos.phase_start + plan.steps, [], config.checkpoint.every_steps
            done = stopping.enabled and pos.stopper.exhausted  # Stopped before the save.
            while pos.step < end and not done and not why_stop:
                state, m = train_step(state, pos.step)
                pos.step += 1
                pending.append(m)
                throughput.step(m)
                progress.update()
                log_now = pos.step % config.log_every_steps == 0
                eval_now = pos.step % eval_every == 0 or pos.step == end
                save_now = (every and pos.step % every == 0) or (
                    eval_now and config.checkpoint.at_epoch_end and pos.step != end)
                why_stop = _stop_reason(stop, pos.step, stop_after_steps, config.log_every_steps)
                if not (log_now or eval_now or save_now or why_stop):
                    continue
                rate = throughput.window(pending)  # Waits for the steps; not the work below.
                val = validate(state) if eval_now and has_val else None
                watch.check(pending, val, pos.step, pos.phase)  # Before anything is recorded.
                if log_now:
                    _log_train(writer, progress, plan, pos, pending, rate)
                    pending = []
                if val is not None:
                    improved, done = _record_validation(val, pos, writer, progress,
                                                        stopping.enabled)
                    if improved and stopping.restore_best:  # Only the test reads it.
                        save(state, "best")
                    if ckpt.keeps_phase_best and pos.stopper.phase_best_step == pos.step:
                        save(state, "phase_best")
                    if done and ckpt.keeps_phase_best:
                        state = _restore_phase_best(ckpt, state, pos, writer, mesh)
                watch.note(writer.history[-2:], pos.phase)
                if save_now and not done and not why_stop:
                    save(state)  # A phase's end (and a stop) is saved once, below.
                throughput.restart()
            if why_stop:
                save(state)  # Checked: a stop comes at a boundary, or before any step.
                raise interrupts.Interrupted(pos.step, why_stop)
            pos.phase += 1
            pos.phase_start = pos.step
            if pos.phase < len(config.phases):
                state = _start_phase(config, state, pos, writer, mesh, epoch_steps)
            save(state)  # The phase boundary: a resume continues with the next phase.
        stop.disarm()  # The test and the report: a signal ends the command at once again.
        # ---- test: the best checkpoint (by the validation metric) or the last weights ----
        ckpt.wait()
        use_best = stopping.restore_best and ckpt.best_step() is not None
        tested = (ckpt.restore("best", devices.abstract(mesh, _variables(state))) if use_best
                  else _variables(state))
        test = evaluator(tested, "test", keep_logits=True)
        val = (evaluator(tested, "validation", keep_logits=True)  # The report's temperature.
               if has_val and report_fn is not None else None)
        results = {
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "test_examples": test["count"], "tested_checkpoint": "best" if use_best else "last",
            "tested_step": int(ckpt.best_step() if use_best else pos.step),
            f"best_{pos.stopper.metric}": pos.stopper.run_best,
            "best_step": pos.stopper.run_best_step, "steps": pos.step,
            "wall_seconds": wall_saved, "train_seconds": train_before + throughput.seconds,
            "images_per_sec": throughput.overall_rate(writer.history),
            **_about_run(config, writer.history, info),
        }
        if report_fn is not None and jax.process_index() == 0:
            report_fn(writer.history, test["labels"], test["logits"], list(info.class_names),
                      results, val)
    return results


def _about_run(config: ml_collections.ConfigDict, history: list[dict], info: Any
               ) -> dict[str, Any]:
    """results.json's facts about the run: each phase's effective peak rates, whether a loss
    rose far above chance (divergence.unstable_loss), devices, dataset and the config."""
    return {"learning_rates": [{"phase": i, "name": p.name,
                                "peak": config_lib.peak_learning_rates(config, i)}
                               for i, p in enumerate(config.phases)],
            "unstable": divergence.unstable_loss(history, info.num_classes),
            "devices": jax.device_count(), "dataset": info.name,
            "config": json.loads(config.to_json_best_effort())}


def _initial_state(config: ml_collections.ConfigDict, model: Any, mesh: Any,
                   ckpt: checkpoints.Checkpointer, info: Any, phase: int | None) -> TrainState:
    """A fresh state (pretrained or ``init_from`` weights, phase 0's optimizer) when ``phase``
    is None, else the latest checkpoint's, saved in phase ``phase``: resuming, every value comes
    from the checkpoint, so shapes are enough."""
    rng = jax.random.key(config.seed + 1)
    epoch_steps = input_pipeline.steps_per_epoch(config, info)
    if phase is None:
        variables = model_setup.init_variables(config, model, class_names=info.class_names)
        tx = build_phase(config, variables["params"], 0, epoch_steps).tx
        return devices.replicate(mesh, create_train_state(variables, tx, rng))
    shapes = jax.eval_shape(lambda: model_setup.init_variables(config, model, load_weights=False))
    phase = min(phase, len(config.phases) - 1)  # A finished run: its last phase.
    tx = build_phase(config, shapes["params"], phase, epoch_steps).tx
    like = jax.eval_shape(lambda v: create_train_state(v, tx, rng), shapes)
    return ckpt.restore("latest", devices.abstract(mesh, like))


def _variables(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _start_phase(config: ml_collections.ConfigDict, state: TrainState, pos: Position,
                 writer: metrics.MetricsWriter, mesh: Any, epoch_steps: int) -> TrainState:
    """Phase ``pos.phase`` begins: a fresh optimizer state, patience reset, a phase marker in
    the metrics."""
    plan = build_phase(config, state.params, pos.phase, epoch_steps)
    pos.stopper.start_phase()
    cached, _ = feature_cache.cache_decision(config, plan)
    writer.write(pos.step, "phase", {"index": plan.index, "name": plan.name,
                                     "feature_cache": cached})
    logging.info("Phase %d (%s): %d steps, training %s, %s", plan.index, plan.name, plan.steps,
                 list(config.phases[plan.index].trainable), config_lib.lr_text(config, plan.index))
    return state.replace(opt_state=devices.replicate(mesh, plan.tx.init(state.params)))


def _stop_reason(stop: interrupts.StopRequest, step: int, stop_after: int | None,
                 log_every: int) -> str | None:
    """Why the run must stop at ``step`` (a signal, or ``stop_after``), else None. Several
    processes agree first (a signal may reach only some), so that all stop at the same step;
    they ask every few steps: at most 10 (a preemption's grace period is short) and on every
    log step (which waits for the device anyway)."""
    at_limit = stop_after is not None and step >= stop_after
    if jax.process_count() > 1 and not at_limit and step % max(1, min(10, log_every)):
        return None  # Agreeing is a collective that drains the step pipeline: not every step.
    if not devices.any_process(stop.why is not None or at_limit):
        return None
    return stop.why or "stop request"


def _log_train(writer: metrics.MetricsWriter, progress: metrics.Progress, plan: PhasePlan,
               pos: Position, pending: list, rate: float | None) -> None:
    """One "train" record: the mean of the steps since the last, images/s (None: no step of the
    window was timed, a compilation), learning rates."""
    values = jax.device_get(pending)
    record = {"loss": float(np.mean([m["loss"] for m in values])),
              "accuracy": float(np.mean([m["accuracy"] for m in values])),
              "images_per_sec": rate, "phase": plan.index,
              **{f"lr/{g}": v
                 for g, v in learning_rates(plan, pos.step - pos.phase_start).items()}}
    writer.write(pos.step, "train", record)
    speed = f" {rate:.1f} img/s" if rate else ""
    progress.log(pos.step, f"loss {record['loss']:.4f} acc {record['accuracy']:.4f}{speed}")


def _record_validation(result: dict, pos: Position, writer: metrics.MetricsWriter,
                       progress: metrics.Progress, stop_early: bool) -> tuple[bool, bool]:
    """Record a validation and update early stopping: (a new best of the run, the phase ends
    here)."""
    writer.write(pos.step, "eval", {"val_loss": result["loss"],
                                    "val_accuracy": result["accuracy"]})
    progress.log(pos.step, f"val_loss {result['loss']:.4f} val_acc {result['accuracy']:.4f}")
    value = result["accuracy"] if pos.stopper.metric == "val_accuracy" else result["loss"]
    improved, stop = pos.stopper.update(value, pos.step)
    if stop and stop_early:
        logging.info("Early stopping ends the phase at step %d", pos.step)
    return improved, stop and stop_early


def _restore_phase_best(ckpt: checkpoints.Checkpointer, state: TrainState, pos: Position,
                        writer: metrics.MetricsWriter, mesh: Any) -> TrainState:
    """The phase's best params and batch_stats into ``state`` (Keras' restore_best_weights),
    marked by a ``restore_best`` record; the optimizer state is kept."""
    best = ckpt.restore("phase_best", devices.abstract(mesh, _variables(state)))
    writer.write(pos.step, "restore_best", {"phase": pos.phase,
                                            "restored_step": pos.stopper.phase_best_step})
    logging.info("Early stopping: the phase continues from its best weights (step %d)",
                 pos.stopper.phase_best_step)
    return state.replace(params=best["params"], batch_stats=best["batch_stats"])


class _TrainBatches:
    """input_pipeline.train_batches at a given step, reopened where the step asked for is not
    the next one (after a cached phase, which reads no images, or on resume)."""

    def __init__(self, config: ml_collections.ConfigDict, info: Any) -> None:
        self.config, self.info, self.it, self.next_step = config, info, None, -1

    def at(self, step: int) -> dict[str, np.ndarray]:
        if self.it is None or step != self.next_step:
            self.it = input_pipeline.train_batches(self.config, self.info, start_step=step)
        self.next_step = step + 1
        return next(self.it)
