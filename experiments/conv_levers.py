"""Each CPU convolution lever on its own: the bare ResNet50 step with models.MatmulConv's rules
switched on one at a time (experiments/README.md, "levers").

    python experiments/conv_levers.py --size 64 --batch 128 --steps 3 --rounds 2 \
        --json experiments/results/levers_64.json

Variants (models.MatmulRules): ``xla`` (XLA's convolution everywhere), ``small_map_input`` (3x3
convs on <= 2x2 input maps as patches @ kernel: the rule before this experiment),
``small_map`` (<= 2x2 output maps: adds stride-2 convs onto 2x2), ``one_by_one`` (1x1 convs as
matmuls), ``both_patches_op`` (small_map + one_by_one, patches by XLA's patches op),
``both`` (the same, patches as 9 strided slices: the default). A sixth lever, other 3x3 convs'
weight gradient as patches^T @ dy through a custom VJP, was measured too and removed
(experiments/README.md, "levers"). Each variant is built by the bench's bare_step and compiled once in this process, then timed in ``--rounds`` interleaved rounds;
the best round counts, and every round is kept in the JSON. The first loss of each variant is
compared with ``xla``'s (same init and batch: the forward pass must agree).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cifar_flax import models
from cifar_flax.bench import bare_step
from cifar_flax.bench.workload import Workload, stage_sizes

VARIANTS = {
    "xla": ("xla", models.MatmulRules()),
    "small_map_input": ("im2col", models.MatmulRules(small_map_on="input", one_by_one=False)),
    "small_map": ("im2col", models.MatmulRules(one_by_one=False)),
    "one_by_one": ("im2col", models.MatmulRules(small_map=False)),
    "both_patches_op": ("im2col", models.MatmulRules(patches="op")),
    "both": ("im2col", models.MatmulRules()),
}


def compiled_variant(name: str, args: argparse.Namespace) -> tuple[Any, Any, Any, Any, dict]:
    """(compiled step, state, x, y, compile info) of one variant."""
    conv_impl, rules = VARIANTS[name]
    models.MATMUL_RULES = rules  # read while tracing, i.e. inside build + compile below
    fn, state, x, y = bare_step.build(Workload(size=args.size, batch=args.batch,
                                               stage_sizes=stage_sizes(args.tiny),
                                               conv_impl=conv_impl))
    t0 = time.perf_counter()
    compiled = fn.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    state, loss = compiled(state, x, y)  # also the warm-up step
    return compiled, state, x, y, {"compile_s": compile_s, "first_loss": float(loss)}


def time_round(compiled: Any, state: Any, x: Any, y: Any, steps: int) -> tuple[Any, float]:
    """Run ``steps`` steps; (new state, images/s)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = compiled(state, x, y)
    loss.block_until_ready()
    return state, x.shape[0] * steps / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    built = {n: compiled_variant(n, args) for n in names}
    models.MATMUL_RULES = models.MatmulRules()
    rates: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            compiled, state, x, y, info = built[n]
            state, rate = time_round(compiled, state, x, y, args.steps)
            built[n] = (compiled, state, x, y, info)
            rates[n].append(rate)
    ref = built[names[0]][4]["first_loss"]
    rows = [{"variant": n, "images_per_s": max(rates[n]), "rounds": rates[n],
             "compile_s": built[n][4]["compile_s"], "first_loss": built[n][4]["first_loss"],
             "first_loss_rel_diff": abs(built[n][4]["first_loss"] - ref) / abs(ref)}
            for n in names]
    base = rows[0]["images_per_s"]
    print(f"bare step, {args.size}x{args.size}, batch {args.batch}, best of {args.rounds} rounds "
          f"of {args.steps} steps\n\n| variant | images/s (rounds) | vs {names[0]} | compile s | "
          "first-loss rel. diff |\n|---|---:|---:|---:|---:|")
    for r in rows:
        rounds = "/".join(f"{v:.1f}" for v in r["rounds"])
        print(f"| {r['variant']} | {r['images_per_s']:.1f} ({rounds}) | "
              f"{r['images_per_s'] / base:.2f}x | {r['compile_s']:.0f} | "
              f"{r['first_loss_rel_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
