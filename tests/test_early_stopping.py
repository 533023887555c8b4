"""Early stopping's arithmetic: min_delta, the direction of each metric, patience, the run's best."""

from __future__ import annotations

from cifar_flax.run.evaluation import EarlyStopping


def _feed(es: EarlyStopping, values: list[float]) -> list[tuple[bool, bool]]:
    return [es.update(v, step) for step, v in enumerate(values, start=1)]


def test_improvements_smaller_than_min_delta_do_not_reset_patience():
    es = EarlyStopping("val_accuracy", patience=2, min_delta=0.05)
    out = _feed(es, [0.50, 0.54, 0.545])  # Each higher, but within min_delta of the best.
    assert [stop for _, stop in out] == [False, False, True]
    assert es.phase_best == 0.50
    es2 = EarlyStopping("val_accuracy", patience=2, min_delta=0.05)
    out2 = _feed(es2, [0.50, 0.56, 0.62])  # +0.06 each: real improvements.
    assert [stop for _, stop in out2] == [False, False, False] and es2.phase_best == 0.62


def test_val_loss_is_minimised_and_val_accuracy_maximised():
    loss = EarlyStopping("val_loss", patience=1, min_delta=0.0)
    assert _feed(loss, [1.0, 0.8, 0.6]) == [(True, False), (True, False), (True, False)]
    assert loss.run_best == 0.6 and loss.run_best_step == 3
    assert loss.update(0.7, 4) == (False, True)  # A higher loss is worse.
    acc = EarlyStopping("val_accuracy", patience=1, min_delta=0.0)
    assert _feed(acc, [0.6, 0.8]) == [(True, False), (True, False)]
    assert acc.update(0.7, 3) == (False, True)  # A lower accuracy is worse.
    assert acc.run_best == 0.8 and acc.run_best_step == 2


def test_the_run_best_survives_a_new_phase_and_a_json_round_trip():
    es = EarlyStopping("val_loss", patience=3)
    _feed(es, [1.0, 0.5])
    es.start_phase()
    assert es.phase_best is None and es.bad_evals == 0
    assert es.update(0.7, 3) == (False, False)  # Phase best, not the run's best.
    again = EarlyStopping.from_json(es.to_json())
    assert again == es and again.run_best == 0.5 and again.run_best_step == 2
