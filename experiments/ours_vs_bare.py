"""The real training step against the bare jit step, timed interleaved in one process.

    python experiments/ours_vs_bare.py --size 64 --batch 64 --reps 6 \
        --json experiments/results/ours_vs_bare_64.json

`python -m cifar_flax.bench` runs each row in its own process one after the other, so on a
machine whose speed drifts (shared cores, turbo) the ours/bare ratio moves by a few percent from
run to run. Here both steps (and ours without synchronised BatchNorm, whose all-reduces are the
one structural difference on one device) are compiled once and then timed in turns, step after
step, so drift hits all of them alike. Reports the fastest step of each (and the median).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from cifar_flax.bench import bare_step
from cifar_flax.bench.project_step import STEP, bench_config, build
from cifar_flax.bench.workload import Workload
from cifar_flax.models import STAGE_SIZES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=6, help="timed steps of each, interleaved")
    p.add_argument("--json", default="", help="also write the numbers here")
    args = p.parse_args()
    steps = {}
    for sync in (True, False):
        config = bench_config(args.size, args.batch, "float32", STAGE_SIZES)
        config.sync_batchnorm = sync
        fn, state, batch, _ = build(config)
        state, metrics = fn(state, batch, STEP)  # Compile.
        jax.block_until_ready(metrics)
        steps[f"ours (sync_batchnorm={sync})"] = [fn, state, batch]
    fn, state, x, y = bare_step.build(Workload(size=args.size, batch=args.batch))
    state, loss = fn(state, x, y)
    jax.block_until_ready(loss)
    times: dict[str, list[float]] = {k: [] for k in [*steps, "bare jit"]}
    for _ in range(args.reps):
        for name, entry in steps.items():
            t = time.perf_counter()
            entry[1], metrics = entry[0](entry[1], entry[2], STEP)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        state, loss = fn(state, x, y)
        jax.block_until_ready(loss)
        times["bare jit"].append(time.perf_counter() - t)
    rows = {k: {"images_per_sec": args.batch / min(v), "median_s": float(np.median(v))}
            for k, v in times.items()}
    bare_ips = rows["bare jit"]["images_per_sec"]
    for k, r in rows.items():
        print(f"{k:32s} {r['images_per_sec']:7.1f} img/s (fastest of {args.reps}), "
              f"median step {r['median_s']:.3f} s, {r['images_per_sec'] / bare_ips:.3f}x bare")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
