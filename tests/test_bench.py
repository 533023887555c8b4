"""The throughput benchmark (``python -m cifar_flax.bench``): valid JSON, skipped frameworks,
like-for-like models, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cifar_flax import models
from cifar_flax.bench import __main__ as bench
from cifar_flax.bench import frameworks as bench_frameworks
from cifar_flax.bench import workload
from cifar_flax.bench.keras_resnet import build_keras_resnet50

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(tmp_path, *extra: str, env: dict | None = None) -> dict:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "cifar_flax.bench", "--size", "32", "--batch", "8", "--steps",
           "2", "--warmup", "1", "--tiny", "--input_steps", "0", "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cli_measures_every_installed_framework(tmp_path):
    report = _run_cli(tmp_path, "--frameworks", "flax,flax_bare,keras,torch",
                      "--input_steps", "2")
    rows = {r["framework"]: r for r in report["rows"]}
    assert list(rows) == ["flax", "flax_bare", "keras", "torch"]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0
        assert r["images_per_s"] == pytest.approx(8 * 1000 / r["ms_per_step"])
    assert max(r["ratio_to_fastest"] for r in rows.values()) == pytest.approx(1.0)
    # Each row's process holds only its framework (and JAX): its peak RSS is that framework's.
    assert rows["torch"]["loaded"] == ["jax", "torch"]
    assert rows["flax_bare"]["loaded"] == ["jax"]
    assert "tensorflow" in rows["flax"]["loaded"] and "torch" not in rows["flax"]["loaded"]
    assert {"tensorflow", "keras"} <= set(rows["keras"]["loaded"])
    assert rows["flax_bare"]["compile_s"] > 0 and rows["flax_bare"]["gflops_per_step"] > 0
    # Ours does the same network work (+ augmentation): FLOPs within a few percent of the bare step.
    assert rows["flax"]["gflops_per_step"] == pytest.approx(rows["flax_bare"]["gflops_per_step"],
                                                            rel=0.05)
    assert rows["flax"]["ratio_to_bare"] == pytest.approx(
        rows["flax"]["images_per_s"] / rows["flax_bare"]["images_per_s"])
    assert report["input_pipeline"]["status"] == "ok"
    assert report["input_pipeline"]["images_per_s"] > 0
    m = report["machine"]
    assert m["backend"] == jax.default_backend() and m["cpu_count"] >= 1 and "jax" in m["versions"]


def test_missing_frameworks_are_skipped_with_the_extra(tmp_path):
    report = _run_cli(tmp_path, "--frameworks", "keras,torch",
                      env={"CIFAR_FLAX_BENCH_HIDE": "keras,torch"})
    rows = {r["framework"]: r for r in report["rows"]}
    assert rows["keras"]["status"] == rows["torch"]["status"] == "skipped"
    assert 'pip install -e ".[test]"' in rows["keras"]["reason"]
    assert 'pip install -e ".[torch]"' in rows["torch"]["reason"]
    assert "skipped" in bench.format_table(report["rows"])


def test_worker_reports_skip_when_hidden(monkeypatch, capsys):
    """Hidden in the worker too (e.g. the import fails there): a skipped row, not a crash."""
    monkeypatch.setenv(workload.HIDE_ENV, "torch")
    assert bench_frameworks.main(["--framework=torch", "--tiny"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(bench_frameworks.RESULT_PREFIX)
    row = json.loads(line[len(bench_frameworks.RESULT_PREFIX):])
    assert row["status"] == "skipped" and 'pip install -e ".[torch]"' in row["reason"]


@pytest.mark.parametrize("main, argv, message", [
    (bench.main, ["--frameworks=flax,mxnet"], "mxnet"),
    (bench.main, ["--input-steps=0"], "input-steps"),
    (bench.main, ["--size=0"], "--size=0"),
    (bench.main, ["--dtype=float16"], "--dtype=float16"),
    (bench.main, ["extra"], "unexpected arguments"),
    (bench_frameworks.main, [], "--framework"),
    (bench_frameworks.main, ["--framework=torch", "--stage_sizes=3,x"], "--stage_sizes"),
])
def test_bad_input_is_one_clear_error(capsys, main, argv, message):
    """Every slip is one ``error:`` line and status 1, before anything is measured."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def _flax_param_count(stages) -> int:
    model = models.create_model(10, "v1.5", head_hidden=(), stage_sizes=stages)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def test_keras_and_torch_rows_are_the_same_network():
    """Same layout everywhere: the trainable parameter counts of the three ResNet50s agree."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("keras")
    from cifar_flax.bench.torch_resnet import ResNet50 as TorchResNet50  # Imports torch (optional).

    n_flax = _flax_param_count(models.STAGE_SIZES)
    n_torch = sum(p.numel() for p in TorchResNet50(10, models.STAGE_SIZES).parameters())
    keras_model = build_keras_resnet50(32, 10, models.STAGE_SIZES)
    n_keras = sum(int(w.numpy().size) for w in keras_model.trainable_weights)
    assert n_flax == n_torch == n_keras
    del torch


def test_table_ratios():
    rows = [{"framework": "a", "status": "ok", "images_per_s": 50.0},
            {"framework": "flax_bare", "status": "ok", "images_per_s": 100.0},
            {"framework": "flax", "status": "ok", "images_per_s": 96.0},
            {"framework": "keras", "status": "skipped", "reason": "not installed"}]
    bench.add_ratios(rows)
    assert rows[0]["ratio_to_fastest"] == 0.5 and rows[1]["ratio_to_fastest"] == 1.0
    assert rows[2]["ratio_to_bare"] == pytest.approx(0.96)
    assert "ratio_to_fastest" not in rows[3]


def test_compile_then_time_carries_the_state():
    """The one timing helper feeds each step's state to the next and reports first/last loss."""
    step = jax.jit(lambda s, x: (s + x, jnp.sum(s)))
    out = workload.compile_then_time(step, jnp.zeros(3), jnp.ones(3), warmup=2, steps=3)
    # 5 steps in all: losses are the sums of the states 0, 1, 2, 3, 4 (x 3 elements).
    assert out["first_loss"] == 0.0 and out["final_loss"] == 12.0
    assert out["compile_s"] > 0 and out["timed_s"] > 0
    assert out["s_per_step"] == pytest.approx(out["timed_s"] / 3)
    feats = workload.compile_then_time(jax.jit(lambda v, x: v * x), jnp.ones((2, 2)), 2.0,
                                       warmup=1, steps=2, carry=False)
    assert "first_loss" not in feats and feats["timed_s"] > 0
