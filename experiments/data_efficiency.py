"""Which fine-tuning wins, and when data is scarce: rows x images per class x seeds, one table.

    python experiments/data_efficiency.py --weights runs/A_scratch \
        --dataset imagefolder:/tmp/cifar10-split/B --out runs/data_efficiency
    python experiments/data_efficiency.py --smoke --out /tmp/de        # synthetic, tiny: CI

For every size (``--sizes``, images per class) and seed (``--seeds``) it links a small-data
ImageFolder (cifar_flax.data.subset.link_few_shot): ``train`` = that many images of each class
(the seed picks which; a seed's smaller subsets lie inside its larger ones), ``val`` = a fixed
``--val-per-class`` images per class that no training subset ever holds (the same for every size,
seed and row), ``test`` = the dataset's whole test split. Every row of configs/ablation.py named in
``--rows`` then runs as a real ``python -m cifar_flax.main`` in its own workdir
(``OUT/runs/<size>pc/<row>/seed<seed>``), so the sweep resumes after an interruption and a
finished run is only read back. Budgets are in steps, the same for every row at a size
(:func:`budget`), split over a row's phases in the proportions of its config.

After a run has trained, its robustness is measured (unless ``--shift-images 0``): the real
``python -m cifar_flax.evaluate --shift=corruptions`` on a fixed subset of the test split
(``--shift-images`` images, the same for every run, x every corruption x ``--shift-severities``,
generated once into the shared cache), written to ``OUT/shift/<size>pc/<row>/seed<seed>``. The
run's own report holds its calibration (ECE raw and after the temperature fitted on ``val``).

Writes ``OUT/summary.json`` (``{"runs": [{"row", "per_class", "seed", "test_accuracy", "mca",
"relative_robustness", "ece", "ece_scaled", "best_val_accuracy", "steps", "wall_seconds",
"command"}], "budgets", "rows", ...}``; paths in commands as ``$OUT``, ``$DATASET`` and
``$WEIGHTS``, so they run as written from the repository root once those are set), ``OUT/table.md``
(mean +- standard deviation per row and size, one table per measure), ``OUT/data_efficiency.png``
(test accuracy against images per class, log x axis, one line per row, error bars) and
``OUT/corrupted_vs_clean.png`` (mCA against clean accuracy, one point per run, a colour per row).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time

import numpy as np

from cifar_flax.config import load_module
from cifar_flax.data.corruptions import CORRUPTIONS
from cifar_flax.data.subset import link_few_shot

# The rows' commands and weights, shared: notebook_ablation.py beside this file, loaded by its path
# (experiments/ is no package; this file also runs loaded by path, as the tests load it).
ablation = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebook_ablation.py"))
ROWS = ("linear", "staged", "full", "lpft", "scratch")
SMOKE = {"sizes": (2, 6), "seeds": (0, 1), "val_per_class": 2, "classes": 4,
         "train_pool": 10, "test_per_class": 4, "shift_images": 8}


SHORT_RUN_STEPS = 300  # Runs shorter than this save "latest" only at phase boundaries.


def budget(per_class: int, num_classes: int, smoke: bool = False) -> dict:
    """The training budget at a data size, the same for every row: ``steps`` =
    600 * sqrt(per_class / 1000), at least 100 (600 at 1,000 images per class: the 15 epochs of
    the class-split ablation; 190 at 100; 100 at 10, where an epoch is one step); ``batch_size`` =
    128, or the largest power of two that fits the training set; validation 20 times per run.
    ``save_at_evaluations``: a run of fewer than SHORT_RUN_STEPS steps (minutes) saves "latest"
    at its phase boundaries only, not at each of its 20 validations (9 s of a 77 s 10-per-class
    run, experiments/README.md); killed, it repeats at most its current phase."""
    n = per_class * num_classes
    batch = min(128, 2 ** int(math.log2(n)))
    steps = 6 if smoke else max(100, round(600 * math.sqrt(per_class / 1000)))
    return {"steps": steps, "batch_size": batch, "eval_every_steps": max(1, steps // 20),
            "steps_per_epoch": n // batch, "save_at_evaluations": steps >= SHORT_RUN_STEPS}


def phase_overrides(config, b: dict) -> list[str]:
    """Split ``b["steps"]`` over the config's phases in proportion to their epochs; each warmup
    keeps its share of its phase."""
    total = sum(p.epochs for p in config.phases)
    out, left = [], b["steps"]
    for i, p in enumerate(config.phases):
        last = i == len(config.phases) - 1
        steps = left if last else max(1, round(b["steps"] * p.epochs / total))
        left -= steps
        warmup = p.warmup_epochs / p.epochs * steps / b["steps_per_epoch"]
        out += [f"--config.phases[{i}].steps={steps}", f"--config.phases[{i}].warmup_epochs={warmup:.6g}"]
    return out


def run_command(row: str, per_class: int, seed: int, args: argparse.Namespace, data: str,
                b: dict) -> list[str]:
    """The exact ``python -m cifar_flax.main`` command of one run."""
    arg = f"{row},smoke" if args.smoke else row
    config = ablation._load_config(arg)
    cmd = [sys.executable, "-m", "cifar_flax.main", f"--config=configs/ablation.py:{arg}",
           f"--workdir={run_dir(args.out, row, per_class, seed)}"]
    cmd += ablation.model_overrides(args.weights)
    if row != "scratch":
        cmd += ablation.weight_overrides(args.weights)
    cmd += [f"--config.dataset=imagefolder:{data}", "--config.val_split=val",
            f"--config.seed={seed}", f"--config.batch_size={b['batch_size']}",
            f"--config.eval_every_steps={b['eval_every_steps']}"]
    if not b["save_at_evaluations"]:
        cmd.append("--config.checkpoint.at_epoch_end=False")
    if args.resolution:
        cmd.append(f"--config.augment.resolution={args.resolution}")
    return cmd + phase_overrides(config, b)


def run_dir(out: str, row: str, per_class: int, seed: int) -> str:
    return os.path.join(out, "runs", f"{per_class}pc", row, f"seed{seed}")


def shift_dir(out: str, row: str, per_class: int, seed: int) -> str:
    return os.path.join(out, "shift", f"{per_class}pc", row, f"seed{seed}")


def shift_command(row: str, per_class: int, seed: int, args: argparse.Namespace) -> list[str]:
    """The exact ``python -m cifar_flax.evaluate --shift=corruptions`` command of one run."""
    return [sys.executable, "-m", "cifar_flax.evaluate",
            f"--workdir={run_dir(args.out, row, per_class, seed)}",
            f"--output={shift_dir(args.out, row, per_class, seed)}", "--shift=corruptions",
            f"--corruptions={args.shift_corruptions}", f"--severities={args.shift_severities}",
            f"--num_images={args.shift_images}"]


def run_once(cmd: list[str], workdir: str, env: dict) -> float:
    """Run one command unless its workdir has a report; its log in ``workdir/run.log``. Returns
    the seconds it took (0 when it had finished before)."""
    results = os.path.join(workdir, "report", "results.json")
    if os.path.exists(results):
        return 0.0
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(workdir, "run.log"), "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ablation.ROOT, env=env, stdout=log, stderr=log)
    if rc or not os.path.exists(results):
        raise ablation.AblationError(
            f"{workdir}: exit status {rc} without a report (see its run.log); rerun the same "
            "command to resume it.")
    return time.time() - t0


def result(row: str, per_class: int, seed: int, cmd: list[str], args: argparse.Namespace
           ) -> dict:
    """One run's line of summary.json: its report's accuracy and calibration, the mCA of its
    shift evaluation (None where it was not measured), and its commands as a reader reruns them
    (ablation.portable: ``$OUT``, ``$DATASET`` for the --dataset folder, ``$WEIGHTS``)."""
    folders = {args.out: "$OUT", args.dataset.split(":", 1)[-1]: "$DATASET",
               args.weights: "$WEIGHTS"}
    with open(os.path.join(run_dir(args.out, row, per_class, seed), "report",
                           "results.json")) as f:
        r = json.load(f)
    calib = r.get("calibration") or {}
    shift_results = os.path.join(shift_dir(args.out, row, per_class, seed), "results.json")
    shift = {}
    if os.path.exists(shift_results):
        with open(shift_results) as f:
            shift = json.load(f)["corruptions"]
    return {"row": row, "per_class": per_class, "seed": seed,
            "test_accuracy": r["test_accuracy"], "test_examples": r["test_examples"],
            "mca": shift.get("mca"), "relative_robustness": shift.get("relative_robustness"),
            "shift_clean_accuracy": shift.get("clean_accuracy"),
            "severity_scale": shift.get("severity_scale"),
            "ece": (calib.get("raw") or {}).get("ece"),
            "ece_scaled": (calib.get("scaled") or {}).get("ece"),
            "temperature": calib.get("temperature"),
            "best_val_accuracy": r.get("best_val_accuracy"), "tested": r["tested_checkpoint"],
            "steps": r["steps"], "wall_seconds": r["wall_seconds"],
            "unstable": r.get("unstable"), "command": ablation.portable(cmd, folders),
            "shift_command": ablation.portable(shift_command(row, per_class, seed, args), folders)
            if shift else None}


MEASURES = {  # summary.json key -> what the table calls it.
    "test_accuracy": "Test accuracy (%)",
    "mca": "Mean corruption accuracy (mCA, %)",
    "ece": "Expected calibration error (ECE, %, 15 bins), raw",
    "ece_scaled": "ECE (%) after the temperature fitted on the validation images",
}


def summarize(runs: list[dict], key: str = "test_accuracy"
              ) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(row, per_class) -> (mean, sample standard deviation, count) of ``key`` over the runs
    that measured it."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        if r.get(key) is not None:
            groups.setdefault((r["row"], r["per_class"]), []).append(r[key])
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for k, v in groups.items()}


def write_table(summary: dict, out: str, title: str) -> str:
    """table.md: one table per measure that some run has (mean +- sample std over seeds)."""
    lines = [f"# {title}", ""]
    for key, what in MEASURES.items():
        stats = summarize(summary["runs"], key)
        if stats:
            lines += _measure_table(summary, stats, what, key) + [""]
    lines += ["Budgets (every row, per size): " + "; ".join(
        f"{pc} per class: {b['steps']} steps at batch {b['batch_size']}, validation every "
        f"{b['eval_every_steps']}" for pc, b in summary["budgets"].items()) + ".", "",
        "Rows: " + "; ".join(f"`{r}` {summary['row_what'][r]}" for r in summary["rows"]) + "."]
    if summary.get("shift"):
        lines += ["", f"Corruptions: {summary['shift']}."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    return text


def _measure_table(summary: dict, stats: dict, what: str, key: str) -> list[str]:
    sizes = sorted({pc for _, pc in stats})
    on = (f"on all {summary['runs'][0]['test_examples']} test images" if key == "test_accuracy"
          else "on the shift subset" if key == "mca" else "on the test images")
    lines = [f"{what}, mean +- standard deviation over seeds {summary['seeds']}, {on}.", "",
             "| row | " + " | ".join(f"{pc} per class" for pc in sizes) + " |",
             "| --- |" + " ---: |" * len(sizes)]
    seeds = len(summary["seeds"])
    for row in summary["rows"]:  # A cell over fewer seeds (a sweep still running) says so.
        cells = [f"{100 * stats[row, pc][0]:.2f} +- {100 * stats[row, pc][1]:.2f}"
                 + (f" (n={stats[row, pc][2]})" if stats[row, pc][2] != seeds else "")
                 if (row, pc) in stats else "-" for pc in sizes]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(summary["runs"])
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = summary["rows"]
    for i, row in enumerate(rows):
        sizes = sorted(pc for r, pc in stats if r == row)
        dodge = 1 + 0.04 * (i - (len(rows) - 1) / 2)  # Side by side, so error bars don't hide.
        mean = [100 * stats[row, pc][0] for pc in sizes]
        std = [100 * stats[row, pc][1] for pc in sizes]
        ax.errorbar([pc * dodge for pc in sizes], mean, yerr=std, marker="o", capsize=4,
                    label=row, linestyle="--" if row == "scratch" else "-")
    ax.set_xscale("log")
    all_sizes = sorted({pc for _, pc in stats})
    ax.set_xticks(all_sizes, [str(pc) for pc in all_sizes])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.axhline(100 / summary["num_classes"], color="gray", linewidth=0.8, linestyle=":",
               label=f"chance ({100 / summary['num_classes']:.0f}%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_efficiency.png"), dpi=120)
    plt.close(fig)


def plot_shift(summary: dict, out: str, title: str) -> None:
    """corrupted_vs_clean.png: each run's mCA against its clean accuracy on the same images, a
    colour per row, a marker per size (Miller et al.'s "accuracy on the line" view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in summary["runs"] if r.get("mca") is not None]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(7, 6))
    markers = dict(zip(sorted({r["per_class"] for r in runs}), "o^sDv"))
    for i, row in enumerate(summary["rows"]):
        for pc, marker in markers.items():
            mine = [r for r in runs if r["row"] == row and r["per_class"] == pc]
            if mine:
                ax.scatter([100 * r["shift_clean_accuracy"] for r in mine],
                           [100 * r["mca"] for r in mine], color=f"C{i}", marker=marker,
                           label=f"{row}, {pc}/class", alpha=0.8)
    top = max(100 * r["shift_clean_accuracy"] for r in runs)
    ax.plot([0, top], [0, top], color="gray", linewidth=0.8, linestyle=":", label="mCA = clean")
    ax.set_xlabel("clean accuracy on the shift subset (%)")
    ax.set_ylabel("mean corruption accuracy, mCA (%)")
    ax.set_title(textwrap.fill(f"{title}. {summary.get('shift', '')}", 95), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "corrupted_vs_clean.png"), dpi=120)
    plt.close(fig)


