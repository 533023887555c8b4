"""``train_and_evaluate(config, workdir)``: the run from init (or resume) to the test report.

Phases run in order (optim.py); each has a fresh optimizer state. After every epoch (or
``eval_every_steps``) the validation split is evaluated (evaluation.py), early stopping may end the
phase, and checkpoints are written (checkpointing.py). A phase whose whole backbone is frozen
trains its head on backbone features cached at the phase start (feature_cache.py,
``config.feature_cache``); the loop around the step (logging, evaluation cadence, checkpoints,
stopping) is the same. A rerun with the same workdir resumes from the latest checkpoint. At the
end the best checkpoint (by the validation metric) is evaluated on the test split (full model) and
``report_fn`` (main.py: analysis/report.py) writes the report.

What stops a run early, and what it leaves:

- SIGTERM (preemption) or a first Ctrl-C (SIGINT): the current step finishes, the state is saved,
  a line says how to resume, and the result is ``{"interrupted": True, "step": s}`` (plus
  ``"signal": "SIGINT"`` for Ctrl-C; main.py then exits with status 130, SIGTERM with 0). A
  second Ctrl-C raises KeyboardInterrupt at once (nothing more is saved).
- Divergence: a non-finite training loss or gradient norm (checked on the host in the metrics the
  loop fetches anyway: at every log line and before every save, no extra device sync per step)
  or validation loss raises :class:`TrainingDiverged` before anything is saved from the diverged
  steps: the last good checkpoint stays the newest, and no report or results are written.
- Early stopping ends the current phase; with ``early_stopping.restore_best`` the phase's best
  weights (params and BatchNorm statistics, kept in ``checkpoints/phase_best``) are restored
  before the next phase starts, and a ``restore_best`` record marks it in the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cifar_flax.config import validate
from cifar_flax.data import input_pipeline
from cifar_flax.data.sources import DatasetInfo
from cifar_flax.training import devices, feature_cache, optim, steps
from cifar_flax.training.checkpoints import Checkpointer
from cifar_flax.training.evaluation import EarlyStopping
from cifar_flax.training.evaluation import Evaluator
from cifar_flax.training.workdir import check_resume, fingerprint
from cifar_flax.training.initialize import build_model, init_variables, input_preprocessing
from cifar_flax.training.metrics import MetricsWriter, Progress
from cifar_flax.training.workdir import write_run_info

# (history, test labels, test logits, class names, results) -> None; main.py writes the report.
ReportFn = Callable[[list, np.ndarray, np.ndarray, list, dict], None]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: training stopped, the last good checkpoint is kept.

    The message is one line for the user (step, phase, what to try); main.py prints it as
    ``error: ...`` and exits with status 1."""


StepFn = Callable[[steps.TrainState, int], tuple[steps.TrainState, dict]]  # (state, step)
ValidateFn = Callable[[steps.TrainState], dict]  # state -> {"loss", "accuracy", ...}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    stop_after_steps: int | None = None,
    report_fn: ReportFn | None = None,
) -> dict[str, Any]:
    """Train all phases (resuming from ``workdir`` if it has checkpoints), test, write the report.

    ``stop_after_steps`` makes the run behave as if SIGTERM arrived once the global step reaches
    it (save, return); tests use it to interrupt a run. Returns results.json's content, or
    ``{"interrupted": True, "step": s}`` for an interrupted run.
    """
    validate(config)
    t_start = time.time()
    mesh = devices.make_mesh()
    info = input_pipeline.get_info(config)
    model = build_model(config, info.num_classes)
    ckpt = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    meta = ckpt.latest_meta()
    run_fingerprint = fingerprint(config, info)  # Checked on resume, saved in every checkpoint.
    if meta is not None:
        for note in check_resume(meta.get("fingerprint"), run_fingerprint, config, workdir):
            logging.info("Resuming despite a harmless change: %s", note)
    if meta is None:
        variables, prep = init_variables(config, model, class_names=info.class_names)
    else:  # Resuming: every value comes from the checkpoint, so shapes are enough.
        variables = jax.eval_shape(lambda: init_variables(config, model, load_weights=False)[0])
        prep = input_preprocessing(config)
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
    write_run_info(workdir, info)  # Class names + input shape for predict/evaluate/export.
    pos = Position.start(config) if meta is None else Position.from_meta(meta)
    run = _Run(config, workdir, info, model, mesh, prep, ckpt,
               MetricsWriter(workdir, meta["history"] if meta else None, config.tensorboard), stop_after_steps,
               fingerprint=run_fingerprint, wall_before=meta.get("wall_seconds", 0.0) if meta else 0.0,
               t_start=t_start)
    try:
        shapes = devices.abstract(mesh, variables)  # The step donates (deletes) the buffers.
        state = _initial_state(run, pos, variables, fresh=meta is None)
        stopped = state is not None and _train_phases(run, pos, state, fresh=meta is None)
        if stopped:
            return {"interrupted": True, "step": pos.step,
                    **({"signal": "SIGINT"} if stopped == "SIGINT" else {})}
        wall = run.wall_before if run.wall_saved is None else run.wall_saved  # Up to training's end.
        return _test_and_report(run, pos, shapes, wall, report_fn)
    finally:
        for c in (ckpt, run.phase_best):
            if c is not None:
                c.wait()
                c.close()
        run.writer.close()


