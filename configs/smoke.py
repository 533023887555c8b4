"""Smoke run: generated data, a tiny ResNet of the same structure, two short phases, no downloads.

    python -m cifar_flax.main --config configs/smoke.py --workdir /tmp/smoke   # < 1 min on 2 cores
"""

import ml_collections

from cifar_flax.config import default_config, phase


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.dataset = "synthetic"  # Generated learnable images (config.synthetic.*), no files.
    c.synthetic.num_train = 256
    c.synthetic.num_test = 64
    c.val_fraction = 0.25  # 64 validation images; 192 train -> 6 steps per epoch at batch 32.
    c.batch_size = 32
    c.lr_batch_size = 32  # The phases' rates below are for batch 32 (another batch scales them).
    c.eval_batch_size = 48  # Does not divide the splits: exercises the padded, masked last batch.
    c.augment.resolution = 32  # No upscaling.
    c.model.stage_sizes = (1, 1, 1, 1)  # Tiny network, same parameter paths as ResNet50.
    c.model.base_width = 8
    c.model.head_hidden = (32,)
    c.model.head_dropout = 0.1
    c.pretrained.source = ""  # Random init (SIMPLE preprocessing).
    c.phases = [
        phase("head", epochs=1, trainable=("head",), lr=0.1, schedule="constant"),
        phase("all", epochs=2, lr=0.05, warmup_epochs=0.5, weight_decay=1e-4),
    ]
    c.early_stopping.patience = 2
    c.checkpoint.every_steps = 4
    c.log_every_steps = 2
    return c