def smoke_data(out: str) -> str:
    """--smoke: a tiny ImageFolder of generated images (4 classes, 32 px) to sample from."""
    from PIL import Image

    from cifar_flax.data.sources import synthetic_images

    root = os.path.join(out, "smoke_images")
    if os.path.isdir(root):
        return root
    cfg = {"num_classes": SMOKE["classes"], "size": 32,
           "num_train": SMOKE["classes"] * SMOKE["train_pool"],
           "num_test": SMOKE["classes"] * SMOKE["test_per_class"]}
    for split_id, split in enumerate(("train", "test")):
        images, labels = synthetic_images(cfg, 0, split_id)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root + ".tmp", split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
    os.rename(root + ".tmp", root)
    return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the runs, subsets and results")
    p.add_argument("--weights", default="", help="an earlier run's workdir (init_from), "
                   "torchvision or keras (--smoke: default a smoke run trained in OUT/pretrain)")
    p.add_argument("--dataset", default="", help="imagefolder:<dir> with train/ and test/")
    p.add_argument("--sizes", default="10,100,1000", help="training images per class")
    p.add_argument("--seeds", default="0,1,2", help="seeds (each picks its own subsets)")
    p.add_argument("--rows", default=",".join(ROWS), help="rows of configs/ablation.py")
    p.add_argument("--val-per-class", type=int, default=50, help="fixed validation images")
    p.add_argument("--resolution", type=int, default=32, help="augment.resolution (0: the row's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (1 on a 2-core machine)")
    p.add_argument("--shift-images", type=int, default=1000, help="test images of every run's "
                   "corruption evaluation (0: none; --smoke: 8)")
    p.add_argument("--shift-corruptions", default=",".join(CORRUPTIONS),
                   help="corruptions of that evaluation (--smoke: gaussian_noise,fog)")
    p.add_argument("--shift-severities", default="1,3,5", help="their severities (--smoke: 3)")
    p.add_argument("--title", default="", help="the table's and plot's title (names the weights "
                   "and data as a reader would)")
    p.add_argument("--smoke", action="store_true", help="generated images, the tiny network, "
                   f"sizes {SMOKE['sizes']}, seeds {SMOKE['seeds']}: CI's end-to-end run")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing: the summary, table "
                   "and plot of the runs finished so far (while a sweep runs, say)")
    args = p.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    try:
        args.sizes, args.seeds = ints(args.sizes), ints(args.seeds)
    except ValueError:
        p.error(f"--sizes {args.sizes!r} / --seeds {args.seeds!r} must be comma-separated integers")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ablation._ablation_module().ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; rows are {','.join(ablation._ablation_module().ROWS)}")
    if args.smoke:
        args.sizes, args.seeds = list(SMOKE["sizes"]), list(SMOKE["seeds"])
        args.val_per_class = SMOKE["val_per_class"]
        args.shift_images = min(args.shift_images, SMOKE["shift_images"])
        args.shift_corruptions, args.shift_severities = "gaussian_noise,fog", "3"
    elif not args.dataset.startswith("imagefolder:") or not args.weights:
        p.error("give --weights and --dataset imagefolder:<dir> (or --smoke)")
    if args.shift_images and importlib.util.find_spec("imagecorruptions") is None:
        p.error("the corruption evaluation (--shift-images) needs imagecorruptions-imaug: "
                "pip install -e '.[robustness]', or pass --shift-images 0")
    if min(args.sizes + [args.val_per_class, args.jobs]) < 1:
        p.error("--sizes, --val-per-class and --jobs must be >= 1")
    args.out = os.path.abspath(args.out)
    return args


