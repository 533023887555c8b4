"""The workdir of a run and what guards it, before and while training touches it.

- :func:`check_workdir`: a path that is a file, cannot be created or is not writable is one
  UserError line naming the path, before any data or weights are read.
- :class:`WorkdirLock`: ``<workdir>/.lock`` holds ``{"pid", "host", "started"}``, created
  atomically (``O_CREAT | O_EXCL``) so of two runs started at once exactly one gets it; the other
  stops with "workdir in use by pid N on host H". A lock left by a killed run (its pid no longer
  alive on this host) is taken over with a warning; a lock from another host cannot be checked
  and must be deleted by hand if that run is dead (the message says so). Multi-host runs: process
  0 holds it. On ``gs://`` workdirs the create is not atomic (object stores have no O_EXCL).
- :func:`fingerprint` / :func:`check_resume`: what a checkpoint was trained with, so a rerun
  resumes only what is resumable. Every checkpoint's meta holds the config flattened to
  ``"phases[1].lr": 0.05``-style keys plus the data it saw (class names, split sizes). A
  difference in anything that shapes the state or the training stops the run with one line
  listing the fields, old -> new, and the two ways on (a new ``--workdir``, or
  ``--config.resume=replace``); a difference only in :data:`HARMLESS` fields (logging, checkpoint
  cadence, where files live) is allowed and logged. A lengthened phase counts as a difference:
  its cosine schedule depends on its length.
- :func:`move_aside`: ``--config.resume=replace`` keeps the old run's files in
  ``<workdir>/previous/<UTC time>/`` instead of deleting them.
- ``run_info.json`` (:func:`write_run_files`, :func:`read_run_info`): what a trained run's users
  need besides its config (class names in label order, the uint8 image shape the pipeline fed
  the model), so predict, evaluate and export work where the training data is not.
- :func:`check_output_folder` / :func:`output_folder` (export, evaluate, eda) and
  :func:`check_output_file` / :func:`output_file` (predict): a command's output never deletes or
  overwrites what the command did not write (``--force`` replaces only its own earlier output,
  never a run's files), writes inside a run's workdir only under its own folder
  (:func:`check_outside_runs`), and appears only complete (written aside, then renamed into
  place).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
from absl import logging
from etils import epath

from cifar_flax import UserError, atomic_file, brief
from cifar_flax.config import default_config
from cifar_flax.data.sources import DatasetInfo, does_not_resolve
from cifar_flax.run import checkpoints, devices, interrupts

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "report", "config.json",
             "run_info.json")  # What a training run writes; moved aside together.




def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def check_workdir(workdir: str) -> epath.Path:
    """Create ``workdir`` if needed and prove it is a writable folder; UserError otherwise (a
    ``gs://`` one that cannot be reached: at once when the storage host does not resolve)."""
    path = epath.Path(workdir)
    if not _is_local(path):
        _check_storage_host(workdir)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(
                f"--workdir {workdir} is a file, not a folder: choose another --workdir.")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"--workdir {workdir} is not a writable folder ({type(e).__name__}: "
            f"{e.strerror or e}): choose another --workdir or fix its permissions.") from None
    except Exception as e:  # noqa: BLE001 - remote file systems raise their own types.
        if _is_local(path) or isinstance(e, UserError):
            raise
        raise UserError(f"--workdir {workdir} cannot be used ({type(e).__name__}: {brief(e)}): "
                        f"{_REMOTE_FIX}") from None
    return path


_REMOTE_FIX = ("check the bucket name and your credentials (gcloud auth application-default "
               "login, or GOOGLE_APPLICATION_CREDENTIALS=<key.json>), or use a local --workdir.")


def _check_storage_host(workdir: str) -> None:
    """A ``gs://`` workdir: fail at once (not after minutes of retries) when Google Cloud
    Storage's host does not resolve; an emulator (STORAGE_EMULATOR_HOST) is not checked."""
    if not workdir.startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    if does_not_resolve("storage.googleapis.com"):
        raise UserError(f"--workdir {workdir}: Google Cloud Storage (storage.googleapis.com) "
                        "cannot be resolved: this machine seems to be offline; use a local "
                        "--workdir, or connect and authenticate (gcloud auth "
                        "application-default login).")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, owned by another user.
        return True
    return True


