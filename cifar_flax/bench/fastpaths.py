"""Speed of the fast paths: cached backbone features, and no backward through a frozen prefix.

    python -m cifar_flax.bench.fastpaths --size=32 --batch=128 --json=fastpaths.json

1. Frozen backbone (the baseline phase): one epoch recomputing the backbone every step (BN in
   inference mode, gradients w.r.t. the head only: the best an uncached step can do) against one
   epoch of head steps on cached features, plus the one-off cost of caching the features; the
   phase speedup for ``--epochs`` epochs counts that one-off cost.
2. Partially frozen (stage4 + head train): images/s against all layers training, same size.

Both use the real train.py step (bench/project_step.build: train.build_phase freezing, shard_map)
on a synthetic batch already on the device, compiled before timing; SGD momentum, ResNet50 v1.5.
The cached side uses what train.py's cached phase (feature_cache.CachedPhase) runs: its feature
function (make_feature_fn + train_augment_fn) and its head step (train.make_head_step).
"""

import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import flags

from cifar_flax import UserError, cli, train
from cifar_flax.bench import project_step
from cifar_flax.bench.workload import (
    NUM_CLASSES,
    TINY_STAGES,
    Workload,
    compile_then_time,
    stage_sizes,
    time_steps,
)
from cifar_flax.run import feature_cache

