"""``train_and_evaluate(config, workdir)``: the run from init (or resume) to the test report.

Phases run in order (optim.py); each has a fresh optimizer state. After every epoch (or
``eval_every_steps``) the validation split is evaluated, early stopping may end the phase, and
checkpoints are written (checkpointing.py). A phase whose whole backbone is frozen trains its head
on backbone features cached at the phase start (feature_cache.py, ``config.feature_cache``); the
loop around the step (logging, evaluation cadence, checkpoints, stopping) is the same. A rerun
with the same workdir resumes from the latest checkpoint. SIGTERM finishes the current step,
saves and returns. At the end the best checkpoint (by the validation metric) is evaluated on the
test split (full model) and report.py writes the report.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cifar_flax import feature_cache, input_pipeline, optim, pretrained, report, step as step_lib
from cifar_flax.checkpointing import Checkpointer
from cifar_flax.config import validate
from cifar_flax.early_stopping import EarlyStopping
from cifar_flax.metrics_writer import MetricsWriter, Progress
from cifar_flax.models import create_model


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """The model a config describes (synchronised BatchNorm over ``data`` when configured)."""
    m = config.model
    return create_model(
        num_classes, m.layout, m.head_hidden, m.head_dropout, m.zero_init_head, config.dtype,
        m.stage_sizes, m.base_width, step_lib.AXIS if config.sync_batchnorm else None,
        m.conv_impl,
    )


def init_variables(config: ml_collections.ConfigDict, model: Any, load_weights: bool = True):
    """(variables, preprocessing): random init, then the pretrained backbone when configured.

    ``load_weights=False`` skips loading (a resumed run restores every value from its checkpoint).
    """
    res = config.augment.resolution
    variables = model.init(
        jax.random.key(config.seed), jnp.zeros((1, res, res, 3), jnp.float32), train=False
    )
    source = config.pretrained.source
    if source and load_weights:
        weights = pretrained.load_pretrained(
            source, config.pretrained.variant, config.pretrained.file, config.pretrained.cache_dir
        )
        variables = pretrained.merge_into(variables, weights)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return variables, input_preprocessing(config)


def input_preprocessing(config: ml_collections.ConfigDict) -> Any:
    """The normalisation the configured weights expect (SIMPLE for random init)."""
    p = config.pretrained
    return pretrained.source_spec(p.source, p.variant, config.model.layout).preprocessing


class _Stop:
    """Set by SIGTERM (preemption): the loop saves after the current step and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Stop":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: no handler (tests calling from threads).
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Evaluator:
    """One pass over a split with the jitted eval step; metrics over real (masked) examples."""

    def __init__(self, config, info, model, mesh, preprocessing):
        self.config, self.info, self.mesh = config, info, mesh
        self.fn = step_lib.make_eval_step(model, mesh, config.augment, preprocessing)

    def __call__(self, variables: Any, split: str) -> dict[str, Any]:
        logits, losses, labels = [], [], []
        for batch in input_pipeline.eval_batches(self.config, self.info, split):
            dev = step_lib.shard_batch(self.mesh, batch)
            out = self.fn(variables, {"image": dev["image"], "label": dev["label"]})
            mask = step_lib.to_host(dev["mask"])
            logits.append(step_lib.to_host(out["logits"])[mask])
            losses.append(step_lib.to_host(out["loss"])[mask])
            labels.append(step_lib.to_host(dev["label"])[mask])
        logits, labels = np.concatenate(logits), np.concatenate(labels)
        return {
            "loss": float(np.mean(np.concatenate(losses))),
            "accuracy": float(np.mean(logits.argmax(-1) == labels)),
            "logits": logits,
            "labels": labels,
        }


class _TrainBatches:
    """train_batches at a given step; reopened at the step asked for when the position moved
    (after a cached phase, which does not read images)."""

    def __init__(self, config, info) -> None:
        self.config, self.info, self.it, self.next_step = config, info, None, -1

    def at(self, step: int) -> dict[str, np.ndarray]:
        if self.it is None or step != self.next_step:
            self.it = input_pipeline.train_batches(self.config, self.info, start_step=step)
        self.next_step = step + 1
        return next(self.it)