@dataclasses.dataclass
class Position:
    """Where the run stands besides its TrainState: what a resume reads from checkpoint meta."""

    step: int
    phase_index: int
    phase_start: int
    early_stopping: EarlyStopping
    train_seconds: float = 0.0  # Training time of earlier (interrupted) sessions.

    @classmethod
    def start(cls, config: ml_collections.ConfigDict) -> "Position":
        es = config.early_stopping
        return cls(0, 0, 0, EarlyStopping(es.metric, es.patience, es.min_delta))

    @classmethod
    def from_meta(cls, meta: dict) -> "Position":
        return cls(meta["step"], meta["phase_index"], meta["phase_start"],
                   EarlyStopping.from_json(meta["early_stopping"]), meta.get("train_seconds", 0.0))


@dataclasses.dataclass
class _Run:
    """The fixed parts of one training session, built once by train_and_evaluate."""

    config: ml_collections.ConfigDict
    workdir: str
    info: DatasetInfo
    model: Any
    mesh: Any
    prep: Any
    ckpt: Checkpointer
    writer: MetricsWriter
    stop_after: int | None
    fingerprint: dict | None = None  # What this run is (train/fingerprint.py); checked on resume.
    wall_before: float = 0.0  # Wall time of earlier sessions, up to their last save.
    t_start: float = 0.0  # This session's start (time.time()).
    wall_saved: float | None = None  # Wall time of all sessions at this session's last save.
    spe: int = dataclasses.field(init=False)
    eval_every: int = dataclasses.field(init=False)
    has_val: bool = dataclasses.field(init=False)
    evaluator: Evaluator = dataclasses.field(init=False)
    throughput: "_Throughput" = dataclasses.field(init=False)
    phase_best: Checkpointer | None = dataclasses.field(init=False)  # Early stopping's restore.

    def __post_init__(self) -> None:
        self.spe = input_pipeline.steps_per_epoch(self.config, self.info)
        self.eval_every = self.config.eval_every_steps or self.spe
        self.has_val = self.info.split_sizes.get("validation", 0) > 0
        self.evaluator = Evaluator(self.config, self.info, self.model, self.mesh, self.prep)
        self.throughput = _Throughput(self.config.batch_size)
        es = self.config.early_stopping
        self.phase_best = None
        if es.enabled and es.restore_best and self.has_val:
            self.phase_best = Checkpointer(
                str(epath.Path(self.workdir) / "checkpoints" / "phase_best"), 1,
                self.config.checkpoint.async_save)  # Its "best" folder: the phase's best weights.

    def plan(self, phase_index: int, params: Any) -> optim.PhasePlan:
        return optim.build_phase(self.config, params, phase_index, self.spe)

    def meta(self, pos: Position) -> dict:
        """The checkpoint's meta item: the Position plus the metrics history."""
        return {
            "step": pos.step,
            "phase_index": pos.phase_index,
            "phase_start": pos.phase_start,
            "early_stopping": pos.early_stopping.to_json(),
            "history": self.writer.history,
            "train_seconds": pos.train_seconds + self.throughput.seconds,
            "fingerprint": self.fingerprint,
            "wall_seconds": self._wall_now(),
        }

    def _wall_now(self) -> float:
        self.wall_saved = self.wall_before + time.time() - self.t_start
        return self.wall_saved

    def save(self, pos: Position, state: steps.TrainState) -> None:
        self.ckpt.save(pos.step, state, self.meta(pos))


