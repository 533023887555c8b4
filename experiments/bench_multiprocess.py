"""Throughput and checkpoint save time: 1 process x N devices against P processes x N/P devices.

    python experiments/bench_multiprocess.py --devices 4 --processes 2 --size 32 --batch 128

Each topology runs the real train step (bench/project_step.py: the one cifar_flax/train.py runs) on a
synthetic batch, every process feeding its own share of the global batch, then saves the full
TrainState with the project's Checkpointer (synchronously, into one directory from all
processes) a few times. Prints a table and writes JSON with ``--json``. On one machine the
processes share its cores: the difference is the cost of the cross-process collectives (gloo on
CPU) and of the multi-process checkpoint protocol, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from cifar_flax.bench.project_step import STEP, bench_config, build
from cifar_flax.bench.workload import NUM_CLASSES, compile_then_time
from cifar_flax.models import STAGE_SIZES
from cifar_flax.run import devices
from cifar_flax.run.checkpoints import Checkpointer

RESULT = "MP_RESULT "


def worker(args: argparse.Namespace) -> None:
    """One process of one topology (launched by :func:`launch`)."""
    if args.num_processes > 1:  # Before any JAX computation (importing is fine).
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    config = bench_config(args.size, args.batch, "float32", STAGE_SIZES)
    fn, state, _, parts = build(config)
    local = args.batch // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    batch = devices.shard_batch(parts["mesh"], {
        "image": rng.integers(0, 256, (local, args.size, args.size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, local).astype(np.int32)})
    to_save = jax.tree.map(lambda x: x.copy(), state)  # The timed steps donate ``state``.
    timing = compile_then_time(fn, state, batch, STEP, warmup=args.warmup, steps=args.steps,
                               loss_of=lambda metrics: metrics["loss"])
    ckpt = Checkpointer(args.workdir, keep=2, async_save=False)
    saves = []
    for step in range(1, args.saves + 1):
        t0 = time.perf_counter()
        ckpt.save("latest", step, to_save, {"step": step})
        ckpt.wait()
        saves.append(time.perf_counter() - t0)
    ckpt.close()
    if jax.process_index() == 0:
        print(RESULT + json.dumps({
            "processes": jax.process_count(), "devices": jax.device_count(),
            "images_per_s": args.batch / timing["s_per_step"], "compile_s": timing["compile_s"],
            "save_s": saves}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, processes: int) -> dict:
    """Run one topology: ``processes`` processes with devices/processes CPU devices each. A
    worker that fails stops the others (its stderr is shown) instead of leaving them waiting."""
    port, workdir = _free_port(), tempfile.mkdtemp(prefix=f"mp{processes}_")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count="
           f"{args.devices // processes}"}
    logs = [(open(os.path.join(workdir, f"out{i}.txt"), "w+"),
             open(os.path.join(workdir, f"err{i}.txt"), "w+")) for i in range(processes)]
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", "--num-processes", str(processes),
         "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}", "--workdir", workdir,
         *sys.argv[1:]], env=env, stdout=out, stderr=err, text=True)
        for i, (out, err) in enumerate(logs)]
    while any(p.poll() is None for p in procs):
        failed = [i for i, p in enumerate(procs) if p.poll()]
        if failed:
            for p in procs:
                p.kill()
            logs[failed[0]][1].seek(0)
            raise SystemExit(f"error: worker {failed[0]} failed:\n{logs[failed[0]][1].read()[-3000:]}")
        time.sleep(0.5)
    logs[0][0].seek(0)
    line = next(ln for ln in logs[0][0].read().splitlines() if ln.startswith(RESULT))
    return json.loads(line[len(RESULT):])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=4, help="devices in all, per topology")
    p.add_argument("--processes", type=int, default=2, help="processes of the second topology")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--json", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    rows = [launch(args, 1), launch(args, args.processes)]
    print("| topology | images/s | compile s | checkpoint save s (each) |")
    print("| --- | ---: | ---: | --- |")
    for r in rows:
        per = r["devices"] // r["processes"]
        saves = ", ".join(f"{s:.2f}" for s in r["save_s"])
        print(f"| {r['processes']} process x {per} devices | {r['images_per_s']:.1f} | "
              f"{r['compile_s']:.1f} | {saves} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
