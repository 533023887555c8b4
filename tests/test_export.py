"""export: jax.export StableHLO + params loadable with what the folder's requirements.txt lists
(in a process that can import nothing else), a SavedModel, both equal to the run's own model;
images of another size resized as predict does; a non-empty output folder needs --force."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import env_with_only, load_config

from cifar_flax import export, exported, main
from cifar_flax.config import phase
from cifar_flax.inference.images import resize_like_pipeline
from cifar_flax.inference.trained_run import Predictor, load_run

BANNED = ("flax", "optax", "tensorflow", "orbax", "ml_collections", "cifar_flax.models")
JAX_DEPS = ("jax", "jaxlib", "numpy", "ml_dtypes", "opt_einsum", "scipy")  # What pip gives jax.


@pytest.fixture(scope="module")
def exported_dir(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert export.main(["--workdir", str(smoke_run), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(smoke_run):
    """Images at batch 1 and 7 and the run's in-process logits (its own conv_impl, eval step)."""
    run = load_run(str(smoke_run))
    rng = np.random.default_rng(0)
    images = {n: rng.integers(0, 256, (n, *run.image_shape), dtype=np.uint8) for n in (1, 7)}
    return images, {n: Predictor(run).logits(x) for n, x in images.items()}


def test_folder_contents(exported_dir, smoke_run):
    info = json.loads((exported_dir / "model.json").read_text())
    run_info = json.loads((smoke_run / "run_info.json").read_text())
    assert info["class_names"] == run_info["class_names"]
    assert info["input"]["shape"] == run_info["image_shape"]
    assert info["platforms"] == ["cpu", "cuda", "tpu"]
    assert info["provenance"]["checkpoint"] == "best"
    assert info["provenance"]["config"]["model"]["conv_impl"] == "xla"
    for name in ("model.jax", "params.npz", "exported.py", "requirements.txt",
                 "saved_model/saved_model.pb"):
        assert (exported_dir / name).is_file(), name


_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    if sys.argv[3] == "package":
        from cifar_flax import exported
    else:  # The loader copied into the folder: no cifar_flax needed at all.
        spec = importlib.util.spec_from_file_location("loader", sys.argv[1] + "/exported.py")
        exported = importlib.util.module_from_spec(spec); spec.loader.exec_module(exported)
    model = exported.load(sys.argv[1])
    data = np.load(sys.argv[2])
    out = {k: model(data[k]) for k in data.files}
    np.savez(sys.argv[2] + ".out.npz", **{k + "_" + n: v[n] for k, v in out.items() for n in v})
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                            ("flax", "optax", "tensorflow", "orbax", "ml_collections")
                            or m == "cifar_flax.models")))
""")


def _requirements(folder) -> list[str]:
    """The package names that ``folder/requirements.txt`` lists."""
    lines = (folder / "requirements.txt").read_text().splitlines()
    return [re.split(r"[<>=!~;\[ ]", ln.strip())[0] for ln in lines
            if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("loader", ["package", "copied"])
def test_loads_with_jax_alone_and_equals_the_run(exported_dir, reference, tmp_path, loader):
    """"copied": the folder's own exported.py, in a process that can import nothing but the
    standard library, jax with its own dependencies and what requirements.txt lists (a fresh
    virtual environment after ``pip install -r requirements.txt``)."""
    images, logits = reference
    np.savez(tmp_path / "x.npz", **{f"b{n}": x for n, x in images.items()})
    (tmp_path / "site").mkdir()
    env = (env_with_only(tmp_path / "site", *JAX_DEPS, *_requirements(exported_dir))
           if loader == "copied" else None)
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(exported_dir), str(tmp_path / "x.npz"),
                        loader], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []  # None of BANNED imported.
    out = np.load(tmp_path / "x.npz.out.npz")
    for n in (1, 7):
        got = out[f"b{n}_logits"]
        assert got.shape == logits[n].shape
        assert np.abs(got - logits[n]).max() <= 1e-5
        np.testing.assert_allclose(out[f"b{n}_probabilities"].sum(-1), 1.0, atol=1e-6)


def test_saved_model_equals_the_run(exported_dir, reference):
    images, logits = reference
    serve = tf.saved_model.load(str(exported_dir / "saved_model")).signatures["serving_default"]
    for n in (1, 7):
        out = serve(images=tf.constant(images[n]))
        assert np.abs(out["logits"].numpy() - logits[n]).max() <= 1e-5
        np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-6)


def test_requirements_name_what_jax_lacks(exported_dir, tmp_path):
    """Without requirements.txt's flatbuffers (jax alone), the loader fails, naming the file."""
    assert "flatbuffers" in _requirements(exported_dir)
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(exported_dir), "-", "copied"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env_with_only(tmp_path, *JAX_DEPS))
    assert p.returncode == 1 and "flatbuffers" in p.stderr, p.stderr[-2000:]
    assert f"pip install -r {exported_dir / 'requirements.txt'}" in p.stderr


def test_loader_rejects_wrong_images(exported_dir):
    model = exported.load(exported_dir)
    with pytest.raises(ValueError, match="uint8"):
        model(np.zeros((2, *model.input_shape), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        model(np.zeros((2, 8, 8), np.uint8))


def test_loader_resizes_other_sizes_as_predict_does(exported_dir, smoke_run):
    """Images of another size: resized as predict's host resize does (TensorFlow's antialiased
    bilinear; jax's differs by a rounding step of 1 in a few pixels), then the model."""
    model, predictor = exported.load(exported_dir), Predictor(load_run(str(smoke_run)))
    h, w, _ = model.input_shape
    rng = np.random.default_rng(1)
    for size in [(48, 40), (20, 17), (64, 64)]:
        images = rng.integers(0, 256, (3, *size, 3), dtype=np.uint8)
        ours = np.asarray(exported.resize(images, h, w))
        theirs = np.stack([resize_like_pipeline(x, h, w) for x in images])
        diff = np.abs(ours.astype(int) - theirs)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (size, diff.max(), diff.mean())
        logits = model(images)["logits"]
        np.testing.assert_array_equal(logits, model(ours)["logits"])
        # Another resize (no antialiasing, nearest, cubic) is >= 4e-3 away on these images.
        np.testing.assert_allclose(logits, predictor.logits(theirs), atol=2e-4, rtol=0)


def test_refuses_a_non_empty_folder_without_force(smoke_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert export.main(["--workdir", str(smoke_run), "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--force" in err[0]
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_missing_run_is_one_error_line(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


@pytest.fixture(scope="module")
def upscaling_run(tmp_path_factory):
    """A tiny run (configs/smoke.py, one short phase) whose 32 px images the model sees at
    augment.resolution 40: its export must resize inside the model."""
    config = load_config("smoke")
    config.augment.resolution = 40
    config.phases = [phase("all", steps=4, lr=0.05)]
    workdir = tmp_path_factory.mktemp("upscaling_run")
    main.run(config, str(workdir))
    return workdir


@pytest.mark.slow
def test_export_resizes_to_the_model_resolution(upscaling_run, tmp_path):
    """uint8 32x32 images into the exported model give the run's own logits (its eval step
    resizes to 40); without the resize inside the export they would differ."""
    out = tmp_path / "model"
    assert export.main(["--workdir", str(upscaling_run), "--output", str(out),
                        "--nosaved_model"]) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["input"]["shape"] == [32, 32, 3] and info["model_resolution"] == 40
    model = exported.load(out)
    assert model.input_shape == (32, 32, 3)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    expected = Predictor(load_run(str(upscaling_run))).logits(images)
    np.testing.assert_allclose(model(images)["logits"], expected, atol=1e-5, rtol=0)
