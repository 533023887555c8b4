"""What a checkpoint was trained with, so a rerun resumes only what is resumable.

Every checkpoint's meta holds ``fingerprint(config, info)``: the config flattened to
``"phases[1].lr": 0.05``-style keys plus the data it saw (class names, train/validation sizes).
A rerun compares it with its own (``check_resume``):

- a difference in anything that shapes the state or the training (model, weights, dataset and
  classes, splits, augmentation, groups, every phase field, batch size, seed, early stopping, ...)
  stops the run with one line listing the fields, old -> new, and the two ways on: a new
  ``--workdir`` or ``--config.resume=replace`` (the old run is moved to ``<workdir>/previous/``);
- a difference only in :data:`HARMLESS` fields (logging, progress bar, checkpoint cadence and
  keep, evaluation batch size, where files live) is allowed and logged.

A lengthened (or added) phase counts as a difference: its cosine schedule depends on its length,
so the resumed run would match no single run's config. To train a finished run longer, start a new
workdir from its weights instead.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import ml_collections

from cifar_flax.config import ConfigError

# Fields whose change cannot alter the trained parameters or the data (prefix match on the key).
HARMLESS = (
    "log_every_steps", "progress_bar", "tensorboard", "checkpoint.", "eval_batch_size", "data_dir",
    "cache",
    "distributed.", "model.conv_impl", "pretrained.file", "pretrained.cache_dir", "test_split",
    "data.num_test",
)
IGNORED = ("resume",)  # How to resume is not part of what was trained.


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, (ml_collections.ConfigDict, dict)):
        for k in sorted(value.keys()):
            _flatten(value[k], f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)) and any(
        isinstance(v, (ml_collections.ConfigDict, dict)) for v in value
    ):
        out[f"{prefix}.count"] = len(value)
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = [_plain(v) for v in value]
    else:
        out[prefix] = _plain(value)


def _plain(v: Any) -> Any:
    """A JSON value that compares the same before and after a JSON round trip."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def fingerprint(config: ml_collections.ConfigDict, info: Any = None) -> dict[str, Any]:
    """Flat ``{key: JSON value}`` of everything that determined a run; ``info`` (a DatasetInfo)
    adds the data it saw. Without ``info``: the config part alone (checkable before any data)."""
    out: dict[str, Any] = {}
    _flatten(config, "", out)
    for key in [k for k in out if k.startswith(IGNORED)]:
        del out[key]
    if info is not None:
        sizes = dict(info.split_sizes)
        out["data.class_names"] = list(info.class_names)
        out["data.num_train"] = int(sizes.get("train", 0))
        out["data.num_validation"] = int(sizes.get("validation", 0))
        out["data.num_test"] = int(sizes.get("test", 0))
    return out


def serious(diffs: list[str]) -> list[str]:
    """The lines of ``differences`` outside HARMLESS fields (those that make a run unresumable)."""
    return [d for d in diffs if not d.split(":", 1)[0].startswith(HARMLESS)]


_UNSET = "(unset)"


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    from cifar_flax.config import default_config

    return fingerprint(default_config())


def _default(key: str) -> Any:
    """The default_config value of ``key`` (a phase field: phase()'s default), or _UNSET."""
    return _defaults().get(re.sub(r"^phases\[\d+\]", "phases[0]", key), _UNSET)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (sorted).

    A key the checkpoint lacks counts only when the current value is not the field's default
    (a field a newer version added, left at its default, resumes). The data part is compared only
    when both sides have it (one may be taken before reading the data)."""
    keys = set(saved) | set(current)
    has_data = lambda fp: any(k.startswith("data.") for k in fp)  # noqa: E731
    if not (has_data(saved) and has_data(current)):
        keys = {k for k in keys if not k.startswith("data.")}
    out = []
    for key in sorted(keys):
        old, new = saved.get(key, _UNSET), current.get(key, _UNSET)
        if old == new or (old is _UNSET and new == _default(key)):
            continue
        out.append(f"{key}: {_short(old)} -> {_short(new)}")
    return out


def _short(v: Any, limit: int = 60) -> str:
    text = v if v is _UNSET else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resume(saved: dict | None, current: dict, config: ml_collections.ConfigDict,
                 workdir: str = "the workdir") -> list[str]:
    """Whether a run with fingerprint ``current`` may resume a checkpoint fingerprinted ``saved``.

    Raises ConfigError (one line listing the differing fields and the ways on) when any field
    outside HARMLESS differs; returns the harmless differences (the caller logs them). ``saved``
    None (a checkpoint written before fingerprints existed) resumes with a note.
    ``config.resume == "replace"`` is handled before (main.run moves the old run aside), so here
    every value of it refuses a different run.
    """
    if saved is None:
        return ["the checkpoint records no fingerprint (an older version wrote it): not checked"]
    diffs = differences(saved, current)
    bad = serious(diffs)
    if bad:
        shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ConfigError(
            f"{workdir} holds a run with a different config ({shown}): resuming would mix the "
            "two. Use a new --workdir, or --config.resume=replace to move the old run to "
            f"{workdir}/previous/ and start this one there."
        )
    return diffs
