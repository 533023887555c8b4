"""experiments/notebook_ablation.py and configs/ablation.py: the original notebook's progression,
row by row.

The row configs are checked against configs/finetune.py (each row adds one change); the script's
command building without running anything; and the whole ``--smoke`` ablation end to end, from
the session's smoke run as the earlier run (init_from), as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, load_config
from train_utils import make_image_tree

from cifar_flax import UserError, train
from cifar_flax.config import assign_groups, load_module
from cifar_flax.data.subset import link_subset
from cifar_flax.run.model_setup import build_model

SCRIPT = ROOT / "experiments" / "notebook_ablation.py"
ROWS = ["linear", "dense", "top", "all", "aug", "staged", "scratch"]  # The notebook's progression.
# The smoke ablation's rows: one of each kind (cached head; two phases; three phases with early
# stopping; random init). Every row's config is checked above without running it.
SMOKE_ROWS = ["linear", "top", "staged", "scratch"]


def _script():
    return load_module(str(SCRIPT))


# ---- the rows ----


def test_rows_add_one_change_each_and_recipe_is_finetune():
    finetune = load_config("finetune")
    module = load_module(str(ROOT / "configs" / "ablation.py"))
    assert list(module.PROGRESSION) == ROWS
    rows = {r: load_config("ablation", r) for r in module.ROWS}
    assert rows["recipe"].to_dict() == finetune.to_dict()
    assert rows["full"].to_dict() == finetune.to_dict()  # The sweep's winner is the default.
    assert rows["linear"].model.head_hidden == () and rows["dense"].model.head_hidden == (256,)
    assert [len(rows[r].phases) for r in ("dense", "top", "all", "aug")] == [1, 2, 3, 3]
    budget = module.BUDGET_EPOCHS
    for r in set(module.ROWS) - {"top"}:  # The same budget for every row but `top` (2 phases).
        assert sum(p.epochs for p in rows[r].phases) == budget, r
    staged = [p.to_dict() for p in module.staged_phases()]
    assert [p.to_dict() for p in rows["all"].phases] == staged
    for r in ("linear", "dense", "top", "all"):  # No augmentation before `aug`.
        assert rows[r].augment.crop_padding == 0 and not rows[r].augment.flip
    for r in ("aug", "staged", "full", "lpft", "scratch"):
        assert rows[r].augment.to_dict() == rows["recipe"].augment.to_dict()
    for r in set(module.ROWS) - {"staged", "recipe"}:  # The rest test their last weights.
        assert not rows[r].early_stopping.enabled and not rows[r].early_stopping.restore_best
    assert rows["staged"].early_stopping.enabled
    assert [p.to_dict() for p in rows["staged"].phases] == staged
    full, lpft = rows["full"].phases, rows["lpft"].phases
    assert len(full) == 1 and len(full[0].trainable) == 6
    assert lpft[0].trainable == ("head",) and len(lpft[1].trainable) == 6
    assert lpft[0].epochs == budget / 4 and not rows["lpft"].frozen_bn_inference
    scratch = rows["scratch"]
    assert scratch.pretrained.source == "" and len(scratch.phases) == 1
    for r in ("full", "lpft", "scratch"):  # The same network: ResNet50 with a linear head.
        assert rows[r].model.to_dict() == rows["linear"].model.to_dict()


def test_staged_trains_the_head_then_stage3_stage4_and_head_then_everything():
    """The original notebook's staged recipe (configs/ablation.py, experiments/README.md): 3
    epochs of the head at lr 0.05, 6 of stage3+stage4 at 0.01 with the head at 0.02, 8 of every
    layer at 0.002; checked on a real ResNet50's parameters through the optimizer each phase
    builds."""
    config = load_config("ablation", "staged")
    res = config.augment.resolution
    params = jax.eval_shape(build_model(config, 10).init, jax.random.key(0),
                            np.zeros((1, res, res, 3), np.float32))["params"]
    groups = assign_groups(train.flat_paths(params), dict(config.groups))
    want = [("head", ("head",), {"head": 0.05}, 3),
            ("upper", ("stage3", "stage4", "head"),
             {"stage3": 0.01, "stage4": 0.01, "head": 0.02}, 6),
            ("all", ("stem", "stage1", "stage2", "stage3", "stage4", "head"),
             dict.fromkeys(("stem", "stage1", "stage2", "stage3", "stage4", "head"), 0.002), 8)]
    assert len(config.phases) == len(want)
    for i, (name, trained, lrs, epochs) in enumerate(want):
        p = config.phases[i]
        assert (p.name, p.epochs) == (name, epochs)
        assert {g: p.group_lr.get(g, p.lr) for g in p.trainable} == lrs
        plan = train.build_phase(config, params, i, steps_per_epoch=10)
        trainable = train.flat_paths(plan.trainable)
        assert {path for path, on in trainable.items() if on} == {
            path for path, g in groups.items() if g in trained}, name
        assert set(plan.schedules) == set(trained), name
        assert plan.bn_train_modules == tuple(g for g in trained if g != "head"), name
    assert len(set(groups.values())) == 6 and len(groups) == 163  # ResNet50's, the head's 4.


def test_smoke_rows_use_the_smoke_data_and_network():
    smoke, row = load_config("smoke"), load_config("ablation", "top,smoke")
    assert row.dataset == "synthetic" and row.model.stage_sizes == smoke.model.stage_sizes
    assert row.model.base_width == smoke.model.base_width
    assert sum(p.epochs for p in row.phases) == pytest.approx(3.0 * 9 / 17)  # The budget, scaled.
    with pytest.raises(ValueError, match="ROW\\[,smoke\\]"):
        load_config("ablation", "topp")


# ---- commands (nothing runs) ----


def test_commands_carry_weights_budget_and_the_run_network(smoke_run, tmp_path):
    s = _script()
    args = s.parse_args(["--out", str(tmp_path), "--epochs-scale", "0.5", "--resolution", "32"])
    top = s.row_command("top", args, "imagefolder:/data/B", str(smoke_run))
    assert f"--config.init_from={smoke_run}" in top and "--config.pretrained.source=" in top
    assert "--config.model.stage_sizes=(1,1,1,1)" in top and "--config.model.base_width=8" in top
    assert f"--config.phases[1].epochs={6 * 0.5:g}" in top
    assert "--config.augment.resolution=32" in top and "--config.dataset=imagefolder:/data/B" in top
    scratch = s.row_command("scratch", args, "", str(smoke_run))
    assert not any("init_from" in a or "pretrained" in a for a in scratch)
    assert "--config.model.base_width=8" in scratch  # The same network as the weights' run.
    keras = s.row_command("dense", args, "", "keras")
    assert "--config.pretrained.source=keras" in keras and "--config.model.layout=v1" in keras


def test_portable_names_each_folder_whole_and_runs_from_the_root():
    """The one function the experiment scripts write their commands and paths with: set the
    placeholders to the folders, and the written command is the command run (bash expands it)."""
    portable = _script().portable
    folders = {"/tmp/x/run": "$OUT", "/tmp/x/run2/": "$DATASET", "/tmp/x/run/pre": "$WEIGHTS",
               "runs/rel": "$DATA", "": "$DATA"}  # Relative or empty: left as they are.
    cmd = [sys.executable, "-m", "cifar_flax.main", "--workdir=/tmp/x/run/full",
           "--config.dataset=imagefolder:/tmp/x/run2/B", "--config.init_from=/tmp/x/run/pre",
           f"--config={ROOT}/configs/ablation.py:full", str(ROOT), "--rel=runs/rel/a",
           "/tmp/x/runs", "--title=a b", "--title=runs in /tmp/x/run2 ($5)"]
    written = portable(cmd, folders)
    # A folder inside another is named by the first listed ($OUT/pre); /tmp/x/run2 is no
    # $OUT + "2"; a quoted argument keeps its placeholder outside single quotes.
    assert written == (
        "python -m cifar_flax.main --workdir=$OUT/full --config.dataset=imagefolder:$DATASET/B "
        "--config.init_from=$OUT/pre --config=configs/ablation.py:full . --rel=runs/rel/a "
        "/tmp/x/runs '--title=a b' \"--title=runs in $DATASET (\\$5)\"")
    assert sys.executable not in written and str(ROOT) not in written
    env = {"OUT": "/tmp/x/run", "DATASET": "/tmp/x/run2", "PATH": os.environ["PATH"]}
    p = subprocess.run(["bash", "-c", "printf '%s\\n' " + written.removeprefix("python ")],
                       env=env, capture_output=True, text=True, check=True)
    relative = {f"--config={ROOT}/configs/ablation.py:full": "--config=configs/ablation.py:full",
                str(ROOT): "."}
    assert p.stdout.splitlines() == [relative.get(a, a) for a in cmd[1:]]
    assert portable(cmd[:6], {"/tmp/x/run/pre": "$WEIGHTS", **folders}).endswith(
        "--config.init_from=$WEIGHTS")  # Listed first, the inner folder wins.
    assert portable("weights /tmp/x/run/pre, dataset imagefolder:/tmp/x/run2/", folders) == (
        "weights $OUT/pre, dataset imagefolder:$DATASET/")  # Text: a title, a path.


def test_the_written_commands_name_the_ablations_folders(smoke_run, tmp_path):
    s = _script()
    args = s.parse_args(["--out", str(tmp_path), "--dataset", "imagefolder:/data/B"])
    folders = s.placeholders(args, str(smoke_run))
    top = s.portable(s.row_command("top", args, args.dataset, str(smoke_run)), folders)
    assert top.startswith("python -m cifar_flax.main --config=configs/ablation.py:top "
                          "--workdir=$OUT/top ")
    assert "--config.init_from=$WEIGHTS" in top and "--config.dataset=imagefolder:$DATASET" in top
    assert str(tmp_path) not in top and str(smoke_run) not in top
    relative = s.placeholders(args, os.path.relpath(smoke_run))  # As init_from names it.
    assert relative[str(smoke_run)] == "$WEIGHTS"


def test_bad_arguments_are_one_line(tmp_path, capsys):
    s = _script()
    with pytest.raises(SystemExit):
        s.parse_args(["--out", str(tmp_path), "--rows", "dense,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
    assert s.main(["--out", str(tmp_path), "--weights", str(tmp_path / "no_run"),
                   "--dry-run"]) == 1
    assert "not torchvision, keras or a run's workdir" in capsys.readouterr().err
    assert s.main(["--out", str(tmp_path), "--dataset", "cifar10", "--train-per-class", "5",
                   "--dry-run"]) == 1
    assert "--train-per-class needs --dataset imagefolder" in capsys.readouterr().err


def test_rows_share_one_compilation_cache_unless_the_user_set_one(monkeypatch, tmp_path):
    script = _script()
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # conftest.py sets both.
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    env = script.child_env(str(tmp_path), smoke=False)
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "jax_cache")
    assert "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env  # JAX's 1 s threshold.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    env = script.child_env(str(tmp_path), smoke=True)
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")  # The user's wins.
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"  # Tiny steps are kept too.


# ---- symlinked subsets ----


def test_link_subset_caps_train_links_test_and_refuses_another_recipe(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_image_tree(src, {"train": {"a": 5, "b": 4, "c": 3}, "test": {"a": 2, "b": 2, "c": 2}})
    counts = link_subset(str(src), str(dst), ["a", "b"], per_class={"train": 3}, seed=1)
    assert counts == {"train": 6, "test": 4}
    assert sorted(os.listdir(dst / "train")) == ["a", "b"]  # Class c left out.
    picked = sorted(os.listdir(dst / "train" / "a"))
    assert len(picked) == 3 and set(picked) <= set(os.listdir(src / "train" / "a"))
    assert all(os.path.islink(dst / "train" / "a" / f) for f in picked)
    assert os.path.islink(dst / "test" / "a")  # Uncapped: the class folder linked whole.
    assert link_subset(str(src), str(dst), ["a", "b"], per_class={"train": 3}, seed=1) == counts
    with pytest.raises(UserError, match="holds another subset"):
        link_subset(str(src), str(dst), ["a", "b"], per_class={"train": 2}, seed=1)
    other = link_subset(str(src), str(tmp_path / "d2"), ["a", "b"], per_class={"train": 3}, seed=2)
    assert other == counts  # Another seed: another sample of the same size.


# ---- end to end ----


@pytest.fixture(scope="module")
def smoke_ablation(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--weights", str(smoke_run),
                        "--out", str(out), "--rows", ",".join(SMOKE_ROWS)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout


@pytest.mark.slow
def test_smoke_ablation_table_matches_every_row_run(smoke_ablation, smoke_run):
    out, stdout = smoke_ablation
    table = json.loads((out / "ablation.json").read_text())
    assert [r["row"] for r in table] == SMOKE_ROWS
    for r in table:
        results = json.loads((out / r["row"] / "report" / "results.json").read_text())
        assert r["test_accuracy"] == results["test_accuracy"] and r["steps"] == results["steps"]
        assert r["tested"] == results["tested_checkpoint"]
        assert f"| {r['row']} |" in (out / "ablation.md").read_text()
        config = json.loads((out / r["row"] / "config.json").read_text())
        want_from = "" if r["row"] == "scratch" else str(smoke_run)
        assert config["init_from"] == want_from, r["row"]
    assert [r["tested"] for r in table] == ["last", "last", "best", "last"]
    steps = {r["row"]: r["steps"] for r in table}
    spe = 192 // 32  # The smoke data: 192 training images at batch 32.
    for r in SMOKE_ROWS:  # Every phase its planned length; early stopping may end `staged` sooner.
        planned = sum(max(1, round(p.epochs * spe)) for p in load_config("ablation", f"{r},smoke").phases)
        assert steps[r] <= planned if r == "staged" else steps[r] == planned, r
    assert steps["linear"] == steps["scratch"] and steps["top"] < steps["scratch"]
    assert "| staged |" in stdout  # The table is printed too.
    assert not (out / "jax_cache").exists()  # The session's cache (conftest.py) was kept.
    # Written for readers: every command from the repository root, the folders by placeholder.
    lines = (out / "ablation.md").read_text().splitlines()
    assert [line.split("`")[1] for line in lines if line.startswith("- ")] == [
        r["command"] for r in table]
    for r in table:
        assert r["command"].startswith("python -m cifar_flax.main --config=configs/ablation.py:"
                                       f"{r['row']},smoke --workdir=$OUT/{r['row']} "), r
        assert ("--config.init_from=$WEIGHTS" in r["command"]) == (r["row"] != "scratch"), r
    for name in ("ablation.json", "ablation.md"):
        text = (out / name).read_text()
        for folder in (out, smoke_run, ROOT, sys.executable):
            assert str(folder) not in text, (name, folder)
    assert "weights $WEIGHTS, " in lines[0]  # The title.


@pytest.mark.slow
def test_smoke_ablation_plot_and_rerun_keeps_finished_rows(smoke_ablation, smoke_run):
    from PIL import Image

    out, _ = smoke_ablation
    with Image.open(out / "ablation.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300
    before = (out / "linear" / "report" / "results.json").read_text()
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--weights", str(smoke_run),
                        "--out", str(out), "--rows", "linear"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "linear" / "report" / "results.json").read_text() == before
    assert [r["row"] for r in json.loads((out / "ablation.json").read_text())] == ["linear"]
