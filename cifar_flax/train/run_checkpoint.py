"""Read the variables of a finished (or interrupted) run's checkpoint, read-only, on any mesh.

Used by ``config.init_from`` (initialize.py) and by predict/evaluate/export (cifar_flax.inference).
A run is named by its workdir, by one of its checkpoint folders (``checkpoints/best`` or
``checkpoints/latest``) or by one step folder in them. Only ``params`` and ``batch_stats`` are
read (a ``latest`` checkpoint also holds the optimizer state, which nobody here needs), and they
are restored with explicit replicated shardings on the current mesh, so a checkpoint written by
another device count or topology restores (the checkpoint's own sharding names devices that may
not exist here). Nothing is created or written: a missing folder is an error, not a new run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

KINDS = ("best", "latest")


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used; the message names the path and the fix."""


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
    ``"latest"``. ``run`` is a workdir, a ``checkpoints/<kind>`` folder or a step folder."""
    if which not in KINDS:
        raise RunError(f"--checkpoint={which!r} must be one of {KINDS}.")
    path = epath.Path(run)
    if not path.exists():
        raise RunError(f"{run} does not exist; pass the --workdir of a training run.")
    if (path / "state").is_dir():  # A step folder.
        kind = path.parent.name if path.parent.name in KINDS else ""
        return RunCheckpoint(path, int(path.name) if path.name.isdigit() else 0, kind)
    if path.name in KINDS and _steps(path):  # A checkpoints/<kind> folder.
        return RunCheckpoint(path / str(_steps(path)[-1]), _steps(path)[-1], path.name)
    order = (which, "latest") if which == "best" else (which,)
    for kind in order:
        steps = _steps(path / "checkpoints" / kind)
        if steps:
            return RunCheckpoint(path / "checkpoints" / kind / str(steps[-1]), steps[-1], kind)
    raise RunError(
        f"{run} has no finished checkpoint (expected {path / 'checkpoints' / which}/<step>); "
        "train it first or pass the workdir of a run that saved one."
    )


def read_meta(ckpt: RunCheckpoint) -> dict[str, Any]:
    """The checkpoint's JSON meta item (step, phase, early stopping, history, ...); {} if none."""
    path = ckpt.path / "meta" / "metadata"
    return json.loads(path.read_text()) if path.exists() else {}


def stored_shapes(ckpt: RunCheckpoint) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` as stored: a tree of ``jax.ShapeDtypeStruct`` (no values)."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointHandler().metadata(ckpt.path / "state")
    missing = [k for k in ("params", "batch_stats") if k not in tree]
    if missing:
        raise RunError(f"{ckpt.path} holds no {missing}; it is not a cifar_flax checkpoint.")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                        {"params": tree["params"], "batch_stats": tree["batch_stats"]})


def restore_variables(ckpt: RunCheckpoint, mesh: Mesh, like: Any = None) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of ``ckpt``, replicated on ``mesh``.

    ``like`` (a tree of arrays or ShapeDtypeStructs, e.g. the model's ``eval_shape``) fixes the
    expected structure and shapes; a mismatch is a RunError naming the differing entries. Without
    it the stored structure is used."""
    import orbax.checkpoint as ocp

    stored = stored_shapes(ckpt)
    if like is not None:
        problems = shape_differences(stored, like)
        if problems:
            raise RunError(
                f"{ckpt.path} does not fit this model ({len(problems)} differences: "
                f"{'; '.join(problems[:6])}); was it trained with another model config?"
            )
    rep = NamedSharding(mesh, P())
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), stored)
    args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=rep, global_shape=s.shape, dtype=s.dtype), target)
    out = ocp.PyTreeCheckpointer().restore(
        ckpt.path / "state",
        args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True),
    )
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
