"""One step on 8 simulated CPU devices equals one step on 1 device (synchronised BatchNorm);
with sync_batchnorm=False the running statistics are the mean of the per-device ones (2 examples
per device: stage4's 1x1 maps give variances of 2 values, float error ~1e-4, so atol 5e-4 there;
one device's own statistics differ by 1e-2..1e-1).

Runs in a subprocess: the device count is fixed when JAX starts, and the rest of the suite keeps
one device. Tolerance: float32 sums are reduced in a different order across devices, so values
agree to ~1e-6 relative; we allow atol 2e-5 + rtol 1e-4 on parameters and batch statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import cpu_devices_env

pytestmark = pytest.mark.slow  # End-to-end runs: the full suite only.

_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from cifar_flax.run import devices
from cifar_flax import train as step_lib
from cifar_flax.config import phase
from train_utils import fake_batch, setup_step, tiny_config

assert jax.device_count() == 8, jax.devices()
config = tiny_config()
config.model.head_hidden = (8,)
config.phases = [phase("all", steps=2, lr=0.1, weight_decay=1e-4)]
batch = fake_batch(n=16)
out = {}
for n in (8, 1):
    mesh = devices.make_mesh(jax.devices()[:n])
    _, _, state, fn = setup_step(config, mesh)
    for step in range(2):
        state, metrics = fn(state, devices.shard_batch(mesh, batch), step)
    leaves = jax.tree.leaves({"p": state.params, "s": state.batch_stats})
    out[n] = {"leaves": [np.asarray(x).ravel().tolist() for x in leaves],
              "loss": float(metrics["loss"]), "shards": len(state.params["head"]["out"]["kernel"].sharding.device_set)}

# sync_batchnorm=False: each device normalises with its own shard's statistics, and the running
# statistics are then averaged over the devices (pmean), i.e. the mean of per-shard updates.
from cifar_flax.data import preprocessing
from cifar_flax.data.preprocessing import SIMPLE
config.sync_batchnorm = False
config.phases = [phase("all", steps=1, lr=0.1)]
mesh = devices.make_mesh(jax.devices()[:8])
model, plan, state, fn = setup_step(config, mesh)
params0, stats0 = jax.device_get(state.params), jax.device_get(state.batch_stats)
state, _ = fn(state, devices.shard_batch(mesh, batch), 0)

@jax.jit  # One program for the 8 shards (eagerly, every layer's ops compile on their own).
def shard_stats(images, labels):
    x, _ = preprocessing.train_augment(images, labels, jax.random.key(0), config.augment, 4,
                                 SIMPLE)  # Augmentation off: deterministic.
    _, new = model.apply({"params": params0, "batch_stats": stats0}, x, train=True,
                         bn_train_modules=plan.bn_train_modules, mutable=["batch_stats"])
    return new["batch_stats"]

per_shard = [shard_stats(batch["image"][2 * i:2 * i + 2], batch["label"][2 * i:2 * i + 2])
             for i in range(8)]
flat = lambda tree: [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(tree)]
out["unsynced"] = {"got": flat(state.batch_stats), "first": flat(per_shard[0]),
                   "mean": flat(jax.tree.map(lambda *xs: np.mean(xs, 0), *per_shard))}
print("RESULT" + json.dumps(out))
"""


def test_eight_devices_match_one_device(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = cpu_devices_env(8, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, root, os.path.join(root, "tests")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    eight, one = out["8"], out["1"]
    assert eight["shards"] == 8 and one["shards"] == 1
    assert abs(eight["loss"] - one["loss"]) < 1e-4
    moved = 0
    for a, b in zip(eight["leaves"], one["leaves"]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=2e-5)
        moved += 1
    assert moved == len(one["leaves"]) > 20
    unsynced = out["unsynced"]
    assert len(unsynced["got"]) == len(unsynced["mean"]) > 10
    for got, mean, first in zip(unsynced["got"], unsynced["mean"], unsynced["first"]):
        np.testing.assert_allclose(np.array(got), np.array(mean), rtol=1e-3, atol=5e-4)
    assert sum(not np.allclose(g, f, rtol=1e-3, atol=5e-4)
               for g, f in zip(unsynced["got"], unsynced["first"])) > 10  # Shards differ.
