"""Several processes through the real entry point: 2 processes x 2 CPU devices (joined with
jax.distributed on 127.0.0.1, gloo collectives) against 1 process x 4 devices, a SIGTERM of both
processes and a resume, and a process that dies.

Tolerance: the two topologies run the same global computation but reduce across devices in a
different order (an in-process all-reduce vs gloo across processes), so parameters may differ in
the last float32 bits; they must agree to atol 1e-5, and test accuracy and every prediction must
be identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import cpu_devices_env

from cifar_flax.data import input_pipeline
from cifar_flax.run import devices
from cifar_flax.run.checkpoints import Checkpointer
from cifar_flax.run.model_setup import build_model, init_variables
from cifar_flax.run.metrics import read_metrics

pytestmark = pytest.mark.slow  # End-to-end runs: the full suite only.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARD_LINE = re.compile(
    r"Input shard: process (\d+) of (\d+) reads (\d+) of the (\d+) (\w+) examples"
    r"(?: in epoch (\d+))? \(indices sha1 (\w+)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "cifar_flax.main", "--config", "configs/smoke.py",
            "--workdir", str(workdir), *overrides]


_env = cpu_devices_env


def _start_pair(workdir, port: int, *extra) -> list[subprocess.Popen]:
    """Both processes of a 2 x 2 run (process 0 is the coordinator)."""
    procs = []
    for i in range(2):
        args = ["--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                "--config.distributed.heartbeat_timeout_seconds=10", *extra]
        procs.append(subprocess.Popen(_cmd(workdir, *args), cwd=ROOT, env=_env(2), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _finish(procs, timeout=400) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def _train_steps(workdir) -> list[int]:
    return [r["step"] for r in read_metrics(str(workdir), "train")]


def _final_variables(workdir, config) -> dict:
    """The best checkpoint's variables restored on this (1-process, 1-device) topology with
    explicit target shardings, whatever topology wrote it."""
    info = input_pipeline.get_info(config)
    model = build_model(config, info.num_classes)
    shapes = jax.eval_shape(lambda: init_variables(config, model, load_weights=False))
    ckpt = Checkpointer(str(workdir))
    try:
        like = devices.abstract(devices.make_mesh(), shapes)
        return jax.device_get(ckpt.restore("best", like))
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1 x 4 run, and a 2 x 2 run SIGTERMed then resumed (resumed exactly, it must end where
    the uninterrupted 1 x 4 run ends: one comparison proves both)."""
    root = tmp_path_factory.mktemp("mp")
    single = subprocess.run(_cmd(root / "single"), cwd=ROOT, env=_env(4), capture_output=True,
                            text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    procs = _start_pair(root / "resumed", _free_port())
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 8 for s in _train_steps(root / "resumed")):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    interrupted = _finish(procs)
    shutil.copytree(root / "resumed", root / "other_topology")
    resumed = _finish(_start_pair(root / "resumed", _free_port()))
    other = subprocess.run(_cmd(root / "other_topology"), cwd=ROOT, env=_env(4),
                           capture_output=True, text=True, timeout=400)  # 2 x 2 -> 1 x 4.
    pair = [(rc, o1 + o2, e1 + e2) for (rc, o1, e1), (_, o2, e2) in zip(resumed, interrupted)]
    return {"root": root, "single": single, "pair": pair, "interrupted": interrupted,
            "resumed": resumed, "other": other}


def _results(workdir) -> tuple[dict, dict]:
    results = json.loads((workdir / "report" / "results.json").read_text())
    return results, dict(np.load(workdir / "report" / "predictions.npz"))


