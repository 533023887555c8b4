"""predict: the run's own pipeline + eval step on new images; bad inputs are one error line."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import cpu_devices_env
from inference_utils import image_folder, write_image
from PIL import Image

from cifar_flax import predict
from cifar_flax.data import input_pipeline
from cifar_flax.inference import images as images_lib
from cifar_flax.inference.trained_run import load_run, read_config
from cifar_flax.run import checkpoints
from cifar_flax.run.evaluation import Evaluator
from cifar_flax.run.workdir import read_run_info


def _classes(run_dir) -> list[str]:
    return json.loads((run_dir / "run_info.json").read_text())["class_names"]


def test_predict_equals_the_eval_step_on_mixed_images(smoke_run, tmp_path):
    """Files of several sizes and modes: predict's logits equal the run's Evaluator on the same
    files read as an ImageFolder through the input pipeline (host resize to the run's size)."""
    paths = image_folder(tmp_path / "data", _classes(smoke_run))
    rows, skipped, loops = predict.predict(str(smoke_run), [str(tmp_path / "data" / "test")],
                                           top_k=2, batch_size=5)
    assert [r["file"] for r in rows] == paths and not skipped and not loops
    run = load_run(str(smoke_run))
    config = read_config(smoke_run)
    config.dataset = f"imagefolder:{tmp_path / 'data'}"
    config.train_split = config.test_split = "test"
    config.val_fraction, config.image_size = 0.0, run.image_shape[0]
    info = input_pipeline.get_info(config)
    ref = Evaluator(config, info, run.model, run.mesh, run.preprocessing)(
        run.variables, "test", keep_logits=True)
    got = np.stack([r["logits"] for r in rows])
    assert ref["logits"].shape == got.shape == (len(paths), run.num_classes)
    np.testing.assert_allclose(got, ref["logits"], atol=1e-5, rtol=0)
    assert [r["top"][0][0] for r in rows] == [run.class_names[i] for i in ref["logits"].argmax(-1)]


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = np.full((6, 5), 77, np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    g = images_lib.decode_file(images_lib.collect([str(tmp_path / "g.png")])[0])
    a = images_lib.decode_file(images_lib.collect([str(tmp_path / "a.png")])[0])
    assert g.shape == a.shape == (6, 5, 3)
    assert (g == 77).all()
    assert (a == np.array([10, 20, 30], np.uint8)).all()  # Alpha dropped, colour kept.


def test_cli_writes_csv_and_json_top_k(smoke_run, tmp_path, capsys):
    for i, (h, w) in enumerate([(32, 32), (48, 40)]):
        write_image(tmp_path / "in" / f"x{i}.png", h, w, "RGB", seed=i)
    np.save(tmp_path / "batch.npy", np.zeros((3, 32, 32, 3), np.uint8))
    inputs = [str(tmp_path / "in"), str(tmp_path / "batch.npy")]
    assert predict.main(["--workdir", str(smoke_run), *inputs, "--top_k", "3",
                         "--output", str(tmp_path / "p.csv")]) == 0
    table = capsys.readouterr().out
    assert "x1.png" in table and "batch.npy[2]" in table
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) == 1 + 2 + 3
    probs = [float(p) for p in rows[1][2::2]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert predict.main(["--workdir", str(smoke_run), *inputs, "--top_k", "9", "--tta", "flip",
                         "--output", str(tmp_path / "p.json")]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    classes = _classes(smoke_run)
    assert len(data) == 5 and all(len(d["top"]) == len(classes) for d in data)  # k capped.
    assert sum(t["probability"] for t in data[0]["top"]) == pytest.approx(1.0, abs=1e-5)


def _bad_inputs(tmp_path, smoke_run) -> dict[str, tuple[list[str], str]]:
    """name -> (argv after --workdir RUN, text the error line must contain)."""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "float.npy", np.zeros((2, 32, 32, 3), np.float32))
    np.save(tmp_path / "gray.npy", np.zeros((2, 32, 32), np.uint8))
    return {
        "non-image file": ([str(tmp_path / "notes.txt")], "notes.txt is not an image file"),
        "undecodable image": ([str(tmp_path / "broken.png")], "broken.png cannot be decoded"),
        "missing input": ([str(tmp_path / "nope.jpg")], "nope.jpg does not exist"),
        "empty folder": ([str(tmp_path / "empty")], "contains no files"),
        "npy dtype": ([str(tmp_path / "float.npy")], "float32 (2, 32, 32, 3)"),
        "npy shape": ([str(tmp_path / "gray.npy")], "uint8 (2, 32, 32)"),
        "output suffix": ([str(tmp_path / "float.npy"), "--output", "p.txt"], ".csv or .json"),
    }


@pytest.mark.parametrize("case", ["non-image file", "undecodable image", "missing input",
                                  "empty folder", "npy dtype", "npy shape", "output suffix"])
def test_bad_input_is_one_error_line(smoke_run, tmp_path, capsys, case):
    argv, text = _bad_inputs(tmp_path, smoke_run)[case]
    assert predict.main(["--workdir", str(smoke_run), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], err


def test_skip_bad_skips_and_counts(smoke_run, tmp_path, capsys):
    write_image(tmp_path / "in" / "ok.png", 32, 32, "RGB", seed=0)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"nope")
    assert predict.main(["--workdir", str(smoke_run), str(tmp_path / "in"), "--skip_bad"]) == 0
    out = capsys.readouterr()
    assert "ok.png" in out.out and "bad.jpg" not in out.out
    assert "skipped 1 bad files" in out.err


@pytest.mark.parametrize("case", ["missing run", "run without checkpoint"])
def test_bad_run_is_one_error_line(smoke_run, tmp_path, capsys, case):
    run = tmp_path / "run"
    if case == "run without checkpoint":
        run.mkdir()
        shutil.copy(smoke_run / "config.json", run / "config.json")
    write_image(tmp_path / "x.png", 32, 32, "RGB", seed=0)
    assert predict.main(["--workdir", str(run), str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    expected = "does not exist" if case == "missing run" else "has no finished checkpoint"
    assert len(err) == 1 and err[0].startswith(f"error: {run}") and expected in err[0], err


def test_command_line_prints_no_traceback(tmp_path):
    """The real ``python -m`` entry point: exit status 1, one line on stderr."""
    p = subprocess.run([sys.executable, "-m", "cifar_flax.predict", "--workdir",
                        str(tmp_path / "none"), str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'} does not exist; pass the --workdir of a training run."]


@pytest.mark.slow
def test_two_devices_restore_and_pad_like_one(smoke_run, tmp_path):
    """The run was written on 1 device; on 2 (virtual CPU) devices its checkpoint restores with
    explicit shardings and an odd batch is padded: the same predictions as here."""
    np.save(tmp_path / "x.npy", np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), np.uint8))
    rows = predict.predict(str(smoke_run), [str(tmp_path / "x.npy")], top_k=4)[0]
    env = cpu_devices_env(2, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "cifar_flax.predict", "--workdir", str(smoke_run),
                        str(tmp_path / "x.npy"), "--top_k", "4", "--output",
                        str(tmp_path / "p.json")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads((tmp_path / "p.json").read_text())
    assert [[t["class"] for t in g["top"]] for g in got] == [[c for c, _ in r["top"]] for r in rows]
    np.testing.assert_allclose([[t["probability"] for t in g["top"]] for g in got],
                               [[p for _, p in r["top"]] for r in rows], atol=1e-6)


def test_run_info_is_written_and_old_runs_fall_back(smoke_run, tmp_path, caplog):
    """Training writes run_info.json; a run without it (older) re-reads its dataset's info."""
    info = read_run_info(str(smoke_run))
    assert info["class_names"] == [f"class_{i}" for i in range(4)]
    assert info["image_shape"] == (32, 32, 3) and info["dataset"] == "synthetic"
    old = tmp_path / "old_run"
    shutil.copytree(smoke_run, old, ignore=shutil.ignore_patterns("run_info.json", "tensorboard"))
    with caplog.at_level(logging.WARNING):
        run = load_run(str(old))
    assert run.class_names == info["class_names"] and run.image_shape == info["image_shape"]
    assert any("no run_info.json" in r.getMessage() for r in caplog.records)


@pytest.fixture
def run_copy(smoke_run, tmp_path):
    """A copy of the smoke run that a test may change (the shared one must stay intact)."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("tensorboard"))
    return run


def _vanishing_reads(monkeypatch, times: int, when: str = "before") -> list[str]:
    """Make the first ``times`` checkpoint reads find their step folder deleted (a training run
    rotating it away) ``"before"`` the read starts or ``"during"`` it (after its shapes were
    read, before its arrays); the deleted steps, in order."""
    deleted = []

    def delete(ckpt):
        if len(deleted) < times:
            shutil.rmtree(ckpt.path)
            deleted.append(f"{ckpt.kind}/{ckpt.step}")

    real_restore, real_shapes = checkpoints.restore_variables, checkpoints.stored_shapes

    def restore(ckpt, *args, **kwargs):
        delete(ckpt)
        return real_restore(ckpt, *args, **kwargs)

    def shapes(ckpt):
        out = real_shapes(ckpt)
        delete(ckpt)
        return out

    if when == "before":
        monkeypatch.setattr(checkpoints, "restore_variables", restore)
    else:
        monkeypatch.setattr(checkpoints, "stored_shapes", shapes)
    return deleted


def _top(rows) -> list[list[tuple[str, float]]]:
    return [[(c, round(p, 5)) for c, p in r["top"]] for r in rows]


@pytest.mark.parametrize("when", ["before", "during"])
def test_step_deleted_while_read_falls_back_to_the_next_newest(run_copy, tmp_path, capsys,
                                                               monkeypatch, when):
    """A run still training rotates its latest steps away: the step predict chose vanishes before
    or while it is read, so predict reads the next newest one (its predictions), with no
    traceback."""
    latest = run_copy / "checkpoints" / "latest"
    steps = sorted(int(p.name) for p in latest.iterdir())
    assert len(steps) >= 2, steps
    np.save(tmp_path / "x.npy", np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), np.uint8))
    inputs = [str(tmp_path / "x.npy")]
    older = predict.predict(str(latest / str(steps[-2])), inputs, top_k=4)[0]
    newest = predict.predict(str(latest / str(steps[-1])), inputs, top_k=4)[0]
    assert _top(older) != _top(newest)  # The test tells the two steps apart.
    deleted = _vanishing_reads(monkeypatch, 1, when)
    assert predict.main(["--workdir", str(run_copy), "--checkpoint", "latest", *inputs,
                         "--top_k", "4", "--output", str(tmp_path / "p.json")]) == 0
    assert deleted == [f"latest/{steps[-1]}"]
    got = json.loads((tmp_path / "p.json").read_text())
    assert [[(t["class"], round(t["probability"], 5)) for t in g["top"]] for g in got] == \
        _top(older)
    assert "Traceback" not in capsys.readouterr().err


def test_every_step_deleted_while_read_is_one_error_line(run_copy, tmp_path, capsys,
                                                         monkeypatch):
    """When every step vanishes as it is read, predict stops with one line naming them."""
    np.save(tmp_path / "x.npy", np.zeros((1, 32, 32, 3), np.uint8))
    deleted = _vanishing_reads(monkeypatch, 99)
    assert predict.main(["--workdir", str(run_copy), "--checkpoint", "latest",
                         str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(deleted) >= 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "deleted while" in err[0] and all(d in err[0] for d in deleted), err


def test_help_says_the_images_follow_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "the images follow the flags: --workdir RUN [--flags] IMAGE..." in help_text


def test_relative_workdir(smoke_run, tmp_path, monkeypatch):
    """``--workdir run`` from the run's parent folder (Orbax reads absolute paths only)."""
    np.save(tmp_path / "x.npy", np.zeros((1, 32, 32, 3), np.uint8))
    monkeypatch.chdir(smoke_run.parent)
    assert predict.main(["--workdir", smoke_run.name, str(tmp_path / "x.npy")]) == 0


def test_missing_output_folder_is_created(smoke_run, tmp_path):
    write_image(tmp_path / "x.png", 32, 32, "RGB", seed=0)
    out = tmp_path / "new" / "sub" / "p.csv"
    assert predict.main(["--workdir", str(smoke_run), str(tmp_path / "x.png"),
                         "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_output_in_a_project_folder_with_its_own_checkpoints(smoke_run, tmp_path, capsys,
                                                            monkeypatch):
    """``--output preds.csv`` from a project folder holding a ``checkpoints/`` folder and a
    ``metrics.jsonl`` of its own is written: a run is such a folder with the config.json or
    run_info.json training writes, and only then refused outside its predictions/."""
    write_image(tmp_path / "x.png", 32, 32, "RGB", seed=0)
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(project)
    argv = ["--workdir", str(smoke_run), str(tmp_path / "x.png"), "--output", "preds.csv"]
    assert predict.main(argv) == 0
    assert len((project / "preds.csv").read_text().splitlines()) == 2
    (project / "run_info.json").write_text((smoke_run / "run_info.json").read_text())
    capsys.readouterr()
    assert predict.main([*argv[:-1], "sub/p.csv"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"inside the training run {project}" in err[0], err


def _unwritable_output(tmp_path, case: str) -> tuple[str, str]:
    """(--output, text its error line must contain). Permission bits do not stop root: there
    the output's parent is a file, which stops every user."""
    if case == "output is a folder":
        (tmp_path / "p.csv").mkdir()
        return str(tmp_path / "p.csv"), "is a folder"
    if os.geteuid() == 0:
        (tmp_path / "blocker").write_text("a file")
        return str(tmp_path / "blocker" / "p.csv"), "is a file"
    (tmp_path / "ro").mkdir(mode=0o500)
    return str(tmp_path / "ro" / "p.csv"), "cannot write"


@pytest.mark.parametrize("case", ["unwritable folder", "output is a folder"])
def test_unwritable_output_fails_before_the_run_is_loaded(smoke_run, tmp_path, capsys,
                                                          monkeypatch, case):
    output, text = _unwritable_output(tmp_path, case)

    def no_load(*args, **kwargs):
        raise AssertionError("the run was loaded before --output was checked")

    monkeypatch.setattr(predict, "load_run", no_load)
    write_image(tmp_path / "x.png", 32, 32, "RGB", seed=0)
    assert predict.main(["--workdir", str(smoke_run), str(tmp_path / "x.png"),
                         "--output", output]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output={output}") and text in err[0], err


def _folder_with_a_loop(tmp_path):
    """in/a.png, in/sub/b.png, in/alias -> in/sub (a second name, no loop), in/loop -> in."""
    root = tmp_path / "in"
    write_image(root / "a.png", 32, 32, "RGB", seed=0)
    write_image(root / "sub" / "b.png", 40, 36, "RGB", seed=1)
    os.symlink(root / "sub", root / "alias")
    os.symlink(root, root / "loop")
    return root


def test_symlink_loop_is_one_error_line_naming_it(smoke_run, tmp_path, capsys):
    root = _folder_with_a_loop(tmp_path)
    assert predict.main(["--workdir", str(smoke_run), str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: symlink loop"), err
    assert f"{root / 'loop'} -> {root} " in err[0] and "loop/loop" not in err[0], err


def test_skip_bad_predicts_each_real_image_once_past_a_loop(smoke_run, tmp_path, capsys):
    root = _folder_with_a_loop(tmp_path)
    assert predict.main(["--workdir", str(smoke_run), str(root), str(root / "sub"), "--skip_bad",
                         "--output", str(tmp_path / "p.json")]) == 0
    files = [d["file"] for d in json.loads((tmp_path / "p.json").read_text())]
    real = sorted(os.path.realpath(root / name) for name in ("a.png", "sub/b.png"))
    assert sorted(os.path.realpath(f) for f in files) == real, files
    err = capsys.readouterr().err
    assert "symlink loop" in err and f"{root / 'loop'} -> {root}" in err, err
