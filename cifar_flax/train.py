"""Training: the data-parallel step and ``train_and_evaluate``, the run from init to the test.

The step (:func:`make_train_step`) is written per device: on-device augmentation -> model ->
softmax cross-entropy on soft labels -> gradients of the trainable parameters only ->
``jax.lax.pmean(grads, "data")`` -> the phase's optax update. It is mapped over the mesh of all
devices with ``jax.shard_map`` inside ``jax.jit``: the batch is split on ``data``, the state is
replicated; BatchNorm averages its statistics over ``data``, so a step gives the same result on
any number of devices. Frozen parameters enter as constants (no backward pass runs through a
frozen prefix) and keep their exact values; step ``s`` draws its randomness from
``fold_in(rng, s)``, so a resumed run repeats an uninterrupted one bit for bit.

:func:`train_and_evaluate` runs the phases of ``config.phases`` in order, each with a fresh
optimizer state; per step: train, log, validate (early stopping, best checkpoints), save, and
honour a stop request. A phase whose backbone is frozen trains its head on cached backbone
features (training/feature_cache.py) with :func:`make_head_step`. At the end the best checkpoint
(by the validation metric) is tested on the test split. What guards the run sits at one seam
each: the workdir, its lock and the resume check (training/workdir.py, before anything trains),
checkpoints with their damaged-step fallback (training/checkpoints.py), the divergence check
(``_check_finite``, before every save), signals (training/interrupts.py: a stop request is
honoured at a step boundary, after saving).

An unstable run goes on but is reported: the first logged training loss (the mean of a log
window) or validation loss above ``UNSTABLE_FACTOR`` x ln(num_classes), 100 times the loss of a
chance-level prediction (230 for 10 classes), prints one warning naming the step, the value and
the learning rate to lower, and results.json's ``unstable`` (null when stable) and report.md
record it (:func:`unstable_loss`, derived from the metrics history, so a resumed run knows it).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

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

from cifar_flax import UserError
from cifar_flax.data import augment, input_pipeline
from cifar_flax.training import checkpoints, devices, evaluation, feature_cache, initialize
from cifar_flax.training import interrupts, metrics, optim
from cifar_flax.training import workdir as workdir_lib
from cifar_flax.training.devices import AXIS

UNSTABLE_FACTOR = 100.0  # A loss above this x ln(num_classes) marks the run unstable.
# (history, test labels, test logits, class names, results, the tested weights' validation
# {"labels", "logits", ...} or None without a validation split: calibration's temperature).
ReportFn = Callable[[list, np.ndarray, np.ndarray, list, dict, dict | None], None]


# ---- the step -----------------------------------------------------------------------------------


class TrainState(flax.struct.PyTreeNode):
    """What a step reads and writes; all of it is checkpointed."""

    step: jax.Array  # Global step (int32), continues across phases.
    params: Any
    batch_stats: Any
    opt_state: Any  # State of the current phase's optimizer (new at each phase start).
    rng: jax.Array  # Base key (uint32[2]); step s uses fold_in(rng, s): resuming needs only step.


def create_train_state(variables: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       step: int = 0) -> TrainState:
    """A fresh state: ``variables`` = {"params", "batch_stats"}; new optimizer state from ``tx``."""
    return TrainState(step=jnp.asarray(step, jnp.int32), params=variables["params"],
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


def make_train_step(model: Any, plan: optim.PhasePlan, mesh: jax.sharding.Mesh, aug_config: Any,
                    preprocessing: Any, num_classes: int, sync_batchnorm: bool = True,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted data-parallel step ``(state, batch) -> (state, metrics)``; ``batch`` holds
    uint8 ``image`` (N, H, W, 3) and int ``label`` (N,) placed by devices.shard_batch. The state
    buffers are donated."""

    def per_device(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        aug_key, dropout_key = step_keys(state.rng, state.step, jax.lax.axis_index(AXIS))
        images, soft = augment.train_augment(batch["image"], batch["label"], aug_key, aug_config,
                                             num_classes, preprocessing)

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
        return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                             opt_state=opt_state), metrics_

    # check_vma=False: the pmap programming model. Gradients are per device and averaged by the
    # explicit pmean; with check_vma=True JAX would already psum the gradients of the replicated
    # params (its transpose of the implicit broadcast) and the pmean would not divide.
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))


