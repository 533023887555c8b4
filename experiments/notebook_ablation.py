"""The original notebook's experiment as one command: every row of configs/ablation.py, one table.

    python experiments/notebook_ablation.py --weights torchvision --out runs/ablation
    python experiments/notebook_ablation.py --weights keras --out runs/ablation_keras \
        --dataset imagefolder:/tmp/cifar10-jpeg --train-per-class 1000 --epochs-scale 0.5
    python experiments/notebook_ablation.py --weights runs/A --out runs/ablation_B \
        --dataset imagefolder:/tmp/cifar10-split/B --resolution 32      # an earlier run's weights
    python experiments/notebook_ablation.py --smoke --out /tmp/ablation    # synthetic, tiny, minutes

Each row is a real ``python -m cifar_flax.main`` run in ``OUT/<row>`` (its own checkpoints and
report; rerunning the script resumes an interrupted row, and a finished row only re-reads its
results; the rows share one JAX compilation cache, OUT/jax_cache). Then it writes ``OUT/ablation.md`` (row, what changed, test accuracy on every test
image, best validation accuracy, steps, wall time, images/s, the exact command: its folders as
``$OUT``, ``$DATASET`` and ``$WEIGHTS``, see :func:`portable`), ``OUT/ablation.json`` and ``OUT/ablation.png`` (bars, with the two accuracies the original
notebook, the Keras notebook this project started from, published as reference lines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any

from cifar_flax.config import load_config_file, load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION_CONFIG = os.path.join(ROOT, "configs", "ablation.py")
SMOKE_CONFIG = os.path.join(ROOT, "configs", "smoke.py")
# The original notebook (Keras ResNet50, ImageNet weights, CIFAR-10): frozen baseline, fine-tuned.
NOTEBOOK_FIGURES = {"original notebook, frozen baseline": 0.3176,
                "original notebook, fine-tuned": 0.8882}
WEIGHT_SOURCES = {
    "torchvision": ["--config.pretrained.source=torchvision",
                    "--config.pretrained.variant=IMAGENET1K_V2", "--config.model.layout=v1.5"],
    "keras": ["--config.pretrained.source=keras", "--config.pretrained.variant=",
              "--config.model.layout=v1"],
}
# Where a folder's path starts in a command or text (as tests/test_committed_results.py finds
# absolute paths: at the start, after a space, a quote, "=", ":", a bracket or a comma), and where
# it ends (a "/", or a character no file name goes on with).
_PATH_START = r"(?<![^\s\"'`=:(\[{,<|])"
_PATH_END = r"(?=[/\s\"'`,;:)\]}]|$)"


class AblationError(Exception):
    """A bad argument or a failed row; the message says which and what to do."""


def _ablation_module() -> Any:
    """configs/ablation.py, loaded by path (configs/ is not a package)."""
    return load_module(ABLATION_CONFIG)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    rows = list(_ablation_module().ROWS)
    progression = _ablation_module().PROGRESSION
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the row workdirs and the table")
    p.add_argument("--weights", default="",
                   help="torchvision, keras, or an earlier run's workdir (init_from); "
                        "default torchvision (--smoke: a smoke run trained first in OUT/pretrain)")
    p.add_argument("--dataset", default="", help="config.dataset (default: the config's cifar10)")
    p.add_argument("--resolution", type=int, default=0, help="augment.resolution (default 160)")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every phase's epochs (and warmup) by this")
    p.add_argument("--train-per-class", type=int, default=0,
                   help="cap the train split at N images per class (an ImageFolder subset of "
                        "symlinks in OUT/data; synthetic: num_train)")
    p.add_argument("--rows", default=",".join(progression),
                   help=f"rows to run, of {','.join(rows)} (default: {','.join(progression)})")
    p.add_argument("--smoke", action="store_true",
                   help="synthetic data and a tiny network (configs/smoke.py): CI's end-to-end run")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        p.error(f"--rows: unknown {unknown}; rows are {','.join(rows)}")
    if args.epochs_scale <= 0:
        p.error(f"--epochs-scale={args.epochs_scale} must be > 0")
    return args


def _load_config(arg: str) -> Any:
    return load_config_file(f"{ABLATION_CONFIG}:{arg}")


def weight_overrides(weights: str) -> list[str]:
    """--config overrides that make a row start from ``weights`` (not used by `scratch`)."""
    if weights in WEIGHT_SOURCES:
        return list(WEIGHT_SOURCES[weights])
    return [*_run_source(weights), f"--config.init_from={os.path.abspath(weights)}"]


def _run_config(run: str) -> dict:
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise AblationError(f"--weights {run}: not torchvision, keras or a run's workdir "
                            f"({path} does not exist).")
    with open(path) as f:
        return json.load(f)


def _run_source(run: str) -> list[str]:
    """The earlier run's weight source: init_from needs the same input normalisation."""
    p = _run_config(run)["pretrained"]
    return [f"--config.pretrained.source={p['source']}", f"--config.pretrained.variant={p['variant']}"]


