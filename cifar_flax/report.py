"""The end-of-run report in ``<workdir>/report/``.

- ``curves.png``: train and validation loss and accuracy over steps, phase starts marked;
- ``confusion_matrix.png`` (class names) and ``classification_report.txt`` / ``.json``
  (per-class precision, recall, F1; scikit-learn);
- ``predictions.npz``: test ``labels``, ``predictions`` and ``logits``, so every number can be
  recomputed; ``results.json``: test accuracy/loss, best validation metric, steps, times, images/s,
  config; ``report.md`` embedding all of it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report  # noqa: E402


def _series(history: Sequence[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in history if r["kind"] == kind and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_curves(history: Sequence[dict], path: str) -> None:
    """Loss and accuracy (train per log interval, validation per evaluation), phases marked."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(*_series(history, "train", metric), label=f"train {metric}", lw=1)
        ax.plot(*_series(history, "eval", f"val_{metric}"), "o-", label=f"val {metric}", ms=3)
        for r in history:
            if r["kind"] == "phase":
                ax.axvline(r["step"], color="gray", ls="--", lw=0.8)
                ax.annotate(r["name"], (r["step"], 1.0), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", ha="right", fontsize=8, color="gray")
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str],
                   path: str) -> None:
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n + 2), max(4, 0.6 * n + 1.5)))
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(n)), display_labels=list(class_names), ax=ax,
        xticks_rotation=45, colorbar=False, values_format="d",
    )
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(results: dict[str, Any], text_report: str) -> str:
    best = {k: v for k, v in results.items() if k.startswith("best_")}
    lines = [
        "# Run report",
        "",
        f"- Test accuracy: **{results['test_accuracy']:.4f}** on {results['test_examples']} "
        f"examples ({results['tested_checkpoint']} checkpoint, step {results['tested_step']})",
        f"- Test loss: {results['test_loss']:.4f}",
        *(f"- {k.replace('_', ' ')}: {v}" for k, v in best.items()),
        f"- Steps: {results['steps']}; wall time {results['wall_seconds']:.0f} s; "
        f"training {results['images_per_sec']:.1f} images/s on {results['devices']} device(s)",
        "",
        "![curves](curves.png)",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "## Classification report (test)",
        "",
        "```",
        text_report.rstrip(),
        "```",
        "",
        "Details: `results.json` (with the full config), `classification_report.json`, "
        "`predictions.npz`.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out_dir: str,
    history: Sequence[dict],
    labels: np.ndarray,
    logits: np.ndarray,
    class_names: Sequence[str],
    results: dict[str, Any],
) -> None:
    """Write every report file into ``out_dir`` (created)."""
    os.makedirs(out_dir, exist_ok=True)
    predictions = np.asarray(logits).argmax(-1)
    np.savez_compressed(os.path.join(out_dir, "predictions.npz"), labels=labels,
                        predictions=predictions, logits=logits)
    kw = dict(labels=list(range(len(class_names))), target_names=list(class_names),
              zero_division=0)
    text = classification_report(labels, predictions, digits=4, **kw)
    with open(os.path.join(out_dir, "classification_report.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "classification_report.json"), "w") as f:
        json.dump(classification_report(labels, predictions, output_dict=True, **kw), f, indent=2)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_curves(history, os.path.join(out_dir, "curves.png"))
    plot_confusion(labels, predictions, class_names, os.path.join(out_dir, "confusion_matrix.png"))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(results, text))
