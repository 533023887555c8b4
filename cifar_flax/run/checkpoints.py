"""Orbax checkpoints of a run, written by training and read by everything that uses a trained run.

Training writes ``<workdir>/checkpoints/latest`` (keep-N, for resuming) and ``.../best`` with
:class:`Checkpointer`. Each checkpoint holds the TrainState (params, batch_stats, opt_state, rng)
and a JSON ``meta`` item (train.Position: the step, the phase and its start step, early stopping;
the metrics history, the run's fingerprint, its clocks). The data position is the step itself
(input_pipeline.train_batches(start_step=step)). Orbax writes into a temporary directory and
renames it when complete, so a run killed at any moment leaves either the previous checkpoints or
a complete new one; a save that fails (a full disk) leaves the previous ones as they were and
raises a one-line UserError.

Damaged checkpoints (a file deleted or truncated after the fact): before resuming from (or
testing) a checkpoint, its meta and every array are read back. An unreadable step is logged with
the reason and moved to ``checkpoints/unreadable/`` (never deleted), and the next older step is
tried, in ``latest`` and in ``best`` (which keeps two for that reason). Only when no step of a
folder reads back does the run stop, naming the folder.

Reading a run (``config.init_from``, predict, evaluate, export): :func:`find_checkpoint` names a
step folder of a workdir, a ``checkpoints/<kind>`` folder or a step folder, and
:func:`restore_variables` reads only ``params`` and ``batch_stats``, read-only, with explicit
replicated shardings on the current mesh (a checkpoint written by another device count or
topology restores). Nothing is created or written there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sys
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cifar_flax import UserError, brief
from cifar_flax.run import devices

BEST_KEEP = 2  # The previous best is the fallback when the newest best is unreadable.




def _path(path: str) -> epath.Path:
    """An absolute epath; ``gs://`` and other URLs are kept as they are (os.path would mangle)."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _manager(path: epath.Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    # Several processes save synchronously: Orbax's background commits of several managers
    # saving at one step (latest, best, phase best) deadlocked across processes in our tests.
    async_save = async_save and jax.process_count() == 1
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(path, options=options)


def _drop_closed_loop_noise(unraisable: Any) -> None:
    """tensorstore reads still in flight after a failed restore report "Event loop is closed"
    through sys.unraisablehook (dozens of tracebacks); drop those, pass anything else on."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value
    ):
        return
    sys.__unraisablehook__(unraisable)


_CLOCKS = ("wall_seconds", "train_seconds")


def _same_meta(saved: dict | None, meta: dict) -> bool:
    """Whether ``meta`` says what ``saved`` (the same step's) says, clocks aside. None (saved by
    an earlier session): assume it does."""
    if saved is None:
        return True
    return saved == _without_clocks(meta)


def _without_clocks(meta: dict) -> dict:
    """A snapshot of ``meta`` without its clocks (the history list keeps growing after a save)."""
    return json.loads(json.dumps({k: v for k, v in meta.items() if k not in _CLOCKS}))


def unreadable_reason(step_dir: epath.Path) -> str | None:
    """Why the checkpoint in ``step_dir`` cannot be read back (None when meta and every array
    read): the arrays are read to host memory, whatever devices wrote them."""
    try:
        meta = step_dir / "meta" / "metadata"
        if (step_dir / "meta").exists():
            json.loads(meta.read_text())
        state = step_dir / "state"
        tree = ocp.PyTreeCheckpointHandler().metadata(state)
        args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        ocp.PyTreeCheckpointer().restore(state, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # noqa: BLE001 - any failure to read back makes it unusable.
        sys.unraisablehook = _drop_closed_loop_noise
        return f"{type(e).__name__}: {brief(e)}"
    return None


def _none_readable(directory: Any, steps: list[int], why: str) -> UserError:
    return UserError(
        f"no readable checkpoint in {directory} (steps {steps}; newest: {why}); nothing was "
        "changed there: restore the folder from a copy, or start over with "
        "--config.resume=replace or a new --workdir."
    )


@contextlib.contextmanager
def _save_errors(mngr: ocp.CheckpointManager, step: int) -> Iterator[None]:
    """A failed save as one UserError that says why: the disk's own words (a full disk reaches
    us as tensorstore's ValueError with the errno text deep in its message), or another process
    of the run gone (the save's collective fails)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of a save is one of these stories.
        where = f"saving checkpoint step {step} in {mngr.directory} failed"
        if isinstance(e, jax.errors.JaxRuntimeError) and jax.process_count() > 1:
            raise UserError(
                f"{where}: another process of this run has stopped ({brief(e, 120)}); its own "
                "output says why. The checkpoints saved before are intact: rerun the same "
                "command on every process to resume.") from None
        raise UserError(
            f"{where} ({_disk_reason(e)}); the checkpoints saved before are intact: fix that "
            "(free space, permissions) and rerun the same command to resume.") from None


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO)


