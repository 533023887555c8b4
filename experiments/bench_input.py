"""Input throughput: the host tf.data pipeline and the on-device augmentation (images/s).

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    python experiments/bench_input.py --data /tmp/cifar10-jpeg [--epochs 3] [--batch 128]

Host: the ImageFolder train split (50,000 JPEGs) through ``train_batches`` at the given global
batch: the one-off image check (read + decode every file once, ``get_info``), the first epoch
(read + decode + shuffle + batch, filling the cache) and the cached epochs. Device: jitted
``train_augment`` (padded crop + flip, and with mixup+cutmix) and ``eval_preprocess`` from 32x32
to 160 and 224, on one batch, compile excluded. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from cifar_flax.data import input_pipeline, preprocessing
from cifar_flax.config import default_config


def bench_host(data: str, batch: int, epochs: int) -> None:
    c = default_config()
    c.update(dict(dataset=f"imagefolder:{data}", val_fraction=0.0, batch_size=batch, cache=True))
    t = time.perf_counter()
    info = input_pipeline.get_info(c)
    dt = time.perf_counter() - t
    n = info.split_sizes["train"] + info.split_sizes["test"]
    print(f"host  image check (decode all {n} files once): {n / dt:8.0f} img/s  ({dt:.1f} s)")
    spe = input_pipeline.steps_per_epoch(c, info)
    stream = input_pipeline.train_batches(c, info)
    for epoch in range(epochs):
        t = time.perf_counter()
        for _ in range(spe):
            b = next(stream)
        dt = time.perf_counter() - t
        kind = "first (decode+shuffle+batch)" if epoch == 0 else "cached"
        print(f"host  epoch {epoch + 1} {kind:30s}: {spe * batch / dt:8.0f} img/s  ({dt:.1f} s)")
    assert b["image"].shape == (batch, 32, 32, 3)


def bench_device(batch: int, iters: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), np.uint8)
    labels = np.arange(batch) % 10
    images, labels = jax.device_put(images), jax.device_put(labels)
    for resolution in (160, 224):
        for name, extra in (("crop+flip", {}), ("crop+flip+mixup+cutmix",
                                                 {"mixup_alpha": 0.2, "cutmix_alpha": 1.0})):
            a = default_config().augment
            a.update(dict(resolution=resolution, **extra))
            fn = jax.jit(lambda x, y, k, a=a: preprocessing.train_augment(x, y, k, a, 10, preprocessing.TORCH))
            _time(f"train_augment {name:24s} 32->{resolution}", batch, iters,
                  lambda i, fn=fn: fn(images, labels, jax.random.key(i)))
        ev = jax.jit(lambda x, a=a: preprocessing.eval_preprocess(x, a, preprocessing.TORCH))
        _time(f"eval_preprocess {'':22s} 32->{resolution}", batch, iters, lambda i: ev(images))


def _time(name: str, batch: int, iters: int, step) -> None:
    jax.block_until_ready(step(0))  # compile
    t = time.perf_counter()
    for i in range(iters):
        out = step(i + 1)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t
    print(f"device {name}: {batch * iters / dt:8.0f} img/s  ({dt / iters * 1e3:.1f} ms/batch)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/cifar10-jpeg", help="ImageFolder root (train/, test/).")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="Timed augmentation batches.")
    p.add_argument("--skip_host", action="store_true")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs")
    if not args.skip_host:
        bench_host(args.data, args.batch, args.epochs)
    bench_device(args.batch, args.iters)


if __name__ == "__main__":
    main()