def make_head_step(model: Any, plan: optim.PhasePlan, mesh: jax.sharding.Mesh, params: Any,
                   num_classes: int) -> Callable:
    """The head-only step of a cached-feature phase, ``(head, opt_state, step, rng, features,
    labels) -> (head, opt_state, step, metrics)``, from the same pieces as the full step (device
    0's keys, the loss, the frozen-aware update on the full tree, the backbone entering as zeros
    that only ``set_to_zero`` sees). Replicated on ``mesh``; head and opt_state are donated."""
    replicated = NamedSharding(mesh, P())
    frozen = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
              for k, v in params.items() if k != "head"}

    def step(head, opt_state, step, rng, features, labels):
        _, dropout_key = step_keys(rng, step, 0)
        full = {**jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), frozen), "head": head}

        def loss_fn(p):
            logits = model.apply({"params": {"head": p["head"]}}, features, train=True,
                                 method="classify", rngs={"dropout": dropout_key})
            soft = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
            return cross_entropy(logits, soft), logits

        (loss, logits), grads = trainable_value_and_grad(loss_fn, full, plan.trainable)
        new, opt_state = masked_update(plan.tx, full, opt_state, grads)
        return new["head"], opt_state, step + 1, step_metrics(loss, logits, labels, grads)

    return jax.jit(step, in_shardings=replicated, out_shardings=replicated, donate_argnums=(0, 1))


