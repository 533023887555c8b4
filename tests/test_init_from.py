"""config.init_from: start from an earlier run (backbone always, head when its shapes match)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import tiny_config

from cifar_flax import UserError
from cifar_flax.config import phase, validate
from cifar_flax.inference.trained_run import load_run, read_config
from cifar_flax.run.model_setup import build_model, variables_from_run


def _equal(a, b) -> bool:
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    return all(jax.tree.leaves(same))


def _backbone(variables) -> dict:
    return {k: {m: v for m, v in variables[k].items() if m != "head"} for k in variables}


def _fake(config, num_classes, value=7.0):
    """Variables of the model ``config`` describes, every entry ``value`` (no init compile)."""
    config.synthetic.num_classes = num_classes
    model = build_model(config, num_classes)
    res = config.augment.resolution
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, res, res, 3))))
    return {k: jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), shapes[k])
            for k in ("params", "batch_stats")}


def test_same_classes_keeps_everything(smoke_run):
    """A workdir means its best checkpoint."""
    source = jax.device_get(load_run(str(smoke_run)).variables)
    config = read_config(smoke_run)
    config.init_from = str(smoke_run)
    assert _equal(variables_from_run(config, _fake(config, 4), str(smoke_run)), source)


def test_other_class_count_keeps_the_backbone_and_reinitialises_the_head(smoke_run, caplog):
    """From the last checkpoint (its backbone trained; the best is from the head-only phase)."""
    source = jax.device_get(load_run(str(smoke_run), "latest").variables)
    config = read_config(smoke_run)
    fresh = _fake(config, 3)  # Stands for the new model's random init.
    with caplog.at_level(logging.INFO):
        got = variables_from_run(config, fresh, str(smoke_run / "checkpoints" / "latest"))
    assert _equal(_backbone(got), _backbone(source))
    assert _equal(got["params"]["head"], fresh["params"]["head"])
    assert got["params"]["head"]["out"]["kernel"].shape[-1] == 3
    assert any("head freshly initialised" in r.getMessage() for r in caplog.records)


def test_backbone_mismatch_lists_the_names(smoke_run):
    config = tiny_config(init_from=str(smoke_run))  # base_width 4, the smoke run's is 8.
    with pytest.raises(UserError) as e:
        variables_from_run(config, _fake(config, 4), str(smoke_run))
    msg = str(e.value)
    assert "backbone does not fit" in msg and "params/stage1/block1/conv1/kernel" in msg
    assert "\n" not in msg


def test_preprocessing_must_match_the_earlier_run(smoke_run):
    config = read_config(smoke_run)
    config.init_from, config.pretrained.source = str(smoke_run), "torchvision"
    with pytest.raises(UserError, match="pretrained.source=''"):
        variables_from_run(config, _fake(config, 4), str(smoke_run))


def test_missing_or_empty_run(tmp_path):
    config = tiny_config(init_from=str(tmp_path / "none"))
    with pytest.raises(UserError, match="init_from=.*does not exist"):
        validate(config)
    config.init_from = str(tmp_path)  # Exists, but holds no checkpoint.
    with pytest.raises(UserError, match="no finished checkpoint"):
        variables_from_run(config, _fake(config, 4), str(tmp_path))


@pytest.mark.slow
def test_training_run_starts_from_the_earlier_run(smoke_run, tmp_path):
    """End to end through main.run (init_variables -> variables_from_run): a 3-class head-only
    run from the smoke run; its backbone (frozen, BatchNorm in inference mode) ends equal to the
    source's, its head has 3 classes."""
    from cifar_flax.main import run

    config = read_config(smoke_run)
    config.init_from = str(smoke_run / "checkpoints" / "latest")  # Its backbone was trained.
    config.synthetic.num_classes = 3
    config.phases = [phase("head", steps=2, trainable=("head",), lr=0.1)]
    config.early_stopping.enabled = False
    config.checkpoint.async_save, config.progress_bar = False, False
    results = run(config, str(tmp_path / "run"))
    assert results["test_examples"] == config.synthetic.num_test
    source = jax.device_get(load_run(str(smoke_run), "latest").variables)
    trained = jax.device_get(load_run(str(tmp_path / "run"), "latest").variables)
    assert _equal(_backbone(trained), _backbone(source))
    assert trained["params"]["head"]["out"]["kernel"].shape[-1] == 3


def test_same_shapes_other_class_names_reinitialises_the_head(smoke_run, caplog):
    """A class split (same count, other classes): the earlier head maps to the wrong labels."""
    source = jax.device_get(load_run(str(smoke_run)).variables)
    config = read_config(smoke_run)
    fresh = _fake(config, 4)
    others = ["dog", "frog", "horse", "ship"]
    with caplog.at_level(logging.INFO):
        got = variables_from_run(config, fresh, str(smoke_run), class_names=others)
    assert _equal(_backbone(got), _backbone(source))
    assert _equal(got["params"]["head"], fresh["params"]["head"])
    assert any("trained on other classes" in r.getMessage() for r in caplog.records)
    same = variables_from_run(config, _fake(config, 4), str(smoke_run),
                              class_names=[f"class_{i}" for i in range(4)])
    assert _equal(same, source)