class _Throughput:
    """images/s over timed windows that exclude compilation, evaluation and checkpointing."""

    def __init__(self, batch_size: int) -> None:
        self.batch, self.images, self.seconds = batch_size, 0, 0.0
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def window(self) -> float:
        """Close the current window (call after blocking on its results); its images/s."""
        dt = time.perf_counter() - self.t0
        rate = self.steps * self.batch / dt if dt > 0 and self.steps else 0.0
        self.images += self.steps * self.batch
        self.seconds += dt if self.steps else 0.0
        self.restart()
        return rate

    @property
    def overall(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, stop_after_steps: int | None = None
) -> dict[str, Any]:
    """Train all phases (resuming from ``workdir`` if it has checkpoints), test, write the report.

    ``stop_after_steps`` makes the run behave as if SIGTERM arrived once the global step reaches
    it (save, return); tests use it to interrupt a run. Returns results.json's content, or
    ``{"interrupted": True, "step": s}`` for an interrupted run.
    """
    validate(config)
    t_start = time.time()
    mesh = step_lib.make_mesh()
    info = input_pipeline.get_info(config)
    spe = input_pipeline.steps_per_epoch(config, info)
    model = build_model(config, info.num_classes)
    ckpt = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    meta = ckpt.latest_meta()
    if meta is None:
        variables, prep = init_variables(config, model)
    else:  # Resuming: every value comes from the checkpoint, so shapes are enough.
        variables = jax.eval_shape(lambda: init_variables(config, model, load_weights=False)[0])
        prep = input_preprocessing(config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    loop = _Loop(config, workdir, info, spe, model, mesh, prep, ckpt, stop_after_steps)
    try:
        shapes = step_lib.abstract(mesh, variables)  # The step donates (deletes) the buffers.
        state = loop.restore_or_start(variables, meta)
        if not loop.run(state):
            return {"interrupted": True, "step": loop.step}
        return loop.finish(shapes, time.time() - t_start)
    finally:
        ckpt.wait()
        ckpt.close()
        loop.writer.close()


class _Loop:
    """The phase loop's state on the host (phase position, early stopping, metrics, timers)."""

    def __init__(self, config, workdir, info, spe, model, mesh, prep, ckpt, stop_after_steps):
        self.config, self.workdir, self.info, self.spe = config, workdir, info, spe
        self.model, self.mesh, self.prep, self.ckpt = model, mesh, prep, ckpt
        self.stop_after = stop_after_steps
        self.has_val = info.split_sizes.get("validation", 0) > 0
        self.evaluator = Evaluator(config, info, model, mesh, prep)
        self.eval_every = config.eval_every_steps or spe
        self.throughput = _Throughput(config.batch_size)
        es = config.early_stopping
        self.es = EarlyStopping(es.metric, es.patience, es.min_delta)
        self.phase_index, self.phase_start, self.step = 0, 0, 0
        self.wall_before = 0.0  # Training wall time of earlier (interrupted) sessions.
        self.writer: MetricsWriter | None = None

    # ---- state and checkpoints ----
    def _state_like(self, variables: Any, plan: optim.PhasePlan) -> step_lib.TrainState:
        """A replicated TrainState for these variables (values, or shapes to restore into)."""
        rng = jax.random.key(self.config.seed + 1)
        make = lambda v: step_lib.create_train_state(v, plan.tx, rng, self.step)  # noqa: E731
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(variables)):
            return step_lib.abstract(self.mesh, jax.eval_shape(make, variables))
        return step_lib.replicate(self.mesh, make(variables))

    def _plan(self, params: Any) -> optim.PhasePlan:
        return optim.build_phase(self.config, params, self.phase_index, self.spe)

    def restore_or_start(self, variables: Any, meta: dict | None) -> step_lib.TrainState | None:
        self.fresh = meta is None
        if meta is None:
            self.writer = MetricsWriter(self.workdir)
            return self._state_like(variables, self._plan(variables["params"]))
        self.phase_index, self.phase_start = meta["phase_index"], meta["phase_start"]
        self.step, self.wall_before = meta["step"], meta.get("train_seconds", 0.0)
        self.es = EarlyStopping.from_json(meta["early_stopping"])
        self.writer = MetricsWriter(self.workdir, meta["history"])
        logging.info("Resuming from step %d (phase %d) in %s", self.step, self.phase_index,
                     self.workdir)
        if self.phase_index >= len(self.config.phases):
            return None  # Training had finished; only the test evaluation and report remain.
        shapes = step_lib.abstract(self.mesh, variables)
        return self.ckpt.restore(self._state_like(shapes, self._plan(shapes["params"])))

    def _meta(self) -> dict:
        return {
            "step": self.step,
            "phase_index": self.phase_index,
            "phase_start": self.phase_start,
            "early_stopping": self.es.to_json(),
            "history": self.writer.history,
            "train_seconds": self.wall_before + self.throughput.seconds,
        }

    def _save(self, state: Any) -> None:
        self.ckpt.save(self.step, state, self._meta())

    # ---- the loop ----
    def run(self, state: step_lib.TrainState | None) -> bool:
        """Train the remaining phases; False when stopped early (SIGTERM / stop_after_steps)."""
        if state is None:
            return True
        total = sum(
            optim.phase_steps(p, self.spe) for p in self.config.phases
        )  # Planned steps (early stopping can shorten phases; the bar's ETA is an upper bound).
        self.batches = _TrainBatches(self.config, self.info)
        progress = Progress(total, min(self.step, total), self.config.progress_bar)
        if self.fresh:
            state = self._start_phase(state, self._plan(state.params))
        try:
            with _Stop() as stop:
                while self.phase_index < len(self.config.phases):
                    state, finished = self._run_phase(state, progress, stop)
                    if not finished:
                        return False
                    self.phase_index += 1
                    if self.phase_index < len(self.config.phases):
                        state = self._start_phase(state, self._plan(state.params))
                    self._save(state)  # Phase boundary: a resume continues with the new phase.
        finally:
            progress.close()
        return True

    def _start_phase(self, state: step_lib.TrainState, plan: optim.PhasePlan):
        """A new phase: fresh optimizer state, patience reset, a phase marker in the metrics."""
        self.phase_start = self.step
        self.es.start_phase()
        opt_state = step_lib.replicate(self.mesh, plan.tx.init(state.params))
        cached = feature_cache.cache_decision(self.config, plan)[0]
        self.writer.write(self.step, "phase",
                          {"index": plan.index, "name": plan.name, "feature_cache": cached})
        logging.info("Phase %d (%s): %d steps, training %s", plan.index, plan.name, plan.steps,
                     list(self.config.phases[plan.index].trainable))
        return state.replace(opt_state=opt_state)

    def _run_phase(self, state, progress, stop) -> tuple[Any, bool]:
        """The current phase on cached features or the full step; False if interrupted."""
        plan = self._plan(state.params)
        if self.config.early_stopping.enabled and self.es.bad_evals >= self.es.patience:
            return state, True  # Killed between early stopping and the phase-boundary save.
        use_cache, why = feature_cache.cache_decision(self.config, plan)
        if use_cache:
            try:
                step_fn, validate = self._cached_fns(state, plan, why, stop)
            except feature_cache.Interrupted:  # SIGTERM while extracting: save and return.
                self._stop_requested(stop, state)
                return state, False
        else:
            logging.info("Phase %d (%s): full train step (feature cache not used: %s)",
                         plan.index, plan.name, why)
            step_fn, validate = self._full_fns(plan)
        return self._train_steps(state, plan, step_fn, validate, progress, stop)

    def _full_fns(self, plan):
        """(step_fn, validate) of the full model: images through the data-parallel step."""
        train_step = step_lib.make_train_step(
            self.model, plan, self.mesh, self.config.augment, self.prep, self.info.num_classes,
            self.config.sync_batchnorm,
        )

        def step_fn(state, step):
            return train_step(state, step_lib.shard_batch(self.mesh, self.batches.at(step)))

        def validate(state):
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            return self.evaluator(variables, "validation")

        return step_fn, validate

    def _cached_fns(self, state, plan, why, stop):
        """(step_fn, validate) on backbone features extracted now (feature_cache.CachedPhase)."""
        cached = feature_cache.CachedPhase(self.config, self.info, self.model, self.mesh,
                                           self.prep, state, plan, lambda: stop.requested)
        n, passes = cached.cache.num_examples, cached.cache.num_passes
        logging.info("Phase %d (%s) trains on cached backbone features (%s): %d train examples "
                     "x %d passes extracted in %.1f s", plan.index, plan.name, why, n, passes,
                     cached.extract_seconds)
        self.writer.write(self.step, "feature_cache", {
            "phase": plan.index, "extract_seconds": cached.extract_seconds,
            "train_examples": n, "passes": passes})
        return cached.step, cached.validate

    def _stop_requested(self, stop, state) -> bool:
        """SIGTERM or stop_after_steps: save and say so; True when the run must return."""
        if not (stop.requested or (self.stop_after is not None and self.step >= self.stop_after)):
            return False
        self._save(state)
        logging.warning("Stopped at step %d (SIGTERM or stop request); checkpoint saved in %s.",
                        self.step, self.workdir)
        print(f"Interrupted at step {self.step}; checkpoint saved. "
              "Rerun the same command to resume.", flush=True)
        return True

    def _train_steps(self, state, plan, step_fn, validate, progress, stop) -> tuple[Any, bool]:
        """Steps ``step_fn(state, step) -> (state, metrics)`` until the phase ends or stops early,
        with logging, evaluation (``validate(state)``), checkpoints and stop requests."""
        end, pending, first = self.phase_start + plan.steps, [], True
        while self.step < end:
            if self._stop_requested(stop, state):
                return state, False
            state, metrics = step_fn(state, self.step)
            self.step += 1
            progress.update()
            pending.append(metrics)
            if first:  # Exclude compilation from images/s.
                jax.block_until_ready(metrics)
                self.throughput.restart()
                first = False
            else:
                self.throughput.steps += 1
            if self.step % self.config.log_every_steps == 0:
                self._log_train(plan, pending, progress)
                pending = []
            if self.step % self.eval_every == 0 or self.step == end:
                if self._evaluate(state, progress, validate):
                    logging.info("Early stopping ends phase %d (%s) at step %d", plan.index,
                                 plan.name, self.step)
                    break
            elif self.config.checkpoint.every_steps and (
                self.step % self.config.checkpoint.every_steps == 0
            ):
                self._save(state)
                self.throughput.restart()
        return state, True

    def _log_train(self, plan, pending, progress) -> None:
        values = jax.device_get(pending)
        rate = self.throughput.window()
        record = {
            "loss": float(np.mean([m["loss"] for m in values])),
            "accuracy": float(np.mean([m["accuracy"] for m in values])),
            "images_per_sec": rate,
            "phase": plan.index,
            **{f"lr/{g}": v for g, v in optim.learning_rates(plan, self.step - self.phase_start).items()},
        }
        self.writer.write(self.step, "train", record)
        progress.log(
            self.step, f"loss {record['loss']:.4f} acc {record['accuracy']:.4f} {rate:.1f} img/s"
        )

    def _evaluate(self, state, progress, validate) -> bool:
        """Validation, early stopping, best/epoch checkpoints; True when the phase should end."""
        stop_phase = False
        if self.has_val:
            r = validate(state)
            self.writer.write(self.step, "eval", {"val_loss": r["loss"], "val_accuracy": r["accuracy"]})
            progress.log(self.step, f"val_loss {r['loss']:.4f} val_acc {r['accuracy']:.4f}")
            value = r["accuracy"] if self.es.metric == "val_accuracy" else r["loss"]
            improved, stop_phase = self.es.update(value, self.step)
            stop_phase = stop_phase and self.config.early_stopping.enabled
            if improved:
                self.ckpt.save_best(self.step, state, self._meta())
        if self.config.checkpoint.at_epoch_end:
            self._save(state)
        self.throughput.restart()
        return stop_phase

    # ---- the end ----
    def finish(self, variables: Any, wall_seconds: float) -> dict[str, Any]:
        """Test the best (or last) weights, write predictions and the report; results.json."""
        like = step_lib.abstract(self.mesh, variables)
        use_best = self.config.early_stopping.restore_best and self.ckpt.best.latest_step() is not None
        if use_best:
            self.ckpt.wait()
            tested = self.ckpt.restore_best(like)
            tested_step = self.ckpt.best.latest_step()
        else:
            state_like = self._state_like(variables, optim.build_phase(
                self.config, variables["params"], len(self.config.phases) - 1, self.spe))
            self.ckpt.wait()
            s = self.ckpt.restore(state_like)
            tested, tested_step = {"params": s.params, "batch_stats": s.batch_stats}, self.step
        r = self.evaluator(tested, "test")
        results = {
            "test_accuracy": r["accuracy"],
            "test_loss": r["loss"],
            "test_examples": int(len(r["labels"])),
            "tested_checkpoint": "best" if use_best else "last",
            "tested_step": int(tested_step),
            f"best_{self.es.metric}": self.es.run_best,
            "best_step": self.es.run_best_step,
            "steps": self.step,
            "wall_seconds": wall_seconds,
            "train_seconds": self.wall_before + self.throughput.seconds,
            "images_per_sec": self._overall_rate(),
            "devices": jax.device_count(),
            "dataset": self.info.name,
            "config": json.loads(self.config.to_json_best_effort()),
        }
        if jax.process_index() == 0:
            report.write_report(
                os.path.join(self.workdir, "report"), self.writer.history, r["labels"],
                r["logits"], list(self.info.class_names), results,
            )
        return results

    def _overall_rate(self) -> float:
        """Mean images/s over the logged windows of all sessions (from the history)."""
        rates = [r["images_per_sec"] for r in self.writer.history
                 if r["kind"] == "train" and r.get("images_per_sec")]
        return float(np.mean(rates)) if rates else self.throughput.overall
