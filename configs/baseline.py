"""The original notebook's baseline: Keras ImageNet ResNet50, frozen, with a dense head + dropout.

Only the head trains (the backbone's BatchNorm stays in inference mode, as Keras' frozen layers
do); no augmentation. The backbone features are therefore computed once and the head trains on
them (config.feature_cache; the same result as running the backbone every step, much faster).
Compare with configs/finetune.py to see what unfreezing and augmentation add.

    python -m cifar_flax.main --config configs/baseline.py --workdir runs/baseline
"""

import ml_collections

from cifar_flax.config import default_config, phase


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.pretrained.source = "keras"  # keras.applications.ResNet50 weights (v1 layout, caffe preprocessing).
    c.pretrained.variant = ""  # The default "notop" file.
    c.model.layout = "v1"  # Must match the Keras weights.
    c.model.head_hidden = (256,)  # The notebook's Dense(256, relu) + Dropout(0.5) head.
    c.model.head_dropout = 0.5
    c.augment.resolution = 160  # 32x32 upscaled; the same resolution as finetune.py.
    c.augment.crop_padding = 0  # No augmentation in the baseline.
    c.augment.flip = False
    c.phases = [
        phase("head", epochs=10, trainable=("head",), optimizer="adamw", lr=1e-3,
              schedule="constant", momentum=0.9),
    ]
    c.early_stopping.patience = 3
    c.feature_cache.enabled = True  # Head only, no augmentation: train on cached backbone features (exact).
    return c