def _disk_reason(e: BaseException) -> str:
    """The OS's words for a failed write, wherever the exception chain holds them (an OSError,
    or its text inside tensorstore's message); else the exception's first line."""
    for cause in (e, e.__cause__, e.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    for code in DISK_ERRNOS:
        if os.strerror(code) in str(e):
            return os.strerror(code)
    return f"{type(e).__name__}: {brief(e)}"


class Checkpointer:
    """The checkpoints of one workdir, by kind: ``latest`` (the full TrainState, keep-N: what a
    resume reads), ``best`` (params and batch_stats of the run's best validation; the final test
    reads it) and, with ``phase_best``, ``phase_best`` (the current phase's best, which early
    stopping restores). ``with Checkpointer(...) as ckpt:`` waits for background saves and
    closes on exit."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True,
                 phase_best: bool = False):
        self.root = _path(workdir) / "checkpoints"
        self.managers = {"latest": _manager(self.root / "latest", keep, async_save),
                         "best": _manager(self.root / "best", BEST_KEEP, async_save)}
        if phase_best:
            self.managers["phase_best"] = _manager(self.root / "phase_best", 1, async_save)
        self.keeps_phase_best = phase_best
        self._usable: dict[str, int | None] = {}  # kind -> newest step that reads back.
        self._saved_meta: dict[str, dict] = {}  # kind -> meta of this session's last save.

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.closing(self):  # Closed even when a background save failed.
            self.wait()

    # ---- saving ----
    def save(self, kind: str, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` (latest: the TrainState; best, phase_best: its params and
        batch_stats) with ``meta`` at ``step``; a failed save is a UserError (the earlier
        checkpoints are intact)."""
        mngr = self.managers[kind]
        if kind != "latest":
            state = {"params": state.params, "batch_stats": state.batch_stats}
        if mngr.latest_step() == step:
            if _same_meta(self._saved_meta.get(kind), meta):
                return  # Already saved at this step (e.g. epoch end coincides with every_steps).
            mngr.wait_until_finished()  # Same step, new position (a phase boundary): replace.
            mngr.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with _save_errors(mngr, step):
            mngr.save(step, args=args, force=True)
        self._usable[kind] = step  # Written by us: no need to read it back.
        self._saved_meta[kind] = _without_clocks(meta)

    # ---- finding a readable step ----
    def _usable_step(self, kind: str) -> int | None:
        """The newest step of ``kind`` that reads back; newer unreadable ones are logged and
        moved to checkpoints/unreadable/. UserError when steps exist but none reads back."""
        if kind in self._usable:
            return self._usable[kind]
        mngr = self.managers[kind]
        self.wait()
        bad: list[tuple[int, str]] = []
        usable = None
        for step in sorted(mngr.all_steps(), reverse=True):
            why = unreadable_reason(mngr.directory / str(step))
            if why is None:
                usable = step
                break
            bad.append((step, why))
        if bad and usable is None:
            raise _none_readable(mngr.directory, [s for s, _ in bad], bad[0][1])
        self._move_unreadable(kind, [s for s, _ in bad])
        for step, why in bad:  # One line per unreadable step.
            logging.warning("Checkpoint %s/%d is unreadable (%s): moved to %s, using step %d.",
                            mngr.directory, step, why, self.root / "unreadable", usable)
        self._usable[kind] = usable
        return usable

    def _move_unreadable(self, kind: str, steps: list[int]) -> None:
        """Keep unreadable steps (never deleted) out of the manager's way: new saves reuse their
        step numbers."""
        mngr = self.managers[kind]
        if not steps:
            return
        if jax.process_index() == 0:
            dest = self.root / "unreadable"
            dest.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            for step in steps:
                (mngr.directory / str(step)).rename(dest / f"{kind}-{step}-{stamp}")
        devices.sync("cifar_flax_unreadable_checkpoints")
        mngr.reload()

    # ---- reading ----
    def latest_meta(self) -> dict | None:
        """The meta item of the newest readable latest checkpoint; None for a fresh run."""
        step = self._usable_step("latest")
        if step is None:
            return None
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return dict(self.managers["latest"].restore(step, args=args)["meta"])

    def any_meta(self) -> tuple[dict | None, UserError | None]:
        """``(meta, None)``: the meta of the newest latest step whose meta reads (arrays not
        checked; nothing moved), what the run in this workdir was, for the checks before
        resuming. ``(None, None)`` when it has no step; ``(None, problem)`` when steps exist but
        no meta reads (the UserError to raise, unless the caller replaces the run)."""
        mngr = self.managers["latest"]
        steps = sorted(mngr.all_steps(), reverse=True)
        why = ""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        for step in steps:
            try:
                return dict(mngr.restore(step, args=args)["meta"]), None
            except Exception as e:  # noqa: BLE001 - try the next older step.
                why = why or f"{type(e).__name__}: {brief(e)}"
        return None, _none_readable(mngr.directory, steps, why) if steps else None

    def best_step(self) -> int | None:
        """The step restore("best") restores (the newest readable best), or None."""
        return self._usable_step("best")

    def latest_step(self) -> int | None:
        """The newest step saved in latest (readable or not), or None."""
        return self.managers["latest"].latest_step()

    def restore(self, kind: str, like: Any) -> Any:
        """The newest readable checkpoint of ``kind`` with the structure, dtypes and shardings of
        ``like`` (latest: a TrainState; best, phase_best: {"params", "batch_stats"}), given as
        ShapeDtypeStructs with shardings or as arrays."""
        step = self._usable_step(kind)
        if step is None:
            raise UserError(f"no checkpoint in {self.managers[kind].directory} to restore.")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(like))
        return self.managers[kind].restore(step, args=args)["state"]

    def wait(self) -> None:
        """Block until background saves are on disk (a failed one is a UserError)."""
        for mngr in self.managers.values():
            with _save_errors(mngr, mngr.latest_step() or 0):  # A background save failed.
                mngr.wait_until_finished()

    def close(self) -> None:
        for mngr in self.managers.values():
            mngr.close()


