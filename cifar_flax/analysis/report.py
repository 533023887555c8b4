"""The end-of-run report in ``<workdir>/report/``.

- ``curves.png``: train and validation loss and accuracy over steps, phase starts marked;
- ``confusion_matrix.png`` (class names, colour bar) and ``confusion_matrix.json`` (its counts,
  row = true class, column = predicted class), ``classification_report.txt`` / ``.json``
  (per-class precision, recall, F1; scikit-learn);
- ``predictions.npz``: test ``labels``, ``predictions`` and ``logits``, so every number can be
  recomputed; ``results.json``: test accuracy/loss, best validation metric, steps, times, images/s,
  config; ``report.md`` embedding all of it;
- ``reliability.png`` and results.json's ``calibration`` block: ECE, NLL, Brier of the test
  predictions, raw and after the temperature fitted on the validation split (calibration.py).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from etils import epath
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    classification_report,
    confusion_matrix,
)

from cifar_flax.analysis import calibration

matplotlib.use("Agg")  # Files only, no display (pyplot picks its backend at the first figure).


def _series(history: Sequence[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in the records of ``kind``; a non-finite value (null in
    metrics.jsonl) is NaN, a gap in the line."""
    rows = [r for r in history if r["kind"] == kind and key in r]
    return [r["step"] for r in rows], [np.nan if r[key] is None else r[key] for r in rows]


def _mark_phases(ax: Any, history: Sequence[dict]) -> None:
    """A dashed line at each phase start, its name above the plot (outside the data area, so it
    is never cut or drawn over the curves). Its ticks are the phases' (integer) start steps."""
    starts = [(r["step"], r["name"]) for r in history if r["kind"] == "phase"]
    for step, _ in starts:
        ax.axvline(step, color="gray", ls="--", lw=0.8)
    top = ax.secondary_xaxis("top")
    top.set_xticks([s for s, _ in starts], [n for _, n in starts], fontsize=8, color="dimgray",
                   rotation=30, ha="left")
    top.tick_params(length=0)


def _mark_non_finite(ax: Any, steps: list[int], values: list[float], what: str) -> None:
    """A red line and label where ``values`` first stop being finite (a diverged run)."""
    bad = [s for s, v in zip(steps, values) if not np.isfinite(v)]
    if bad:
        ax.axvline(bad[0], color="red", ls=":", lw=1.2,
                   label=f"{what} not finite from step {bad[0]}")


def plot_curves(history: Sequence[dict], path: str) -> None:
    """curves_figure saved as a PNG at ``path``."""
    _save_figure(curves_figure(history), epath.Path(path))


def curves_figure(history: Sequence[dict]) -> Any:
    """Loss and accuracy (train per log interval, validation per evaluation), phases marked."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        train, val = _series(history, "train", metric), _series(history, "eval", f"val_{metric}")
        ax.plot(*train, label=f"train {metric}", lw=1)
        ax.plot(*val, "o-", label=f"val {metric}", ms=3)
        _mark_non_finite(ax, *train, f"train {metric}")
        _mark_phases(ax, history)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Steps: no ticks like 2.5.
        ax.set_xlabel("step")
        ax.set_title(metric, pad=22)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` x ``n`` confusion counts, ``[true class, predicted class]`` (scikit-learn),
    with a row and column for every class, seen or not."""
    return confusion_matrix(labels, predictions, labels=list(range(n)))


def confusion_figure(labels: np.ndarray, predictions: np.ndarray,
                     class_names: Sequence[str]) -> Any:
    """The confusion matrix as a figure: row = true class, column = predicted class (counts)."""
    return counts_figure(confusion_counts(labels, predictions, len(class_names)), class_names)


def counts_figure(counts: np.ndarray, class_names: Sequence[str]) -> Any:
    """``counts`` (row = true class, column = predicted class) drawn with a count in each cell
    and a colour bar, the matrix filling most of the figure."""
    fig, ax = plt.subplots(layout="constrained")
    shown = ConfusionMatrixDisplay(counts, display_labels=list(class_names)).plot(
        ax=ax, values_format="d", colorbar=False)
    fig.colorbar(shown.im_, ax=ax, fraction=0.05, pad=0.02)  # Slimmer than the default.
    # Rotated names end at their column's tick, instead of straddling it over their neighbours.
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_aspect("auto")  # The image fills its axes; _fit_to_matrix makes it (nearly) square.
    ax.set_title("Test confusion matrix")
    _fit_to_matrix(fig, ax, min_side=max(3.0, 0.5 * len(class_names)))
    return fig


def _fit_to_matrix(fig: Any, ax: Any, min_side: float) -> None:
    """Size ``fig`` so the matrix axes ``ax`` is a square of at least ``min_side`` inches and
    about two thirds of the figure or more each way, the rest just fitting the names, title and
    colour bar (constrained layout). A fixed figure size leaves a wide empty margin around a few
    classes, or squeezes the matrix beside long names."""
    for _ in range(2):  # The second pass settles the colour bar, whose width scales with ax.
        fig.draw_without_rendering()
        box, (width, height) = ax.get_position(), fig.get_size_inches()
        extra_w, extra_h = width * (1 - box.width), height * (1 - box.height)
        side = max(min_side, 2 * extra_w, 2 * extra_h)
        fig.set_size_inches(side + extra_w, side + extra_h)


def plot_confusion(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str],
                   path: str) -> None:
    """confusion_figure saved as a PNG at ``path``."""
    _save_figure(confusion_figure(labels, predictions, class_names), epath.Path(path))