# ---- the run ------------------------------------------------------------------------------------


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
    model = initialize.build_model(config, info.num_classes)
    prep = initialize.input_preprocessing(config)
    epoch_steps = input_pipeline.steps_per_epoch(config, info)
    eval_every = config.eval_every_steps or epoch_steps
    has_val = info.split_sizes.get("validation", 0) > 0
    run_fingerprint = workdir_lib.fingerprint(config, info)
    workdir_lib.check_previous_run(config, info, workdir)  # Refused, moved aside, or resumable.
    es_cfg = config.early_stopping
    ckpt = checkpoints.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save,
                                    phase_best=es_cfg.enabled and es_cfg.restore_best and has_val)
    saved = ckpt.latest_meta()  # Where a rerun resumes (damaged newer steps moved aside).
    state = _initial_state(config, model, mesh, ckpt, saved, info, epoch_steps)
    step, phase_index, phase_start, es = _position(saved, config)
    wall_before = wall_saved = saved["wall_seconds"] if saved else 0.0
    train_before = saved.get("train_seconds", 0.0) if saved else 0.0
    workdir_lib.write_run_files(workdir, config, info)
    writer = metrics.MetricsWriter(workdir, saved["history"] if saved else None, config.tensorboard)
    evaluator = evaluation.Evaluator(config, info, model, mesh, prep)
    throughput = metrics.Throughput(config.batch_size)
    batches = _TrainBatches(config, info)
    total = sum(optim.phase_steps(p, epoch_steps) for p in config.phases)  # The bar's: at most.
    unstable = unstable_loss(writer.history, info.num_classes)  # Warned once, also on resume.

    def save(state: TrainState, kind: str = "latest") -> None:
        """A checkpoint of ``kind`` (latest, best, phase_best): the state, where the run stands."""
        nonlocal wall_saved
        wall_saved = wall_before + time.time() - wall_start
        meta = {"step": step, "phase_index": phase_index, "phase_start": phase_start,
                "early_stopping": es.to_json(), "history": writer.history,
                "train_seconds": train_before + throughput.seconds,
                "fingerprint": run_fingerprint, "wall_seconds": wall_saved}
        ckpt.save(kind, step, state, meta)

    if saved is None:
        state = _start_phase(config, state, 0, epoch_steps, mesh, writer, es, step)
    else:
        logging.info("Resuming from step %d (phase %d) in %s", step, phase_index, workdir)
    # ---- phases: each a fresh optimizer state, on cached features or the full step ----
    with ckpt, writer, interrupts.StopRequest() as stop, metrics.Progress(
            total, min(step, total), config.progress_bar) as progress:
        while phase_index < len(config.phases):
            plan = optim.build_phase(config, state.params, phase_index, epoch_steps)
            use_cache, why = feature_cache.cache_decision(config, plan)
            if use_cache:
                cached = feature_cache.CachedPhase(
                    config, info, model, mesh, prep, state,
                    make_head_step(model, plan, mesh, state.params, info.num_classes),
                    should_stop=lambda: stop.why is not None)
                _log_cache(writer, plan, cached, why, step)
                train_step, validate = cached.step, cached.validate
            else:
                logging.info("Phase %d (%s): full train step (%s)", plan.index, plan.name, why)
                full = make_train_step(model, plan, mesh, config.augment, prep, info.num_classes,
                                       config.sync_batchnorm)
                train_step = lambda s, i: full(s, devices.shard_batch(mesh, batches.at(i)))  # noqa
                validate = lambda s: evaluator(_variables(s), "validation")  # noqa: E731
            throughput.expect_compile()
            # ---- steps: train, log, validate and early-stop, save, stop request ----
            end, pending = phase_start + plan.steps, []
            done = config.early_stopping.enabled and es.exhausted  # Stopped before the save.
            while step < end and not done:
                why_stop = _stop_requested(stop, step, stop_after_steps, config)
                if why_stop:
                    _check_finite(pending, step, config, phase_index, ckpt)
                    throughput.window()  # The steps since the last log (synced just above).
                    save(state)
                    raise interrupts.Interrupted(step, why_stop)
                state, m = train_step(state, step)
                step += 1
                pending.append(m)
                throughput.step(m)
                progress.update()
                if step % config.log_every_steps == 0:
                    _check_finite(pending, step, config, phase_index, ckpt)
                    _log_train(writer, progress, throughput, plan, step, phase_start, pending)
                    pending = []
                    unstable = _warn_unstable(writer.history[-1:], unstable, phase_index,
                                              info.num_classes, config)
                if step % eval_every == 0 or step == end:
                    _check_finite(pending, step, config, phase_index, ckpt)
                    throughput.window()  # The steps since the last log (synced just above).
                    improved, done = _validate(validate if has_val else None, state, step, es,
                                               writer, progress, config, phase_index, ckpt)
                    unstable = _warn_unstable(writer.history[-1:], unstable, phase_index,
                                              info.num_classes, config)
                    if improved:
                        save(state, "best")
                    if ckpt.keeps_phase_best and es.phase_best_step == step:
                        save(state, "phase_best")
                    if done and ckpt.keeps_phase_best:
                        state = _restore_phase_best(ckpt, state, es, writer, step, phase_index,
                                                    mesh)
                    if config.checkpoint.at_epoch_end and not done and step != end:
                        save(state)  # A phase's end is saved once, at the boundary below.
                    throughput.restart()
                elif config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                    _check_finite(pending, step, config, phase_index, ckpt)
                    throughput.window()
                    save(state)
                    throughput.restart()
            phase_index += 1
            phase_start = step
            if phase_index < len(config.phases):
                state = _start_phase(config, state, phase_index, epoch_steps, mesh, writer, es,
                                     step)
            save(state)  # The phase boundary: a resume continues with the next phase.
        stop.disarm()  # The test and the report: a signal ends the command at once again.
        # ---- test: the best checkpoint (by the validation metric) or the last weights ----
        ckpt.wait()
        use_best = config.early_stopping.restore_best and ckpt.best_step() is not None
        tested = (ckpt.restore("best", devices.abstract(mesh, _variables(state))) if use_best
                  else _variables(state))
        test = evaluator(tested, "test", keep_logits=True)
        val = (evaluator(tested, "validation", keep_logits=True)  # The report's temperature.
               if has_val and report_fn is not None else None)
        results = {
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "test_examples": test["count"], "tested_checkpoint": "best" if use_best else "last",
            "tested_step": int(ckpt.best_step() if use_best else step),
            f"best_{es.metric}": es.run_best, "best_step": es.run_best_step, "steps": step,
            "wall_seconds": wall_saved, "train_seconds": train_before + throughput.seconds,
            "images_per_sec": _overall_rate(writer.history, throughput),
            **_about_run(config, writer.history, info),
        }
        if report_fn is not None and jax.process_index() == 0:
            report_fn(writer.history, test["labels"], test["logits"], list(info.class_names),
                      results, val)
    return results


