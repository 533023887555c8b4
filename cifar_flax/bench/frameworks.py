"""The benchmark worker: one framework's ResNet50 training step, timed in its own process.

Every row does the same work (bench/workload.py) with channels-last activations; each framework
runs in a fresh process (started by bench/cli.py) so that peak memory (``ru_maxrss``) and thread
pools stay apart, and the Keras and PyTorch processes never import JAX. The worker prints one
line ``BENCH_RESULT <json>`` that the CLI parses::

    python -m cifar_flax.bench.frameworks --framework torch --size 32 --batch 128 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from cifar_flax.bench import bare_step, keras_step, torch_step, train_step
from cifar_flax.bench.timing import peak_rss_mb
from cifar_flax.bench.workload import FrameworkUnavailable, stage_sizes

RESULT_PREFIX = "BENCH_RESULT "
RUNNERS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "flax": train_step.run,
    "flax_bare": bare_step.run,
    "keras": keras_step.run,
    "torch": torch_step.run,
}


def finish(framework: str, args: argparse.Namespace, out: dict) -> dict:
    """Derive images/s and ms/step from the timed block; add the process' peak RSS."""
    out = dict(out)
    out.update(framework=framework, status="ok", size=args.size, batch=args.batch,
               steps=args.steps, dtype=args.dtype, peak_rss_mb=peak_rss_mb())
    out["ms_per_step"] = 1000.0 * out["timed_s"] / args.steps
    out["images_per_s"] = args.batch * args.steps / out["timed_s"]
    return out


def _stages(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", required=True, choices=sorted(RUNNERS))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tiny", action="store_true", help="stage_sizes (1,1,1,1) (tests only)")
    p.add_argument("--stage-sizes", type=_stages, default=None,
                   help="e.g. 3,4,6,3 (default: ResNet50's, or (1,1,1,1) with --tiny)")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
    args = p.parse_args(argv)
    args.stage_sizes = args.stage_sizes or stage_sizes(args.tiny)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = finish(args.framework, args, RUNNERS[args.framework](args))
    except FrameworkUnavailable as e:
        result = {"framework": args.framework, "status": "skipped", "reason": str(e)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
