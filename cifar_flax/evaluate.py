"""Evaluate a trained run on any dataset split with its class names:
``python -m cifar_flax.evaluate --workdir RUN --output DIR [--split test] [--config.dataset=...]``.

The run's own config is the starting point (model, preprocessing, image size, batch sizes);
``--config.<field>=<value>`` overrides any field of it, e.g. ``--config.dataset=imagefolder:/data/
other`` for a second test set (``<dir>/<split>/<class>/*.jpg``), ``--config.data_dir`` for tfds.
``--split`` is the physical split to evaluate (default: the run's test split); only that split is
read. Images are read and resized like the run's own test images (any image of another size is
resized on the host to the run's image size, as ``config.image_size`` does). The report files
of training (confusion matrix, classification report, predictions.npz, results.json, report.md)
go to DIR.
On the run's own test split the accuracy equals the run's results.json test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from typing import TYPE_CHECKING

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

from cifar_flax import cli
from cifar_flax.config import ConfigError
from cifar_flax.inference.cli import run_cli

if TYPE_CHECKING:  # These import TensorFlow, which run_cli imports first (quietly).
    from cifar_flax.data.sources import DatasetInfo
    from cifar_flax.inference.trained_run import LoadedRun


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_flax.evaluate",
                                description=__doc__.split("\n")[0],
                                epilog="Any --config.<field>=<value> overrides the run's config.")
    p.add_argument("--workdir", required=True, help="the training run's --workdir")
    p.add_argument("--output", required=True, help="folder for the report files")
    p.add_argument("--split", default="", help="split to evaluate (default: the run's test split)")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--force", action="store_true",
                   help="replace an earlier evaluate output in --output")
    return p


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
    """``--config.a.b=value`` arguments applied to ``config`` (parsed as ``main`` parses them)."""
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ConfigError(f"unknown arguments {bad}; only --config.<field>=<value> overrides "
                          "and the options of --help are accepted.")
    for o in overrides:  # A misspelled field: main's message, with the nearest name.
        problem = cli.override_error(config, o[len("--config."):].split("=", 1)[0])
        if problem:
            raise ConfigError(problem)
    values, argv = flags.FlagValues(), ["evaluate", *overrides]
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv)
        values(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"bad override in {list(overrides)}: {e}") from None
    return values.config


def eval_config(run: LoadedRun, overrides: Sequence[str], split: str) -> ml_collections.ConfigDict:
    """The run's config with the overrides, reading only ``split`` (as the "test" split)."""
    config = apply_overrides(ml_collections.ConfigDict(run.config.to_dict()), overrides)
    split = split or config.test_split
    config.train_split, config.test_split, config.val_split = split, split, ""
    config.val_fraction = 0.0
    h, w, _ = run.image_shape
    if h == w:  # Images of any other size are resized on the host to the run's, as in training.
        config.image_size = h
    return config


def dataset_info(run: LoadedRun, config: ml_collections.ConfigDict) -> DatasetInfo:
    """The dataset's info, checked against the run: same class names, resized to its image size."""
    from cifar_flax.data import input_pipeline
    from cifar_flax.data.sources import DataError

    info = input_pipeline.get_info(config)
    if list(info.class_names) != list(run.class_names):
        raise DataError(
            f"{info.name} has classes {list(info.class_names)} but the run was trained on "
            f"{list(run.class_names)}; evaluate needs the same class names in the same order."
        )
    if tuple(info.image_shape) != tuple(run.image_shape):  # Only for non-square run images.
        raise DataError(f"{info.name} images are {info.image_shape[:2]}, the run's "
                        f"{run.image_shape[:2]}; give images of the run's size.")
    return info


WRITTEN_BY = "cifar_flax.evaluate"  # results.json's mark of an evaluate output (--force).


def _is_evaluation(folder: epath.Path) -> bool:
    """Whether ``folder`` holds an earlier evaluate output (its results.json says so)."""
    try:
        return json.loads((folder / "results.json").read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def evaluate(workdir: str, output: str, split: str = "", overrides: Sequence[str] = (),
             checkpoint: str = "best", force: bool = False) -> dict[str, Any]:
    """Evaluate and write the report into ``output`` (a new folder, or with ``force`` an earlier
    evaluate output); returns its results.json content."""
    import jax

    from cifar_flax.analysis.report import REPORT_FILES, write_report
    from cifar_flax.inference.trained_run import load_run
    from cifar_flax.training.evaluation import Evaluator
    from cifar_flax.training.workdir import check_output_folder, output_folder

    t0 = time.time()
    check_output_folder(output, force, "evaluate", _is_evaluation, REPORT_FILES)
    run = load_run(workdir, checkpoint)
    config = eval_config(run, overrides, split)
    info = dataset_info(run, config)
    r = Evaluator(config, info, run.model, run.mesh, run.preprocessing)(
        run.variables, "test", keep_logits=True)
    results = {"written_by": WRITTEN_BY,
        "test_accuracy": r["accuracy"], "test_loss": r["loss"], "test_examples": r["count"],
        "tested_checkpoint": run.checkpoint.kind or "given", "tested_step": run.checkpoint.step,
        "dataset": info.name, "split": config.test_split, "run": str(run.workdir),
        "wall_seconds": time.time() - t0, "devices": jax.device_count(),
        "config": json.loads(config.to_json_best_effort()),
    }
    if jax.process_index() == 0:
        with output_folder(output) as tmp:
            write_report(str(tmp), None, r["labels"], r["logits"], run.class_names, results)
    return results


def _main(argv: Sequence[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
    results = evaluate(args.workdir, args.output, args.split, overrides, args.checkpoint,
                       args.force)
    print(f"accuracy {results['test_accuracy']:.4f} (loss {results['test_loss']:.4f}) on "
          f"{results['test_examples']} images of {results['dataset']} split "
          f"{results['split']!r}; report in {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 with one ``error:`` line on bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
