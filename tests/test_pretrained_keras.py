"""Keras ResNet50 -> Flax: the conversion computes exactly what Keras computes.

A ``keras.applications.ResNet50`` with random weights and non-trivial BatchNorm statistics is
written in the HDF5 layout of the published notop file, converted with ``pretrained convert``, and
its features (``pretrained features``) are compared with Keras' own on Keras' own preprocessing.
"""

from __future__ import annotations

import h5py
import jax
import numpy as np
import pytest
from weights_utils import assert_features_match, features_via_command, random_images

from cifar_flax import pretrained
from cifar_flax.weights import convert, store

keras = pytest.importorskip("keras")

SIZES = (32, 64, 224)


@pytest.fixture(scope="module")
def keras_model():
    keras.utils.set_random_seed(0)  # reproducible kernels, so the printed differences are too
    model = keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(None, None, 3)
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Variances down to 1e-6 (below epsilon) make the features sensitive to the
            # BatchNorm epsilon; gamma ~ sqrt(var) keeps the activations O(1).
            c = layer.gamma.shape[0]
            var = 10 ** rng.uniform(-6.0, 0.3, c)
            gamma = np.sqrt(var) * rng.uniform(0.5, 1.5, c)
            layer.set_weights([gamma, rng.normal(0.0, 0.2, c), rng.normal(0.0, 0.2, c), var])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0.0, 0.1, bias.shape)])  # non-zero biases
    return model


def write_published_layout(model, path, suffix: str = ":0") -> None:
    """The HDF5 layout of resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 (TF-Keras 2)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode("utf8") for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}{suffix}" for w in layer.weights]
            group.attrs["weight_names"] = [n.encode("utf8") for n in names]
            for name, value in zip(names, layer.get_weights()):
                group.create_dataset(name, data=value)


@pytest.fixture(scope="module")
def converted(keras_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keras")
    write_published_layout(keras_model, tmp / "notop.h5")
    assert pretrained.main(
        ["convert", "--source=keras", f"--input={tmp / 'notop.h5'}",
         f"--output={tmp / 'converted'}"]
    ) == 0
    return tmp


def test_published_file_layout_is_what_keras_itself_reads(keras_model, converted):
    """Guard on the test's writer: Keras' own legacy HDF5 loader accepts the file."""
    from keras.src.legacy.saving import legacy_h5_format

    clone = keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(None, None, 3)
    )
    with h5py.File(converted / "notop.h5", "r") as f:
        legacy_h5_format.load_weights_from_hdf5_group(f, clone)
    for a, b in zip(keras_model.get_weights(), clone.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", SIZES)
def test_features_match_keras(keras_model, converted, size):
    images = random_images(size)
    ours = features_via_command(converted, images)
    x = keras.applications.resnet.preprocess_input(images.astype(np.float32))
    assert_features_match(ours, np.asarray(keras_model(x, training=False)), f"keras {size}x{size}")


def test_keras3_names_without_suffix_convert_identically(keras_model, converted, tmp_path):
    """Keras 3 names weights ``<layer>/<weight>`` (no ``:0``): same conversion, from our writer
    and from Keras' own ``model.save("x.h5")``."""
    write_published_layout(keras_model, tmp_path / "k3.h5", suffix="")
    keras_model.save(tmp_path / "k3_model.h5")  # Keras 3's own legacy HDF5 (under model_weights)
    with h5py.File(tmp_path / "k3_model.h5", "r") as f:
        group = f["model_weights"]["conv1_conv"]
        first = group.attrs["weight_names"][0]
        assert (first.decode() if isinstance(first, bytes) else first) == "conv1_conv/kernel"
    ref = store.load_weights(str(converted / "converted"))
    for name in ("k3.h5", "k3_model.h5"):
        got = convert.convert_file("keras", str(tmp_path / name))
        assert got.spec.layout == "v1" and got.spec.preprocessing.name == "caffe"
        for a, b in zip(
            jax.tree.leaves((ref.params, ref.batch_stats)),
            jax.tree.leaves((got.params, got.batch_stats)),
        ):
            np.testing.assert_array_equal(a, b)
