"""Calibration of a classifier's probabilities: ECE, NLL, Brier, temperature scaling and the
reliability diagram (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

- ECE: the examples are put in ``bins`` equal-width bins of their confidence (the top softmax
  probability), bin m holding (m-1)/M < confidence <= m/M; ECE = sum over bins of
  (examples in bin / all) x |accuracy in bin - mean confidence in bin|.
- NLL: the mean of -log p(true class), from log-softmax of the logits (exact where a
  probability rounds to 0); without temperature it is the run's test loss.
- Brier: the multi-class Brier score of Brier (1950), mean over examples of
  sum over classes (p_k - onehot_k)^2, in [0, 2] (scikit-learn's ``brier_score_loss`` with
  ``scale_by_half=False``, which it has only from 1.7 and which halves two classes by default).
- Temperature: one scalar T > 0 dividing the logits, fitted by minimising the NLL of the
  *validation* split (never the test split); the predicted class never changes. NLL is convex
  in 1/T, so a bounded 1-D search on log T finds the one minimum. A fit at the search's bound
  (T = 0.01 or 100) means the validation NLL has no minimum there: every prediction right, or a
  few confidently wrong ones dominating the loss; then there is no temperature, and the report
  says which.

:func:`summary` is results.json's ``calibration`` block, raw and after the temperature;
:func:`reliability_figure` draws accuracy against confidence per bin, before and after.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from scipy import optimize, special

matplotlib.use("Agg")  # Files only, no display (pyplot picks its backend at the first figure).

BINS = 15
LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))  # T in [0.01, 100]; a fit at a bound is none.


@dataclasses.dataclass(frozen=True)
class Temperature:
    """A fitted temperature (``value`` None: none) and where it came from, or why there is none
    (``fitted_on``: e.g. "validation (5000 examples)" or "no validation split: ..."). A value is
    positive and finite (ValueError otherwise), so dividing by it keeps every prediction."""

    value: float | None
    fitted_on: str

    def __post_init__(self) -> None:
        if self.value is not None and not (np.isfinite(self.value) and self.value > 0):
            raise ValueError(f"temperature {self.value!r} ({self.fitted_on}): a temperature is a "
                             "positive finite number; another would change predictions.")


def probabilities(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Softmax of ``logits / temperature`` (float64; ``temperature`` None: 1)."""
    return special.softmax(_scaled(logits, temperature), axis=-1)


def _scaled(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    return np.asarray(logits, np.float64) / (1.0 if temperature is None else temperature)


def bin_stats(probs: np.ndarray, labels: np.ndarray,
              bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, accuracy, mean confidence) per equal-width confidence bin ((m-1)/M, m/M];
    accuracy and confidence are 0 in an empty bin."""
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")  # conf <= 1/M -> bin 0.
    count = np.bincount(index, minlength=bins).astype(np.float64)
    safe = np.maximum(count, 1)
    accuracy = np.bincount(index, weights=correct, minlength=bins) / safe
    mean_conf = np.bincount(index, weights=confidence, minlength=bins) / safe
    return count, accuracy, mean_conf


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins (module docstring)."""
    count, accuracy, confidence = bin_stats(probs, labels, bins)
    return float(np.sum(count * np.abs(accuracy - confidence)) / count.sum())


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float | None = None) -> float:
    """Mean -log p(true class) of softmax(``logits`` / ``temperature``)."""
    log_p = special.log_softmax(_scaled(logits, temperature), axis=-1)
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - onehot_k)^2, in [0, 2]."""
    onehot = np.eye(probs.shape[-1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising ``nll(logits, labels, T)``: bounded Brent search on log T (NLL is
    convex in 1/T, hence unimodal in log T). Give it validation logits, never test ones."""
    found = optimize.minimize_scalar(lambda log_t: nll(logits, labels, np.exp(log_t)),
                                     bounds=LOG_T_BOUNDS, method="bounded",
                                     options={"xatol": 1e-6})
    return float(np.exp(found.x))