def _summary(results: dict[str, Any], training: bool) -> list[str]:
    """The report's bullet lines: a training run's test result and training figures, or an
    evaluation's result and its own wall time."""
    tested = (f"{results['test_examples']} examples ({results['tested_checkpoint']} checkpoint, "
              f"step {results['tested_step']})")
    if not training:
        return [f"- Accuracy: **{results['test_accuracy']:.4f}** on {tested}",
                f"- Loss: {results['test_loss']:.4f}",
                f"- Run: {results['run']}; data: {results['dataset']} split "
                f"{results['split']!r}",
                f"- Evaluation wall time {results['wall_seconds']:.0f} s on "
                f"{results['devices']} device(s)"]
    best = {k: v for k, v in results.items() if k.startswith("best_")}
    rate = results.get("images_per_sec")  # None: no step was timed (each one compiled).
    bad = results.get("unstable")
    return [f"- Test accuracy: **{results['test_accuracy']:.4f}** on {tested}",
            f"- Test loss: {results['test_loss']:.4f}",
            *(f"- {k.replace('_', ' ')}: {v}" for k, v in best.items()),
            f"- Steps: {results['steps']}; wall time {results['wall_seconds']:.0f} s"
            + (f"; training throughput {rate:.1f} images/s" if rate else "")
            + f" on {results['devices']} device(s)",
            *([f"- **Unstable run**: the {bad['what']} reached {bad['value']:.4g} at step "
               f"{bad['step']} (phase {bad['phase']}), above {bad['limit']:.4g} = "
               f"{bad['limit'] / bad['chance_loss']:g} x the chance-level loss "
               f"{bad['chance_loss']:.4g}: lower that phase's learning rate"] if bad else [])]


def _markdown(results: dict[str, Any], text_report: str, training: bool) -> str:
    lines = [
        "# Run report" if training else "# Evaluation report",
        "",
        *_summary(results, training),
        "",
        *(["![curves](curves.png)", ""] if training else []),
        "![confusion matrix](confusion_matrix.png)",
        "",
        "## Classification report (test)" if training else "## Classification report",
        "",
        "```",
        text_report.rstrip(),
        "```",
        "",
        *_calibration_lines(results["calibration"]),
        "Details: `results.json` (with the full config), `classification_report.json`, "
        "`confusion_matrix.json` (counts, row = true class), `predictions.npz`.",
        "",
    ]
    return "\n".join(lines)


def _calibration_lines(block: dict[str, Any]) -> list[str]:
    """The report's calibration section: raw and temperature-scaled metrics, the diagram."""
    rows = [("raw", block["raw"])]
    if block["scaled"] is not None:
        rows.append((f"T = {block['temperature']:.3f}", block["scaled"]))
        where = f"Temperature fitted on {block['fitted_on']}."
    else:
        where = f"No temperature: {block['note']}."
    return ["## Calibration (test)", "",
            f"| | ECE ({block['bins']} bins) | NLL | Brier |", "| --- | --- | --- | --- |",
            *(f"| {name} | {m['ece']:.4f} | {m['nll']:.4f} | {m['brier']:.4f} |"
              for name, m in rows),
            "", f"{where} Brier is summed over classes (0 to 2); a temperature never changes "
            "a prediction, so the accuracy stays.", "",
            "![reliability diagram](reliability.png)", ""]


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None, so the file is valid JSON (``NaN`` is not)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _save_figure(fig: Any, path: epath.Path) -> None:
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


REPORT_FILES = ("predictions.npz", "classification_report.txt", "classification_report.json",
                "results.json", "curves.png", "confusion_matrix.png", "confusion_matrix.json",
                "reliability.png", "report.md")


def write_report(
    out_dir: str,
    history: Sequence[dict] | None,
    labels: np.ndarray,
    logits: np.ndarray,
    class_names: Sequence[str],
    results: dict[str, Any],
    temperature: calibration.Temperature | None = None,
) -> None:
    """Write the report files (REPORT_FILES) into ``out_dir`` (created; a local path or a
    ``gs://`` URL). ``history`` None: an evaluation of a trained run (no training curves).
    ``results`` gains its ``calibration`` block, with ``temperature`` (fitted on validation data
    by the caller) applied beside the raw numbers."""
    temperature = temperature or calibration.Temperature(None, "no temperature given")
    results["calibration"] = calibration.summary(logits, labels, temperature)
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = np.asarray(logits).argmax(-1)
    with (out / "predictions.npz").open("wb") as f:
        np.savez_compressed(f, labels=labels, predictions=predictions, logits=logits)
    kw = dict(labels=list(range(len(class_names))), target_names=list(class_names),
              zero_division=0)
    text = classification_report(labels, predictions, digits=4, **kw)
    (out / "classification_report.txt").write_text(text)
    per_class = classification_report(labels, predictions, output_dict=True, **kw)
    (out / "classification_report.json").write_text(json.dumps(per_class, indent=2))
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    if history is not None:
        _save_figure(curves_figure(history), out / "curves.png")
    counts = confusion_counts(labels, predictions, len(class_names))
    (out / "confusion_matrix.json").write_text(json.dumps(
        {"class_names": list(class_names), "rows": "true class", "columns": "predicted class",
         "counts": counts.tolist()}))
    _save_figure(counts_figure(counts, class_names), out / "confusion_matrix.png")
    _save_figure(calibration.reliability_figure(logits, labels, temperature.value),
                 out / "reliability.png")
    (out / "report.md").write_text(_markdown(results, text, history is not None))