# ---- state ----------------------------------------------------------------------------------


def _state_like(run: _Run, step: int, variables: Any, plan: optim.PhasePlan) -> steps.TrainState:
    """A replicated TrainState for these variables (values, or shapes to restore into)."""
    rng = jax.random.key(run.config.seed + 1)
    make = lambda v: steps.create_train_state(v, plan.tx, rng, step)  # noqa: E731
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(variables)):
        return devices.abstract(run.mesh, jax.eval_shape(make, variables))
    return devices.replicate(run.mesh, make(variables))


def _initial_state(run: _Run, pos: Position, variables: Any, fresh: bool):
    """A fresh state, the latest checkpoint's, or None when a resumed run had finished training."""
    if fresh:
        return _state_like(run, pos.step, variables, run.plan(0, variables["params"]))
    logging.info("Resuming from step %d (phase %d) in %s", pos.step, pos.phase_index, run.workdir)
    if pos.phase_index >= len(run.config.phases):
        return None  # Training had finished; only the test evaluation and report remain.
    shapes = devices.abstract(run.mesh, variables)
    plan = run.plan(pos.phase_index, shapes["params"])
    return run.ckpt.restore(_state_like(run, pos.step, shapes, plan))


# ---- phases ---------------------------------------------------------------------------------


def _train_phases(run: _Run, pos: Position, state: steps.TrainState, fresh: bool) -> str | None:
    """Train the remaining phases; None when done, else why it stopped early ("SIGTERM",
    "SIGINT" or "stop_after_steps"; the state is saved)."""
    phases = run.config.phases
    total = sum(optim.phase_steps(p, run.spe) for p in phases)  # The bar's ETA: an upper bound.
    progress = Progress(total, min(pos.step, total), run.config.progress_bar)
    batches = _TrainBatches(run.config, run.info)
    if fresh:
        state = _start_phase(run, pos, state)
    try:
        with _Stop() as stop:
            while pos.phase_index < len(phases):
                state, finished = _run_phase(run, pos, state, batches, progress, stop)
                if not finished:
                    return stop.signal_name or "stop_after_steps"
                pos.phase_index += 1
                if pos.phase_index < len(phases):
                    state = _start_phase(run, pos, state)
                run.save(pos, state)  # Phase boundary: a resume continues with the new phase.
    finally:
        progress.close()
    return None


def _start_phase(run: _Run, pos: Position, state: steps.TrainState) -> steps.TrainState:
    """A new phase: fresh optimizer state, patience reset, a phase marker in the metrics."""
    plan = run.plan(pos.phase_index, state.params)
    pos.phase_start = pos.step
    pos.early_stopping.start_phase()
    opt_state = devices.replicate(run.mesh, plan.tx.init(state.params))
    cached = feature_cache.cache_decision(run.config, plan)[0]
    run.writer.write(pos.step, "phase",
                     {"index": plan.index, "name": plan.name, "feature_cache": cached})
    logging.info("Phase %d (%s): %d steps, training %s", plan.index, plan.name, plan.steps,
                 list(run.config.phases[plan.index].trainable))
    return state.replace(opt_state=opt_state)