def read_json(path: epath.Path) -> Any:
    """The JSON content of ``path``; None when it is missing, unreadable or not JSON (a lock
    gone or being written this instant, a folder that is not a command's output)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """``with WorkdirLock(workdir):`` one run per workdir (see the module docstring); with
    ``take=False`` (every process but the first) it does nothing. A signal that ends the process
    at once releases it too (interrupts.on_abort)."""

    def __init__(self, workdir: str, take: bool = True):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.take, self.held = take, False
        self._forget = lambda: None

    def __enter__(self) -> "WorkdirLock":
        if self.take:
            self.acquire()
            self._forget = interrupts.on_abort(self.release)
        return self

    def __exit__(self, *exc) -> None:
        self._forget()
        self.release()

    def _create(self) -> bool:
        """Atomically create the lock with our record; False if it already exists."""
        data = json.dumps(self.record).encode()
        if not _is_local(self.path):
            if self.path.exists():
                return False
            self.path.write_bytes(data)
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def acquire(self) -> None:
        for _ in range(5):
            if self._create():
                self.held = True
                return
            holder = read_json(self.path)
            if holder is None:  # Vanished or half-written: look again shortly.
                time.sleep(0.2)
                continue
            if holder.get("host") != self.record["host"] or _pid_alive(int(holder["pid"])):
                raise UserError(self._busy_message(holder))
            self._take_over(holder)
        holder = read_json(self.path) or {"pid": "?", "host": "?"}
        raise UserError(self._busy_message(holder))

    def _busy_message(self, holder: dict) -> str:
        other_host = holder.get("host") != self.record["host"]
        extra = (f"; if that run is dead, delete {self.path}" if other_host else "")
        return (f"workdir {self.path.parent} in use by pid {holder.get('pid')} on host "
                f"{holder.get('host')}: wait for it to finish or use another --workdir{extra}.")

    def _take_over(self, stale: dict) -> None:
        """Move a dead run's lock aside (atomic rename) so the next _create can succeed."""
        aside = self.path.parent / f"{LOCK_NAME}.stale.{stale['pid']}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):  # Another starter moved it first.
            self.path.rename(aside)
        # Not the stale lock: nothing moved (``aside`` is missing), or we moved a fresh lock
        # taken meanwhile, which goes back.
        if read_json(aside) != stale:
            with contextlib.suppress(OSError):  # Someone took the lock meanwhile: theirs.
                os.link(os.fspath(aside), os.fspath(self.path))
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        logging.warning("Taking over the lock of %s: pid %s on host %s is no longer running "
                        "(a killed run); resuming from its last checkpoint.",
                        self.path.parent, stale["pid"], stale["host"])

    def release(self) -> None:
        if self.held and read_json(self.path) == self.record:
            self.path.unlink(missing_ok=True)
        self.held = False


def move_aside(workdir: str) -> epath.Path | None:
    """Move the run files of ``workdir`` into ``previous/<UTC time>/``; its path (None if none)."""
    root = epath.Path(workdir)
    present = [name for name in RUN_FILES if (root / name).exists()]
    if not present:
        return None
    dest = root / "previous" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest.mkdir(parents=True, exist_ok=False)
    for name in present:
        (root / name).rename(dest / name)
    return dest


# ---- a command's output (export, evaluate, eda, predict): never lose what it did not write ----


def _is_run(folder: epath.Path) -> bool:
    """Whether ``folder`` is a training run's workdir: a run's lock (a ``.lock`` of another
    program, pytest's say, is not one), or ``checkpoints/`` or ``metrics.jsonl`` beside the
    ``config.json`` or ``run_info.json`` training writes (write_run_files; a project folder
    holding a ``checkpoints/`` folder of its own is not a run)."""
    lock = read_json(folder / LOCK_NAME) if (folder / LOCK_NAME).is_file() else None
    if isinstance(lock, dict) and {"pid", "host"} <= lock.keys():
        return True
    return (any((folder / name).exists() for name in ("checkpoints", "metrics.jsonl"))
            and any((folder / name).exists() for name in ("config.json", FILENAME)))


def find_run(folder: epath.Path) -> epath.Path | None:
    """The first training run at or below ``folder``, or None."""
    if not folder.is_dir():
        return None
    if _is_run(folder):
        return folder
    for child in folder.iterdir():
        if child.is_dir() and not (_is_local(child) and os.path.islink(child)):
            found = find_run(child)
            if found is not None:
                return found
    return None


def _folders_above(target: epath.Path) -> list[epath.Path]:
    """The folders holding ``target``, nearest first; on ``gs://b/...`` up to the bucket (its
    parents ``gs://`` and ``/`` are no folders of it)."""
    return [p for p in target.parents if os.fspath(p).split("://", 1)[-1].strip("/")]


