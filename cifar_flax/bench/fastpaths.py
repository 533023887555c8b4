"""Speed of the fast paths: cached backbone features, and no backward through a frozen prefix.

    python -m cifar_flax.bench.fastpaths --size 32 --batch 128 --json fastpaths.json

1. Frozen backbone (the baseline phase): one epoch recomputing the backbone every step (BN in
   inference mode, gradients w.r.t. the head only: the best an uncached step can do) against one
   epoch of head steps on cached features, plus the one-off cost of caching the features; the
   phase speedup for ``--epochs`` epochs counts that one-off cost.
2. Partially frozen (stage4 + head train): images/s against all layers training, same size.

Both use the real train.py step (bench_train_step.build: optim.build_phase freezing, shard_map)
on a synthetic batch already on the device, compiled before timing; SGD momentum, ResNet50 v1.5.
The cached side uses what train.py's cached phase (feature_cache.CachedPhase) runs: its feature
function (make_feature_fn + train_augment_fn) and its head step (make_state_head_step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

import jax
import numpy as np

from cifar_flax.bench import train_step as bench_train_step
from cifar_flax.bench.timing import compile_then_time, time_steps
from cifar_flax.bench.workload import NUM_CLASSES, stage_sizes
from cifar_flax.training import feature_cache


def _train_step_s(args: argparse.Namespace, trainable: Sequence[str] | None, **kw) -> float:
    """Seconds per step of the real train.py step (bench_train_step.build), ``trainable`` groups."""
    config = bench_train_step.bench_config(args.size, args.batch, "float32",
                                           stage_sizes(args.tiny), trainable, **kw)
    fn, state, batch, _ = bench_train_step.build(config)
    return compile_then_time(fn, state, batch, warmup=args.warmup, steps=args.steps,
                             loss_of=lambda m: m["loss"])["s_per_step"]


def measure_frozen_backbone(args: argparse.Namespace) -> dict[str, Any]:
    """Baseline phase (head only, seed's 256-unit head with dropout 0.5, no augmentation):
    train.py's step every epoch vs features cached once + the cached phase's head step."""
    head = {"head_hidden": (256,), "head_dropout": 0.5, "augment": False}
    uncached_s = _train_step_s(args, ("head",), **head)
    config = bench_train_step.bench_config(args.size, args.batch, "float32",
                                           stage_sizes(args.tiny), ("head",), **head)
    _, state, batch, parts = bench_train_step.build(config)
    model, variables, plan = parts["model"], parts["variables"], parts["plan"]
    images = np.asarray(batch["image"])
    labels = np.asarray(batch["label"])
    feat_fn = feature_cache.make_feature_fn(  # CachedPhase's train-cache feature function
        model, lambda x: x, feature_cache.train_augment_fn(config, NUM_CLASSES, parts["prep"]))
    key = jax.random.PRNGKey(0)
    extract_s = compile_then_time(feat_fn, variables, images, key, warmup=args.warmup,
                                  steps=args.steps, carry=False)["s_per_step"]
    feats = np.asarray(feat_fn(variables, images, key))
    head_step = feature_cache.make_state_head_step(model, plan, parts["mesh"], state.params,
                                                   NUM_CLASSES)
    hs = {"head": state.params["head"], "opt": state.opt_state, "step": state.step}

    def head_one():  # CachedPhase.step without the host-side row gather
        hs["head"], hs["opt"], hs["step"], m = head_step(
            hs["head"], hs["opt"], hs["step"], state.rng, feats, labels)
        return m["loss"]

    head_s = time_steps(head_one, lambda o: o.block_until_ready(), 5,
                        args.head_steps)["s_per_step"]
    spe = args.train_examples // args.batch
    epoch_unc, epoch_cached = spe * uncached_s, spe * head_s
    extraction = math.ceil(args.train_examples / args.batch) * extract_s
    phase_unc, phase_cached = args.epochs * epoch_unc, extraction + args.epochs * epoch_cached
    return {
        "uncached_step_s": uncached_s, "extract_batch_s": extract_s, "cached_head_step_s": head_s,
        "steps_per_epoch": spe, "epoch_uncached_s": epoch_unc, "epoch_cached_s": epoch_cached,
        "feature_extraction_s": extraction, "epoch_speedup": epoch_unc / epoch_cached,
        "epochs": args.epochs, "phase_uncached_s": phase_unc, "phase_cached_s": phase_cached,
        "phase_speedup": phase_unc / phase_cached,
    }


def measure_partial_freeze(args: argparse.Namespace) -> dict[str, Any]:
    """train.py's step training all layers vs stage4 + head (no backward through stem..stage3)."""
    rows: dict[str, Any] = {}
    for name, trainable in (("all_layers", None), ("stage4_head", ("stage4", "head"))):
        s = _train_step_s(args, trainable)
        rows[name] = {"images_per_s": args.batch / s, "s_per_step": s}
    rows["speedup"] = rows["stage4_head"]["images_per_s"] / rows["all_layers"]["images_per_s"]
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both fast-path comparisons; returns the JSON-ready report."""
    return {"config": vars(args), "frozen_backbone": measure_frozen_backbone(args),
            "partial_freeze": measure_partial_freeze(args)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed backbone steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--head-steps", type=int, default=200, help="timed cached head steps")
    p.add_argument("--train-examples", type=int, default=45_000, help="epoch size (CIFAR-10 "
                   "train minus the 10%% validation hold-out)")
    p.add_argument("--epochs", type=int, default=10, help="length of the frozen phase")
    p.add_argument("--tiny", action="store_true", help="stage_sizes (1,1,1,1) (tests only)")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    r = measure(args)
    f, pf = r["frozen_backbone"], r["partial_freeze"]
    print(f"frozen backbone, {args.size}x{args.size} batch {args.batch}, "
          f"{args.train_examples} examples/epoch:\n"
          f"  uncached epoch {f['epoch_uncached_s']:.1f} s | cached epoch "
          f"{f['epoch_cached_s']:.2f} s ({f['epoch_speedup']:.0f}x) | one-off feature "
          f"extraction {f['feature_extraction_s']:.1f} s"
          f"\n  {args.epochs}-epoch phase: {f['phase_uncached_s']:.0f} s -> "
          f"{f['phase_cached_s']:.0f} s ({f['phase_speedup']:.1f}x)")
    print(f"partially frozen: all layers {pf['all_layers']['images_per_s']:.1f} images/s, "
          f"stage4+head {pf['stage4_head']['images_per_s']:.1f} images/s "
          f"({pf['speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
