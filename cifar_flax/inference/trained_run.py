"""A trained run loaded for inference: its config, class names, input shape, model and variables,
and the logits and class probabilities it gives for uint8 images.

Everything comes from the run's workdir (``config.json``, ``run_info.json`` and a checkpoint), so
the user passes nothing the run already knows and the data need not be on this machine. A run
that is still training can be read: a step folder it deletes (rotates away) before or while it is
read is replaced by the newest step left. Runs trained before ``run_info.json`` existed fall back
to re-reading the dataset's info (which needs the data) and say so. :class:`Predictor` runs
images through the evaluation's logits step (run.evaluation.make_logits_step: eval
preprocessing, inference-mode BatchNorm, no dropout), sharded over the mesh's devices; a batch is
padded to a multiple of the device count and the padding dropped from the result.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from cifar_flax import UserError
from cifar_flax.config import default_config, phase
from cifar_flax.data import input_pipeline
from cifar_flax.data.preprocessing import Preprocessing
from cifar_flax.run import checkpoints, devices
from cifar_flax.run.checkpoints import RunCheckpoint
from cifar_flax.run.evaluation import make_logits_step
from cifar_flax.run.model_setup import build_model, input_preprocessing
from cifar_flax.run.workdir import read_run_info


@dataclasses.dataclass
class TrainedRun:
    """A run ready for inference: ``model.apply(variables, x, train=False)`` on the ``mesh``."""

    workdir: epath.Path
    config: ml_collections.ConfigDict
    class_names: list[str]
    image_shape: tuple[int, int, int]  # uint8 HWC the run's host pipeline fed the model.
    dataset: str
    model: Any
    variables: dict[str, Any]
    preprocessing: Preprocessing
    checkpoint: RunCheckpoint
    mesh: Mesh

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _merge(target: ml_collections.ConfigDict, values: dict) -> None:
    """Set ``values`` into ``target`` recursively; tuples stay tuples; keys of an older config
    version whose type changed since (e.g. a bool that became a group) keep today's default."""
    for key, value in values.items():
        current = target.get(key) if key in target else None
        if isinstance(current, ml_collections.ConfigDict):
            if isinstance(value, dict):
                _merge(current, value)
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if _takes(current, value):
            target[key] = value
        else:
            logging.warning("Ignoring config.%s=%r of the run (its type changed).", key, value)


def _takes(current: Any, value: Any) -> bool:
    """Whether a ConfigDict field holding ``current`` takes ``value`` (a JSON value; a list for
    a tuple already made a tuple): ml_collections' type-safety rule, which raises otherwise.
    None on either side, the same type, or an int for a float."""
    return (current is None or value is None or isinstance(value, type(current))
            or (type(current) is float and isinstance(value, int)))


def config_from_json(values: dict) -> ml_collections.ConfigDict:
    """A run's ``config.json`` as a full ConfigDict (today's defaults for fields it lacks)."""
    values = dict(values)
    phases = values.pop("phases", None)
    config = default_config()
    _merge(config, values)
    if phases:
        config.phases = [phase(p.get("name", f"phase{i}"),
                               **{k: v for k, v in p.items() if k != "name"})
                         for i, p in enumerate(phases)]
    return config


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """``<workdir>/config.json`` as a ConfigDict; UserError when the run has none."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise UserError(f"{workdir} has no config.json; pass the --workdir of a training run.")
    return config_from_json(json.loads(path.read_text()))


def _dataset_info(workdir: epath.Path, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """run_info.json, or (older runs) the same facts re-read from the run's dataset."""
    facts = read_run_info(str(workdir))
    if facts is not None:
        return facts
    logging.warning("%s has no run_info.json (trained before it existed): reading class names "
                    "and image size from its dataset %s.", workdir, config.dataset)
    info = input_pipeline.get_info(config)
    return {"dataset": info.name, "class_names": list(info.class_names),
            "image_shape": tuple(info.image_shape), "num_classes": info.num_classes}


