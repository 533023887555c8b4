"""ResNet50 from random init, all layers, native 32x32 inputs (needs no weight download).

    python -m cifar_flax.main --config configs/scratch.py --workdir runs/scratch
    python -m cifar_flax.main --config configs/scratch.py \
        --config.dataset=imagefolder:/tmp/cifar10-jpeg --workdir runs/scratch_jpeg   # offline
"""

import ml_collections

from cifar_flax.config import default_config, phase


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.pretrained.source = ""  # Random init; SIMPLE preprocessing ([-1, 1]).
    c.model.layout = "v1.5"
    c.model.head_hidden = ()  # Linear head on the pooled features.
    c.model.head_dropout = 0.0
    c.model.zero_init_head = True
    c.augment.resolution = 32  # No upscaling: the cheapest ResNet50 there is.
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.batch_size = 128
    # The linear head sees 2048 post-ReLU features with |f|^2 ~ 5000 at init, so with 10 classes
    # its loss curvature is ~500 and SGD+momentum on it is unstable above lr ~0.01: at the
    # backbone's lr 0.1 the loss climbed from 2.3 to 4-5 during warmup.
    c.phases = [
        phase("all", epochs=30, lr=0.1, group_lr={"head": 0.005}, warmup_epochs=1,
              weight_decay=5e-4, schedule="cosine"),
    ]
    c.early_stopping.patience = 5
    return c
