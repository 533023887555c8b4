"""The report files: numbers that agree with the predictions, images that are images."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cifar_flax.analysis.report import write_report


def test_report_files_agree_with_predictions(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 2, 2, 0]] * 5.0
    history = [
        {"step": 0, "kind": "phase", "index": 0, "name": "head"},
        {"step": 2, "kind": "train", "loss": 1.0, "accuracy": 0.5},
        {"step": 2, "kind": "eval", "val_loss": 0.9, "val_accuracy": 0.6},
        {"step": 2, "kind": "phase", "index": 1, "name": "all"},
        {"step": 4, "kind": "train", "loss": 0.5, "accuracy": 0.8},
        {"step": 4, "kind": "eval", "val_loss": 0.7, "val_accuracy": 0.7},
    ]
    results = {"test_accuracy": 5 / 7, "test_loss": 0.3, "test_examples": 7,
               "tested_checkpoint": "best", "tested_step": 4, "best_val_accuracy": 0.7,
               "steps": 4, "wall_seconds": 1.0, "images_per_sec": 10.0, "devices": 1}
    write_report(str(tmp_path), history, labels, logits, ["cat", "dog", "frog"], results)

    report = json.loads((tmp_path / "classification_report.json").read_text())
    assert report["cat"]["recall"] == 0.5 and report["cat"]["precision"] == 0.5
    assert report["dog"]["precision"] == 2 / 3 and report["frog"]["recall"] == 2 / 3
    assert "frog" in (tmp_path / "classification_report.txt").read_text()
    pred = np.load(tmp_path / "predictions.npz")
    assert np.mean(pred["predictions"] == pred["labels"]) == json.loads(
        (tmp_path / "results.json").read_text())["test_accuracy"]
    for name in ("curves.png", "confusion_matrix.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 5  # Not a blank canvas.
    md = (tmp_path / "report.md").read_text()
    assert "curves.png" in md and "confusion_matrix.png" in md and "0.7143" in md


def test_confusion_matrix_rows_are_true_classes_columns_predictions():
    from cifar_flax.analysis.report import confusion_figure

    labels = np.array([0, 0, 0, 1, 2])  # Three true 0s: two predicted 1, one predicted 2.
    predictions = np.array([1, 1, 2, 1, 2])
    fig = confusion_figure(labels, predictions, ["a", "b", "c"])
    ax = fig.axes[0]
    plotted = np.asarray(ax.images[0].get_array())
    np.testing.assert_array_equal(plotted, [[0, 2, 1], [0, 1, 0], [0, 0, 1]])
    assert ax.get_ylabel() == "True label" and ax.get_xlabel() == "Predicted label"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]


def test_curves_phase_names_inside_the_figure_and_non_finite_marked():
    from cifar_flax.analysis.report import curves_figure

    history = [
        {"step": 0, "kind": "phase", "index": 0, "name": "head"},
        {"step": 2, "kind": "train", "loss": 1.0, "accuracy": 0.5},
        {"step": 4, "kind": "phase", "index": 1, "name": "a-long-phase-name"},
        {"step": 6, "kind": "train", "loss": None, "accuracy": 0.1},  # null in metrics.jsonl
    ]
    fig = curves_figure(history)
    fig.canvas.draw()
    box = fig.bbox
    from matplotlib.text import Text

    names = [t for t in fig.findobj(Text) if t.get_text() in ("head", "a-long-phase-name")
             and t.get_visible()]
    assert len(names) == 4  # Both names on both panels ...
    plot_top = max(ax.bbox.y1 for ax in fig.axes)
    for t in names:  # ... drawn entirely inside the image, above the curves (never over them).
        e = t.get_window_extent()
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, t
        assert e.y0 >= plot_top - 1, t
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "train loss not finite from step 6" in labels


def test_results_json_stays_valid_json_with_non_finite_values(tmp_path):
    results = {"test_accuracy": 0.25, "test_loss": float("nan"), "test_examples": 4,
               "tested_checkpoint": "last", "tested_step": 2, "best_val_loss": float("inf"),
               "steps": 2, "wall_seconds": 1.0, "images_per_sec": 1.0, "devices": 1}
    write_report(str(tmp_path), [], np.array([0, 1, 0, 1]), np.eye(2)[[0, 0, 0, 0]],
                 ["a", "b"], results)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["test_loss"] is None and loaded["best_val_loss"] is None
