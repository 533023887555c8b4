"""Classify images with a trained run: ``python -m cifar_flax.predict --workdir RUN INPUT...``.

INPUT: image files, folders (recursively) or ``.npy`` files of uint8 (N, H, W, 3) images. The
run's config, class names, input size and best checkpoint (``--checkpoint latest`` for its last)
come from RUN. Images are read and resized the way the run's pipeline did (inference/images.py),
then go through the run's evaluation step, each real file once (a symlink loop is an error, or
skipped with ``--skip_bad``). Prints a table of the top-k classes per image;
``--output preds.csv`` or ``preds.json`` also writes them (checked, its folder made, before any
work). A run that is still training can be read (a step it deletes meanwhile: the newest one
left). Bad inputs: one ``error:`` line, exit 1.
"""

from cifar_flax import cli

if __name__ == "__main__":  # Before the imports below: Ctrl-C as one line, TensorFlow quiet.
    cli.start()

import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from etils import epath  # noqa: E402

from cifar_flax import UserError  # noqa: E402
from cifar_flax.inference.images import ImageInputs  # noqa: E402
from cifar_flax.inference.trained_run import TTA_MODES, Predictor, load_run  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training run's --workdir.", flag_values=FLAGS)
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "The run's checkpoint.",
                  flag_values=FLAGS)
flags.DEFINE_integer("top_k", 5, "Classes shown per image.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("tta", "none", list(TTA_MODES), "flip: average with the mirror image.",
                  flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per model call.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("output", "", "Also write the predictions to this .csv or .json file.",
                    flag_values=FLAGS)
flags.DEFINE_boolean("skip_bad", False, "Skip undecodable files (and count them).",
                     flag_values=FLAGS)
flags.mark_flags_as_required(["workdir"], flag_values=FLAGS)


def predict(workdir: str, inputs: Sequence[str], top_k: int = 5, tta: str = "none",
            batch_size: int = 64, checkpoint: str = "best", skip_bad: bool = False
            ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows, skipped files, skipped symlink loops): per image ``{"file", "top": [(class,
    probability), ...], "logits": np.ndarray (C,)}`` in input order, each real file once."""
    run = load_run(workdir, checkpoint)
    images = ImageInputs(inputs, run.image_shape, skip_bad)
    predictor, rows = Predictor(run), []
    k = max(1, min(top_k, run.num_classes))
    for names, batch in images.batches(batch_size):
        logits, probs = predictor.probabilities(batch, tta)
        for name, lg, pr in zip(names, logits, probs):
            order = np.argsort(-pr, kind="stable")[:k]
            rows.append({"file": name, "logits": lg,
                         "top": [(run.class_names[i], float(pr[i])) for i in order]})
    if not rows:
        raise UserError(f"no readable images among {list(inputs)} "
                         f"({len(images.skipped)} skipped).")
    return rows, images.skipped, images.loops


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per image: file, then the top-k classes with probabilities."""
    width = min(60, max(len("file"), *(len(r["file"]) for r in rows)))
    lines = [f"{'file':<{width}}  top classes (probability)"]
    for r in rows:
        name = r["file"] if len(r["file"]) <= width else "..." + r["file"][-(width - 3):]
        top = "  ".join(f"{c} {p:.3f}" for c, p in r["top"])
        lines.append(f"{name:<{width}}  {top}")
    return "\n".join(lines)


def write_output(rows: list[dict[str, Any]], path: str) -> None:
    """CSV (file, class_1, prob_1, ...) or JSON (a list of {"file", "top": [{"class",
    "probability"}, ...]})."""
    out = epath.Path(path)
    if path.endswith(".json"):
        data = [{"file": r["file"], "top": [{"class": c, "probability": p} for c, p in r["top"]]}
                for r in rows]
        out.write_text(json.dumps(data, indent=2))
        return
    with out.open("w") as f:
        w = csv.writer(f)
        k = len(rows[0]["top"])
        w.writerow(["file"] + [x for i in range(1, k + 1) for x in (f"class_{i}", f"prob_{i}")])
        for r in rows:
            w.writerow([r["file"]] + [x for c, p in r["top"] for x in (c, f"{p:.6f}")])


def check_output(path: str) -> None:
    """``--output`` before any work (a slip found after the predictions would lose them): a .csv
    or .json file, not a folder, whose folder exists (else it is made here) and takes a file."""
    if not path.endswith((".csv", ".json")):
        raise UserError(f"--output={path} must end in .csv or .json.")
    out = epath.Path(path)
    if out.is_dir():
        raise UserError(f"--output={path} is a folder; name a .csv or .json file (e.g. "
                        f"--output={out / 'predictions.csv'}).")
    blocker = _file_in_the_way(out.parent)
    if blocker is not None:
        raise UserError(f"--output={path}: {blocker} is a file, not a folder; choose another "
                        "--output.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".predict_write_test.{id(path)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output={path}: cannot write into {out.parent} ({type(e).__name__}: "
                        f"{e.strerror or e}); choose another --output.") from None


def _file_in_the_way(folder: epath.Path) -> epath.Path | None:
    """The nearest existing one of ``folder`` and its parents when it is a file (no folder can
    be made there), else None."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _main(argv: list[str]) -> str | None:
    if len(argv) < 2:
        raise UserError("no INPUT given: pass image files, folders or .npy files after the "
                        "flags (python -m cifar_flax.predict --workdir RUN images/).")
    if FLAGS.output:
        check_output(FLAGS.output)
    rows, skipped, loops = predict(FLAGS.workdir, argv[1:], FLAGS.top_k, FLAGS.tta,
                                   FLAGS.batch_size, FLAGS.checkpoint, FLAGS.skip_bad)
    print(format_table(rows))
    if skipped:
        print(f"skipped {len(skipped)} bad files (--skip_bad), e.g. {skipped[0]}", file=sys.stderr)
    if loops:
        print(f"skipped {len(loops)} symlink loop(s) (--skip_bad; the images in them were read "
              f"once), e.g. {loops[0]}", file=sys.stderr)
    if not FLAGS.output:
        return None
    write_output(rows, FLAGS.output)
    return f"wrote {len(rows)} predictions to {FLAGS.output}"


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