KINDS = ("best", "latest")  # The checkpoint folders a trained run's users read.


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint step folder of a run: ``<workdir>/checkpoints/<kind>/<step>``."""

    path: epath.Path
    step: int
    kind: str  # "best", "latest" or "" (a step folder given directly, outside that layout).

    @property
    def workdir(self) -> epath.Path | None:
        """The run's workdir when the checkpoint sits in the usual layout, else None."""
        root = self.path.parent.parent
        return root.parent if root.name == "checkpoints" else None


def _steps(manager_dir: epath.Path) -> list[int]:
    """Finished step folders (Orbax renames a folder to its step number when complete)."""
    if not manager_dir.is_dir():
        return []
    return sorted(int(p.name) for p in manager_dir.iterdir() if p.name.isdigit()
                  and (p / "state").is_dir())


def find_checkpoint(run: str, which: str = "best") -> RunCheckpoint:
    """The checkpoint of ``run`` to use: ``which="best"`` (the run's best by its validation
    metric; its last checkpoint when it has no best, e.g. trained without validation) or
    ``"latest"``. ``run`` is a workdir, a ``checkpoints/<kind>`` folder or a step folder. Its
    path is absolute. A run still training may delete the step after it was named (see
    inference.trained_run.load_run, which then asks again)."""
    if which not in KINDS:
        raise UserError(f"--checkpoint={which!r} must be one of {KINDS}.")
    path = _path(run)
    if not path.exists():
        raise UserError(f"{run} does not exist; pass the --workdir of a training run.")
    found = newest_checkpoint(run, which)
    if found is None:
        raise UserError(
            f"{run} has no finished checkpoint (expected {path / 'checkpoints' / which}/<step>); "
            "train it first or pass the workdir of a run that saved one.")
    return found