def plan(args: argparse.Namespace, src: str) -> tuple[list[dict], dict]:
    """Every run to do (in order: size, seed, row) with its command, and the budgets."""
    classes = sorted(e for e in os.listdir(os.path.join(src, "train")) if not e.startswith("."))
    budgets, runs = {}, []
    for pc in args.sizes:
        b = budgets[pc] = budget(pc, len(classes), args.smoke)
        for seed in args.seeds:
            data = os.path.join(args.out, "data", f"{pc}pc_seed{seed}")
            for row in args.rows:
                runs.append({"row": row, "per_class": pc, "seed": seed, "data": data,
                             "cmd": run_command(row, pc, seed, args, data, b)})
    return runs, {"budgets": budgets, "num_classes": len(classes)}


def sweep(args: argparse.Namespace, runs: list[dict], src: str) -> None:
    """Link every subset, then train and measure what is not finished (``--jobs`` at once), one
    line each."""
    for r in runs:
        link_few_shot(src, r["data"], r["per_class"], r["seed"], args.val_per_class)
    env = ablation.child_env(args.out, args.smoke)
    todo = [r for r in runs if not _done(args, r)]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished before; running {len(todo)}",
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train_and_measure, r, args, env): r for r in todo}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            r = futures[future]
            seconds = future.result()
            got = result(r["row"], r["per_class"], r["seed"], r["cmd"], args)
            mca = f", mCA {100 * got['mca']:.2f}%" if got["mca"] is not None else ""
            print(f"[{i}/{len(todo)}] {r['per_class']} per class, {r['row']}, seed {r['seed']}: "
                  f"test accuracy {100 * got['test_accuracy']:.2f}%{mca} ({seconds / 60:.1f} min)",
                  flush=True)