def check_outside_runs(out: epath.Path, output: str, own_folder: str, flag: str) -> None:
    """The one rule of every command's output (UserError, one line): inside a training run's
    workdir only under ``<run>/<own_folder>/`` (predictions/, evaluations/, exports/, eda/); the
    run's other files and folders are the run's, even names it does not write yet (``report/``
    of a run still training)."""
    run = next((p for p in _folders_above(out) if p.is_dir() and _is_run(p)), None)
    if run is not None and (run / own_folder) not in out.parents:
        raise UserError(f"{flag} {output} is inside the training run {run}; write under "
                        f"{run / own_folder}/ or outside the run.")


def check_output_folder(output: str, force: bool, written_by: str,
                        is_ours: Callable[[epath.Path], bool], files: tuple[str, ...],
                        own_folder: str, flag: str = "--output") -> None:
    """Refuse (UserError, one line) an output folder (``flag``) that this command must not
    write: a file; a folder inside a run's workdir but outside its ``<run>/<own_folder>/``
    (check_outside_runs); a run's workdir; a non-empty folder without ``force``; with
    ``force``, a folder holding a run at any depth, or one that ``written_by`` did not write
    (``is_ours`` false, or entries outside ``files``). Called before any work."""
    out = _absolute(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {output} is a file; give a folder.")
    check_outside_runs(out, output, own_folder, flag)
    if not out.exists() or not any(out.iterdir()):
        return
    run = out if _is_run(out) else find_run(out) if force else None  # Walk the tree for --force.
    if run is not None:
        raise UserError(f"{flag} {output} holds the training run {run}; {written_by} never "
                        "writes over a run: choose another folder.")
    if not force:
        raise UserError(f"{flag} {output} is not empty; choose a new folder, or pass "
                        f"--force to replace an earlier output of {written_by}.")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in files)
    if foreign or not is_ours(out):
        what = f"files it did not write: {foreign[:5]}" if foreign else "no output of it"
        raise UserError(f"{flag} {output} holds {what}; --force replaces only an earlier "
                        f"output of {written_by}: choose a new folder.")


def check_output_file(output: str, force: bool, written_by: str,
                      is_ours: Callable[[epath.Path], bool], own_folder: str,
                      flag: str = "--output") -> None:
    """The rule of check_output_folder for a single file (UserError, one line): inside a run's
    workdir only under its ``<run>/<own_folder>/`` (check_outside_runs); an existing file only
    when ``is_ours`` recognises it as an earlier output of ``written_by`` and ``force`` is
    given. Called before any work."""
    out = _absolute(output)
    check_outside_runs(out, output, own_folder, flag)
    if not out.exists():
        return
    if not is_ours(out):
        raise UserError(f"{flag} {output} exists and is not an output of {written_by}, which "
                        "never replaces a file it did not write: choose a new file.")
    if not force:
        raise UserError(f"{flag} {output} holds an earlier output of {written_by}; pass --force "
                        "to replace it, or choose a new file.")


def _absolute(path: str) -> epath.Path:
    return epath.Path(path if "://" in path else os.path.abspath(path))


@contextlib.contextmanager
def output_folder(output: str) -> Iterator[epath.Path]:
    """``with output_folder(out) as tmp:`` write into ``tmp``, a new folder next to ``out``; when
    the block ends without an exception ``tmp`` takes the place of ``out`` (an earlier ``out``,
    already checked by check_output_folder, is removed only then). On an exception, or a signal
    that ends the process (interrupts.on_abort), ``tmp`` is removed and ``out`` is left as it
    was: a move into place that failed part-way (on ``gs://`` a rename copies, then deletes) is
    removed and the earlier output put back."""
    out = _absolute(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}.{time.time_ns()}"
    tmp, old = (out.parent / f".{out.name}.{what}.{stamp}" for what in ("tmp", "old"))

    moved = {"aside": False, "in": False}  # out -> old done; tmp -> out done.

    def undo() -> None:  # Back to the state before: the earlier output in place, no tmp.
        if moved["in"]:  # Complete: the new output stays, the earlier one goes.
            old.rmtree(missing_ok=True)
            return
        if moved["aside"]:  # A rename that failed part-way (gs:// copies, then deletes).
            out.rmtree(missing_ok=True)
        if old.exists() and not out.exists():
            old.rename(out)
        tmp.rmtree(missing_ok=True)

    tmp.mkdir()
    forget = interrupts.on_abort(undo)
    try:
        yield tmp
        if out.exists():
            out.rename(old)
            moved["aside"] = True
        tmp.rename(out)
        moved["in"] = True
    except BaseException:
        undo()
        raise
    finally:
        forget()
    old.rmtree(missing_ok=True)