def test_two_processes_match_one_process(runs, smoke_config):
    config = smoke_config
    root = runs["root"]
    single, single_pred = _results(root / "single")
    pair, pair_pred = _results(root / "resumed")
    assert single["devices"] == pair["devices"] == 4
    assert pair["test_accuracy"] == single["test_accuracy"]
    assert pair["test_examples"] == single["test_examples"] == 64  # Every test image once.
    np.testing.assert_array_equal(pair_pred["labels"], single_pred["labels"])
    np.testing.assert_array_equal(pair_pred["predictions"], single_pred["predictions"])
    a, b = _final_variables(root / "single", config), _final_variables(root / "resumed", config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_each_process_reads_its_own_disjoint_covering_shard(runs, smoke_config):
    """Evaluation splits: a fixed shard per process; train: a shard per epoch (each process's
    part of every global batch). Disjoint, covering, and what each process logged it read."""
    config = smoke_config
    info = input_pipeline.get_info(config)
    seen = {}
    for rc, _, err in runs["pair"]:
        for m in SHARD_LINE.finditer(err):
            proc, count, n, total, split, epoch, digest = m.groups()
            assert count == "2"
            seen[(int(proc), split, epoch and int(epoch))] = (int(n), int(total), digest)
    for split in ("validation", "test"):
        mine = [input_pipeline.host_indices(config, split, (i, 2)) for i in range(2)]
        everything = input_pipeline.host_indices(config, split, (0, 1))
        assert not set(mine[0]) & set(mine[1])  # Disjoint ...
        assert sorted(np.concatenate(mine)) == sorted(everything)  # ... and covering.
        for i in range(2):  # And each process read exactly its shard.
            assert seen[(i, split, None)] == (len(mine[i]), len(everything),
                                              input_pipeline.indices_digest(mine[i])), (i, split)
    epochs = {key[2] for key in seen if key[1] == "train"}
    assert epochs == {0, 1, 2}  # Smoke: 1 + 2 epochs.
    train = input_pipeline.host_indices(config, "train", (0, 1))
    for epoch in epochs:
        mine = [train[input_pipeline.train_positions(config, info, epoch, (i, 2))]
                for i in range(2)]
        assert not set(mine[0]) & set(mine[1])
        assert sorted(np.concatenate(mine)) == sorted(train)  # 192 = 6 full batches of 32.
        for i in range(2):
            assert seen[(i, "train", epoch)] == (len(mine[i]), len(train),
                                                 input_pipeline.indices_digest(mine[i]))


def test_outputs_written_once_by_process_zero(runs):
    workdir = runs["root"] / "resumed"
    steps = _train_steps(workdir)
    assert steps == sorted(set(steps)) and steps[-1] == 18  # One writer: no duplicate records.
    events = os.listdir(workdir / "tensorboard")  # One file per start (interrupted, resumed).
    assert len([f for f in events if f.startswith("events.out.tfevents")]) == 2
    assert {"best", "latest"} <= set(os.listdir(workdir / "checkpoints"))  # One directory.
    outputs = [o for _, o, _ in runs["resumed"]]
    assert sum("test accuracy" in o for o in outputs) == 1  # Only process 0 prints the result.


def test_sigterm_both_then_resume_gives_the_uninterrupted_result(runs, smoke_config):
    config = smoke_config
    for rc, out, err in runs["interrupted"]:
        assert rc == 0, err[-3000:]
        assert "Interrupted at step" in out
    stops = {int(o.split("Interrupted at step ")[1].split(";")[0]) for _, o, _ in runs["interrupted"]}
    assert len(stops) == 1 and 8 <= stops.pop() < 18  # Both stopped at the same step.
    for rc, _, err in runs["resumed"]:
        assert rc == 0, err[-3000:]
    root = runs["root"]
    straight, straight_pred = _results(root / "single")  # Uninterrupted (1 x 4).
    resumed, resumed_pred = _results(root / "resumed")
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    np.testing.assert_array_equal(resumed_pred["predictions"], straight_pred["predictions"])
    a, b = _final_variables(root / "single", config), _final_variables(root / "resumed", config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)  # Another topology: float rounding.


def test_a_two_process_checkpoint_resumes_on_one_process(runs, smoke_config):
    """Written by 2 processes x 2 devices, resumed by 1 process x 4 devices (explicit target
    shardings): the same result as the uninterrupted runs of either topology."""
    assert runs["other"].returncode == 0, runs["other"].stderr[-3000:]
    root = runs["root"]
    straight, straight_pred = _results(root / "single")
    other, other_pred = _results(root / "other_topology")
    assert other["test_accuracy"] == straight["test_accuracy"]
    np.testing.assert_array_equal(other_pred["predictions"], straight_pred["predictions"])
    a = _final_variables(root / "single", smoke_config)
    b = _final_variables(root / "other_topology", smoke_config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_a_dead_process_stops_the_other_with_a_message(tmp_path):
    procs = _start_pair(tmp_path, _free_port())
    deadline = time.time() + 300
    while time.time() < deadline and not _train_steps(tmp_path):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    procs[1].kill()
    t0 = time.time()
    _, err = procs[0].communicate(timeout=120)  # Heartbeat timeout 10 s: never forever.
    assert procs[0].returncode != 0
    assert time.time() - t0 < 120
    # JAX's coordination service aborts the survivor (in a step), or a save's collective fails.
    assert any(m in err for m in ("another task died", "unhealthy",
                                  "another process of this run has stopped")), err[-3000:]
