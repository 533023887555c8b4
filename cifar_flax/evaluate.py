"""Evaluate a trained run on any dataset split with its class names:
``python -m cifar_flax.evaluate --workdir RUN --output DIR [--split test] [--config.dataset=...]``.

The run's own config is the starting point (model, preprocessing, image size, batch sizes);
``--config.<field>=<value>`` overrides any field of it, e.g. ``--config.dataset=imagefolder:/data/
other`` for a second test set (``<dir>/<split>/<class>/*.jpg``), ``--config.data_dir`` for tfds.
``--split`` is the physical split to evaluate (default: the run's test split); only that split is
read. Images are read and resized like the run's own test images (any image of another size is
resized on the host to the run's image size, as ``config.image_size`` does). DIR (a new folder,
or with ``--force`` an earlier evaluate output; never a run's workdir or report) receives the
confusion matrix, classification report, predictions.npz, results.json and report.md. On the
run's own test split the accuracy equals the run's results.json test accuracy.
"""

from cifar_flax import cli

if __name__ == "__main__":  # Before the imports below: Ctrl-C as one line, TensorFlow quiet.
    cli.start()

import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cifar_flax import UserError  # noqa: E402
from cifar_flax.analysis.report import REPORT_FILES, write_report  # noqa: E402
from cifar_flax.config import default_config  # noqa: E402
from cifar_flax.data import input_pipeline  # noqa: E402
from cifar_flax.data.sources import DatasetInfo  # noqa: E402
from cifar_flax.inference.trained_run import TrainedRun, load_run  # noqa: E402
from cifar_flax.training.evaluation import Evaluator  # noqa: E402
from cifar_flax.training.workdir import check_output_folder, output_folder, read_json  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training run's --workdir.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "A new folder for the report files.", flag_values=FLAGS)
flags.DEFINE_string("split", "", "Split to evaluate (default: the run's test split).",
                    flag_values=FLAGS)
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "The run's checkpoint.",
                  flag_values=FLAGS)
flags.DEFINE_boolean("force", False, "Replace an earlier evaluate output in --output.",
                     flag_values=FLAGS)
cli.config_flag(FLAGS, "--config.<field>=<value> overrides a field of the run's config.",
                default=default_config())
flags.mark_flags_as_required(["workdir", "output"], flag_values=FLAGS)

WRITTEN_BY = "cifar_flax.evaluate"  # results.json's mark of an evaluate output (--force).


def eval_config(run: TrainedRun, overrides: dict[str, Any], split: str) -> ml_collections.ConfigDict:
    """The run's config with ``overrides`` ({"dataset": ...}), reading only ``split`` (as the
    "test" split)."""
    config = cli.apply_overrides(ml_collections.ConfigDict(run.config.to_dict()), overrides)
    split = split or config.test_split
    config.train_split, config.test_split, config.val_split = split, split, ""
    config.val_fraction = 0.0
    h, w, _ = run.image_shape
    if h == w:  # Images of any other size are resized on the host to the run's, as in training.
        config.image_size = h
    return config


def dataset_info(run: TrainedRun, config: ml_collections.ConfigDict) -> DatasetInfo:
    """The dataset's info, checked against the run: same class names, resized to its image size."""
    info = input_pipeline.get_info(config)
    if list(info.class_names) != list(run.class_names):
        raise UserError(
            f"{info.name} has classes {list(info.class_names)} but the run was trained on "
            f"{list(run.class_names)}; evaluate needs the same class names in the same order.")
    if tuple(info.image_shape) != tuple(run.image_shape):  # Only for non-square run images.
        raise UserError(f"{info.name} images are {info.image_shape[:2]}, the run's "
                        f"{run.image_shape[:2]}; give images of the run's size.")
    return info


def _is_evaluation(folder: epath.Path) -> bool:
    """Whether ``folder`` holds an earlier evaluate output (its results.json says so)."""
    results = read_json(folder / "results.json")
    return isinstance(results, dict) and results.get("written_by") == WRITTEN_BY


def evaluate(workdir: str, output: str, split: str = "", overrides: dict[str, Any] | None = None,
             checkpoint: str = "best", force: bool = False) -> dict[str, Any]:
    """Evaluate and write the report into ``output`` (a new folder, or with ``force`` an earlier
    evaluate output); returns its results.json content."""
    t0 = time.time()
    check_output_folder(output, force, "evaluate", _is_evaluation, REPORT_FILES)
    run = load_run(workdir, checkpoint)
    config = eval_config(run, overrides or {}, split)
    info = dataset_info(run, config)
    r = Evaluator(config, info, run.model, run.mesh, run.preprocessing)(
        run.variables, "test", keep_logits=True)
    results = {"written_by": WRITTEN_BY,
               "test_accuracy": r["accuracy"], "test_loss": r["loss"], "test_examples": r["count"],
               "tested_checkpoint": run.checkpoint.kind or "given",
               "tested_step": run.checkpoint.step, "dataset": info.name,
               "split": config.test_split, "run": str(run.workdir),
               "wall_seconds": time.time() - t0, "devices": jax.device_count(),
               "config": json.loads(config.to_json_best_effort())}
    if jax.process_index() == 0:
        with output_folder(output) as tmp:
            write_report(str(tmp), None, r["labels"], r["logits"], run.class_names, results)
    return results


def _main(argv: list[str]) -> str:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    overrides = config_flags.get_override_values(FLAGS["config"])
    r = evaluate(FLAGS.workdir, FLAGS.output, FLAGS.split, overrides, FLAGS.checkpoint,
                 FLAGS.force)
    return (f"accuracy {r['test_accuracy']:.4f} (loss {r['test_loss']:.4f}) on "
            f"{r['test_examples']} images of {r['dataset']} split {r['split']!r}; report in "
            f"{FLAGS.output}")


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