def _run_phase(run, pos, state, batches, progress, stop) -> tuple[steps.TrainState, bool]:
    """The current phase on cached features or the full step; False if interrupted."""
    plan = run.plan(pos.phase_index, state.params)
    if run.config.early_stopping.enabled and pos.early_stopping.exhausted:
        return state, True  # Killed between early stopping and the phase-boundary save.
    use_cache, why = feature_cache.cache_decision(run.config, plan)
    if not use_cache:
        logging.info("Phase %d (%s): full train step (feature cache not used: %s)",
                     plan.index, plan.name, why)
        step_fn, validate = _full_fns(run, plan, batches)
    else:
        try:
            step_fn, validate = _cached_fns(run, pos, state, plan, why, stop)
        except feature_cache.Interrupted:  # SIGTERM while extracting: save and return.
            _stop_requested(run, pos, state, stop, plan, [])
            return state, False
    return _train_steps(run, pos, state, plan, step_fn, validate, progress, stop)


def _full_fns(run: _Run, plan: optim.PhasePlan, batches: "_TrainBatches"):
    """(step_fn, validate) of the full model: images through the data-parallel step."""
    train_step = steps.make_train_step(
        run.model, plan, run.mesh, run.config.augment, run.prep, run.info.num_classes,
        run.config.sync_batchnorm,
    )

    def step_fn(state, step):
        return train_step(state, devices.shard_batch(run.mesh, batches.at(step)))

    def validate(state):
        return run.evaluator({"params": state.params, "batch_stats": state.batch_stats},
                             "validation")

    return step_fn, validate


def _cached_fns(run: _Run, pos: Position, state, plan, why: str, stop: "_Stop"):
    """(step_fn, validate) on backbone features extracted now (feature_cache.CachedPhase)."""
    cached = feature_cache.CachedPhase(run.config, run.info, run.model, run.mesh, run.prep,
                                       state, plan, lambda: stop.requested)
    n, passes = cached.cache.num_examples, cached.cache.num_passes
    logging.info("Phase %d (%s) trains on cached backbone features (%s): %d train examples "
                 "x %d passes extracted in %.1f s", plan.index, plan.name, why, n, passes,
                 cached.extract_seconds)
    run.writer.write(pos.step, "feature_cache", {
        "phase": plan.index, "extract_seconds": cached.extract_seconds,
        "train_examples": n, "passes": passes})
    return cached.step, cached.validate


# ---- steps ----------------------------------------------------------------------------------


def _train_steps(run: _Run, pos: Position, state, plan, step_fn: StepFn,
                 validate: ValidateFn, progress: Progress, stop: "_Stop"):
    """Steps until the phase ends or early stopping ends it, with logging, evaluation,
    checkpoints and stop requests; (state, False) when stopped (SIGTERM / stop_after_steps)."""
    end, pending, first = pos.phase_start + plan.steps, [], True
    while pos.step < end:
        if _stop_requested(run, pos, state, stop, plan, pending):
            return state, False
        state, metrics = step_fn(state, pos.step)
        pos.step += 1
        progress.update()
        pending.append(metrics)
        if first:  # Exclude compilation from images/s.
            jax.block_until_ready(metrics)
            run.throughput.restart()
            first = False
        else:
            run.throughput.steps += 1
        if pos.step % run.config.log_every_steps == 0:
            _log_train(run, pos, plan, pending, progress)
            pending = []
        if pos.step % run.eval_every == 0 or pos.step == end:
            _check_finite(run, pos, plan, pending)  # Before anything is saved.
            state, stop_phase = _evaluate(run, pos, state, progress, validate, pos.step == end)
            if stop_phase:
                logging.info("Early stopping ends phase %d (%s) at step %d", plan.index,
                             plan.name, pos.step)
                break
        elif run.config.checkpoint.every_steps and (
            pos.step % run.config.checkpoint.every_steps == 0
        ):
            _check_finite(run, pos, plan, pending)
            run.save(pos, state)
            run.throughput.restart()
    return state, True


def _log_train(run: _Run, pos: Position, plan, pending: list, progress: Progress) -> None:
    """One "train" record: the mean of the steps since the last one, images/s, learning rates."""
    values = jax.device_get(pending)
    _check_finite(run, pos, plan, values)
    rate = run.throughput.window()
    lrs = optim.learning_rates(plan, pos.step - pos.phase_start)  # Phase-relative schedules.
    record = {
        "loss": float(np.mean([m["loss"] for m in values])),
        "accuracy": float(np.mean([m["accuracy"] for m in values])),
        "images_per_sec": rate,
        "phase": plan.index,
        **{f"lr/{g}": v for g, v in lrs.items()},
    }
    run.writer.write(pos.step, "train", record)
    progress.log(
        pos.step, f"loss {record['loss']:.4f} acc {record['accuracy']:.4f} {rate:.1f} img/s"
    )


