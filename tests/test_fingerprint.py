"""What makes a checkpoint resumable: the fingerprint, its differences, harmless vs refused."""

from __future__ import annotations

import json
import types

import pytest
from train_utils import tiny_config

from cifar_flax import UserError
from cifar_flax.config import phase
from cifar_flax.run.workdir import check_resume, differences, fingerprint

INFO = types.SimpleNamespace(class_names=("a", "b"), split_sizes={"train": 48, "validation": 16,
                                                                  "test": 24})


def _saved(config, info=INFO) -> dict:
    return json.loads(json.dumps(fingerprint(config, info)))  # As read back from a checkpoint.


def test_the_same_config_matches_after_a_json_round_trip():
    c = tiny_config()
    assert differences(_saved(c), fingerprint(c, INFO)) == []
    assert check_resume(_saved(c), fingerprint(c, INFO)) == []


@pytest.mark.parametrize("override, field", [
    ({"batch_size": 32}, "batch_size: 16 -> 32"),
    ({"seed": 3}, "seed: 0 -> 3"),
    ({"model.head_hidden": (8,)}, "model.head_hidden: [] -> [8]"),
    ({"phases[0].lr": 0.1}, "phases[0].lr: 0.05 -> 0.1"),
    ({"phases[0].steps": 20}, "phases[0].steps: 10 -> 20"),  # Lengthening is not resumable.
    ({"phases[0].trainable": ("head",)}, "phases[0].trainable"),
    ({"augment.flip": True}, "augment.flip: False -> True"),
])
def test_a_changed_field_is_refused_with_its_old_and_new_value(override, field):
    old, new = tiny_config(), tiny_config(**override)
    with pytest.raises(UserError) as e:
        check_resume(_saved(old), fingerprint(new, INFO), "runs/x")
    msg = str(e.value)
    assert field in msg and "\n" not in msg
    assert "new --workdir" in msg and "--config.resume=replace" in msg and "runs/x" in msg


def test_an_added_phase_or_group_lr_is_a_difference():
    old, new = tiny_config(), tiny_config()
    new.phases = list(new.phases) + [phase("more", steps=5)]
    assert "phases.count: 1 -> 2" in differences(_saved(old), fingerprint(new, INFO))
    new2 = tiny_config()
    new2.phases[0].group_lr.head = 0.5
    assert differences(_saved(old), fingerprint(new2, INFO)) == [
        "phases[0].group_lr.head: (unset) -> 0.5"]


def test_other_data_is_refused_but_only_when_both_sides_saw_data():
    c = tiny_config()
    other = types.SimpleNamespace(class_names=("a", "c"), split_sizes=INFO.split_sizes)
    with pytest.raises(UserError, match=r"data.class_names: \['a', 'b'\] -> \['a', 'c'\]"):
        check_resume(_saved(c), fingerprint(c, other))
    assert differences(_saved(c), fingerprint(c)) == []  # Config part only: data not compared.


def test_harmless_changes_resume_and_are_returned_for_the_log():
    old = tiny_config()
    new = tiny_config(**{"log_every_steps": 7, "progress_bar": True, "checkpoint.keep": 5,
                         "eval_batch_size": 32, "resume": "replace"})
    notes = check_resume(_saved(old), fingerprint(new, INFO))
    assert notes == ["checkpoint.keep: 2 -> 5", "eval_batch_size: 16 -> 32",
                     "log_every_steps: 1 -> 7", "progress_bar: False -> True"]


def test_a_field_added_later_at_its_default_resumes():
    c = tiny_config()
    saved = _saved(c)
    del saved["early_stopping.min_delta"]  # A checkpoint written before the field existed.
    assert differences(saved, fingerprint(c, INFO)) == []
    c.early_stopping.min_delta = 0.5
    assert differences(saved, fingerprint(c, INFO)) == ["early_stopping.min_delta: (unset) -> 0.5"]
