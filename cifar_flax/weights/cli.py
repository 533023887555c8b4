"""The weights command line::

    python -m cifar_flax.pretrained convert --source {keras,torchvision} --input FILE --output DIR
    python -m cifar_flax.pretrained features --weights DIR --images IMAGES.npy --output FEATS.npy

``convert`` writes a directory usable as ``--config.pretrained.file=DIR``; ``features`` writes the
pooled (N, 2048) float32 features of uint8 NHWC images. Errors: one line on stderr, status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import numpy as np

from cifar_flax.weights.convert import convert_file
from cifar_flax.weights.features import extract_features
from cifar_flax.weights.files import WeightsError
from cifar_flax.weights.registry import SOURCES
from cifar_flax.weights.store import load_weights, save_weights


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_flax.pretrained",
                                description="Convert ImageNet ResNet50 weights; extract features.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a published weight file to a Flax weights dir")
    c.add_argument("--source", required=True, choices=SOURCES)
    c.add_argument("--input", required=True, help=".h5 / .pth / .safetensors / .npz file")
    c.add_argument("--output", required=True, help="directory to write (spec.json + state/)")
    c.add_argument("--variant", default="local", help="recorded in spec.json (default: local)")
    f = sub.add_parser("features", help="pooled backbone features of uint8 NHWC images")
    f.add_argument("--weights", required=True, help="directory written by `convert`")
    f.add_argument("--images", required=True, help="uint8 (N, H, W, 3) .npy, H, W >= 32")
    f.add_argument("--output", required=True, help="float32 (N, 2048) .npy to write")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p


def _convert(args: argparse.Namespace) -> None:
    weights = convert_file(args.source, args.input, args.variant)
    save_weights(weights, args.output)
    n = sum(v.size for v in jax.tree.leaves((weights.params, weights.batch_stats)))
    print(f"Converted {args.input} -> {args.output}: {n:,} values, layout "
          f"{weights.spec.layout}, preprocessing {weights.spec.preprocessing.name}.")


def _features(args: argparse.Namespace) -> None:
    weights = load_weights(args.weights)
    try:
        images = np.load(args.images, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise WeightsError(f"Could not read --images {args.images!r}: {e}") from e
    feats = extract_features(weights, images, args.batch_size, args.dtype, progress=True)
    np.save(args.output, feats)
    print(f"Wrote {feats.shape} features to {args.output}.")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (errors: one line on stderr, status 1)."""
    args = _parser().parse_args(argv)
    try:
        (_convert if args.command == "convert" else _features)(args)
    except (WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