def model_overrides(weights: str) -> list[str]:
    """An earlier run fixes the network's shape (every row, scratch too: the same network)."""
    if not weights or weights in WEIGHT_SOURCES:
        return []
    m = _run_config(weights)["model"]
    tup = lambda v: "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"  # noqa
    return [f"--config.model.layout={m['layout']}", f"--config.model.stage_sizes={tup(m['stage_sizes'])}",
            f"--config.model.base_width={m['base_width']}"]


def budget_overrides(args: argparse.Namespace, config: Any, data: str) -> list[str]:
    """Dataset, resolution and epochs-scale overrides for one row's config."""
    out = [f"--config.dataset={data}"] if data else []
    if args.resolution:
        out.append(f"--config.augment.resolution={args.resolution}")
    if args.train_per_class and config.dataset == "synthetic" and not data:
        n = args.train_per_class * config.synthetic.num_classes
        out.append(f"--config.synthetic.num_train={n}")
    if args.epochs_scale != 1.0:
        for i, ph in enumerate(config.phases):
            out.append(f"--config.phases[{i}].epochs={ph.epochs * args.epochs_scale:g}")
            out.append(f"--config.phases[{i}].warmup_epochs={ph.warmup_epochs * args.epochs_scale:g}")
    return out


def capped_dataset(args: argparse.Namespace, out: str) -> str:
    """``--dataset``, or (with --train-per-class on an ImageFolder) its capped symlink subset."""
    if not args.train_per_class or not args.dataset:
        return args.dataset
    if not args.dataset.startswith("imagefolder:"):
        raise AblationError(f"--train-per-class needs --dataset imagefolder:<dir> (or --smoke); "
                            f"{args.dataset!r} is a tfds dataset: make an ImageFolder of it.")
    from cifar_flax.data.subset import link_subset

    src = args.dataset.split(":", 1)[1]
    classes = sorted(e for e in os.listdir(os.path.join(src, "train")) if not e.startswith("."))
    dst = os.path.join(out, f"data_{args.train_per_class}_per_class")
    link_subset(src, dst, classes, splits=("train", "test"), per_class={"train": args.train_per_class})
    return f"imagefolder:{dst}"


def row_command(row: str, args: argparse.Namespace, data: str, weights: str) -> list[str]:
    """The exact ``python -m cifar_flax.main`` command of one row."""
    arg = f"{row},smoke" if args.smoke else row
    config = _load_config(arg)
    config_path = os.path.relpath(ABLATION_CONFIG, ROOT)  # Rows run from the repository root.
    cmd = [sys.executable, "-m", "cifar_flax.main", f"--config={config_path}:{arg}",
           f"--workdir={os.path.join(args.out, row)}"]
    cmd += model_overrides(weights)
    if row != "scratch" and weights:
        cmd += weight_overrides(weights)
    return cmd + budget_overrides(args, config, data)


