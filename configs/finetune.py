"""The recipe: torchvision ResNet50 (IMAGENET1K_V2) fine-tuned on CIFAR-10 in three phases.

1. head: backbone frozen (and its BatchNorm in inference mode), train the dense head;
2. upper: unfreeze stage3 + stage4 at a moderate learning rate (head a bit higher);
3. all: every layer at a low learning rate.
Augmentation (padded random crop, flip) throughout; each phase ends early when validation
accuracy stops improving, and the best checkpoint is tested.

    python -m cifar_flax.main --config configs/finetune.py --workdir runs/finetune
"""

import ml_collections

from cifar_flax.config import default_config, phase


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.pretrained.source = "torchvision"
    c.pretrained.variant = "IMAGENET1K_V2"
    c.model.layout = "v1.5"  # Must match the torchvision weights.
    c.model.head_hidden = (256,)
    c.model.head_dropout = 0.5
    c.augment.resolution = 160  # 32x32 upscaled on device; ImageNet features need the size.
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.batch_size = 128
    c.phases = [
        phase("head", epochs=3, trainable=("head",), lr=0.05, warmup_epochs=0.25,
              schedule="cosine"),
        phase("upper", epochs=6, trainable=("stage3", "stage4", "head"), lr=0.01,
              group_lr={"head": 0.02}, warmup_epochs=0.5, weight_decay=5e-5),
        phase("all", epochs=8, lr=0.002, warmup_epochs=0.5, weight_decay=5e-5),
    ]
    c.early_stopping.metric = "val_accuracy"
    c.early_stopping.patience = 2
    c.early_stopping.min_delta = 0.001
    return c
