"""Classify images with a trained run: ``python -m cifar_flax.predict --workdir RUN INPUT...``.

INPUT: image files, folders (recursively) or ``.npy`` files of uint8 (N, H, W, 3) images. The
run's config, class names, input size and best checkpoint (``--checkpoint latest`` for its last)
come from RUN. Images are read and resized the way the run's pipeline did (inference/images.py),
then go through the run's evaluation step. Prints a table of the top-k classes per image;
``--output preds.csv`` or ``preds.json`` also writes them. Bad inputs: one ``error:`` line, exit 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Sequence

from cifar_flax.inference.cli import run_cli

TTA_MODES = ("none", "flip")  # inference/predictor.py's (imported lazily: it imports jax + TF).


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_flax.predict",
                                description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, .npy files")
    p.add_argument("--workdir", required=True, help="the training run's --workdir")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--tta", default="none", choices=TTA_MODES, help="flip: average with the mirror")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", default="", help="preds.csv or preds.json")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable files (and count)")
    return p


def predict(workdir: str, inputs: Sequence[str], top_k: int = 5, tta: str = "none",
            batch_size: int = 64, checkpoint: str = "best", skip_bad: bool = False
            ) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, skipped files): per image ``{"file", "top": [(class, probability), ...],
    "logits": np.ndarray (C,)}`` in input order."""
    import numpy as np

    from cifar_flax.inference.images import ImageInputs, InputError
    from cifar_flax.inference.trained_run import Predictor
    from cifar_flax.inference.trained_run import load_run

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
        raise InputError(f"no readable images among {list(inputs)} "
                         f"({len(images.skipped)} skipped).")
    return rows, images.skipped


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
    from etils import epath

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


def _main(argv: Sequence[str]) -> int:
    from cifar_flax.inference.images import InputError

    args = _parser().parse_args(argv)
    if args.output and not args.output.endswith((".csv", ".json")):
        raise InputError(f"--output={args.output} must end in .csv or .json.")
    if args.batch_size < 1 or args.top_k < 1:
        raise InputError("--batch-size and --top-k must be >= 1.")
    rows, skipped = predict(args.workdir, args.inputs, args.top_k, args.tta, args.batch_size,
                            args.checkpoint, args.skip_bad)
    print(format_table(rows))
    if skipped:
        print(f"skipped {len(skipped)} bad files (--skip-bad), e.g. {skipped[0]}", file=sys.stderr)
    if args.output:
        write_output(rows, args.output)
        print(f"wrote {len(rows)} predictions to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 with one ``error:`` line on bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
