"""Shared steps of the weight-conversion tests: features through the command, and the comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar_flax import pretrained


def random_images(size: int, n: int = 3) -> np.ndarray:
    """``n`` random uint8 images (3 with batch size 2: two batches, the last one padded)."""
    return np.random.default_rng(size).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def features_via_command(workdir: Path, images: np.ndarray) -> np.ndarray:
    """Run ``pretrained features`` on ``workdir/converted`` for ``images``; the saved features."""
    size = images.shape[1]
    np.save(workdir / f"images{size}.npy", images)
    out = workdir / f"feats{size}.npy"
    assert pretrained.main(
        ["features", f"--weights={workdir / 'converted'}",
         f"--images={workdir / f'images{size}.npy'}", f"--output={out}", "--batch_size=2"]
    ) == 0
    return np.load(out)


def assert_features_match(ours: np.ndarray, ref: np.ndarray, label: str) -> None:
    """(N, 2048) float32 and max abs difference <= 1e-4 x max abs feature (printed for -s)."""
    assert ours.shape == ref.shape == (len(ref), 2048) and ours.dtype == np.float32
    diff, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    print(f"\n{label}: max abs diff {diff:.3g}, max abs feature {scale:.3g}, "
          f"ratio {diff / scale:.3g}")
    assert scale > 0 and diff <= 1e-4 * scale
