"""Calibration: ECE, NLL and Brier against hand-computed cases, the temperature recovered and
fitted on the validation split only, and the training report's calibration block."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import sklearn
from etils import epath
from sklearn.metrics import brier_score_loss, log_loss

from cifar_flax import evaluate, main
from cifar_flax.analysis import calibration
from cifar_flax.analysis.calibration import Temperature


def test_ece_of_a_hand_computed_case():
    # 15 bins of width 1/15; bin m (from 0) holds m/15 < confidence <= (m+1)/15.
    probs = np.array([[0.90, 0.05, 0.05],   # conf 0.90 -> bin 13 (0.867, 0.933], right
                      [0.90, 0.05, 0.05],   # conf 0.90 -> bin 13, wrong (label 1)
                      [0.50, 0.30, 0.20],   # conf 0.50 -> bin 7 (0.467, 0.533], right
                      [0.32, 0.48, 0.20],   # conf 0.48 -> bin 7, wrong (label 0)
                      [0.70, 0.20, 0.10],   # conf 0.70 -> bin 10 (0.667, 0.733], right
                      [0.60, 0.30, 0.10],   # conf 0.60 = 9/15 -> bin 8 (0.533, 0.6], wrong
                      [1.00, 0.00, 0.00]])  # conf 1.00 -> bin 14 (0.933, 1], right
    labels = np.array([0, 1, 0, 0, 0, 1, 0])
    # bin 13: 2 examples, accuracy 1/2, confidence 0.90 -> gap 0.40
    # bin  7: 2 examples, accuracy 1/2, confidence (0.50 + 0.48) / 2 = 0.49 -> gap 0.01
    # bin 10: 1 example, accuracy 1, confidence 0.70 -> gap 0.30
    # bin  8: 1 example, accuracy 0, confidence 0.60 -> gap 0.60 (an edge: the lower bin)
    # bin 14: 1 example, accuracy 1, confidence 1.00 -> gap 0
    # ECE = (2 * 0.40 + 2 * 0.01 + 1 * 0.30 + 1 * 0.60 + 1 * 0) / 7 = 1.72 / 7 = 0.245714...
    assert calibration.ece(probs, labels) == pytest.approx(1.72 / 7, abs=1e-12)
    # One bin: |accuracy 4/7 - mean confidence 5.08/7| = 1.08 / 7 = 0.154286...
    assert calibration.ece(probs, labels, bins=1) == pytest.approx(1.08 / 7, abs=1e-12)
    count, accuracy, confidence = calibration.bin_stats(probs, labels)
    assert count.tolist() == [0] * 7 + [2, 1, 0, 1, 0, 0, 2, 1]
    assert (accuracy[13], confidence[7]) == (0.5, pytest.approx(0.49))


def test_nll_and_brier_of_a_tiny_case():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    labels = np.array([0, 2])
    # NLL = -(log 0.5 + log 0.3) / 2 = (0.693147 + 1.203973) / 2 = 0.948560
    assert calibration.nll(np.log(probs), labels) == pytest.approx(0.948560, abs=1e-6)
    # Brier, summed over classes: (0.25 + 0.0625 + 0.0625 = 0.375) and
    # (0.01 + 0.36 + 0.49 = 0.86), mean 0.6175
    assert calibration.brier(probs, labels) == pytest.approx(0.6175, abs=1e-12)
    # A temperature of 2 on logits 2 * log p gives back p.
    assert calibration.nll(2 * np.log(probs), labels, 2.0) == pytest.approx(0.948560, abs=1e-6)


def test_nll_and_brier_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (200, 4))
    labels = rng.integers(0, 4, 200)
    probs = calibration.probabilities(logits)
    assert calibration.nll(logits, labels) == pytest.approx(
        log_loss(labels, probs, labels=range(4)), rel=1e-9)
    if tuple(int(x) for x in sklearn.__version__.split(".")[:2]) >= (1, 7):  # multi-class Brier
        assert calibration.brier(probs, labels) == pytest.approx(
            brier_score_loss(labels, probs, labels=range(4), scale_by_half=False), rel=1e-9)


def _sampled(n: int, classes: int, t0: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / t0): the calibrating temperature of z is t0."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, classes))
    p = calibration.probabilities(logits, t0)
    labels = np.minimum((rng.random((n, 1)) > p.cumsum(-1)).sum(-1), classes - 1)
    return logits, labels


@pytest.mark.parametrize("t0", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(t0):
    logits, labels = _sampled(20000, 10, t0, seed=1)
    t = calibration.fit_temperature(logits, labels)
    assert t == pytest.approx(t0, rel=0.05)
    # It is the minimum: a little either way is worse.
    assert calibration.nll(logits, labels, t) < min(
        calibration.nll(logits, labels, t * 0.97), calibration.nll(logits, labels, t * 1.03))


def test_a_temperature_keeps_every_prediction_and_one_that_would_not_is_refused():
    """Any temperature the fit can give (its bounds and between) keeps every prediction; one
    that is not positive and finite (-1 flips the order) is refused where it is made, with a
    ValueError that names it (also under ``python -O``)."""
    logits, labels = _sampled(500, 5, 2.0, seed=2)
    block = calibration.summary(logits, labels, Temperature(2.0, "validation (9 examples)"))
    assert block["temperature"] == 2.0 and block["fitted_on"] == "validation (9 examples)"
    assert block["scaled"]["nll"] == pytest.approx(calibration.nll(logits, labels, 2.0))
    assert block["scaled"]["ece"] < block["raw"]["ece"]  # Over-confident logits, cooled.
    for t in (np.exp(calibration.LOG_T_BOUNDS[0]), 2.0, np.exp(calibration.LOG_T_BOUNDS[1])):
        np.testing.assert_array_equal(
            calibration.probabilities(logits, Temperature(t, "a fit").value).argmax(-1),
            logits.argmax(-1))
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"temperature .* \(bogus\): a temperature is a "
                           "positive finite number"):
            Temperature(bad, "bogus")


def test_reliability_figure_draws_each_bins_accuracy_and_count():
    logits, labels = _sampled(300, 4, 2.0, seed=3)
    fig = calibration.reliability_figure(logits, labels, 2.0)
    assert len(fig.axes) == 4  # Raw and scaled: accuracy above, counts below.
    for column, t in enumerate((None, 2.0)):
        count, accuracy, _ = calibration.bin_stats(calibration.probabilities(logits, t), labels)
        top, bottom = fig.axes[column], fig.axes[2 + column]
        bars = top.containers[0]  # The accuracy bars, one per non-empty bin.
        np.testing.assert_allclose([b.get_height() for b in bars], accuracy[count > 0])
        np.testing.assert_allclose([b.get_height() for b in bottom.containers[0]], count)
        assert sum(b.get_height() for b in bottom.containers[0]) == 300
    assert len(calibration.reliability_figure(logits, labels, None).axes) == 2


def _fake_training(test: tuple, validation: dict | None):
    """A train_and_evaluate that only hands main.run's report_fn the given test and validation
    logits (as train.py does after training)."""
    def run(config, workdir, stop_after_steps, report_fn):
        labels, logits = test
        results = {"test_accuracy": float(np.mean(logits.argmax(-1) == labels)),
                   "test_loss": calibration.nll(logits, labels), "test_examples": len(labels),
                   "tested_checkpoint": "best", "tested_step": 1, "steps": 1,
                   "wall_seconds": 1.0, "images_per_sec": 1.0, "devices": 1}
        report_fn([], labels, logits, ["a", "b", "c", "d"], results, validation)
        return results
    return run


def test_the_run_fits_its_temperature_on_validation_never_on_test(
        tmp_path, monkeypatch, smoke_config):
    val_logits, val_labels = _sampled(4000, 4, 0.5, seed=4)  # Calibrated at T = 0.5 ...
    test = _sampled(4000, 4, 3.0, seed=5)[::-1]  # ... the test logits at T = 3.
    fitted = calibration.fit_temperature(val_logits, val_labels)
    assert fitted < 0.6 < 2.5 < calibration.fit_temperature(test[1], test[0])
    monkeypatch.setattr(main, "train_and_evaluate", _fake_training(
        test, {"labels": val_labels, "logits": val_logits, "count": 4000}))
    results = main.run(smoke_config, str(tmp_path))

    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["calibration"] == results["calibration"]
    block = saved["calibration"]
    assert block["temperature"] == pytest.approx(fitted, rel=1e-9)
    assert block["fitted_on"] == "validation (4000 examples)" and block["bins"] == 15
    assert block["raw"]["nll"] == pytest.approx(saved["test_loss"])
    assert block["scaled"]["nll"] == pytest.approx(calibration.nll(test[1], test[0], fitted))
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| T = {fitted:.3f} | {block['scaled']['ece']:.4f} |" in md
    assert "validation (4000 examples)" in md and "reliability.png" in md
    assert (tmp_path / "report" / "reliability.png").stat().st_size > 0


def test_a_run_without_validation_data_reports_raw_calibration_only(
        tmp_path, monkeypatch, smoke_config):
    test = _sampled(100, 4, 3.0, seed=6)[::-1]
    monkeypatch.setattr(main, "train_and_evaluate", _fake_training(test, None))
    main.run(smoke_config, str(tmp_path))

    block = json.loads((tmp_path / "report" / "results.json").read_text())["calibration"]
    assert block["temperature"] is None and block["scaled"] is None
    assert block["note"] == "no validation split: no temperature fitted"
    assert block["raw"]["ece"] == pytest.approx(
        calibration.ece(calibration.probabilities(test[1]), test[0]))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "No temperature: no validation split" in md and "| T = " not in md
    assert (tmp_path / "report" / "reliability.png").stat().st_size > 0


def test_no_temperature_is_fitted_on_non_finite_validation_logits():
    bad = {"labels": np.array([0, 1]), "logits": np.array([[0.0, np.nan], [1.0, 0.0]])}
    t = calibration.from_validation(bad)
    assert t.value is None and "non-finite" in t.fitted_on


def test_a_fit_at_the_searchs_bound_is_no_temperature_and_says_why():
    """A validation NLL with no minimum inside [0.01, 100] gives no temperature, with the
    reason: every prediction right (sharpening only helps; T = 0.01 would make the test
    predictions' NLL explode), or one confidently wrong example among good ones (T = 100
    flattens everything to pay for it, as in the data-efficiency sweep's `linear` rows)."""
    logits, labels = _sampled(400, 5, 1.0, seed=4)
    right = logits.argmax(-1)
    sharpen = calibration.from_validation({"labels": right, "logits": logits})
    assert sharpen.value is None
    assert "T = 0.01" in sharpen.fitted_on and "every validation prediction is right" in (
        sharpen.fitted_on)
    wrong = logits.copy()
    wrong[7] = 0.0
    wrong[7, (right[7] + 1) % 5] = 5000.0  # One example: sure and wrong, loss 5000.
    flatten = calibration.from_validation({"labels": right, "logits": wrong})
    assert flatten.value is None
    assert "T = 100" in flatten.fitted_on and "example 7 of 400 has a loss of 5000.0" in (
        flatten.fitted_on)
    block = calibration.summary(logits, labels, flatten)
    assert block["scaled"] is None and block["note"] == flatten.fitted_on
    inside = calibration.from_validation({"labels": labels, "logits": logits})
    assert inside.value == pytest.approx(1.0, rel=0.2) and inside.fitted_on.startswith(
        "validation (400 examples)")


@pytest.mark.parametrize("t, reused", [(2.0, True), (99.99995, False), (0.0100001, False)])
def test_evaluate_reuses_a_reports_temperature_only_inside_the_search(tmp_path, t, reused):
    """A run's report from before a fit at the bound meant "none" (T = 100 in the sweep's
    `linear` rows) is not reused: evaluate fits again, under today's rule."""
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text(json.dumps({
        "tested_step": 5, "calibration": {"temperature": t, "fitted_on": "validation (9)"}}))
    run = types.SimpleNamespace(workdir=epath.Path(tmp_path), checkpoint=types.SimpleNamespace(
        step=5))
    got = evaluate._from_report(run)
    assert (got is not None and got.value == t) if reused else got is None