def _done(args: argparse.Namespace, r: dict) -> bool:
    where = (r["row"], r["per_class"], r["seed"])
    trained = os.path.exists(os.path.join(run_dir(args.out, *where), "report", "results.json"))
    return trained and (not args.shift_images or os.path.exists(
        os.path.join(shift_dir(args.out, *where), "results.json")))


def train_and_measure(r: dict, args: argparse.Namespace, env: dict) -> float:
    """Train one run (run_once), then evaluate it on the corrupted subset unless that was done;
    the evaluation's log is ``<shift dir>.log`` (its output folder must start empty). Seconds."""
    where = (r["row"], r["per_class"], r["seed"])
    seconds = run_once(r["cmd"], run_dir(args.out, *where), env)
    out = shift_dir(args.out, *where)
    if not args.shift_images or os.path.exists(os.path.join(out, "results.json")):
        return seconds
    cmd = shift_command(*where, args)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.time()
    with open(out + ".log", "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ablation.ROOT, env=env, stdout=log, stderr=log)
    if rc:
        raise ablation.AblationError(f"{out}: the shift evaluation exited {rc} (see {out}.log); "
                                     "rerun the same command to retry it.")
    return seconds + time.time() - t0


def finished(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """The runs of the plan that have a report; says how many are missing (and errs on none)."""
    done = [r for r in runs if os.path.exists(os.path.join(
        run_dir(args.out, r["row"], r["per_class"], r["seed"]), "report", "results.json"))]
    missing = [f"{r['per_class']}pc/{r['row']}/seed{r['seed']}" for r in runs if r not in done]
    print(f"{len(done)} of {len(runs)} runs finished" +
          (f"; not yet: {', '.join(missing)}" if missing else ""), flush=True)
    if not done:
        raise ablation.AblationError(f"no finished run in {args.out}/runs to report on")
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    try:
        if args.smoke and not args.weights and not args.dry_run:
            args.weights = ablation.pretrain_smoke(args.out)
        src = smoke_data(args.out) if args.smoke else args.dataset.split(":", 1)[1]
        runs, facts = plan(args, src)
        if args.dry_run:
            print("\n".join("$ " + shlex.join(r["cmd"]) for r in runs))
            return 0
        t0 = time.time()
        if args.report_only:
            runs = finished(args, runs)
        else:
            sweep(args, runs, src)
    except ablation.AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    what = ablation._ablation_module().ROWS
    title = args.title or (f"weights {os.path.basename(args.weights.rstrip('/'))}, data "
                           f"{os.path.basename(src.rstrip('/'))}" + (" (smoke)" if args.smoke else ""))
    summary = {"title": title, "rows": args.rows, "row_what": {r: what[r] for r in args.rows},
               "sizes": args.sizes, "seeds": args.seeds, "val_per_class": args.val_per_class,
               "num_classes": facts["num_classes"],
               "budgets": {str(pc): b for pc, b in facts["budgets"].items()},
               "sweep_seconds_this_session": time.time() - t0,
               "runs": [result(r["row"], r["per_class"], r["seed"], r["cmd"], args)
                        for r in runs]}
    summary["shift"] = _shift_text(args, summary["runs"]) if args.shift_images else None
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(write_table(summary, args.out, title))
    plot(summary, args.out, title)
    plot_shift(summary, args.out, title)
    return 0


def _shift_text(args: argparse.Namespace, runs: list[dict]) -> str:
    """What the shift subset is, with the severity scale as the evaluations state it."""
    n = len(args.shift_corruptions.split(","))
    scale = next((r["severity_scale"] for r in runs if r.get("severity_scale")), "")
    return (f"{args.shift_images} test images (a seeded choice, the same for every run) x {n} "
            f"generated corruptions x severities {args.shift_severities}"
            + (f" ({scale}; not the released CIFAR-10-C)" if scale else ""))


if __name__ == "__main__":
    sys.exit(main())