def _evaluate(run: _Run, pos: Position, state, progress: Progress, validate: ValidateFn,
              phase_end: bool) -> tuple[steps.TrainState, bool]:
    """Validation, early stopping, best/epoch checkpoints; (state, True) when the phase should
    end (then with the phase's best weights when they are kept: ``run.phase_best``). At a
    phase's end the epoch checkpoint is left to the phase-boundary save that follows, so that
    no step is saved twice (with several processes a second save of one step is a hazard)."""
    stop_phase = False
    es = pos.early_stopping
    if run.has_val:
        r = validate(state)
        if not np.isfinite(r["loss"]):
            _diverged(run, pos, pos.step, "validation loss", r["loss"])
        run.writer.write(pos.step, "eval", {"val_loss": r["loss"], "val_accuracy": r["accuracy"]})
        progress.log(pos.step, f"val_loss {r['loss']:.4f} val_acc {r['accuracy']:.4f}")
        value = r["accuracy"] if es.metric == "val_accuracy" else r["loss"]
        improved, stop_phase = es.update(value, pos.step)
        stop_phase = stop_phase and run.config.early_stopping.enabled
        if improved:
            run.ckpt.save_best(pos.step, state, run.meta(pos))
        if run.phase_best is not None and es.phase_best_step == pos.step:
            run.phase_best.save_best(pos.step, state, run.meta(pos))
        if stop_phase and run.phase_best is not None:
            state = _restore_phase_best(run, pos, state)
    if run.config.checkpoint.at_epoch_end and not (stop_phase or phase_end):
        run.save(pos, state)
    run.throughput.restart()
    return state, stop_phase


def _restore_phase_best(run: _Run, pos: Position, state: steps.TrainState) -> steps.TrainState:
    """The phase's best params and batch_stats into ``state`` (Keras' restore_best_weights),
    marked by a ``restore_best`` metrics record; the optimizer state and step are kept."""
    run.phase_best.wait()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    best = run.phase_best.restore_best(devices.abstract(run.mesh, variables))
    best_step = pos.early_stopping.phase_best_step
    run.writer.write(pos.step, "restore_best",
                     {"phase": pos.phase_index, "restored_step": best_step})
    logging.info("Early stopping: phase %d continues from its best weights (step %d)",
                 pos.phase_index, best_step)
    return state.replace(params=best["params"], batch_stats=best["batch_stats"])


def _check_finite(run: _Run, pos: Position, plan: optim.PhasePlan, pending: list) -> None:
    """Raise TrainingDiverged at the first of the last ``len(pending)`` steps (ending at
    ``pos.step``) whose loss or gradient norm is not finite."""
    values = jax.device_get(pending)  # Already computed: this waits only for the last step.
    for i, m in enumerate(values):
        for name in ("loss", "grad_norm"):
            if name in m and not np.isfinite(m[name]):
                label = "training loss" if name == "loss" else "gradient norm"
                _diverged(run, pos, pos.step - len(values) + 1 + i, label, m[name])


def _diverged(run: _Run, pos: Position, step: int, what: str, value: Any) -> None:
    """Raise TrainingDiverged with the one line the user sees (what happened, what to try)."""
    i = pos.phase_index
    phase = run.config.phases[i]
    last = run.ckpt.latest.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept in {run.workdir}/checkpoints"
            if last is not None else "no checkpoint had been saved yet")
    raise TrainingDiverged(
        f"training diverged at step {step} in phase {i} ({phase.name}): the {what} is "
        f"{float(value)}; {kept}. Try a lower learning rate (--config.phases[{i}].lr, now "
        f"{phase.lr:g}) or a warmup (--config.phases[{i}].warmup_epochs, now "
        f"{phase.warmup_epochs:g}), in a new --workdir or with --config.resume=replace.")


