"""Host input-pipeline throughput for the benchmark: images/s of input_pipeline.train_batches.

Measured on the host alone (no model), for the same batch size as the framework rows, so that a
reader sees whether tf.data reading + decoding + batching keeps up with the training step.
"""

from __future__ import annotations

import time
from typing import Any, Iterator


def _train_batches(dataset: str, size: int, batch: int) -> Iterator[Any]:
    """The project's training batches for ``dataset``, via input_pipeline.train_batches
    (``synthetic`` is generated at ``size``; other datasets are read as the config says)."""
    from cifar_flax import config as config_lib
    from cifar_flax.data import input_pipeline

    cfg = config_lib.default_config()
    cfg.dataset = dataset
    cfg.batch_size = batch
    cfg.synthetic.size = size
    cfg.synthetic.num_train = max(cfg.synthetic.num_train, 4 * batch)
    return input_pipeline.train_batches(cfg, input_pipeline.get_info(cfg))


def measure(dataset: str, size: int, batch: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` batches after two warm-up batches; never raises (status says why).

    ``first_batch_s`` is the one-off cost before the first batch (listing, and for in-memory
    sources decoding the whole split); ``images_per_s`` is the steady state after it.
    """
    try:
        t0 = time.perf_counter()
        it = _train_batches(dataset, size, batch)
        next(it)
        first = time.perf_counter() - t0
        next(it)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            n += len(next(it)["image"])
        dt = time.perf_counter() - t0
    except Exception as e:  # reported in the table, the framework rows still count
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    return {"status": "ok", "dataset": dataset, "batch": batch, "images_per_s": n / dt,
            "first_batch_s": first}
