"""torchvision ResNet50 -> Flax: the conversion computes exactly what PyTorch computes.

The reference is ``cifar_flax.bench.torch_resnet.ResNet50`` (torchvision's layout and state-dict
keys) with random weights and BatchNorm statistics, saved with ``torch.save``; the Flax side goes
through ``pretrained convert`` (in a process where torch cannot be imported: the ``.pth`` is read
without PyTorch, as after a plain ``pip install``) and ``pretrained features``. The same state
dict as .safetensors / .npz must convert to identical parameters. The train command starts from
the ``.pth`` without torch too (the README's main command, given the file).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, cpu_devices_env, env_without
from train_utils import state_at
from weights_utils import assert_features_match, features_via_command, random_images

from cifar_flax.weights import convert, files, store

torch = pytest.importorskip("torch")

SIZES = (32, 64, 224)
# torchvision's normalisation, written out here so the reference does not share our code.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def torch_model():
    from cifar_flax.bench.torch_resnet import ResNet50

    torch.manual_seed(0)
    model = ResNet50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                # Variances down to 1e-6 (below epsilon) make the features sensitive to the
                # BatchNorm epsilon; gamma ~ sqrt(var) keeps the activations O(1).
                c = m.num_features
                m.running_var.copy_(10 ** torch.empty(c).uniform_(-6.0, 0.3))
                m.weight.copy_(m.running_var.sqrt() * torch.empty(c).uniform_(0.5, 1.5))
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.num_batches_tracked.fill_(c)
    return model.eval()


@pytest.fixture(scope="module")
def converted(torch_model, tmp_path_factory):
    """A folder with ``resnet50.pth`` and ``converted/``, what the convert command made of it in
    a process where torch cannot be imported."""
    tmp = tmp_path_factory.mktemp("torch")
    torch.save(torch_model.state_dict(), tmp / "resnet50.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_flax.pretrained", "convert", "--source=torchvision",
         f"--input={tmp / 'resnet50.pth'}", f"--output={tmp / 'converted'}"],
        env=env_without(tmp, "torch"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.mark.parametrize("size", SIZES)
def test_features_match_torch(torch_model, converted, size):
    images = random_images(size)
    ours = features_via_command(converted, images)
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    with torch.no_grad():
        ref = torch_model.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert_features_match(ours, ref, f"torchvision {size}x{size}")


def test_spec_of_converted_weights(converted):
    weights = store.load_weights(str(converted / "converted"))
    assert weights.spec.source == "torchvision" and weights.spec.layout == "v1.5"
    assert weights.spec.preprocessing.name == "torch"
    assert weights.spec.file_sha256 == files.file_hash(str(converted / "resnet50.pth"), "sha256")
    assert weights.params["stem"]["conv"]["kernel"].shape == (7, 7, 3, 64)
    assert "bias" not in weights.params["stem"]["conv"]


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_safetensors_and_npz_convert_identically(torch_model, converted, tmp_path, fmt):
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    path = tmp_path / f"resnet50.{fmt}"
    if fmt == "npz":
        np.savez(path, **state)
    else:
        from safetensors.numpy import save_file

        save_file(state, str(path))
    ref = store.load_weights(str(converted / "converted"))
    got = convert.convert_file("torchvision", str(path))
    ref_leaves = jax.tree_util.tree_leaves_with_path((ref.params, ref.batch_stats))
    got_leaves = jax.tree_util.tree_leaves_with_path((got.params, got.batch_stats))
    assert [p for p, _ in ref_leaves] == [p for p, _ in got_leaves]
    for (_, a), (_, b) in zip(ref_leaves, got_leaves):
        np.testing.assert_array_equal(a, b)


def test_full_model_with_head_from_merged_weights(torch_model, converted):
    """merge_into puts the converted backbone into a full model's variables: torch's features."""
    from cifar_flax import models
    from cifar_flax.data import preprocessing

    model = models.create_model(num_classes=10, layout="v1.5", head_hidden=(16,))
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    # Stand-in variables with the model's structure (``init`` itself is slow to compile on CPU).
    abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), abstract)
    merged = convert.merge_into(variables, store.load_weights(str(converted / "converted")))
    np.testing.assert_array_equal(merged["params"]["head"]["hidden1"]["kernel"],
                                  variables["params"]["head"]["hidden1"]["kernel"])
    x = preprocessing.normalize(images, preprocessing.TORCH)
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=model.features))(merged, x))
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    with torch.no_grad():
        ref = torch_model.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_train_command_starts_from_the_pth_without_torch(converted, tmp_path):
    """The README's main command (configs/finetune.py) with ``pretrained.file=resnet50.pth``, tiny
    (generated images, one step) and at learning rate 0, in a process where torch cannot be
    imported: the .pth is converted into the cache and the trained backbone is that file's."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    overrides = {"dataset": "synthetic", "synthetic.num_train": 10, "synthetic.num_test": 4,
                 "batch_size": 8, "eval_batch_size": 8, "augment.resolution": 32,
                 "phases[0].epochs": 1, "phases[0].lr": 0.0,
                 "pretrained.file": converted / "resnet50.pth", "pretrained.cache_dir": cache}
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_flax.main", "--config", "configs/finetune.py",
         "--workdir", str(workdir), *[f"--config.{k}={v}" for k, v in overrides.items()]],
        env=env_without(tmp_path, "torch", env=cpu_devices_env(1)), cwd=ROOT,
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name.split("-")[:2] for p in (cache / "converted").iterdir()] == [
        ["torchvision", "file"]]
    ref = store.load_weights(str(converted / "converted")).params
    trained = state_at(str(workdir))["params"]
    assert trained.keys() - {"head"} == ref.keys()
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
    got_leaves = jax.tree_util.tree_leaves_with_path({k: trained[k] for k in ref})
    assert [p for p, _ in ref_leaves] == [p for p, _ in got_leaves]
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