FLAGS = flags.FlagValues()
flags.DEFINE_integer("size", 32, "Image height = width.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("batch", 128, "Images per step.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "Timed backbone steps per measurement.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("warmup", 1, "Untimed steps (after compilation).", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_integer("head_steps", 200, "Timed cached head steps.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("train_examples", 45_000, "Epoch size (CIFAR-10 train minus the 10% "
                     "validation hold-out).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("epochs", 10, "Length of the frozen phase.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_boolean("tiny", False, "stage_sizes (1,1,1,1) (tests only).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write the report here.", flag_values=FLAGS)


def _config(w: Workload, trainable: Sequence[str] | None, **kw) -> Any:
    return project_step.bench_config(w.size, w.batch, "float32", w.stage_sizes, trainable, **kw)


def _train_step_s(w: Workload, trainable: Sequence[str] | None, **kw) -> float:
    """Seconds per step of the real train.py step (project_step.build), ``trainable`` groups."""
    fn, state, batch, _ = project_step.build(_config(w, trainable, **kw))
    return compile_then_time(fn, state, batch, project_step.STEP, warmup=w.warmup, steps=w.steps,
                             loss_of=lambda m: m["loss"])["s_per_step"]


def measure_frozen_backbone(w: Workload, head_steps: int, train_examples: int,
                            epochs: int) -> dict[str, Any]:
    """Baseline phase (head only, the original notebook's 256-unit head with dropout 0.5, no
    augmentation):
    train.py's step every epoch vs features cached once + the cached phase's head step, over
    ``epochs`` epochs of ``train_examples`` (``head_steps`` timed head steps)."""
    head = {"head_hidden": (256,), "head_dropout": 0.5, "augment": False}
    uncached_s = _train_step_s(w, ("head",), **head)
    config = _config(w, ("head",), **head)
    _, state, batch, parts = project_step.build(config)
    model, variables, plan = parts["model"], parts["variables"], parts["plan"]
    images = np.asarray(batch["image"])
    labels = np.asarray(batch["label"])
    augment_fn = feature_cache.train_augment_fn(config.augment, NUM_CLASSES, parts["prep"])
    feat_fn = feature_cache.make_feature_fn(  # CachedPhase's train-cache feature function
        model, lambda x: x, augment_fn)
    key = jax.random.PRNGKey(0)
    extract_s = compile_then_time(feat_fn, variables, images, key, warmup=w.warmup,
                                  steps=w.steps, carry=False)["s_per_step"]
    feats = np.asarray(feat_fn(variables, images, key))
    head_step = train.make_head_step(model, plan, parts["mesh"], state.params)
    hs = {"head": state.params["head"], "opt": state.opt_state}

    def head_one():  # CachedPhase.step without the host-side row gather
        hs["head"], hs["opt"], m = head_step(
            hs["head"], hs["opt"], project_step.STEP, state.rng, feats, labels)
        return m["loss"]

    head_s = time_steps(head_one, lambda o: o.block_until_ready(), 5, head_steps)["s_per_step"]
    epoch_steps = train_examples // w.batch
    epoch_unc, epoch_cached = epoch_steps * uncached_s, epoch_steps * head_s
    extraction = math.ceil(train_examples / w.batch) * extract_s
    phase_unc, phase_cached = epochs * epoch_unc, extraction + epochs * epoch_cached
    return {
        "uncached_step_s": uncached_s, "extract_batch_s": extract_s, "cached_head_step_s": head_s,
        "steps_per_epoch": epoch_steps, "epoch_uncached_s": epoch_unc,
        "epoch_cached_s": epoch_cached,
        "feature_extraction_s": extraction, "epoch_speedup": epoch_unc / epoch_cached,
        "epochs": epochs, "phase_uncached_s": phase_unc, "phase_cached_s": phase_cached,
        "phase_speedup": phase_unc / phase_cached,
    }


def measure_partial_freeze(w: Workload) -> dict[str, Any]:
    """train.py's step training all layers vs stage4 + head (no backward through stem..stage3)."""
    rows: dict[str, Any] = {}
    for name, trainable in (("all_layers", None), ("stage4_head", ("stage4", "head"))):
        s = _train_step_s(w, trainable)
        rows[name] = {"images_per_s": w.batch / s, "s_per_step": s}
    rows["speedup"] = rows["stage4_head"]["images_per_s"] / rows["all_layers"]["images_per_s"]
    return rows


def measure(w: Workload, head_steps: int = 200, train_examples: int = 45_000,
            epochs: int = 10) -> dict[str, Any]:
    """Both fast-path comparisons (float32); returns the JSON-ready report."""
    return {"config": {"size": w.size, "batch": w.batch, "steps": w.steps, "warmup": w.warmup,
                       "head_steps": head_steps, "train_examples": train_examples,
                       "epochs": epochs, "tiny": w.stage_sizes == TINY_STAGES},
            "frozen_backbone": measure_frozen_backbone(w, head_steps, train_examples, epochs),
            "partial_freeze": measure_partial_freeze(w)}


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    if FLAGS.json and os.path.isdir(FLAGS.json):
        raise UserError(f"--json={FLAGS.json} is a folder; give the report file's path.")
    if FLAGS.train_examples < FLAGS.batch:
        raise UserError(f"--train_examples={FLAGS.train_examples} is less than one batch "
                        f"(--batch={FLAGS.batch}); give the epoch's size in examples.")
    w = Workload(FLAGS.size, FLAGS.batch, FLAGS.steps, FLAGS.warmup, "float32",
                 stage_sizes(FLAGS.tiny))
    r = measure(w, FLAGS.head_steps, FLAGS.train_examples, FLAGS.epochs)
    f, pf = r["frozen_backbone"], r["partial_freeze"]
    print(f"frozen backbone, {w.size}x{w.size} batch {w.batch}, "
          f"{FLAGS.train_examples} examples/epoch:\n"
          f"  uncached epoch {f['epoch_uncached_s']:.1f} s | cached epoch "
          f"{f['epoch_cached_s']:.2f} s ({f['epoch_speedup']:.0f}x) | one-off feature "
          f"extraction {f['feature_extraction_s']:.1f} s"
          f"\n  {FLAGS.epochs}-epoch phase: {f['phase_uncached_s']:.0f} s -> "
          f"{f['phase_cached_s']:.0f} s ({f['phase_speedup']:.1f}x)")
    print(f"partially frozen: all layers {pf['all_layers']['images_per_s']:.1f} images/s, "
          f"stage4+head {pf['stage4_head']['images_per_s']:.1f} images/s "
          f"({pf['speedup']:.2f}x)")
    if FLAGS.json:
        with open(FLAGS.json, "w") as fh:
            json.dump(r, fh, indent=2)


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
