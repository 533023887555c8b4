"""Classify images with a trained run; the images follow the flags:
``python -m cifar_flax.predict --workdir RUN [--top_k 5 --output p.csv ...] IMAGE...`` (files,
folders, .npy).

IMAGE: image files, folders (recursively) or ``.npy`` files of uint8 (N, H, W, 3) images. The
run's config, class names, input size and best checkpoint (``--checkpoint latest`` for its last)
come from RUN. Images are read and resized the way the run's pipeline did (inference/images.py),
then go through the run's evaluation step, each real file once (a symlink loop is an error, or
skipped with ``--skip_bad``). Prints a table of the top-k classes per image;
``--output preds.csv`` or ``preds.json`` also writes them (checked, its folder made, before any
work; written aside and renamed into place, so never half written). ``--output`` never replaces
a file predict did not write (one it wrote, recognised by its exact CSV header and rows or JSON
structure, only with ``--force``) and, inside a run's workdir, writes only under
``<run>/predictions/`` (workdir.check_outside_runs: the rule export, evaluate and eda follow). A
run that is still training can be read (a step it deletes meanwhile: the newest one left). Bad
inputs: one ``error:`` line, exit 1.
"""

import csv
import json
import sys
from typing import Any, Sequence

import numpy as np
from absl import flags
from etils import epath

from cifar_flax import UserError, cli, user_errors
from cifar_flax.inference.images import ImageInputs
from cifar_flax.inference.trained_run import TTA_MODES, Predictor, load_run
from cifar_flax.run.workdir import check_output_file, output_file

OWN_FOLDER = "predictions"  # The one folder of a run's workdir that predict writes into.
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training run's --workdir (the images follow the "
                    "flags: --workdir RUN [--flags] IMAGE..., image files, folders or .npy).",
                    flag_values=FLAGS)
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "The run's checkpoint.",
                  flag_values=FLAGS)
flags.DEFINE_integer("top_k", 5, "Classes shown per image.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("tta", "none", list(TTA_MODES), "flip: average with the mirror image.",
                  flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per model call.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("output", "", "Also write the predictions to this new .csv or .json file "
                    f"(inside a run's workdir: under RUN/{OWN_FOLDER}/).", flag_values=FLAGS)
flags.DEFINE_boolean("force", False, "Replace an earlier --output file of predict.",
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


def _csv_header(k: int) -> list[str]:
    return ["file"] + [x for i in range(1, k + 1) for x in (f"class_{i}", f"prob_{i}")]


def write_output(rows: list[dict[str, Any]], path: str) -> None:
    """CSV (file, class_1, prob_1, ...) or JSON (a list of {"file", "top": [{"class",
    "probability"}, ...]}), written aside and renamed into place (workdir.output_file)."""
    with output_file(path) as out:
        if path.endswith(".json"):
            data = [{"file": r["file"], "top": [{"class": c, "probability": p}
                                                for c, p in r["top"]]} for r in rows]
            out.write_text(json.dumps(data, indent=2))
            return
        with out.open("w") as f:
            w = csv.writer(f)
            w.writerow(_csv_header(len(rows[0]["top"])))
            for r in rows:
                w.writerow([r["file"]] + [x for c, p in r["top"] for x in (c, f"{p:.6f}")])


def is_predictions_file(path: epath.Path) -> bool:
    """Whether ``path`` is a file write_output wrote: a CSV with its exact header and at least
    one row, each of its length with probabilities in [0, 1]; a JSON list of exactly its
    records. Anything else (another CSV, a run's config.json, an unreadable file) is not."""
    try:
        if path.name.endswith(".json"):
            return _is_predictions_json(json.loads(path.read_text()))
        with path.open() as f:
            reader = csv.reader(f)
            header = next(reader, [])
            k = (len(header) - 1) // 2
            rows = 0
            for row in reader:
                if len(row) != len(header) or not all(0 <= float(p) <= 1 for p in row[2::2]):
                    return False
                rows += 1
            return k >= 1 and header == _csv_header(k) and rows > 0
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return False


def _is_predictions_json(data: Any) -> bool:
    def is_class(t: Any) -> bool:
        return (isinstance(t, dict) and set(t) == {"class", "probability"}
                and isinstance(t["class"], str) and type(t["probability"]) in (int, float)
                and 0 <= t["probability"] <= 1)

    def is_record(d: Any) -> bool:
        return (isinstance(d, dict) and set(d) == {"file", "top"} and isinstance(d["file"], str)
                and isinstance(d["top"], list) and bool(d["top"]) and all(map(is_class, d["top"])))

    return isinstance(data, list) and bool(data) and all(map(is_record, data))


def check_output(path: str, force: bool = False) -> None:
    """``--output`` before any work (a slip found after the predictions would lose them): a .csv
    or .json file, not a folder, that predict may write (workdir.check_output_file: a new file,
    or with ``force`` an earlier predictions file; in a run's workdir only under
    ``<run>/predictions/``), whose folder exists (else it is made here) and takes a file."""
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
    check_output_file(path, force, "predict", is_predictions_file, OWN_FOLDER)
    with user_errors(lambda e: f"--output={path}: cannot write into {out.parent} "
                     f"({type(e).__name__}: {e.strerror or e}); choose another --output.", OSError):
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".predict_write_test.{id(path)}"
        probe.write_text("")
        probe.unlink()


def _file_in_the_way(folder: epath.Path) -> epath.Path | None:
    """The nearest existing one of ``folder`` and its parents when it is a file (no folder can
    be made there), else None."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _main(argv: list[str]) -> str | None:
    if len(argv) < 2:
        raise UserError("no images given: pass image files, folders or .npy files after the "
                        "flags (python -m cifar_flax.predict --workdir RUN images/).")
    if FLAGS.output:
        check_output(FLAGS.output, FLAGS.force)
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
