"""Orbax checkpoints: ``<workdir>/checkpoints/latest`` (keep-N, for resuming) and ``.../best``.

Each checkpoint holds the TrainState (params, batch_stats, opt_state, step, rng) and a JSON
``meta`` item (phase index and start step, early-stopping state, metrics history). The data
position is the step itself (input_pipeline.train_batches(start_step=step)). Orbax writes into a
temporary directory and renames it when complete, so a run killed at any moment leaves either the
previous checkpoints or a complete new one; leftover temporary directories are ignored and cleaned.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


def _manager(path: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(os.path.abspath(path), options=options)


class Checkpointer:
    """Saves and restores the latest and the best checkpoint of one workdir."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        root = os.path.join(workdir, "checkpoints")
        self.latest = _manager(os.path.join(root, "latest"), keep, async_save)
        self.best = _manager(os.path.join(root, "best"), 1, async_save)

    @staticmethod
    def _save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
        if mngr.latest_step() == step:
            return  # Already saved at this step (e.g. epoch end coincides with every_steps).
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        mngr.save(step, args=args, force=True)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save the full TrainState (for resuming)."""
        self._save(self.latest, step, state, meta)

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        """Save the variables of a new best evaluation (params and batch_stats only)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        self._save(self.best, step, variables, meta)

    @staticmethod
    def _meta(mngr: ocp.CheckpointManager) -> dict | None:
        step = mngr.latest_step()
        if step is None:
            return None
        out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def latest_meta(self) -> dict | None:
        """The meta item of the latest checkpoint, or None when there is none (a fresh run)."""
        return self._meta(self.latest)

    def best_meta(self) -> dict | None:
        return self._meta(self.best)

    @staticmethod
    def _restore(mngr: ocp.CheckpointManager, like: Any) -> Any:
        out = mngr.restore(
            mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(like))
        )
        return out["state"]

    def restore(self, like: Any) -> Any:
        """The latest TrainState, with the structure, dtypes and shardings of ``like``
        (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or of arrays)."""
        return self._restore(self.latest, like)

    def restore_best(self, like_variables: Any) -> Any:
        """The best {"params", "batch_stats"}, shaped like ``like_variables``."""
        return self._restore(self.best, like_variables)

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
