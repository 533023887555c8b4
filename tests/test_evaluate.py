"""evaluate: the run's checkpoint on a split, the training report's files, one-line errors."""

from __future__ import annotations

import json

import numpy as np
from inference_utils import image_folder

from cifar_flax import evaluate


def test_reproduces_the_runs_test_accuracy_and_report(smoke_run, tmp_path, capsys):
    """On the run's own test split: results.json's test accuracy exactly, the same predictions,
    and every report file of training."""
    out = tmp_path / "eval"
    assert evaluate.main(["--workdir", str(smoke_run), "--output", str(out)]) == 0
    assert "report in" in capsys.readouterr().out
    trained = json.loads((smoke_run / "report" / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    assert got["test_accuracy"] == trained["test_accuracy"]
    assert got["test_examples"] == trained["test_examples"]
    assert got["tested_step"] == trained["tested_step"]
    a, b = np.load(smoke_run / "report" / "predictions.npz"), np.load(out / "predictions.npz")
    np.testing.assert_array_equal(a["predictions"], b["predictions"])
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
    for name in ("confusion_matrix.png", "classification_report.txt",
                 "classification_report.json", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "curves.png").exists()  # An evaluation has no training curves.


def test_another_dataset_with_the_same_classes(smoke_run, tmp_path):
    """An ImageFolder of mixed sizes and modes with the run's class names, only a 'test' split
    (no train split needed); every image counted once."""
    classes = json.loads((smoke_run / "run_info.json").read_text())["class_names"]
    paths = image_folder(tmp_path / "data", classes, split="holdout")
    results = evaluate.evaluate(str(smoke_run), str(tmp_path / "eval"), split="holdout",
                                overrides={"dataset": f"imagefolder:{tmp_path / 'data'}"})
    assert results["test_examples"] == len(paths)
    assert results["split"] == "holdout" and results["dataset"].startswith("imagefolder:")
    assert 0.0 <= results["test_accuracy"] <= 1.0


def test_class_name_mismatch_lists_both(smoke_run, tmp_path, capsys):
    image_folder(tmp_path / "data", ["cat", "dog"])
    argv = ["--workdir", str(smoke_run), "--output", str(tmp_path / "eval"),
            f"--config.dataset=imagefolder:{tmp_path / 'data'}"]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "['cat', 'dog']" in err[0] and "'class_3'" in err[0]
    assert not (tmp_path / "eval").exists()


def test_bad_override_is_one_error_line(smoke_run, tmp_path, capsys):
    for arg, text in [("--config.eval_bath_size=1", "did you mean --config.eval_batch_size"),
                      ("--config.eval_batch_size=x", "eval_batch_size"),
                      ("--bogus", "unknown flag --bogus;")]:
        assert evaluate.main(["--workdir", str(smoke_run), "--output", str(tmp_path), arg]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], err
