"""Corrupted test sets (data/corruptions.py) and ``evaluate --shift=corruptions``: each image is
the library's corruption at the asked severity, once; the set is reproducible bit for bit (two
processes, any order of the cells, after an interruption); the cache resumes and never lies in a
run's workdir; the command's results, plots and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import matplotlib.image
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import ROOT
from inference_utils import write_image

from cifar_flax import UserError, evaluate
from cifar_flax.config import default_config
from cifar_flax.data import corruptions

imagecorruptions = pytest.importorskip("imagecorruptions")  # The robustness extra (CI has it).
CELLS = [("gaussian_noise", 2), ("impulse_noise", 5), ("glass_blur", 3), ("fog", 1),
         ("contrast", 4), ("elastic_transform", 5)]


def _images() -> tuple[list[np.ndarray], np.ndarray]:
    """Three smooth images of two sizes (the library's smallest, 32x32, and 40x36) at indices
    of a larger split."""
    rng = np.random.default_rng(7)
    base = [rng.integers(0, 256, (4, 4, 3)).astype(np.float64) for _ in range(3)]
    sizes = [(32, 32), (40, 36), (32, 32)]
    images = [np.kron(b, np.ones((h // 4, w // 4, 1))).astype(np.uint8)
              for b, (h, w) in zip(base, sizes)]
    return images, np.array([3, 10, 11])


def _expected(image: np.ndarray, index: int, corruption: str, severity: int, seed: int
              ) -> np.ndarray:
    """The library called directly, with the documented per-image seed: NumPy's global RNG
    seeded, and ``seed=`` for the two corruptions with their own generator."""
    s = int(np.random.SeedSequence(
        [seed, corruptions.CORRUPTIONS.index(corruption), severity, index]).generate_state(1)[0])
    np.random.seed(s)
    extra = {"seed": s} if corruption in ("impulse_noise", "glass_blur") else {}
    return imagecorruptions.corrupt(image, severity=severity, corruption_name=corruption, **extra)


def test_each_image_is_the_library_once_at_its_severity(tmp_path):
    """Every generated image equals one direct call of the library at the cell's severity (a
    wrong severity, a second application or an unseeded draw would differ), and NumPy's global
    RNG is left as it was."""
    images, indices = _images()
    state = np.random.get_state()
    generated = corruptions.GeneratedSet(tmp_path, images, indices, seed=5)
    generated.generate(CELLS, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state()))
    for corruption, severity in CELLS:
        got = generated.load(corruption, severity)
        for image, index, out in zip(images, indices, got):
            want = _expected(image, int(index), corruption, severity, seed=5)
            assert out.shape == image.shape and out.dtype == np.uint8
            np.testing.assert_array_equal(out, want, err_msg=f"{corruption} {severity}")
            assert not np.array_equal(out, image), f"{corruption} {severity} changed nothing"


GENERATE = """
import sys, numpy as np
from cifar_flax.data import corruptions
z = np.load(sys.argv[1])
images = [z["a"], z["b"], z["c"]]
cells = [(c, int(s)) for c, s in z["cells"]]
corruptions.GeneratedSet(sys.argv[2], images, z["indices"], seed=5).generate(cells, False)
"""


def _pixels(generated: corruptions.GeneratedSet) -> dict:
    return {cell: generated.load(*cell) for cell in CELLS}


def _same(a: dict, b: dict) -> bool:
    return all(len(a[c]) == len(b[c]) and all(np.array_equal(x, y) for x, y in zip(a[c], b[c]))
               for c in CELLS)


def _generated(root, cells) -> dict:
    images, indices = _images()
    generated = corruptions.GeneratedSet(root, images, indices, seed=5)
    generated.generate(cells, progress=False)
    return _pixels(generated)


def test_reproducible_in_any_cell_order_and_after_an_interruption(tmp_path, monkeypatch):
    """The same pixels from the cells in reverse order, killed midway and resumed; the resumed
    generation makes only the cells still missing."""
    want = _generated(tmp_path / "a", CELLS)
    calls, real = [], corruptions.corrupt

    def dies_after_seven(*args):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(args[1:3])
        return real(*args)

    monkeypatch.setattr(corruptions, "corrupt", dies_after_seven)
    images, indices = _images()
    resumed = corruptions.GeneratedSet(tmp_path / "b", images, indices, seed=5)
    with pytest.raises(KeyboardInterrupt):
        resumed.generate(CELLS[::-1], progress=False)
    assert len(list(resumed.folder.glob("*.npz"))) == 2  # Two whole cells; the third is lost.
    monkeypatch.setattr(corruptions, "corrupt", real)
    resumed.generate(CELLS, progress=False)
    assert resumed.calls == 7 + 3 * (len(CELLS) - 2)
    assert _same(_pixels(resumed), want)


@pytest.mark.slow  # A second process: TensorFlow's import and numba's compilation, ~30 s loaded.
def test_reproducible_in_another_process(tmp_path):
    want = _generated(tmp_path / "a", CELLS)
    images, indices = _images()
    np.savez(tmp_path / "in.npz", a=images[0], b=images[1], c=images[2], indices=indices,
             cells=np.array(CELLS[::-1]))
    p = subprocess.run([sys.executable, "-c", GENERATE, str(tmp_path / "in.npz"),
                        str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    other = corruptions.GeneratedSet(tmp_path / "b", images, indices, seed=5)
    assert other.folder.name == corruptions.GeneratedSet(tmp_path / "a", images, indices,
                                                         seed=5).folder.name
    assert other.calls == 0 and _same(_pixels(other), want)


def test_the_cache_resumes_and_is_keyed_by_images_and_seed(tmp_path, monkeypatch):
    """A second set over the same images and seed generates nothing (the library is not called);
    another seed, or one changed pixel, is another folder."""
    images, indices = _images()
    corruptions.GeneratedSet(tmp_path, images, indices, seed=5).generate(CELLS, progress=False)
    called = []
    monkeypatch.setattr(corruptions, "corrupt", lambda *a: called.append(a))
    again = corruptions.GeneratedSet(tmp_path, images, indices, seed=5)
    again.generate(CELLS, progress=False)
    assert len(_pixels(again)) == len(CELLS) and called == [] and again.calls == 0
    changed = [im.copy() for im in images]
    changed[1][0, 0, 0] ^= 1
    folders = {corruptions.GeneratedSet(tmp_path, im, indices, seed).folder.name
               for im, seed in ((images, 5), (images, 6), (changed, 5))}
    assert len(folders) == 3


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    """A cell whose file fails midway (after some bytes) leaves only key.json: no partial file
    that a rerun would take for a cached one, no temporary file; the rerun then writes it."""
    images, indices = _images()
    generated = corruptions.GeneratedSet(tmp_path, images, indices, seed=5)

    def dies_midway(f, **arrays):
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        generated.generate([("contrast", 1)], progress=False)
    assert sorted(p.name for p in generated.folder.iterdir()) == ["key.json"]
    monkeypatch.undo()
    generated.generate([("contrast", 1)], progress=False)
    assert len(generated.load("contrast", 1)) == len(images)


@pytest.mark.parametrize("damage", ["truncated", "other images"])
def test_a_damaged_cache_file_is_named_with_the_fix(tmp_path, damage):
    """A cell file damaged outside the project (a bad copy, another set's file under its name)
    is a UserError naming the file and saying to delete it; the rerun then regenerates it."""
    images, indices = _images()
    generated = corruptions.GeneratedSet(tmp_path, images, indices, seed=5)
    generated.generate([("contrast", 1)], progress=False)
    path = generated.path("contrast", 1)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        other = corruptions.GeneratedSet(tmp_path / "other", images[:2], indices[:2], seed=5)
        other.generate([("contrast", 1)], progress=False)
        path.write_bytes(other.path("contrast", 1).read_bytes())
    with pytest.raises(UserError, match="delete that file and rerun") as e:
        generated.load("contrast", 1)
    assert str(path) in str(e.value)
    path.unlink()
    assert len(generated.load("contrast", 1)) == len(images)


def test_small_images_and_a_missing_library_are_one_line(tmp_path, monkeypatch):
    images, indices = _images()
    with pytest.raises(UserError, match="smaller than 32x32"):
        corruptions.GeneratedSet(tmp_path, [images[0][:31]], indices[:1])
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # import raises ImportError.
    with pytest.raises(UserError, match=r"pip install -e '\.\[robustness\]'"):
        corruptions.corrupt(images[0], "fog", 1, 0)


def test_the_released_set_is_never_downloaded(tmp_path):
    """Not prepared in data_dir: one line saying how to prepare it, before any download."""
    with pytest.raises(UserError) as e:
        corruptions.check_released(str(tmp_path), [("glass_blur", 2)])
    assert "cifar10_corrupted/frosted_glass_blur_2 is not prepared" in str(e.value)
    assert "--corruption_set=generated" in str(e.value)
    assert not any(tmp_path.rglob("*.tar"))


def test_the_released_set_is_read_as_it_is_with_the_clean_labels(tmp_path, monkeypatch):
    """Under tfds' mock data (prepared, offline): a cell's images at the chosen indices as tfds
    gives them (glass_blur is tfds' frosted_glass_blur); other labels than the clean split's
    (another order of the images) are refused."""
    config = default_config()
    config.data_dir = str(tmp_path)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=12):
        cell = corruptions.released_config(config, "glass_blur", 2)
        assert cell.dataset == "cifar10_corrupted/frosted_glass_blur_2"
        images, labels = corruptions.read_images(cell, "test", np.arange(12))
        at = np.array([2, 5, 6, 11])
        load = corruptions.released(config, [("glass_blur", 2)], at, labels[at])
        assert all(np.array_equal(a, images[i]) for a, i in zip(load("glass_blur", 2), at))
        shuffled = corruptions.released(config, [("glass_blur", 2)], at, (labels[at] + 1) % 10)
        with pytest.raises(UserError, match="other labels than split"):
            shuffled("glass_blur", 2)


def test_the_released_set_is_refused_for_a_split_other_than_test():
    """cifar10_corrupted holds corrupted copies of CIFAR-10's test split only: another split's
    indices would read other images (or none), so it is refused before anything is read."""
    run = types.SimpleNamespace(num_classes=10)
    config = default_config()
    config.dataset, config.test_split = "cifar10", "train"
    with pytest.raises(UserError, match="split 'train' is another: pass --split=test"):
        evaluate._released(run, evaluate.Corruptions(released=True), config,
                           np.arange(3), np.zeros(3, int))


@pytest.mark.parametrize("args, text", [
    (["--shift=corruptions", "--corruptions=fgo"], "unknown ['fgo']"),
    (["--shift=corruptions", "--severities=0,6"], "severities from 1 to 5"),
    (["--num_images=10"], "--num_images applies only with --shift=corruptions"),
    (["--shift=corruptions", "--corruption_seed=-1"], "--corruption_seed=-1: give a seed"),
])
def test_bad_corruption_flags_are_one_line(smoke_run, tmp_path, capsys, args, text):
    argv = ["--workdir", str(smoke_run), "--output", str(tmp_path / "out"), *args]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


def test_a_missing_library_is_one_line_before_the_run_is_read(smoke_run, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # import raises ImportError.
    monkeypatch.setattr(evaluate, "load_run", lambda *a: pytest.fail("the run was read"))
    argv = ["--workdir", str(smoke_run), "--output", str(tmp_path / "out"), "--shift=corruptions"]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[robustness]'" in err[0], err


def _cell_files(cache) -> list[str]:
    """The names of the cell files in a corruption cache."""
    return sorted(p.name for p in cache.rglob("*.npz"))


def _files(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow  # Three evaluations in this process, ~30 s on 2 loaded cores.
def test_mixed_sizes_are_corrupted_at_their_own_size_and_resized_like_the_pipeline(
        smoke_run, tmp_path, monkeypatch):
    """An ImageFolder of 32x32, 40x52 and 64x64 images: the clean images of the corruption
    evaluation give the plain evaluation's logits (the same host resize); the severity scale
    names the sizes; a cache inside the run's workdir is refused."""
    classes = json.loads((smoke_run / "run_info.json").read_text())["class_names"]
    for c, name in enumerate(classes):
        for i, (h, w) in enumerate([(32, 32), (40, 52), (64, 64)]):
            write_image(tmp_path / "data" / "test" / name / f"{i}.png", h, w, "RGB", 10 * c + i)
    overrides = {"dataset": f"imagefolder:{tmp_path / 'data'}"}
    plain = evaluate.evaluate(str(smoke_run), str(tmp_path / "plain"), overrides=overrides)
    monkeypatch.setenv("CIFAR_FLAX_CACHE", str(tmp_path / "cache"))
    shift = evaluate.Corruptions(("pixelate",), (2,))
    got = evaluate.evaluate(str(smoke_run), str(tmp_path / "shift"), overrides=overrides,
                            shift=shift)
    assert _cell_files(tmp_path / "cache") == ["pixelate_2.npz"]
    block = got["corruptions"]
    assert block["cache"].startswith(str(corruptions.cache_folder()))
    assert got["test_accuracy"] == plain["test_accuracy"] == block["clean_accuracy"]
    a, b = (np.load(tmp_path / f / "predictions.npz") for f in ("plain", "shift"))
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
    assert block["severity_scale"].endswith("applied at each image's own size (32x32 to 64x64)")
    monkeypatch.setenv("CIFAR_FLAX_CACHE", str(smoke_run / "cache"))
    before = _files(smoke_run)
    with pytest.raises(UserError, match="lies inside the run's workdir"):
        evaluate.evaluate(str(smoke_run), str(tmp_path / "again"), overrides=overrides,
                          shift=evaluate.Corruptions(("pixelate",), (2,)))
    assert _files(smoke_run) == before


@pytest.mark.slow
def test_evaluate_shift_corruptions_end_to_end(smoke_run, tmp_path):
    """The command on the smoke run, two corruptions at one severity: every cell in
    results.json, mCA their mean, relative robustness mCA / clean, clean = the run's test
    accuracy (all 64 images), both figures drawn, the report naming the severity scale and
    never the released set's name; the cache in $CIFAR_FLAX_CACHE, the run untouched."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    before = _files(smoke_run)
    p = subprocess.run(
        [sys.executable, "-m", "cifar_flax.evaluate", "--workdir", str(smoke_run), "--output",
         str(out), "--shift=corruptions", "--corruptions=gaussian_noise,fog", "--severities=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CIFAR_FLAX_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    block = results["corruptions"]
    trained = json.loads((smoke_run / "report" / "results.json").read_text())
    assert block["clean_accuracy"] == results["test_accuracy"] == trained["test_accuracy"]
    assert block["images"] == results["test_examples"] == 64
    assert block["corruptions"] == ["gaussian_noise", "fog"] and block["severities"] == [3]
    cells = [block["accuracy"][c]["3"] for c in ("gaussian_noise", "fog")]
    assert cells == [block["correct"][c]["3"] / 64 for c in ("gaussian_noise", "fog")]
    assert block["mca"] == pytest.approx(np.mean(cells))
    assert block["relative_robustness"] == pytest.approx(np.mean(cells) / block["clean_accuracy"])
    assert block["generated_now"] == 2 * 64
    for name in ("corruption_heatmap.png", "accuracy_by_severity.png"):
        image = matplotlib.image.imread(out / name)
        assert min(image.shape[:2]) > 200 and image[..., :3].std() > 0.05, name
    report = (out / "report.md").read_text()
    assert block["severity_scale"] in report and "ImageNet-C constants" in report
    assert "CIFAR-10-C" not in report and "## Calibration" in report
    assert _cell_files(cache) == ["fog_3.npz", "gaussian_noise_3.npz"]
    assert _files(smoke_run) == before
