"""run/evaluation.py: device-side sums over real examples only; logits kept on request."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from train_utils import init_variables, tiny_config

from cifar_flax.data import input_pipeline, preprocessing
from cifar_flax.data.preprocessing import SIMPLE
from cifar_flax.run import devices
from cifar_flax.run.evaluation import Evaluator
from cifar_flax.run.model_setup import build_model


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()  # 24 test examples, eval batches of 16: the second is half padding.
    info = input_pipeline.get_info(config)
    model = build_model(config, info.num_classes)
    variables = init_variables(model, config.augment.resolution, seed=3)
    evaluator = Evaluator(config, info, model, devices.make_mesh(), SIMPLE)
    return config, info, model, variables, evaluator


def _direct(config, info, model, variables):
    """Mean loss and accuracy of the real test examples, computed without the Evaluator."""
    images, labels = [], []
    for b in input_pipeline.eval_batches(config, info, "test"):
        images.append(b["image"][b["mask"]])
        labels.append(b["label"][b["mask"]])
    images, labels = np.concatenate(images), np.concatenate(labels)
    x = preprocessing.eval_preprocess(images, config.augment, SIMPLE)
    logits = np.asarray(jax.jit(model.apply)(variables, x))  # Inference mode; one program.
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return float(np.mean(loss)), float(np.mean(logits.argmax(-1) == labels)), logits, labels


@pytest.mark.slow
def test_padding_counts_in_neither_loss_nor_accuracy(setup):
    config, info, model, variables, evaluator = setup
    batches = list(input_pipeline.eval_batches(config, info, "test"))
    assert not batches[-1]["mask"].all()  # The test would be vacuous without padding.
    loss, acc, _, _ = _direct(config, info, model, variables)
    r = evaluator(variables, "test")
    assert r["count"] == 24
    assert set(r) == {"loss", "accuracy", "count"}  # No logits unless asked for.
    np.testing.assert_allclose(r["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(r["accuracy"], acc)


def test_keep_logits_returns_the_real_examples_in_order(setup):
    config, info, model, variables, evaluator = setup
    loss, _, logits, labels = _direct(config, info, model, variables)
    r = evaluator(variables, "test", keep_logits=True)
    assert r["logits"].shape == (24, info.num_classes) and r["logits"].dtype == np.float32
    np.testing.assert_array_equal(r["labels"], labels)
    np.testing.assert_allclose(r["logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["loss"], loss, rtol=1e-5)