def child_env(out: str, smoke: bool) -> dict[str, str]:
    """The rows' environment: one JAX compilation cache for all of them (rows share phases, so
    a later row loads the steps an earlier one compiled); the user's own setting wins."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "jax_cache"))
    if smoke:  # The tiny network's steps compile in under the default 1 s threshold.
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def pretrain_smoke(out: str) -> str:
    """--smoke without --weights: a smoke run to start from (stands for the pretrained run)."""
    workdir = os.path.join(out, "pretrain")
    _run([sys.executable, "-m", "cifar_flax.main", f"--config={SMOKE_CONFIG}",
          f"--workdir={workdir}", "--config.tensorboard=False"], workdir, child_env(out, True))
    return workdir


def portable(cmd: list[str] | str, folders: dict[str, str]) -> str:
    """What a results file says of ``cmd`` (a command's argv, or text such as a title), so that
    a reader reruns it as written from the repository root once the placeholders are set
    (experiments/README.md, "Paths in the results"): each absolute folder of ``folders``
    (``{args.out: "$OUT", ...}``) as its placeholder, paths inside the repository relative to it,
    and a command's interpreter (``sys.executable``) as ``python``.

    A folder counts only whole (``/tmp/run`` is no part of ``/tmp/run2``); a folder inside
    another one of ``folders`` is named by whichever comes first (``$OUT/pretrain``), the
    repository last. Relative and empty folders are left as they are. Only for what is written:
    the commands run keep their absolute paths."""
    names = {f.rstrip(os.sep): name for f, name in folders.items()
             if os.path.isabs(f) and f.strip(os.sep)}  # "/" is no folder to name.
    names.setdefault(ROOT + os.sep, "")
    names.setdefault(ROOT, ".")
    pattern = re.compile(_PATH_START + "(" + "|".join(
        re.escape(f) + ("" if f.endswith(os.sep) else _PATH_END) for f in names) + ")")
    if isinstance(cmd, str):
        return pattern.sub(lambda m: names[m.group(1)], cmd)
    return " ".join(_shell_word(pattern.split(token), names) for token in ["python", *cmd[1:]])


def _shell_word(parts: list[str], names: dict[str, str]) -> str:
    """One argument of a written command from its ``parts`` (text, folder, text, ...): quoted as
    shlex.join quotes it, but with its placeholders where the shell expands them (unquoted, or in
    double quotes)."""
    text = "".join(names[p] if i % 2 else p for i, p in enumerate(parts))
    if not any(names[p].startswith("$") for p in parts[1::2]):
        return shlex.quote(text)
    if all(shlex.quote(p) == p for p in parts[0::2] if p):
        return text
    return '"' + "".join(names[p] if i % 2 else re.sub(r'([\\"$`])', r"\\\1", p)
                         for i, p in enumerate(parts)) + '"'


def placeholders(args: argparse.Namespace, weights: str) -> dict[str, str]:
    """This ablation's folders that its results name by placeholder: ``$OUT`` (--out),
    ``$DATASET`` (the --dataset folder) and ``$WEIGHTS`` (the run the rows start from)."""
    run = os.path.abspath(weights) if weights and weights not in WEIGHT_SOURCES else ""
    return {args.out: "$OUT", args.dataset.split(":", 1)[-1]: "$DATASET", run: "$WEIGHTS"}


def _run(cmd: list[str], workdir: str, env: dict[str, str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc:
        raise AblationError(f"{os.path.basename(workdir)}: exit status {rc}; the command above "
                            f"failed (its workdir {workdir} resumes when you rerun the script).")


def row_result(row: str, cmd: list[str], what: str, out: str, folders: dict[str, str]) -> dict:
    """One table row from the row's report/results.json; its command as :func:`portable` writes
    it with ``folders``."""
    with open(os.path.join(out, row, "report", "results.json")) as f:
        r = json.load(f)
    return {"row": row, "what": what, "test_accuracy": r["test_accuracy"],
            "test_examples": r["test_examples"], "tested": r["tested_checkpoint"],
            "best_val_accuracy": r.get("best_val_accuracy"),
            "steps": r["steps"], "wall_seconds": r["wall_seconds"],
            "images_per_sec": r["images_per_sec"], "command": portable(cmd, folders)}


def write_table(results: list[dict], out: str, title: str) -> None:
    """ablation.md and ablation.json."""
    lines = [f"# {title}", "",
             "| row | what changed | test acc | tested | best val acc | steps | wall | images/s |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        val = "-" if r["best_val_accuracy"] is None else f"{100 * r['best_val_accuracy']:.2f}%"
        rate = "-" if r["images_per_sec"] is None else f"{r['images_per_sec']:.0f}"  # None: untimed
        lines.append(f"| {r['row']} | {r['what']} | {100 * r['test_accuracy']:.2f}% | "
                     f"{r['tested']} | {val} | "
                     f"{r['steps']} | {r['wall_seconds'] / 60:.1f} min | {rate} |")
    n = {r["test_examples"] for r in results}
    lines += ["", f"Test accuracy on all {'/'.join(map(str, sorted(n)))} test images of the "
              "last weights, or of the best checkpoint by validation accuracy where early "
              "stopping is on (`tested`); wall = the row's whole run (start-up, training, "
              "validation, test, report); images/s = training throughput.", "",
              "Commands (run from the repository root):", ""]
    lines += [f"- {r['row']}: `{r['command']}`" for r in results]
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1)


def plot(results: list[dict], out: str, title: str) -> None:
    """ablation.png: test accuracy per row, the original notebook's published figures as
    reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["row"] for r in results]
    accs = [100 * r["test_accuracy"] for r in results]
    bars = ax.bar(names, accs, color=["#888" if n == "scratch" else "#3b75af" for n in names])
    ax.bar_label(bars, fmt="%.1f%%", padding=2)
    for (label, value), style in zip(NOTEBOOK_FIGURES.items(), ("--", ":")):
        ax.axhline(100 * value, color="#c44", linestyle=style, linewidth=1.2,
                   label=f"{label}: {100 * value:.2f}%")
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ablation.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    what = _ablation_module().ROWS
    try:
        weights = args.weights  # A run by its absolute path, as init_from names it.
        if weights and weights not in WEIGHT_SOURCES:
            weights = os.path.abspath(weights)
        if args.smoke and not weights and not args.dry_run:
            weights = pretrain_smoke(args.out)
        data = capped_dataset(args, args.out)
        commands = {row: row_command(row, args, data, weights) for row in args.rows}
        for i, (row, cmd) in enumerate(commands.items(), 1):
            print(f"\n[{i}/{len(commands)}] {row}: {what[row]}", flush=True)
            if args.dry_run:
                print("$ " + shlex.join(cmd))
                continue
            _run(cmd, os.path.join(args.out, row), child_env(args.out, args.smoke))
            if not os.path.exists(os.path.join(args.out, row, "report", "results.json")):
                raise AblationError(f"{row} stopped before its report (SIGTERM?); rerun the "
                                    "same command to resume it.")
        if args.dry_run:
            return 0
        folders = placeholders(args, weights)
        results = [row_result(row, cmd, what[row], args.out, folders)
                   for row, cmd in commands.items()]
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    title = portable(f"The original notebook's ablation: weights {weights or 'torchvision'}, "
                     f"dataset {data or 'the config default'}"
                     + (" (smoke)" if args.smoke else ""), folders)
    write_table(results, args.out, title)
    plot(results, args.out, title)
    print(open(os.path.join(args.out, "ablation.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
