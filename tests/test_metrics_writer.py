"""metrics.jsonl: every line valid JSON (non-finite values as null), rewritten on resume."""

from __future__ import annotations

import json

from cifar_flax.run.metrics import MetricsWriter


def test_non_finite_values_are_null_and_every_line_is_strict_json(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(1, "train", {"loss": 1.5, "accuracy": 0.5})
    w.write(2, "train", {"loss": float("nan"), "accuracy": 0.25})
    w.write(3, "eval", {"val_loss": float("inf"), "val_accuracy": 0.0})
    w.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(ln, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
              for ln in lines]  # Rejects NaN / Infinity tokens.
    assert [r["loss"] for r in strict if r["kind"] == "train"] == [1.5, None]
    assert strict[2]["val_loss"] is None and strict[2]["val_accuracy"] == 0.0
    assert w.history == strict  # The history checkpoints carry is the same.


def test_a_resumed_writer_rewrites_the_file_from_its_history(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
        w.write(step, "train", {"loss": 1.0 / step})
    w.close()
    kept = w.history[:2]  # A checkpoint at step 2: step 3 was lost.
    MetricsWriter(str(tmp_path), kept).close()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
