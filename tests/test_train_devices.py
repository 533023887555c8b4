"""One step on 8 simulated CPU devices equals one step on 1 device (synchronised BatchNorm).

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

_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from cifar_flax import step as step_lib
from cifar_flax.config import phase
from train_utils import fake_batch, setup_step, tiny_config

assert jax.device_count() == 8, jax.devices()
config = tiny_config()
config.model.head_hidden = (8,)
config.phases = [phase("all", steps=2, lr=0.1, weight_decay=1e-4)]
batch = fake_batch(n=16)
out = {}
for n in (8, 1):
    mesh = step_lib.make_mesh(jax.devices()[:n])
    _, _, state, fn = setup_step(config, mesh)
    for _ in range(2):
        state, metrics = fn(state, step_lib.shard_batch(mesh, batch))
    leaves = jax.tree.leaves({"p": state.params, "s": state.batch_stats})
    out[n] = {"leaves": [np.asarray(x).ravel().tolist() for x in leaves],
              "loss": float(metrics["loss"]), "shards": len(state.params["head"]["out"]["kernel"].sharding.device_set)}
print("RESULT" + json.dumps(out))
"""


def test_eight_devices_match_one_device(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
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