# ---- stop requests ----------------------------------------------------------------------------


class _Stop:
    """SIGTERM (preemption) or a first Ctrl-C: the loop saves after the current step and returns.

    A second Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only in the main
    thread (tests may call the loop from others) and restored on exit; a signal the process
    inherited as ignored (a job started with ``&`` or nohup) stays ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Stop":
        for sig in self.SIGNALS:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread: no handler.
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # A second Ctrl-C: abort now.
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _stop_sync_every(config: Any) -> int:
    """Steps between the processes' agreements on a stop request: at most 10 (a preemption's
    grace period is short), and on every log step (which waits for the device anyway)."""
    return max(1, min(10, config.log_every_steps or 10))


def _stop_requested(run: _Run, pos: Position, state, stop: _Stop, plan: optim.PhasePlan,
                    pending: list) -> bool:
    """A signal or stop_after_steps: save (unless diverged) and say so; True when the run must
    return. With several processes they agree first (a signal may reach only some of them), so
    that all stop and save at the same step; they check every few steps (_stop_sync_every)."""
    at_limit = run.stop_after is not None and pos.step >= run.stop_after  # Same on every process.
    requested = stop.requested or at_limit
    if jax.process_count() > 1 and not at_limit and pos.step % _stop_sync_every(run.config):
        return False  # Agreeing is a collective that drains the step pipeline: not every step.
    if not devices.any_process(requested):
        return False
    _check_finite(run, pos, plan, pending)
    run.save(pos, state)
    why = stop.signal_name or "stop request"
    logging.warning("Stopped at step %d (%s); checkpoint saved in %s.", pos.step, why, run.workdir)
    print(f"Interrupted at step {pos.step}; checkpoint saved ({why}). "
          "Rerun the same command to resume.", flush=True)
    return True


# ---- the end ----------------------------------------------------------------------------------


def _test_and_report(run: _Run, pos: Position, variables: Any, wall_seconds: float,
                     report_fn: ReportFn | None) -> dict[str, Any]:
    """Test the best (or last) weights, write predictions and the report; results.json."""
    es = pos.early_stopping
    like = devices.abstract(run.mesh, variables)
    use_best = run.config.early_stopping.restore_best and run.ckpt.best_step() is not None
    if use_best:
        run.ckpt.wait()
        tested = run.ckpt.restore_best(like)
        tested_step = run.ckpt.best_step()  # The newest best that reads back.
    else:
        last = len(run.config.phases) - 1
        state_like = _state_like(run, pos.step, variables, run.plan(last, variables["params"]))
        run.ckpt.wait()
        s = run.ckpt.restore(state_like)
        tested, tested_step = {"params": s.params, "batch_stats": s.batch_stats}, pos.step
    r = run.evaluator(tested, "test", keep_logits=True)
    results = {
        "test_accuracy": r["accuracy"],
        "test_loss": r["loss"],
        "test_examples": r["count"],
        "tested_checkpoint": "best" if use_best else "last",
        "tested_step": int(tested_step),
        f"best_{es.metric}": es.run_best,
        "best_step": es.run_best_step,
        "steps": pos.step,
        "wall_seconds": wall_seconds,
        "train_seconds": pos.train_seconds + run.throughput.seconds,
        "images_per_sec": _overall_rate(run),
        "devices": jax.device_count(),
        "dataset": run.info.name,
        "config": json.loads(run.config.to_json_best_effort()),
    }
    if jax.process_index() == 0 and report_fn is not None:
        report_fn(run.writer.history, r["labels"], r["logits"], list(run.info.class_names),
                  results)
    return results


def _overall_rate(run: _Run) -> float:
    """Mean images/s over the logged windows of all sessions (from the history)."""
    rates = [r["images_per_sec"] for r in run.writer.history
             if r["kind"] == "train" and r.get("images_per_sec")]
    return float(np.mean(rates)) if rates else run.throughput.overall


# ---- helpers ----------------------------------------------------------------------------------


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
        self.t0, self.steps = time.perf_counter(), 0

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
