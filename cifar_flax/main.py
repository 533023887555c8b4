"""Entry point: ``python -m cifar_flax.main --config configs/finetune.py --workdir runs/ft``.

``--config configs/x.py`` or ``configs/x.py:arg``, with ``--config.a.b=value`` overrides (e.g.
``--config.dataset=imagefolder:/data/pets --config.phases[0].lr=0.1``). Rerunning with the same
``--workdir`` resumes (only a run with the same fingerprint: train/fingerprint.py,
``config.resume``); one run per workdir at a time (train/workdir.py). Slips in flags, config,
workdir, data or weights, and failed saves, print one ``error:`` line and exit with status 1;
Ctrl-C outside the training loop prints one line and exits with 130 (cli.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C during the slow imports below: one line, no traceback.
    from cifar_flax import cli as _cli

    _cli.install_ctrl_c_handler()

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from cifar_flax import cli
from cifar_flax.cli import fail
from cifar_flax.config import ConfigError, validate, validate_distributed
from cifar_flax.training import devices

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, report.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, stop_after_steps: int | None = None) -> dict:
    """Train (or resume) and write the report into ``<workdir>/report``; results.json's content.

    Before any data or weights are read: the workdir is checked and locked (process 0), and a run
    already in it is compared with this config (resumed, refused, or moved aside when
    ``config.resume == "replace"``). ``stop_after_steps``: as train_and_evaluate's (tests
    interrupt a run with it)."""
    import contextlib

    from cifar_flax.analysis.report import write_report
    from cifar_flax.training import workdir as workdir_lib
    from cifar_flax.training.loop import train_and_evaluate

    def report_fn(history, labels, logits, class_names, results):
        write_report(str(epath.Path(workdir) / "report"), history, labels, logits, class_names,
                     results)

    workdir_lib.check_workdir(workdir)
    first = jax.process_index() == 0
    with workdir_lib.WorkdirLock(workdir) if first else contextlib.nullcontext():
        _check_or_replace_previous_run(config, workdir)
        return train_and_evaluate(config, workdir, stop_after_steps, report_fn)


def _check_or_replace_previous_run(config, workdir: str) -> None:
    """Refuse (ConfigError) a workdir whose run has another config, from the config alone, before
    the data is read; with ``config.resume == "replace"`` move such a run (or an unreadable one)
    to ``<workdir>/previous/<time>/`` instead. The loop checks the data part once it has read it."""
    from cifar_flax.training import workdir as fp
    from cifar_flax.training import workdir as workdir_lib
    from cifar_flax.training.checkpoints import CheckpointError, Checkpointer

    ckpt = Checkpointer(workdir, config.checkpoint.keep, async_save=False)
    try:
        meta, unreadable = ckpt.any_meta(), None
    except CheckpointError as e:
        meta, unreadable = None, e
    finally:
        ckpt.close()
    replace = config.get("resume", "auto") == "replace"
    if unreadable is not None and not replace:
        raise unreadable
    saved = meta.get("fingerprint") if meta else None
    different = saved is not None and fp.serious(fp.differences(saved, fp.fingerprint(config)))
    if replace and (different or unreadable is not None):
        if jax.process_index() == 0:
            dest = workdir_lib.move_aside(workdir)
            logging.warning("--config.resume=replace: the previous run of %s moved to %s.",
                            workdir, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("cifar_flax_replace_previous_run")
    elif meta is not None:
        fp.check_resume(saved, fp.fingerprint(config), config, workdir)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story for a user (printed as one ``error:`` line)."""
    from cifar_flax.data.sources import DataError
    from cifar_flax.training.checkpoints import CheckpointError
    from cifar_flax.training.loop import TrainingDiverged
    from cifar_flax.training.workdir import WorkdirError
    from cifar_flax.weights.files import WeightsError

    return (ConfigError, DataError, WeightsError, WorkdirError, CheckpointError, TrainingDiverged)


def train_cli(config, workdir: str) -> dict:
    """What ``main`` runs after flag parsing: distributed start, checks, the run; every user
    error becomes one ``error:`` line and exit status 1 (SystemExit)."""
    try:
        validate_distributed(config)
        devices.initialize(config.distributed)
        validate(config)
        return run(config, workdir)
    except _user_errors() as e:
        fail(str(e))
    except OSError as e:  # A disk or permission problem while writing outside the checkpoints.
        fail(f"{type(e).__name__}: {e} (while running in --workdir {workdir}); the checkpoints "
             "saved so far are intact: fix that and rerun the same command to resume.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = train_cli(_CONFIG.value, _WORKDIR.value)
    if results.get("signal") == "SIGINT":  # Ctrl-C in training: saved (the loop said so).
        raise SystemExit(cli.INTERRUPTED_EXIT)
    if "test_accuracy" in results and jax.process_index() == 0:
        print(f"test accuracy {results['test_accuracy']:.4f} "
              f"({results['images_per_sec']:.1f} images/s); report in {_WORKDIR.value}/report")


if __name__ == "__main__":
    cli.run(main, interrupted="nothing new was saved; rerun the same command to resume from "
            "the last checkpoint")