def load_run(run: str, checkpoint: str = "best", conv_impl: str | None = None,
             mesh: Mesh | None = None) -> TrainedRun:
    """Load ``run`` (a workdir, or a checkpoint folder inside one) with its ``checkpoint``
    ("best": the run's best, else its last; or "latest"), restored replicated on ``mesh``
    (default: all devices). ``conv_impl`` overrides ``config.model.conv_impl`` (export: "xla")."""
    ckpt = checkpoints.find_checkpoint(run, checkpoint)
    workdir = ckpt.workdir or epath.Path(run)
    config = read_config(workdir)
    if conv_impl is not None:
        config.model.conv_impl = conv_impl
    facts = _dataset_info(workdir, config)
    model = build_model(config, len(facts["class_names"]))
    mesh = mesh or devices.make_mesh()
    res = config.augment.resolution
    like = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jax.numpy.zeros((1, res, res, 3)), train=False))
    like = {"params": like["params"], "batch_stats": like["batch_stats"]}
    ckpt, variables = _restore_newest(run, checkpoint, ckpt, mesh, like)
    return TrainedRun(workdir, config, list(facts["class_names"]), tuple(facts["image_shape"]),
                     facts["dataset"], model, variables, input_preprocessing(config), ckpt, mesh)


MAX_VANISHED = 10  # Steps deleted while being read before giving up (a run saving faster).
VANISH_WAIT_S = 2.0  # How long a failed read waits for a deletion in progress to finish.


def _restore_newest(run: str, which: str, ckpt: RunCheckpoint, mesh: Mesh,
                    like: Any) -> tuple[RunCheckpoint, dict[str, Any]]:
    """``(checkpoint, variables)``: ``ckpt``'s, or, when its step folder is deleted before or
    while it is read (a run still training rotates its old steps away), the newest step left's.
    A run that is still training can thus be read; UserError when no step is left."""
    vanished: list[str] = []
    while True:
        try:
            return ckpt, checkpoints.restore_variables(ckpt, mesh, like)
        except Exception as e:  # noqa: BLE001 - re-raised unless the folder is gone.
            if not _deleted(ckpt.path, wait=not isinstance(e, UserError)):
                raise
        vanished.append(f"{ckpt.kind}/{ckpt.step}" if ckpt.kind else str(ckpt.path))
        logging.warning("Checkpoint %s was deleted while being read (a run still training "
                        "there?); reading the newest one left.", ckpt.path)
        if len(vanished) == MAX_VANISHED:
            raise _vanished_error(run, vanished, "a run saving faster than they can be read")
        ckpt = checkpoints.newest_checkpoint(run, which)
        if ckpt is None:
            raise _vanished_error(run, vanished, "no other is left")


def _deleted(path: epath.Path, wait: bool) -> bool:
    """Whether ``path`` is gone, or (``wait``) goes within VANISH_WAIT_S: a read that failed
    midway may have seen a deletion (rmtree) still in progress."""
    deadline = time.monotonic() + (VANISH_WAIT_S if wait else 0.0)
    while path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _vanished_error(run: str, vanished: list[str], why: str) -> UserError:
    """One line: which steps of ``run`` were deleted while being read, why we stop, what to do."""
    many = len(vanished) > 1
    return UserError(
        f"{run}: checkpoint{'s' if many else ''} {', '.join(vanished)} {'were' if many else 'was'} "
        f"deleted while being read (a training run still saving there rotates old steps away) "
        f"and {why}; rerun when the run has saved a new one or has finished.")


TTA_MODES = ("none", "flip")  # predict.py's --tta choices.


class Predictor:
    """``predictor.logits(images)``, ``predictor.probabilities(images, tta)`` for a TrainedRun."""

    def __init__(self, run: TrainedRun) -> None:
        self.run = run
        self.fn = make_logits_step(run.model, run.mesh, run.config.augment, run.preprocessing)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) at the run's image shape -> float32 logits (n, C)."""
        n = len(images)
        pad = -n % self.run.mesh.size
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        dev = devices.shard_batch(self.run.mesh, {"image": np.ascontiguousarray(images)})
        out = self.fn(self.run.variables, dev["image"])
        return np.asarray(devices.to_host(out), np.float32)[:n]

    def probabilities(self, images: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities); ``tta="flip"`` averages the probabilities (and logits) of
        each image and its horizontal mirror."""
        if tta not in TTA_MODES:
            raise ValueError(f"tta={tta!r} must be one of {TTA_MODES}.")
        logits = self.logits(images)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        if tta == "flip":
            flipped = self.logits(images[:, :, ::-1])
            logits = (logits + flipped) / 2
            probs = (probs + np.asarray(jax.nn.softmax(flipped, axis=-1))) / 2
        return logits, probs