def newest_checkpoint(run: str, which: str = "best") -> RunCheckpoint | None:
    """What :func:`find_checkpoint` names (``which``: one of KINDS), or None where it has no
    finished checkpoint to name (``run`` gone, or none saved): for a reader that asks again
    after a step it was reading was deleted (inference.trained_run)."""
    path = _path(run)  # Orbax reads no relative path (``--workdir run`` from its parent).
    if (path / "state").is_dir():  # A step folder.
        kind = path.parent.name if path.parent.name in KINDS else ""
        return RunCheckpoint(path, int(path.name) if path.name.isdigit() else 0, kind)
    steps = _steps(path) if path.name in KINDS else []  # Listed once: a run may be rotating.
    if steps:  # A checkpoints/<kind> folder.
        return RunCheckpoint(path / str(steps[-1]), steps[-1], path.name)
    order = (which, "latest") if which == "best" else (which,)
    for kind in order:
        steps = _steps(path / "checkpoints" / kind)
        if steps:
            return RunCheckpoint(path / "checkpoints" / kind / str(steps[-1]), steps[-1], kind)
    return None


def read_meta(ckpt: RunCheckpoint) -> dict[str, Any]:
    """The checkpoint's JSON meta item (step, phase, early stopping, history, ...); {} if none."""
    path = ckpt.path / "meta" / "metadata"
    return json.loads(path.read_text()) if path.exists() else {}


def stored_shapes(ckpt: RunCheckpoint) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` as stored: a tree of ``jax.ShapeDtypeStruct`` (no values).
    FileNotFoundError when the step folder is gone (a training run rotated it away since it was
    found), so that a reader can tell that from a checkpoint of another kind."""
    if not (ckpt.path / "state").is_dir():
        raise FileNotFoundError(errno.ENOENT, "checkpoint step folder deleted", str(ckpt.path))
    tree = ocp.PyTreeCheckpointHandler().metadata(ckpt.path / "state")
    missing = [k for k in ("params", "batch_stats") if k not in tree]
    if missing:
        raise UserError(f"{ckpt.path} holds no {missing}; it is not a cifar_flax checkpoint.")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                        {"params": tree["params"], "batch_stats": tree["batch_stats"]})


def restore_variables(ckpt: RunCheckpoint, mesh: Mesh, like: Any = None) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of ``ckpt``, replicated on ``mesh``.

    ``like`` (a tree of arrays or ShapeDtypeStructs, e.g. the model's ``eval_shape``) fixes the
    expected structure and shapes; a mismatch is a UserError naming the differing entries. Without
    it the stored structure is used. A read that fails (e.g. the folder deleted meanwhile by a
    training run rotating its steps) raises as it is, without tensorstore's teardown noise."""
    stored = stored_shapes(ckpt)
    if like is not None:
        problems = shape_differences(stored, like)
        if problems:
            raise UserError(
                f"{ckpt.path} does not fit this model ({len(problems)} differences: "
                f"{'; '.join(problems[:6])}); was it trained with another model config?"
            )
    rep = NamedSharding(mesh, P())
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), stored)
    args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=rep, global_shape=s.shape, dtype=s.dtype), target)
    try:
        out = ocp.PyTreeCheckpointer().restore(
            ckpt.path / "state",
            args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True),
        )
    except Exception:
        sys.unraisablehook = _drop_closed_loop_noise  # Reads still in flight (folder deleted).
        raise
    return {"params": out["params"], "batch_stats": out["batch_stats"]}


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'/'-joined path -> shape of every leaf (arrays or ShapeDtypeStructs)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def shape_differences(stored: Any, expected: Any) -> list[str]:
    """Human-readable differences between two trees' leaf paths and shapes ([] when equal)."""
    a, b = flat_shapes(stored), flat_shapes(expected)
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params"), k))  # noqa
    out = [f"{k} missing from the checkpoint" for k in order(b.keys() - a.keys())]
    out += [f"{k} unexpected in the checkpoint" for k in order(a.keys() - b.keys())]
    out += [f"{k} {a[k]} in the checkpoint vs {b[k]} expected" for k in order(a.keys() & b.keys())
            if a[k] != b[k]]
    return out
