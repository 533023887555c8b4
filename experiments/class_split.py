"""Build the CIFAR-10 class split of the transfer benchmark as symlinked ImageFolders.

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    python experiments/class_split.py --src /tmp/cifar10-jpeg --out /tmp/cifar10-split
    # -> /tmp/cifar10-split/A/{train,test}/<airplane..deer>   (all 5,000 + 1,000 per class)
    #    /tmp/cifar10-split/B/{train,test}/<dog..truck>       (train capped, test whole)

A is the "pretraining" half (a stand-in for ImageNet), B the small-data target. No image is
copied (cifar_flax.data.subset links them).
"""

from __future__ import annotations

import argparse
import os

from cifar_flax.data.subset import link_subset

A_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
B_CLASSES = ("dog", "frog", "horse", "ship", "truck")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="the extracted cifar10-jpeg folder")
    parser.add_argument("--out", required=True, help="where A/ and B/ are linked")
    parser.add_argument("--b-train-per-class", type=int, default=1000,
                        help="images per class in B's train split (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of B's train sample")
    args = parser.parse_args()
    a = link_subset(args.src, os.path.join(args.out, "A"), A_CLASSES)
    b = link_subset(args.src, os.path.join(args.out, "B"), B_CLASSES,
                    per_class={"train": args.b_train_per_class}, seed=args.seed)
    print(f"A: {os.path.join(args.out, 'A')} {a}\nB: {os.path.join(args.out, 'B')} {b}")


if __name__ == "__main__":
    main()
