"""Parameter groups and training phases -> one optax transformation per phase.

A *group* is a named regex searched in the '/'-joined parameter path (``stage4/block1/conv1/kernel``);
every parameter belongs to exactly one group. A *phase* (``config.phase()``) names the groups it
trains, their learning rates, schedule and optimizer. Frozen groups get ``optax.set_to_zero()`` in
an ``optax.multi_transform`` (no optimizer state, no update) and train.py does not differentiate
them at all, so no backward pass runs through a frozen prefix of the network.

Learning rates follow the batch (``config.lr_batch_size``, documented in config.py):
:func:`peak_learning_rates` is the one place that scales them. They are computed from the config
each time a phase is built (a resumed run too), never stored scaled, so never scaled twice.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import optax
from flax import traverse_util

from cifar_flax import UserError
from cifar_flax.models import BACKBONE_MODULES

FROZEN = "__frozen__"


def flat_paths(params: Any) -> dict[str, Any]:
    """``{"stage1/block1/conv1/kernel": leaf, ...}`` for a nested param dict."""
    return traverse_util.flatten_dict(params, sep="/")


def assign_groups(params: Any, groups: Mapping[str, str]) -> dict[str, str]:
    """Map each parameter path to its group; UserError if any path matches none or several."""
    compiled = {name: re.compile(pattern) for name, pattern in groups.items()}
    assignment, orphans, doubles = {}, [], []
    for path in flat_paths(params):
        hits = [name for name, rx in compiled.items() if rx.search(path)]
        if not hits:
            orphans.append(path)
        elif len(hits) > 1:
            doubles.append(f"{path} ({', '.join(hits)})")
        else:
            assignment[path] = hits[0]
    errors = []
    if orphans:
        errors.append(
            f"{len(orphans)} parameters match no entry of config.groups, e.g. {orphans[:10]}: "
            "add a group whose regex matches them."
        )
    if doubles:
        errors.append(
            f"{len(doubles)} parameters match several entries of config.groups, e.g. "
            f"{doubles[:10]}: make the regexes disjoint."
        )
    if errors:
        raise UserError("\n".join(errors))
    return assignment


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


def lr_scale(config: ml_collections.ConfigDict) -> float:
    """The factor every stated learning rate is multiplied by: batch_size / lr_batch_size."""
    return config.batch_size / config.lr_batch_size


def peak_learning_rates(config: ml_collections.ConfigDict, index: int) -> dict[str, float]:
    """Each trainable group's peak learning rate in phase ``index`` at this run's batch size
    (its ``group_lr`` entry or the phase's ``lr``, times :func:`lr_scale`), in config.groups'
    order."""
    phase, scale = config.phases[index], lr_scale(config)
    group_lr = dict(phase.group_lr)
    return {g: group_lr.get(g, phase.lr) * scale
            for g in dict(config.groups) if g in tuple(phase.trainable)}


def build_phase(
    config: ml_collections.ConfigDict, params: Any, index: int, steps_per_epoch: int
) -> PhasePlan:
    """The optimizer and masks of phase ``index`` of ``config.phases`` for these params."""
    phase = config.phases[index]
    assignment = assign_groups(params, dict(config.groups))
    trainable = tuple(phase.trainable)
    steps = phase_steps(phase, steps_per_epoch)
    schedules = {g: make_schedule(phase, lr, steps, steps_per_epoch)
                 for g, lr in peak_learning_rates(config, index).items()}
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
