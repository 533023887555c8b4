"""The report files: numbers that agree with the predictions, images that are images."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cifar_flax.report import write_report


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