def _about_run(config: ml_collections.ConfigDict, history: list[dict], info: Any
               ) -> dict[str, Any]:
    """results.json's facts about the run: each phase's effective peak rates, whether a loss
    rose far above chance (unstable_loss), devices, dataset and the config."""
    return {"learning_rates": [{"phase": i, "name": p.name,
                                "peak": optim.peak_learning_rates(config, i)}
                               for i, p in enumerate(config.phases)],
            "unstable": unstable_loss(history, info.num_classes),
            "devices": jax.device_count(), "dataset": info.name,
            "config": json.loads(config.to_json_best_effort())}


def _initial_state(config: ml_collections.ConfigDict, model: Any, mesh: Any,
                   ckpt: checkpoints.Checkpointer, saved: dict | None, info: Any,
                   epoch_steps: int) -> TrainState:
    """A fresh state (pretrained or ``init_from`` weights, phase 0's optimizer), or the latest
    checkpoint's: resuming, every value comes from the checkpoint, so shapes are enough."""
    rng = jax.random.key(config.seed + 1)
    if saved is None:
        variables = initialize.init_variables(config, model, class_names=info.class_names)
        tx = optim.build_phase(config, variables["params"], 0, epoch_steps).tx
        return devices.replicate(mesh, create_train_state(variables, tx, rng))
    shapes = jax.eval_shape(lambda: initialize.init_variables(config, model, load_weights=False))
    phase = min(saved["phase_index"], len(config.phases) - 1)  # A finished run: its last phase.
    tx = optim.build_phase(config, shapes["params"], phase, epoch_steps).tx
    like = jax.eval_shape(lambda v: create_train_state(v, tx, rng, saved["step"]), shapes)
    return ckpt.restore("latest", devices.abstract(mesh, like))


def _position(saved: dict | None, config: ml_collections.ConfigDict
              ) -> tuple[int, int, int, evaluation.EarlyStopping]:
    """(step, phase index, phase start step, early stopping) of a fresh run or a checkpoint."""
    if saved is None:
        es = config.early_stopping
        return 0, 0, 0, evaluation.EarlyStopping(es.metric, es.patience, es.min_delta)
    return (saved["step"], saved["phase_index"], saved["phase_start"],
            evaluation.EarlyStopping.from_json(saved["early_stopping"]))


