"""experiments/data_efficiency.py: the budgets, the small-data subsets, and the ``--smoke`` sweep
end to end (every run a real ``python -m cifar_flax.main``), from the session's smoke run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, load_config
from train_utils import make_image_tree

from cifar_flax.config import load_module
from cifar_flax.data.subset import link_few_shot

SCRIPT = ROOT / "experiments" / "data_efficiency.py"
ROWS = ["linear", "staged", "full", "lpft", "scratch"]
# The smoke sweep's row: the recipe (rows of two and three phases and the one without weights
# run end to end in the smoke ablation, tests/test_notebook_ablation.py; every row's command and
# budget split is checked below without running it).
SMOKE_ROWS = ["full"]


@pytest.fixture(scope="module")
def script():
    return load_module(str(SCRIPT))


def test_budget_grows_with_the_data_and_the_batch_fits(script):
    b = {pc: script.budget(pc, 5) for pc in (10, 100, 1000)}
    assert [b[pc]["steps"] for pc in (10, 100, 1000)] == [100, 190, 600]
    assert [b[pc]["batch_size"] for pc in (10, 100, 1000)] == [32, 128, 128]
    for pc, x in b.items():
        assert x["batch_size"] <= 5 * pc and x["steps"] // x["eval_every_steps"] in (20, 21)
    # The minutes-long runs save "latest" at phase boundaries only, the 1,000-per-class ones at
    # each validation too.
    assert [b[pc]["save_at_evaluations"] for pc in (10, 100, 1000)] == [False, False, True]


def test_a_short_run_saves_only_at_phase_boundaries(script, tmp_path):
    args = script.parse_args(["--weights", "torchvision", "--dataset", "imagefolder:/data/b",
                              "--out", str(tmp_path), "--rows", "full"])
    for pc, saves in ((10, False), (1000, True)):
        cmd = script.run_command("full", pc, 0, args, "/data/b", script.budget(pc, 5))
        assert ("--config.checkpoint.at_epoch_end=False" not in cmd) == saves


@pytest.mark.parametrize("row", ROWS)
def test_phase_overrides_split_the_budget_in_the_rows_proportions(script, row):
    config = load_config("ablation", row)
    b = script.budget(100, 5)
    args = script.phase_overrides(config, b)
    steps = [int(a.split("=")[1]) for a in args if ".steps=" in a]
    assert sum(steps) == b["steps"] and len(steps) == len(config.phases)
    total = sum(p.epochs for p in config.phases)
    for s, p in zip(steps, config.phases):
        assert abs(s - b["steps"] * p.epochs / total) <= 1
    warmups = [float(a.split("=")[1]) for a in args if "warmup_epochs=" in a]
    for w, s, p in zip(warmups, steps, config.phases):  # Each warmup keeps its share.
        assert w * b["steps_per_epoch"] / s == pytest.approx(p.warmup_epochs / p.epochs, rel=1e-4)


def test_every_row_runs_the_real_command_and_only_scratch_starts_without_weights(script,
                                                                                 tmp_path):
    args = script.parse_args(["--weights", "torchvision", "--dataset", "imagefolder:/data/b",
                              "--out", str(tmp_path), "--rows", ",".join(ROWS)])
    b = script.budget(10, 5)
    for row in ROWS:
        cmd = script.run_command(row, 10, 1, args, "/data/b_10", b)
        assert cmd[1:4] == ["-m", "cifar_flax.main", f"--config=configs/ablation.py:{row}"]
        weights = [a for a in cmd if a.startswith(("--config.pretrained.", "--config.init_from"))]
        assert bool(weights) == (row != "scratch"), (row, cmd)
        assert {"--config.dataset=imagefolder:/data/b_10", "--config.seed=1",
                f"--config.batch_size={b['batch_size']}"} <= set(cmd), cmd
        assert cmd[-2 * len(load_config("ablation", row).phases):] == script.phase_overrides(
            load_config("ablation", row), b)


# Handmade results: (row, images per class) -> test accuracy of seeds 0, 1, 2 (linear at 100:
# seed 0 only, a sweep still running). Mean +- sample std (ddof 1), by hand, in percent:
# full 10: 60 +- 10; full 100: 82 +- 2; linear 10: 35 +- sqrt(0.0039) = 6.24; linear 100: 71 +- 0.
# (Population std would give 8.16, 1.63, 5.10; grouping by seed mixes the sizes.)
HANDMADE = {("full", 10): [0.50, 0.60, 0.70], ("full", 100): [0.80, 0.84, 0.82],
            ("linear", 10): [0.30, 0.33, 0.42], ("linear", 100): [0.71]}


def test_the_table_is_mean_and_sample_std_over_seeds_per_row_and_size(script, tmp_path):
    runs = [{"row": row, "per_class": pc, "seed": seed, "test_accuracy": acc,
             "test_examples": 500} for (row, pc), accs in HANDMADE.items()
            for seed, acc in enumerate(accs)]
    stats = script.summarize(runs)
    assert set(stats) == set(HANDMADE)
    for key, want in {("full", 10): (0.60, 0.10, 3), ("full", 100): (0.82, 0.02, 3),
                      ("linear", 10): (0.35, 0.0039 ** 0.5, 3),
                      ("linear", 100): (0.71, 0.0, 1)}.items():
        assert stats[key] == pytest.approx(want, abs=1e-12), key
    summary = {"runs": runs, "seeds": [0, 1, 2], "rows": ["linear", "full"],
               "budgets": {"10": script.budget(10, 5), "100": script.budget(100, 5)},
               "row_what": {"linear": "a probe", "full": "every layer"}}
    table = script.write_table(summary, str(tmp_path), "handmade")
    assert "| linear | 35.00 +- 6.24 | 71.00 +- 0.00 (n=1) |" in table
    assert "| full | 60.00 +- 10.00 | 82.00 +- 2.00 |" in table
    assert (tmp_path / "table.md").read_text() == table


def test_few_shot_subsets_share_one_validation_set_and_nest(tmp_path):
    src = tmp_path / "src"
    make_image_tree(src, {"train": {"a": 12, "b": 12}, "test": {"a": 3, "b": 3}})

    def files(dst, split):
        return {(c, f) for c in ("a", "b") for f in os.listdir(dst / split / c)}

    subsets = {(pc, seed): tmp_path / f"{pc}_{seed}" for pc in (2, 6) for seed in (0, 1)}
    for (pc, seed), dst in subsets.items():
        assert link_few_shot(str(src), str(dst), pc, seed, 3) == {"train": 2 * pc, "val": 6,
                                                                   "test": 6}
    val = files(subsets[2, 0], "val")
    for (pc, seed), dst in subsets.items():
        assert files(dst, "val") == val and not files(dst, "train") & val
        assert os.path.islink(dst / "test" / "a")
    assert files(subsets[2, 0], "train") <= files(subsets[6, 0], "train")  # A seed's nest.
    assert files(subsets[6, 0], "train") != files(subsets[6, 1], "train")  # Seeds differ.
    assert link_few_shot(str(src), str(subsets[2, 0]), 2, 0, 3)["train"] == 4  # No-op.
    with pytest.raises(Exception, match="another subset"):
        link_few_shot(str(src), str(subsets[2, 0]), 2, 1, 3)
    with pytest.raises(Exception, match="not enough"):
        link_few_shot(str(src), str(tmp_path / "big"), 10, 0, 3)


def test_bad_arguments_are_one_line(script, tmp_path, capsys):
    for argv, text in [(["--out", str(tmp_path)], "give --weights and --dataset"),
                       (["--smoke", "--out", str(tmp_path), "--rows", "full,nope"], "nope"),
                       (["--smoke", "--out", str(tmp_path), "--sizes", "a"], "integers")]:
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert text in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_sweep(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("data_efficiency")
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--weights", str(smoke_run), "--out", str(out),
           "--rows", ",".join(SMOKE_ROWS)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out, p.stdout, cmd


@pytest.mark.slow
def test_smoke_sweep_summary_holds_every_run(smoke_sweep, script, smoke_run):
    out, stdout, _ = smoke_sweep
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    want = {(r, pc, s) for r in SMOKE_ROWS for pc in script.SMOKE["sizes"]
            for s in script.SMOKE["seeds"]}
    assert {(r["row"], r["per_class"], r["seed"]) for r in runs} == want and len(runs) == len(want)
    for r in runs:
        workdir = out / "runs" / f"{r['per_class']}pc" / r["row"] / f"seed{r['seed']}"
        results = json.loads((workdir / "report" / "results.json").read_text())
        assert r["test_accuracy"] == results["test_accuracy"] and r["steps"] == results["steps"]
        config = json.loads((workdir / "config.json").read_text())
        assert config["val_split"] == "val" and config["seed"] == r["seed"]
        assert config["dataset"].endswith(f"data/{r['per_class']}pc_seed{r['seed']}")
        assert (config["init_from"] == "") == (r["row"] == "scratch")
        planned = summary["budgets"][str(r["per_class"])]["steps"]
        assert r["steps"] <= planned if r["row"] == "staged" else r["steps"] == planned
        assert r["command"].startswith("python -m cifar_flax.main")
        # Robustness and calibration: the run's shift evaluation and its own report.
        shift = json.loads((out / "shift" / f"{r['per_class']}pc" / r["row"] / f"seed{r['seed']}"
                            / "results.json").read_text())["corruptions"]
        assert r["mca"] == shift["mca"] and shift["images"] == script.SMOKE["shift_images"]
        assert sorted(shift["accuracy"]) == ["fog", "gaussian_noise"]
        assert r["ece"] == results["calibration"]["raw"]["ece"]
        # Commands as a reader reruns them: the machine's folders are named, not spelled out.
        assert r["shift_command"].startswith("python -m cifar_flax.evaluate ")
        for command in (r["command"], r["shift_command"]):
            assert str(out) not in command and str(ROOT) not in command and "$OUT/" in command
        assert "$WEIGHTS" in r["command"] and "$DATA" not in r["command"]
    for name in ("summary.json", "table.md"):  # No folder of this machine anywhere.
        text = (out / name).read_text()
        for folder in (out, smoke_run, ROOT, sys.executable):
            assert str(folder) not in text, (name, folder)
    table = (out / "table.md").read_text()
    for row in SMOKE_ROWS:
        assert f"| {row} |" in table and f"| {row} |" in stdout
    cells = re.findall(r"\| \d+\.\d\d \+- \d+\.\d\d ", table)  # mean +- std per row and size
    assert len(cells) == len(script.MEASURES) * len(SMOKE_ROWS) * len(script.SMOKE["sizes"])


@pytest.mark.slow
def test_smoke_sweep_plot_and_rerun_reads_back(smoke_sweep):
    from PIL import Image

    out, _, cmd = smoke_sweep
    for name in ("data_efficiency.png", "corrupted_vs_clean.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 600 and im.size[1] > 400
    before = (out / "summary.json").read_text()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "running 0" in p.stdout
    after = json.loads((out / "summary.json").read_text())
    assert after["runs"] == json.loads(before)["runs"]
    # --report-only: nothing runs; the runs finished so far, and the missing one named.
    report = out / "runs" / "2pc" / "full" / "seed0" / "report"
    report.rename(report.with_name("report.aside"))
    try:
        p = subprocess.run(cmd + ["--report-only"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    finally:
        report.with_name("report.aside").rename(report)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "3 of 4 runs finished; not yet: 2pc/full/seed0" in p.stdout
    partial = json.loads((out / "summary.json").read_text())["runs"]
    assert len(partial) == 3 and ("full", 2, 0) not in {
        (r["row"], r["per_class"], r["seed"]) for r in partial}
    assert re.search(r"\| full \| \d+\.\d\d \+- 0\.00 \(n=1\) \|", p.stdout)
