"""The class-split transfer benchmark as one resumable command: pretrain on half of CIFAR-10's
classes, transfer to the other half at 10, 100 and 1,000 images per class.

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    python experiments/class_split.py --src /tmp/cifar10-jpeg --out runs/class_split

1. A = airplane..deer (all 25,000 train and 5,000 test images) and B = dog..truck (likewise) as
   symlinked ImageFolders in ``--data`` (default OUT/data; cifar_flax.data.subset links them).
   A is the "pretraining" half, a stand-in for ImageNet; B the small-data target.
2. ResNet50 from scratch on A (configs/scratch.py, 15 epochs) in OUT/A_scratch: its features
   stand in for ImageNet ones.
3. experiments/data_efficiency.py on B from that run, in OUT/data_efficiency.

Each step resumes: a finished pretraining or run is only read back, an interrupted one continues
from its last checkpoint when the command is rerun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from cifar_flax.config import load_module
from cifar_flax.data.subset import link_subset

# Running a command resumably, shared: notebook_ablation.py beside this file, loaded by its path
# (experiments/ is no package).
ablation = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "notebook_ablation.py"))
A_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
B_CLASSES = ("dog", "frog", "horse", "ship", "truck")
TITLE = "pretrained on A (5 classes, from scratch), transfer to B (5 other classes)"


def pretrain_command(data: str, workdir: str, epochs: float) -> list[str]:
    """ResNet50 from random init on A (configs/scratch.py at 32 px)."""
    return [sys.executable, "-m", "cifar_flax.main", "--config=configs/scratch.py",
            f"--config.dataset=imagefolder:{os.path.join(data, 'A')}",
            f"--config.phases[0].epochs={epochs:g}", f"--workdir={workdir}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the extracted cifar10-jpeg folder")
    p.add_argument("--out", required=True, help="the pretraining run and the sweep go here")
    p.add_argument("--data", default="", help="where A/ and B/ are linked (default OUT/data)")
    p.add_argument("--pretrain-epochs", type=float, default=15.0)
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", default="1")
    p.add_argument("--dry-run", action="store_true", help="link the data, print the commands")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    data = os.path.abspath(args.data or os.path.join(out, "data"))
    for name, classes in (("A", A_CLASSES), ("B", B_CLASSES)):
        counts = link_subset(args.src, os.path.join(data, name), classes)
        print(f"{name}: {os.path.join(data, name)} {counts}")
    workdir = os.path.join(out, "A_scratch")
    pretrain = pretrain_command(data, workdir, args.pretrain_epochs)
    sweep = [sys.executable, os.path.join(ablation.ROOT, "experiments", "data_efficiency.py"),
             f"--weights={workdir}", f"--dataset=imagefolder:{os.path.join(data, 'B')}",
             f"--out={os.path.join(out, 'data_efficiency')}", f"--sizes={args.sizes}",
             f"--seeds={args.seeds}", f"--jobs={args.jobs}", f"--title={TITLE}"]
    if args.dry_run:
        print("$ " + " ".join(pretrain) + "\n$ " + " ".join(sweep))
        return 0
    try:
        if not os.path.exists(os.path.join(workdir, "report", "results.json")):
            ablation._run(pretrain, workdir, dict(os.environ))
    except ablation.AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return subprocess.call(sweep, cwd=ablation.ROOT)


if __name__ == "__main__":
    sys.exit(main())
