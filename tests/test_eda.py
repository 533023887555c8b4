"""EDA: exact counts and pixel statistics on a generated tree; the CLI writes real PNGs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from train_utils import default_sigint, make_image_tree

# Per class: (colour of its images, train count, test count). Known values -> known statistics.
CLASSES = {"blue": ((0, 0, 200), 3, 1), "grey": ((100, 100, 100), 2, 2), "red": ((250, 10, 0), 5, 1)}


pytestmark = pytest.mark.usefixtures("fresh_caches")


def _pixels(i, split, name):
    pixels = np.zeros((4, 5, 3), np.uint8) + np.array(CLASSES[name][0], np.uint8)
    pixels[0, 0] = 255 - pixels[0, 0]  # one odd pixel per image: non-trivial min/max
    return pixels


def _tree(root):
    make_image_tree(root, {"train": {name: c[1] for name, c in CLASSES.items()},
                           "test": {name: c[2] for name, c in CLASSES.items()}}, _pixels)


def _expected(split_index):
    images = []
    for colour, *counts in CLASSES.values():
        img = np.zeros((4, 5, 3)) + colour
        img[0, 0] = 255 - img[0, 0]
        images += [img] * counts[split_index]
    return np.stack(images)


def _config_file(tmp_path, dataset):
    path = tmp_path / "eda_config.py"
    path.write_text(
        "from cifar_flax.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.dataset = {dataset!r}\n"
        "    c.val_fraction = 0.0\n"
        "    return c\n"
    )
    return str(path)


def _run_cli(tmp_path, dataset, out):
    cmd = [sys.executable, "-m", "cifar_flax.eda", "--config", _config_file(tmp_path, dataset),
           f"--workdir={out}", "--samples_per_class=2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_eda_cli_exact_stats_and_pngs(tmp_path):
    _tree(tmp_path / "data")
    out = tmp_path / "out"
    result = _run_cli(tmp_path, f"imagefolder:{tmp_path / 'data'}", out)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["image_shape"] == [4, 5, 3] and stats["dtype"] == "uint8"
    assert stats["uniform_size"] is True and stats["class_names"] == ["blue", "grey", "red"]
    assert set(stats["splits"]) == {"train", "test"}
    for split_index, split in enumerate(("train", "test")):
        s, ref = stats["splits"][split], _expected(split_index)
        assert s["images_per_class"] == {k: v[1 + split_index] for k, v in CLASSES.items()}
        assert s["num_images"] == len(ref) and s["non_finite"] == 0
        np.testing.assert_allclose(s["channel_mean"], ref.mean((0, 1, 2)), rtol=1e-12)
        np.testing.assert_allclose(s["channel_std"], ref.std((0, 1, 2)), rtol=1e-9)
        assert s["channel_min"] == ref.min((0, 1, 2)).tolist()
        assert s["channel_max"] == ref.max((0, 1, 2)).tolist()
        np.testing.assert_allclose([s["mean"], s["std"]], [ref.mean(), ref.std()], rtol=1e-9)
    for png in ("class_distribution.png", "samples.png", "pixel_histograms.png"):
        with Image.open(out / png) as im:
            im.verify()
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
            assert np.asarray(im.convert("L")).std() > 1  # not a blank canvas
    md = (out / "eda.md").read_text()
    assert all(f"]({png})" in md for png in ("class_distribution.png", "samples.png"))


@pytest.mark.slow
def test_eda_cli_missing_folder_is_one_line(tmp_path):
    result = _run_cli(tmp_path, f"imagefolder:{tmp_path / 'missing'}", tmp_path / "out")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ImageFolder directory") and "missing" in last
    assert "Traceback" not in result.stderr


def test_samples_grid_has_no_empty_band(tmp_path):
    from PIL import Image

    from cifar_flax.analysis.dataset_stats import plot_samples

    rng = np.random.default_rng(0)
    names = tuple(f"class{i}" for i in range(10))
    samples = [[rng.integers(0, 255, (32, 32, 3)).astype(np.uint8) for _ in range(8)]
               for _ in names]
    plot_samples(samples, names, str(tmp_path / "samples.png"))
    pixels = np.asarray(Image.open(tmp_path / "samples.png").convert("L"))

    def longest_blank_run(blank: np.ndarray) -> int:
        best = run = 0
        for b in blank:
            run = run + 1 if b else 0
            best = max(best, run)
        return best

    white = pixels > 250
    assert longest_blank_run(white.all(1)) < 0.03 * pixels.shape[0]  # No white band across ...
    assert longest_blank_run(white.all(0)) < 0.05 * pixels.shape[1]  # ... or down the image.


@pytest.mark.slow
def test_eda_ctrl_c_is_one_line(tmp_path):
    import os
    import signal
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for delay in (3.0, 1.5, 0.7):  # Shorter when a fast machine finished the EDA first.
        proc = subprocess.Popen(
            [sys.executable, "-m", "cifar_flax.eda", "--config", "configs/smoke.py", "--workdir",
             str(tmp_path / f"eda_{delay}")], cwd=root, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        time.sleep(delay)  # Importing TensorFlow, scanning or plotting: not done yet.
        if proc.poll() is None:
            break
        proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("Interrupted (Ctrl-C)")]
    assert lines in (  # During the imports (a loaded machine) or once the EDA runs.
        ["Interrupted (Ctrl-C): stopped before it wrote anything."],
        ["Interrupted (Ctrl-C): EDA stopped; nothing was written for the unfinished scan."]), err
    assert not (tmp_path / f"eda_{delay}" / "stats.json").exists()


@pytest.mark.slow
def test_ctrl_c_after_the_eda_finished_changes_nothing(tmp_path):
    """A Ctrl-C that arrives once the EDA has written everything (while Python shuts down)
    leaves the finished command's status 0."""
    import os
    import signal

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_flax.eda", "--config", "configs/smoke.py", "--workdir",
         str(tmp_path / "eda")], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=default_sigint)
    line = proc.stdout.readline()
    assert line.startswith("EDA written to"), (line, proc.stderr.read()[-2000:])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Interrupted" not in err and (tmp_path / "eda" / "eda.md").exists()
