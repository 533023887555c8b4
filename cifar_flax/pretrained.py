"""``python -m cifar_flax.pretrained convert|features ...``: the weights command line
(cifar_flax.weights.cli)."""

import sys

from cifar_flax.weights.cli import main

if __name__ == "__main__":
    sys.exit(main())