@contextlib.contextmanager
def output_file(output: str) -> Iterator[epath.Path]:
    """``with output_file(out) as tmp:`` write the file ``tmp`` (next to ``out``); when the block
    ends without an exception it replaces ``out`` in one rename, so ``out`` is never half
    written. On an exception or a signal that ends the process, ``tmp`` is removed."""
    with atomic_file(_absolute(output)) as tmp, contextlib.ExitStack() as stack:
        stack.callback(interrupts.on_abort(lambda: tmp.unlink(missing_ok=True)))  # Then forgotten.
        yield tmp


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
# Fields added later whose absence meant a behaviour other than their default: a checkpoint from
# before lr_batch_size trained at the rates as given, i.e. stated for its own batch size.
LEGACY = {"lr_batch_size": lambda saved: saved.get("batch_size", _UNSET)}


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    return fingerprint(default_config())


def _default(key: str) -> Any:
    """The default_config value of ``key`` (a phase field: phase()'s default), or _UNSET."""
    return _defaults().get(re.sub(r"^phases\[\d+\]", "phases[0]", key), _UNSET)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (sorted).

    A key the checkpoint lacks counts only when the current value is not the field's default
    (a field a newer version added, left at its default, resumes), except where the older
    version behaved as another value (LEGACY). The data part is compared only when both sides
    have it (one may be taken before reading the data)."""
    keys = set(saved) | set(current)
    has_data = lambda fp: any(k.startswith("data.") for k in fp)  # noqa: E731
    if not (has_data(saved) and has_data(current)):
        keys = {k for k in keys if not k.startswith("data.")}
    out = []
    for key in sorted(keys):
        legacy = LEGACY.get(key)
        old = saved.get(key, legacy(saved) if legacy else _UNSET)
        new = current.get(key, _UNSET)
        if old == new or (old is _UNSET and new == _default(key)):
            continue
        out.append(f"{key}: {_short(old)} -> {_short(new)}")
    return out


def _short(v: Any, limit: int = 60) -> str:
    text = v if v is _UNSET else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_previous_run(config: ml_collections.ConfigDict, info: DatasetInfo, workdir: str) -> None:
    """Before a run starts in ``workdir``: the run already there (if any) must have this run's
    fingerprint. A different run, or one whose checkpoints no longer read, stops with one line
    naming the differing fields and the ways on, or, with ``config.resume == "replace"``, is
    moved to ``<workdir>/previous/<time>/`` and this run starts fresh. Harmless differences
    (HARMLESS) resume and are logged."""
    with checkpoints.Checkpointer(workdir, async_save=False) as ckpt:
        saved, problem = ckpt.any_meta()  # A problem (no meta reads): only "replace" goes on.
    old, current = (saved or {}).get("fingerprint"), fingerprint(config, info)
    if config.resume == "replace" and (problem or old and serious(differences(old, current))):
        if jax.process_index() == 0:
            logging.warning("--config.resume=replace: the previous run of %s moved to %s.",
                            workdir, move_aside(workdir))
        devices.sync("cifar_flax_replace_previous_run")
        return
    if problem:
        raise problem
    if saved is not None and not old:
        logging.info("The checkpoint records no fingerprint (an older version wrote it): "
                     "resuming unchecked.")
    for note in check_resume(old, current, workdir) if old else []:
        logging.info("Resuming despite a harmless change: %s", note)


def check_resume(saved: dict, current: dict, workdir: str = "the workdir") -> list[str]:
    """Whether a run fingerprinted ``current`` may resume one fingerprinted ``saved``: a
    UserError (one line listing the differing fields and the ways on) when a field outside
    HARMLESS differs, else the harmless differences (to log)."""
    diffs = differences(saved, current)
    bad = serious(diffs)
    if bad:
        shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise UserError(
            f"{workdir} holds a run with a different config ({shown}): resuming would mix the "
            "two. Use a new --workdir, or --config.resume=replace to move the old run to "
            f"{workdir}/previous/ and start this one there.")
    return diffs


FILENAME = "run_info.json"


def write_run_files(workdir: str, config: ml_collections.ConfigDict, info: DatasetInfo) -> None:
    """``<workdir>/config.json`` and ``run_info.json`` (process 0 only)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))
    record = {
        "dataset": info.name,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "image_shape": list(info.image_shape),
    }
    (path / FILENAME).write_text(json.dumps(record, indent=2))


def read_run_info(workdir: str) -> dict[str, Any] | None:
    """The content of ``<workdir>/run_info.json``; None when the run has none (runs trained
    before it existed)."""
    path = epath.Path(workdir) / FILENAME
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    record["class_names"] = list(record["class_names"])
    record["image_shape"] = tuple(int(x) for x in record["image_shape"])
    return record
