"""On-device augmentation: shapes, determinism, flip, crop bounds, mixing, normalisation."""

import jax
import numpy as np
import pytest

from cifar_flax.config import default_config
from cifar_flax.data import preprocessing

K = 5


def _aug(**overrides):
    a = default_config().augment
    a.update(dict(resolution=12, crop_padding=0, flip=False, random_resized_crop=False))
    a.update(overrides)
    return a


def _images(b=16, h=12, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _run(images, aug, key=0, spec=preprocessing.SIMPLE, labels=None):
    labels = np.arange(len(images)) % K if labels is None else labels
    fn = jax.jit(lambda x, y, k: preprocessing.train_augment(x, y, k, aug, K, spec))
    x, y = fn(images, labels, jax.random.key(key))
    return np.asarray(x), np.asarray(y)


def _norm(images, spec=preprocessing.SIMPLE):
    return np.asarray(preprocessing.normalize(images, spec))


def test_shapes_dtypes_and_one_hot_labels():
    aug = _aug(resolution=20, crop_padding=2, flip=True)
    x, y = _run(_images(b=6, h=8, w=10), aug, labels=np.array([0, 1, 2, 3, 4, 0]))
    assert x.shape == (6, 20, 20, 3) and x.dtype == np.float32
    assert y.shape == (6, K) and y.dtype == np.float32
    np.testing.assert_array_equal(y, np.eye(K)[[0, 1, 2, 3, 4, 0]])
    e = np.asarray(preprocessing.eval_preprocess(_images(b=2, h=8, w=10), aug, preprocessing.TORCH))
    assert e.shape == (2, 20, 20, 3) and e.dtype == np.float32


def test_same_key_same_output_and_examples_draw_independently():
    aug = _aug(crop_padding=3, flip=True, mixup_alpha=0.4)
    same = np.repeat(_images(b=1), 32, axis=0)  # 32 copies of one image
    x1, y1 = _run(same, aug, key=7)
    x2, y2 = _run(same, aug, key=7)
    x3, _ = _run(same, aug, key=8)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    # Copies of one image get different crops/flips: many distinct outputs in one batch.
    assert len({x.tobytes() for x in x1}) > 16


def test_flip_really_mirrors():
    images = _images(b=32)
    x, _ = _run(images, _aug(flip=True))
    plain, mirrored = _norm(images), _norm(images[:, :, ::-1])
    is_plain = [np.allclose(a, p, atol=1e-5) for a, p in zip(x, plain)]
    is_mirror = [np.allclose(a, m, atol=1e-5) for a, m in zip(x, mirrored)]
    assert all(p or m for p, m in zip(is_plain, is_mirror))
    assert 4 <= sum(is_mirror) <= 28 and 4 <= sum(is_plain) <= 28


def test_padded_crop_is_a_window_of_the_zero_padded_image():
    pad, images = 2, _images(b=24, h=10, w=10)
    x, _ = _run(images, _aug(resolution=10, crop_padding=pad))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.float32)
    offsets = set()
    for i in range(len(images)):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.allclose(x[i], _norm(padded[i, dy : dy + 10, dx : dx + 10][None])[0], atol=1e-4)
        ]
        assert len(hits) == 1, f"example {i} is no in-bounds window of the padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets really vary


def test_random_resized_crop_boxes_stay_in_bounds():
    aug = _aug(random_resized_crop=True, rrc_scale=(0.2, 0.9))
    keys = jax.random.split(jax.random.key(0), 2000)
    boxes = np.asarray(jax.vmap(lambda k: preprocessing.crop_box(k, 24, 30, aug))(keys))
    y0, x0, h, w = boxes.T
    assert (y0 >= 0).all() and (x0 >= 0).all()
    assert (y0 + h <= 24 + 1e-4).all() and (x0 + w <= 30 + 1e-4).all()
    area = h * w / (24 * 30)
    assert area.max() <= 0.9 + 1e-4 and area.min() >= 0.2 * 0.74
    assert area.std() > 0.1 and np.ptp(x0) > 5  # really random
    x, _ = _run(_images(b=4, h=24, w=30), aug)
    assert x.shape == (4, 12, 12, 3) and np.isfinite(x).all()


def test_no_augmentation_equals_eval_preprocess():
    images = _images(b=4, h=8, w=8)
    aug = _aug(resolution=20)
    x, _ = _run(images, aug, spec=preprocessing.TORCH)
    e = np.asarray(preprocessing.eval_preprocess(images, aug, preprocessing.TORCH))
    ref = jax.image.resize(images.astype(np.float32), (4, 20, 20, 3), "linear")
    np.testing.assert_allclose(x, e, atol=1e-4)
    np.testing.assert_allclose(e, _norm(ref, preprocessing.TORCH), atol=1e-4)
    # A full-image random-resized crop is the same plain resize.
    full = _aug(resolution=20, random_resized_crop=True, rrc_scale=(1.0, 1.0), rrc_ratio=(1, 1))
    np.testing.assert_allclose(_run(images, full, spec=preprocessing.TORCH)[0], e, atol=1e-3)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_weights_match_the_soft_labels(mode):
    images = np.zeros((8, 12, 12, 3), np.uint8)
    images[1::2] = 255  # even examples black (class 0), odd white (class 1)
    labels = np.arange(8) % 2
    aug = _aug(**{f"{mode}_alpha": 1.0})
    x, y = _run(images, aug, key=3, labels=labels)
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-5)
    white = (x[..., 0] + 1) / 2  # SIMPLE spec: black -> -1, white -> +1
    if mode == "cutmix":
        assert np.isin(np.round(white, 4), [0.0, 1.0]).all()  # pixels are pasted, not blended
    np.testing.assert_allclose(white.mean((1, 2)), y[:, 1], atol=1e-4)
    assert 0.05 < np.abs(y - np.eye(K)[labels]).max()  # something really got mixed


@pytest.mark.parametrize("source", ["caffe", "torch"])
def test_normalisation_matches_the_reference_constants(source):
    rgb = np.array([[[[10, 128, 250]]]], np.uint8)
    spec = preprocessing.get(source)
    out = np.asarray(preprocessing.eval_preprocess(rgb, _aug(resolution=1), spec))[0, 0, 0]
    if source == "caffe":  # keras.applications.resnet50.preprocess_input: RGB->BGR minus mean
        expected = np.array([250 - 103.939, 128 - 116.779, 10 - 123.68])
    else:  # torchvision: /255, minus mean, over std
        expected = (np.array([10, 128, 250]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
