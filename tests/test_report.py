"""The report files: numbers that agree with the predictions, images that are images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cifar_flax import evaluate
from cifar_flax.analysis import calibration
from cifar_flax.analysis import report as report_module
from cifar_flax.analysis.report import write_report

RESULTS = {"test_accuracy": 0.5, "test_loss": 0.3, "test_examples": 10,
           "tested_checkpoint": "best", "tested_step": 7, "steps": 7, "wall_seconds": 1.0,
           "images_per_sec": 10.0, "devices": 1}


def _saved_figures(monkeypatch) -> dict:
    """File name -> the Figure that write_report saves there (still saved as a PNG)."""
    saved, save = {}, report_module._save_figure
    monkeypatch.setattr(report_module, "_save_figure",
                        lambda fig, path: (saved.__setitem__(path.name, fig), save(fig, path)))
    return saved


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
    assert "confusion_matrix.json" in md
    raw = calibration.metrics(logits, labels)  # No temperature given: raw calibration only.
    assert f"| raw | {raw['ece']:.4f} | {raw['nll']:.4f} | {raw['brier']:.4f} |" in md
    assert json.loads((tmp_path / "results.json").read_text())["calibration"]["raw"] == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(report_module.REPORT_FILES)


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


def test_report_confusion_json_and_figure_have_rows_true_columns_predicted(tmp_path, monkeypatch):
    # Asymmetric: four class-0 images predicted as 2, no class-2 image predicted as 0.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    predictions = np.array([2, 2, 2, 2, 0, 1, 2, 2, 2, 1])
    expected = [[1, 0, 4], [0, 1, 1], [0, 1, 2]]  # [true][predicted]
    figures = _saved_figures(monkeypatch)
    write_report(str(tmp_path), None, labels, np.eye(3)[predictions], ["a", "b", "c"],
                 RESULTS | {"run": "r", "dataset": "d", "split": "test"})

    saved = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert saved["class_names"] == ["a", "b", "c"]
    assert (saved["rows"], saved["columns"]) == ("true class", "predicted class")
    assert saved["counts"] == expected and saved["counts"][0][2] == 4 and saved["counts"][2][0] == 0
    assert "curves.png" not in figures  # An evaluation report: no training curves.
    ax = figures["confusion_matrix.png"].axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)
    assert ax.get_xlabel().startswith("Predicted") and ax.get_ylabel().startswith("True")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


@pytest.mark.parametrize("n", [3, 10])
def test_report_confusion_figure_has_colour_bar_and_matrix_fills_it(tmp_path, monkeypatch, n):
    names = ["automobile_long_name"] + [f"class_{i}" for i in range(1, n)]
    labels = np.arange(4 * n) % n
    figures = _saved_figures(monkeypatch)
    write_report(str(tmp_path), [], labels, np.eye(n)[(labels + labels // n) % n], names,
                 RESULTS)
    fig = figures["confusion_matrix.png"]
    fig.draw_without_rendering()
    matrix = fig.axes[0]
    assert matrix.images[0].colorbar is not None
    assert any(a is matrix.images[0].colorbar.ax for a in fig.axes[1:])
    box = matrix.get_position()  # Figure fractions.
    assert box.width > 0.6 and box.height > 0.6, box
    whole = fig.bbox
    for text in [*matrix.get_xticklabels(), *matrix.get_yticklabels(),
                 matrix.xaxis.label, matrix.yaxis.label, matrix.title]:
        e = text.get_window_extent()  # Every name, label and title fully inside the image.
        assert whole.x0 <= e.x0 and e.x1 <= whole.x1 and whole.y0 <= e.y0 and e.y1 <= whole.y1, text
    counts = np.asarray(matrix.images[0].get_array())
    cells = matrix.get_window_extent()  # Each count drawn within the matrix.
    assert len(matrix.texts) == n * n and all(
        cells.contains(*t.get_window_extent().get_points().mean(0)) for t in matrix.texts)
    assert sum(int(t.get_text()) for t in matrix.texts) == counts.sum() == 4 * n


# matplotlib's default ticks for steps 1..3 are 1.25, 1.5, ... and for 1..20 2.5, 5, 7.5, ...
@pytest.mark.parametrize("last", [3, 7, 20])
def test_curves_step_ticks_are_integers(last):
    from cifar_flax.analysis.report import curves_figure

    history = [{"step": 1, "kind": "phase", "index": 0, "name": "head"},
               *({"step": s, "kind": "train", "loss": 1 / s, "accuracy": s / last}
                 for s in range(1, last + 1)),
               {"step": 2, "kind": "phase", "index": 1, "name": "all"}]
    fig = curves_figure(history)
    fig.draw_without_rendering()
    for ax in fig.axes:
        for axis in (ax, *ax.child_axes):  # The panel and its phase-name axis on top.
            ticks = axis.xaxis.get_majorticklocs()
            assert len(ticks) >= 2 and all(t == round(t) for t in ticks), ticks


def test_smoke_runs_report_has_calibration_fitted_on_its_validation_split(smoke_run):
    report = smoke_run / "report"
    results = json.loads((report / "results.json").read_text())
    block, saved = results["calibration"], np.load(report / "predictions.npz")
    labels, logits = saved["labels"], saved["logits"]
    assert block["bins"] == 15 and block["fitted_on"] == "validation (64 examples)"
    assert block["raw"] == pytest.approx(calibration.metrics(logits, labels))
    assert block["raw"]["nll"] == pytest.approx(results["test_loss"], rel=1e-4)
    assert block["scaled"] == pytest.approx(
        calibration.metrics(logits, labels, block["temperature"]))
    md = (report / "report.md").read_text()
    assert "## Calibration (test)" in md and "![reliability diagram](reliability.png)" in md
    assert f"| T = {block['temperature']:.3f} | {block['scaled']['ece']:.4f} |" in md
    with Image.open(report / "reliability.png") as im:
        assert im.size[0] > 800 and np.asarray(im.convert("L")).std() > 5  # Two panels, drawn.


@pytest.mark.slow
def test_evaluate_takes_the_runs_temperature_or_fits_it_on_the_runs_validation_split(
        smoke_run, tmp_path):
    """evaluate applies the temperature of the run's report; without one it fits it on the run's
    validation split (the same number: train.py handed the report the tested weights' validation
    logits), never on the split it evaluates."""
    trained = json.loads((smoke_run / "report" / "results.json").read_text())["calibration"]
    got = evaluate.evaluate(str(smoke_run), str(tmp_path / "eval"))["calibration"]
    assert got["temperature"] == trained["temperature"]
    assert got["fitted_on"] == "the run's validation (64 examples), from its report"
    run = tmp_path / "run"  # An older run: a report without the calibration block.
    shutil.copytree(smoke_run, run)
    results = json.loads((run / "report" / "results.json").read_text())
    del results["calibration"]
    (run / "report" / "results.json").write_text(json.dumps(results))
    refit = evaluate.evaluate(str(run), str(tmp_path / "eval2"))["calibration"]
    assert refit["fitted_on"] == "the run's validation (64 examples), fitted here"
    assert refit["temperature"] == pytest.approx(trained["temperature"], rel=1e-3)
    saved = np.load(tmp_path / "eval2" / "predictions.npz")
    on_test = calibration.fit_temperature(saved["logits"], saved["labels"])
    assert abs(on_test - refit["temperature"]) > 0.05 * refit["temperature"], on_test