def from_validation(validation: dict[str, Any] | None) -> Temperature:
    """The temperature fitted on an evaluation of the validation split (``{"labels",
    "logits"}``, run.evaluation.Evaluator with ``keep_logits``); none without one."""
    if validation is None or len(validation["labels"]) == 0:
        return Temperature(None, "no validation split: no temperature fitted")
    labels, logits = np.asarray(validation["labels"]), np.asarray(validation["logits"])
    if not np.all(np.isfinite(logits)):
        return Temperature(None, "non-finite validation logits: no temperature fitted")
    t = fit_temperature(logits, labels)
    if bound := at_bound(t):  # No minimum inside the search: T would only say "flatten".
        return Temperature(None, _why_no_minimum(logits, labels, bound))
    return Temperature(t, f"validation ({len(labels)} examples)")


def at_bound(t: float) -> float | None:
    """The search's bound (0.01 or 100) that ``t`` lies at, if it does: a fit there is none."""
    return next((float(np.exp(b)) for b in LOG_T_BOUNDS if abs(np.log(t) - b) < 1e-3), None)


def _why_no_minimum(logits: np.ndarray, labels: np.ndarray, bound: float) -> str:
    """Why the validation NLL has no minimum inside the search, for the report's note."""
    n = len(labels)
    if bound < 1:
        why = ("every validation prediction is right, so sharpening only lowers the loss"
               if np.all(logits.argmax(-1) == labels) else "its loss keeps falling")
    else:
        losses = -special.log_softmax(logits.astype(np.float64), -1)[np.arange(n), labels]
        worst = int(np.argmax(losses))
        why = (f"validation example {worst} of {n} has a loss of {losses[worst]:.1f} (mean "
               f"{losses.mean():.2f}): a few confidently wrong predictions make flattening "
               "every prediction pay")
    return (f"the NLL of the validation split ({n} examples) keeps falling "
            f"towards T = {bound:g}, the search's bound ({why}); a temperature there would not "
            "calibrate the test predictions")


def metrics(logits: np.ndarray, labels: np.ndarray, temperature: float | None = None,
            bins: int = BINS) -> dict[str, float]:
    """{"ece", "nll", "brier"} of softmax(``logits`` / ``temperature``)."""
    probs = probabilities(logits, temperature)
    return {"ece": ece(probs, labels, bins), "nll": nll(logits, labels, temperature),
            "brier": brier(probs, labels)}


def summary(logits: np.ndarray, labels: np.ndarray, temperature: Temperature,
            bins: int = BINS) -> dict[str, Any]:
    """results.json's ``calibration`` block: ``{"bins", "raw", "temperature", "fitted_on",
    "scaled"}`` (``scaled`` None without a temperature, and ``note`` saying why)."""
    labels = np.asarray(labels)
    block = {"bins": bins, "raw": metrics(logits, labels, None, bins),
             "temperature": temperature.value, "fitted_on": None, "scaled": None}
    if temperature.value is None:
        return block | {"note": temperature.fitted_on}
    return block | {"fitted_on": temperature.fitted_on,
                    "scaled": metrics(logits, labels, temperature.value, bins)}


def reliability_figure(logits: np.ndarray, labels: np.ndarray, temperature: float | None = None,
                       bins: int = BINS) -> Any:
    """Accuracy per confidence bin against the diagonal (perfect calibration), with each bin's
    count below; one column raw, one after ``temperature`` (when given)."""
    labels = np.asarray(labels)
    states = [("raw", None)] + ([(f"T = {temperature:.3f}", temperature)]
                               if temperature is not None else [])
    fig, axes = plt.subplots(2, len(states), figsize=(5 * len(states), 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
                             layout="constrained")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for column, (name, t) in enumerate(states):
        probs = probabilities(logits, t)
        count, accuracy, confidence = bin_stats(probs, labels, bins)
        top, bottom = axes[0, column], axes[1, column]
        seen = count > 0
        top.bar(edges[:-1][seen], accuracy[seen], width=1 / bins, align="edge",
                edgecolor="black", label="accuracy")
        top.bar(edges[:-1][seen], (confidence - accuracy)[seen], bottom=accuracy[seen],
                width=1 / bins, align="edge", color="red", alpha=0.3, label="gap to confidence")
        top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
                title=f"{name}: ECE {ece(probs, labels, bins):.4f}")
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(edges[:-1], count, width=1 / bins, align="edge", color="gray",
                   edgecolor="black")
        bottom.set(xlabel="confidence (top probability)", ylabel="examples")
    return fig
