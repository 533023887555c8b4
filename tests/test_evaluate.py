"""evaluate: the run's checkpoint on a split, the training report's files, one-line errors, and
the temperature of its calibration block (never fitted on the images evaluated)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_config
from inference_utils import image_folder
from train_utils import steps_saved, tiny_config

from cifar_flax import UserError, evaluate, main
from cifar_flax.config import phase
from cifar_flax.data import sources


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


def _stand_in(workdir, report_temperature: float | None = None, **config_fields):
    """What run_temperature reads of a TrainedRun before any model: the smoke config with
    ``config_fields``, checkpoint step 1, and (``report_temperature``) a report that tested it."""
    config = load_config("smoke")
    for field, value in config_fields.items():
        config[field] = value
    if report_temperature is not None:
        (workdir / "report").mkdir()
        block = {"temperature": report_temperature, "fitted_on": "validation (64 examples)"}
        (workdir / "report" / "results.json").write_text(
            json.dumps({"tested_step": 1, "calibration": block}))
    return types.SimpleNamespace(config=config, workdir=workdir,
                                 checkpoint=types.SimpleNamespace(step=1), model=None,
                                 mesh=None, preprocessing=None, variables=None)


@pytest.mark.parametrize("fields, split, temperature", [
    ({"val_split": "validation"}, "validation", None),  # The run's named validation split.
    ({"val_split": "validation"}, "test", 1.5),
    ({"val_split": "validation"}, "train", 1.5),  # Training images, none of them validation.
    ({"val_fraction": 0.25}, "train", None),  # Its validation images are held out of train.
    ({"val_fraction": 0.25}, "test", 1.5),
    ({"val_fraction": 0.0}, "train", 1.5),  # No validation: train holds none of it.
])
def test_no_temperature_on_the_runs_own_validation_images(tmp_path, fields, split, temperature):
    """The split the run's validation images come from gets no temperature, not even the one
    of its report (fitted on those very images), and the reason; any other split the report's."""
    run = _stand_in(tmp_path, report_temperature=1.5, **fields)
    t = evaluate.run_temperature(run, split, {})
    assert t.value == temperature
    if temperature is None:
        assert t.fitted_on == (f"split {split!r} holds the run's validation images, on which its "
                               "temperature is fitted, so none is applied to them")


def test_evaluating_the_split_the_validation_was_held_out_of_reports_no_temperature(
        smoke_run, tmp_path):
    """The smoke run held a quarter of its train split out for validation: evaluating that
    split reports raw calibration only, and says why."""
    results = evaluate.evaluate(str(smoke_run), str(tmp_path / "eval"), split="train")
    block = results["calibration"]
    assert results["split"] == "train" and block["temperature"] is None
    # The training images (hold-out included), not the test images under the train split's name.
    assert results["test_examples"] == load_config("smoke").synthetic.num_train
    assert "split 'train' holds the run's validation images" in block["note"]
    assert "No temperature: split 'train' holds" in (tmp_path / "eval" / "report.md").read_text()


def test_the_temperature_reads_the_runs_data_where_given_and_never_downloads(
        tmp_path, monkeypatch):
    """A run on tfds cifar10 (no report): its validation data is looked up in the --config.
    data_dir given to evaluate (not the run's, nor the --config.dataset evaluated), and, not
    prepared there, is not downloaded (as if online): no temperature, the reason naming it."""
    downloads = []
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: downloads.append(self.name))
    monkeypatch.setattr(sources, "_unresolved_host", lambda builder: None)  # As if online.
    run = _stand_in(tmp_path, dataset="cifar10", data_dir=str(tmp_path / "old"))
    new = tmp_path / "new"
    t = evaluate.run_temperature(run, "test", {"data_dir": str(new),
                                               "dataset": f"imagefolder:{tmp_path}"})
    assert t.value is None and downloads == []
    assert t.fitted_on.startswith("the run's validation data cannot be read (tfds dataset "
                                  f"'cifar10' is not prepared in data_dir {str(new)!r}")
    assert "--config.data_dir=" in t.fitted_on


def test_a_temperature_that_cannot_be_fitted_is_reported_not_raised(tmp_path, monkeypatch):
    """A UserError while fitting (the validation pass refusing the batch size, say) is no
    temperature with that error as the reason, not the end of the evaluation."""
    def refuses(*args, **kwargs):
        raise UserError("config.eval_batch_size=48 must be a positive multiple of the device "
                        "count (5)")

    monkeypatch.setattr(evaluate, "Evaluator", lambda *args: refuses)
    t = evaluate.run_temperature(_stand_in(tmp_path), "test", {})
    assert t.value is None
    assert t.fitted_on == ("the run's validation data cannot be read (config.eval_batch_size=48 "
                           "must be a positive multiple of the device count (5))")


def test_the_temperature_is_decided_before_the_evaluation(smoke_run, tmp_path, monkeypatch):
    """Before the (corruption) work: whatever stops the temperature step stops the command
    before any image is evaluated or corrupted."""
    def stops(*args):
        raise UserError("the temperature step")

    monkeypatch.setattr(evaluate, "run_temperature", stops)
    monkeypatch.setattr(evaluate, "evaluate_corruptions", lambda *a: pytest.fail("corrupted"))
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a: pytest.fail("evaluated"))
    for shift in (None, evaluate.Corruptions(released=True)):
        with pytest.raises(UserError, match="the temperature step"):
            evaluate.evaluate(str(smoke_run), str(tmp_path / "eval"), shift=shift)


def test_a_run_that_tests_its_last_weights_is_read_with_them(tmp_path):
    """restore_best=False (configs/finetune.py's choice): the run tests its last weights, keeps no
    best checkpoint, and evaluate (like predict and export) reads those last weights: its
    accuracy on the run's test split is the run's. A best checkpoint here would be read instead
    of the tested one."""
    c = tiny_config()
    c.phases = [phase("all", steps=6, lr=0.05, schedule="constant")]
    c.early_stopping.enabled = c.early_stopping.restore_best = False
    c.eval_every_steps = 2
    run = tmp_path / "run"
    results = main.run(c, str(run))
    assert results["tested_checkpoint"] == "last" and steps_saved(str(run), "best") == []
    out = evaluate.evaluate(str(run), str(tmp_path / "ev"))
    assert out["tested_step"] == results["steps"] == 6
    assert out["test_accuracy"] == results["test_accuracy"]