def _variables(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _start_phase(config: ml_collections.ConfigDict, state: TrainState, index: int, epoch_steps: int,
                 mesh: Any, writer: metrics.MetricsWriter, es: evaluation.EarlyStopping,
                 step: int) -> TrainState:
    """A new phase: a fresh optimizer state, patience reset, a phase marker in the metrics."""
    plan = optim.build_phase(config, state.params, index, epoch_steps)
    es.start_phase()
    cached, _ = feature_cache.cache_decision(config, plan)
    writer.write(step, "phase", {"index": index, "name": plan.name, "feature_cache": cached})
    logging.info("Phase %d (%s): %d steps, training %s, %s", index, plan.name, plan.steps,
                 list(config.phases[index].trainable), _lr_text(config, index))
    return state.replace(opt_state=devices.replicate(mesh, plan.tx.init(state.params)))


def _log_cache(writer: metrics.MetricsWriter, plan: optim.PhasePlan,
               cached: feature_cache.CachedPhase, why: str, step: int) -> None:
    if cached.cut_short:
        return  # A stop request ended the extraction: the loop stops before the next step.
    n, passes = cached.cache.num_examples, cached.cache.num_passes
    logging.info("Phase %d (%s) trains on cached backbone features (%s): %d train examples x %d "
                 "passes extracted in %.1f s", plan.index, plan.name, why, n, passes,
                 cached.extract_seconds)
    writer.write(step, "feature_cache", {"phase": plan.index, "train_examples": n,
                                         "extract_seconds": cached.extract_seconds,
                                         "passes": passes})


def _stop_requested(stop: interrupts.StopRequest, step: int, stop_after: int | None,
                    config: ml_collections.ConfigDict) -> str | None:
    """Why the run must stop before ``step`` (a signal, or ``stop_after``), else None. Several
    processes agree first (a signal may reach only some), so that all stop at the same step;
    they check every few steps: at most 10 (a preemption's grace period is short) and on every
    log step (which waits for the device anyway)."""
    at_limit = stop_after is not None and step >= stop_after
    every = max(1, min(10, config.log_every_steps))
    if jax.process_count() > 1 and not at_limit and step % every:
        return None  # Agreeing is a collective that drains the step pipeline: not every step.
    if not devices.any_process(stop.why is not None or at_limit):
        return None
    return stop.why or "stop request"


def _check_finite(pending: list, step: int, config: ml_collections.ConfigDict, phase: int,
                  ckpt: checkpoints.Checkpointer) -> None:
    """The divergence check, before anything is saved: UserError at the first of the steps
    ending at ``step`` whose training loss or gradient norm is not finite (read on the host from
    metrics that are fetched anyway: no extra device sync per step)."""
    values = jax.device_get(pending)
    for i, m in enumerate(values):
        for name, label in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            if not np.isfinite(m[name]):
                _diverged(step - len(values) + 1 + i, label, m[name], config, phase, ckpt)


def _diverged(step: int, what: str, value: Any, config: ml_collections.ConfigDict, i: int,
              ckpt: checkpoints.Checkpointer) -> None:
    """Stop a diverged run with the one line the user sees: what happened and what to try."""
    phase, last = config.phases[i], ckpt.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.root}"
            if last is not None else "no checkpoint had been saved yet")
    raise UserError(
        f"training diverged at step {step} in phase {i} ({phase.name}): the {what} is "
        f"{float(value)}; {kept}. Try a lower learning rate (--config.phases[{i}].lr, now "
        f"{phase.lr:g}: {_lr_text(config, i)}) or a warmup (--config.phases[{i}].warmup_epochs, "
        f"now {phase.warmup_epochs:g}), in a new --workdir or with --config.resume=replace.")


def _lr_text(config: ml_collections.ConfigDict, i: int) -> str:
    """Phase ``i``'s peak learning rates as this run trains with them, and where they come from
    when the batch scaled them (optim.peak_learning_rates), for the log and the error lines."""
    rates = optim.peak_learning_rates(config, i)
    shown = (f"{next(iter(rates.values())):g}" if len(set(rates.values())) == 1
             else ", ".join(f"{g} {v:g}" for g, v in rates.items()))
    if config.batch_size == config.lr_batch_size:
        return f"peak lr {shown}"
    return (f"peak lr {shown} (the config's rates are for --config.lr_batch_size="
            f"{config.lr_batch_size}, x {config.batch_size}/{config.lr_batch_size} at "
            f"batch_size {config.batch_size})")


def unstable_loss(history: list[dict], num_classes: int, phase: int = 0
                  ) -> dict[str, Any] | None:
    """The first record of ``history`` (records from phase ``phase`` on) whose training loss (a
    "train" record's window mean) or validation loss exceeds UNSTABLE_FACTOR x ln(num_classes):
    {"step", "phase", "what", "value", "limit", "chance_loss"}; None when there is none
    (results.json's ``unstable``)."""
    chance = math.log(num_classes)
    limit = UNSTABLE_FACTOR * chance
    keys = {"train": ("loss", "training loss"), "eval": ("val_loss", "validation loss")}
    for r in history:
        if r["kind"] == "phase":
            phase = r["index"]
        key, what = keys.get(r["kind"], (None, None))
        value = r.get(key) if key else None
        if value is not None and value > limit:
            return {"step": r["step"], "phase": phase, "what": what, "value": value,
                    "limit": limit, "chance_loss": chance}
    return None


