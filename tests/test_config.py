"""Config validation: every shipped config is valid; each invalid field gives one clear line."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, load_config
from train_utils import command_status, make_image_tree, tiny_config

from cifar_flax import UserError, train, user_errors
from cifar_flax.config import (assign_groups, default_config, load_module, peak_learning_rates,
                               phase, validate)
from cifar_flax.inference.trained_run import config_from_json

ABLATION_ROWS = list(load_module(str(ROOT / "configs" / "ablation.py")).ROWS)


@pytest.mark.parametrize("name", ["finetune", "baseline", "scratch", "smoke"])
def test_shipped_configs_are_valid(name):
    config = load_config(name)
    validate(config, num_devices=1)
    assert config.phases and all(p.trainable for p in config.phases)


@pytest.mark.parametrize("name, arg", [
    *[(n, None) for n in ("finetune", "baseline", "scratch", "smoke")],
    *[("ablation", row + smoke) for row in ABLATION_ROWS for smoke in ("", ",smoke")]])
def test_every_config_trains_at_its_stated_rates_at_its_own_batch(name, arg):
    """Each config states its rates for the batch it runs at (lr_batch_size == batch_size), so
    the linear scaling leaves every shipped recipe exactly as it was."""
    c = load_config(name, arg)
    assert c.lr_batch_size == c.batch_size, (name, arg)
    for i, p in enumerate(c.phases):
        assert peak_learning_rates(c, i) == {
            g: dict(p.group_lr).get(g, p.lr) for g in c.groups if g in p.trainable}


def test_lr_batch_size_must_be_a_positive_integer():
    c = default_config()
    c.lr_batch_size = 0
    assert "lr_batch_size=0 must be a positive integer" in _error(c)


def test_a_one_class_imagefolder_is_one_error_line_before_training(tmp_path, capsys):
    """Through the command: one class folder would train and test at accuracy 1.0."""
    make_image_tree(tmp_path / "data", {"train": {"cat": 4}, "test": {"cat": 2}})
    c = tiny_config(dataset=f"imagefolder:{tmp_path / 'data'}")
    assert command_status(c, tmp_path / "run") == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert (f"split folder {tmp_path / 'data' / 'train'} has one class folder (cat): a "
            "classifier needs at least two classes; add a folder") in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _error(config, num_devices: int = 1) -> str:
    with pytest.raises(UserError) as e:
        validate(config, num_devices=num_devices)
    return str(e.value)


def test_phase_naming_a_missing_group():
    c = default_config()
    c.phases = [phase("x", trainable=("head", "stage9"))]
    msg = _error(c)
    assert "\n" not in msg and "phases[0]" in msg and "stage9" in msg and "stage4" in msg


def test_batch_not_divisible_by_device_count():
    c = default_config()
    c.batch_size = 100
    msg = _error(c, num_devices=8)
    assert "\n" not in msg and "batch_size=100" in msg and "8 devices" in msg


def test_missing_dataset_folder_and_empty_dataset(tmp_path):
    c = default_config()
    c.dataset = f"imagefolder:{tmp_path}/nope"
    msg = _error(c)
    assert "\n" not in msg and "does not exist" in msg and "nope" in msg
    c.dataset = ""
    assert "dataset is empty" in _error(c)


def test_layout_must_match_the_weights():
    c = default_config()
    c.pretrained.source = "keras"  # needs v1
    msg = _error(c)
    assert "\n" not in msg and "model.layout='v1.5'" in msg and "model.layout='v1'" in msg


def test_several_problems_give_one_line_each():
    c = default_config()
    c.phases = [phase("a", optimizer="adam", schedule="linear", steps=-1)]
    c.early_stopping.metric = "accuracy"
    lines = _error(c).splitlines()
    assert len(lines) == 4
    assert any("optimizer='adam'" in ln for ln in lines)
    assert any("schedule='linear'" in ln for ln in lines)
    assert any("early_stopping.metric" in ln for ln in lines)


def test_early_stopping_needs_validation_data():
    c = default_config()
    c.val_fraction = 0.0
    assert "val_fraction" in _error(c)
    c.early_stopping.enabled = False
    validate(c, num_devices=1)


def _params():
    z = np.zeros(1)
    return {"stem": {"conv": {"kernel": z}}, "stage1": {"block1": {"conv1": {"kernel": z}}},
            "head": {"out": {"kernel": z, "bias": z}}}


def test_overlapping_groups_list_the_doubles():
    groups = {"stem": "^stem/", "stage1": "^stage1/", "head": "^head/", "kernels": "kernel$"}
    with pytest.raises(UserError) as e:
        assign_groups(train.flat_paths(_params()), groups)
    msg = str(e.value)
    assert "\n" not in msg and "several" in msg and "stem/conv/kernel (stem, kernels)" in msg


def test_orphans_are_listed_at_most_ten():
    params = {f"extra{i}": {"w": np.zeros(1)} for i in range(15)} | _params()
    with pytest.raises(UserError) as e:
        assign_groups(train.flat_paths(params), {"stem": "^stem/", "stage1": "^stage1/",
                                                 "head": "^head/"})
    msg = str(e.value)
    assert msg.startswith("15 parameters match no entry") and msg.count("extra") == 10



def test_a_variant_of_another_source_is_caught_at_the_config_check():
    c = default_config()
    c.pretrained.source, c.model.layout = "keras", "v1"
    c.pretrained.variant = "IMAGENET1K_V2"  # finetune.py's torchvision variant.
    msg = _error(c)
    assert "\n" not in msg and "pretrained.variant='IMAGENET1K_V2' is not a keras variant" in msg
    assert "notop" in msg
    c.pretrained.file = "/somewhere/resnet50.h5"  # A local file names its own variant.
    validate(c, num_devices=1)


def test_resume_mode_must_be_known():
    c = default_config()
    c.resume = "fresh"
    assert "resume='fresh' must be one of ('auto', 'replace')" in _error(c)


def test_a_class_with_no_training_images_is_an_error(tmp_path):
    for split, cls in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "dog")):
        (tmp_path / split / cls).mkdir(parents=True)
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"x")
    (tmp_path / "test" / "dog" / "1.png").write_bytes(b"x")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"x")  # Hidden files do not count.
    c = default_config()
    c.dataset = f"imagefolder:{tmp_path}"
    msg = _error(c)
    assert "\n" not in msg and f"{tmp_path / 'train' / 'dog'} has no training images" in msg


def test_a_warmup_longer_than_its_phase_warns(caplog):
    c = default_config()
    c.phases = [phase("short", epochs=0.5, warmup_epochs=1.0)]
    validate(c, num_devices=1)
    assert "phases[0] (short): warmup_epochs=1.0 is longer than the phase" in caplog.text


def test_user_errors_turns_only_the_listed_exceptions_into_one_user_error():
    """The one seam where a library's exception at an I/O boundary becomes the user's error."""
    with pytest.raises(UserError, match=r"^cannot read x \(boom\)$") as e:
        with user_errors(lambda err: f"cannot read x ({err})", OSError):
            raise OSError("boom")
    assert e.value.__suppress_context__  # One line, not the library's traceback.
    with pytest.raises(KeyError):  # Not listed: a bug, not the user's.
        with user_errors(lambda err: "never", OSError):
            raise KeyError("k")
    with pytest.raises(UserError, match="^inner$"):  # Already the user's: unchanged.
        with user_errors(lambda err: "never", Exception):
            raise UserError("inner")
    with pytest.raises(UserError, match="^init_from=x: inner$"):  # Listed: what was being done.
        with user_errors(lambda err: f"init_from=x: {err}", UserError):
            raise UserError("inner")


def test_a_run_config_field_whose_type_changed_keeps_todays_default(caplog):
    """config.json of an older run: a value of another type keeps today's default (with a
    warning), an int where a float is stored is taken, the other fields are read."""
    c = config_from_json({"batch_size": "big", "seed": 3,
                          "early_stopping": {"min_delta": 1, "patience": "x"}})
    assert c.batch_size == default_config().batch_size and c.seed == 3
    assert c.early_stopping.min_delta == 1.0
    assert c.early_stopping.patience == default_config().early_stopping.patience
    assert "Ignoring config.batch_size='big'" in caplog.text
