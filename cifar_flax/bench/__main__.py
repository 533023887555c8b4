"""``python -m cifar_flax.bench``: see cifar_flax.bench.cli."""

import sys

from cifar_flax.bench.compare import main

sys.exit(main())