def _warn_unstable(new: list[dict], known: dict | None, phase: int, num_classes: int,
                   config: ml_collections.ConfigDict) -> dict | None:
    """``known``, or the first unstable one of the ``new`` records of phase ``phase``
    (unstable_loss), warned once."""
    if known is not None:
        return known
    found = unstable_loss(new, num_classes, phase)
    if found is not None:
        i = found["phase"]
        logging.warning(
            "unstable run: the %s at step %d is %.4g, above %.4g (%g x ln(%d), the loss of a "
            "chance-level guess); the learning rate is too high for batch_size %d: lower "
            "--config.phases[%d].lr (now %g: %s) in a new --workdir.", found["what"],
            found["step"], found["value"], found["limit"], UNSTABLE_FACTOR, num_classes,
            config.batch_size, i, config.phases[i].lr, _lr_text(config, i))
    return found


def _log_train(writer: metrics.MetricsWriter, progress: metrics.Progress,
               throughput: metrics.Throughput, plan: optim.PhasePlan, step: int,
               phase_start: int, pending: list) -> None:
    """One "train" record: the mean of the steps since the last, images/s, learning rates."""
    values = jax.device_get(pending)
    rate = throughput.window()  # None: no step of this window was timed (a compilation).
    record = {"loss": float(np.mean([m["loss"] for m in values])),
              "accuracy": float(np.mean([m["accuracy"] for m in values])),
              "images_per_sec": rate, "phase": plan.index,
              **{f"lr/{g}": v for g, v in optim.learning_rates(plan, step - phase_start).items()}}
    writer.write(step, "train", record)
    speed = f" {rate:.1f} img/s" if rate else ""
    progress.log(step, f"loss {record['loss']:.4f} acc {record['accuracy']:.4f}{speed}")


def _validate(validate: Callable | None, state: TrainState, step: int,
              es: evaluation.EarlyStopping, writer: metrics.MetricsWriter,
              progress: metrics.Progress, config: ml_collections.ConfigDict, phase: int,
              ckpt: checkpoints.Checkpointer) -> tuple[bool, bool]:
    """Validate (without validation data: nothing), record it, update early stopping: (a new
    best of the run, the phase ends here). A non-finite validation loss stops the run."""
    if validate is None:
        return False, False
    result = validate(state)
    if not np.isfinite(result["loss"]):
        _diverged(step, "validation loss", result["loss"], config, phase, ckpt)
    writer.write(step, "eval", {"val_loss": result["loss"], "val_accuracy": result["accuracy"]})
    progress.log(step, f"val_loss {result['loss']:.4f} val_acc {result['accuracy']:.4f}")
    value = result["accuracy"] if es.metric == "val_accuracy" else result["loss"]
    improved, stop = es.update(value, step)
    stop = stop and config.early_stopping.enabled
    if stop:
        logging.info("Early stopping ends the phase at step %d", step)
    return improved, stop


def _restore_phase_best(ckpt: checkpoints.Checkpointer, state: TrainState,
                        es: evaluation.EarlyStopping, writer: metrics.MetricsWriter, step: int,
                        phase: int, mesh: Any) -> TrainState:
    """The phase's best params and batch_stats into ``state`` (Keras' restore_best_weights),
    marked by a ``restore_best`` record; the optimizer state and step are kept."""
    best = ckpt.restore("phase_best", devices.abstract(mesh, _variables(state)))
    writer.write(step, "restore_best", {"phase": phase, "restored_step": es.phase_best_step})
    logging.info("Early stopping: the phase continues from its best weights (step %d)",
                 es.phase_best_step)
    return state.replace(params=best["params"], batch_stats=best["batch_stats"])


def _overall_rate(history: list[dict], throughput: metrics.Throughput) -> float | None:
    """Mean training images/s over the logged windows of all sessions, else over this session's
    timed steps; None when no step was timed (each phase's first step compiles, and is not)."""
    rates = [r["images_per_sec"] for r in history
             if r["kind"] == "train" and r.get("images_per_sec")]
    return float(np.mean(rates)) if rates else throughput.overall


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
