"""The config schema: every field, its default and what it means.

The files in ``configs/`` start from :func:`default_config` and change what their recipe needs, so
a field is documented once, here. ``validate`` (in this module) checks a config before any work.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (a CIFAR-10 fine-tune from torchvision V2 weights)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds init, shuffling, validation split, augmentation and dropout.

    # ---- data (input_pipeline.py) ----
    c.dataset = "cifar10"  # tfds name, "imagefolder:<dir>" (<dir>/<split>/<class>/*.jpg|png) or "synthetic".
    c.data_dir = ""  # tfds data_dir ("" = tfds default, ~/tensorflow_datasets).
    c.train_split = "train"
    c.test_split = "test"
    c.val_split = ""  # A named validation split; "" = hold out val_fraction of train_split.
    c.val_fraction = 0.1  # Fraction of train held out (seeded) for early stopping; 0 = no validation.
    c.image_size = 0  # Host-side resize to this square size when image sizes vary; 0 = keep (must be uniform).
    c.skip_bad_files = False  # ImageFolder: skip undecodable files (and report how many) instead of failing.
    c.shuffle_buffer = 50_000
    c.cache = True  # tf.data cache of decoded uint8 images after the first epoch.
    c.batch_size = 128  # Global batch (over all devices and hosts); must divide by the device count.
    c.eval_batch_size = 256  # Global eval batch; the last batch is padded and masked.
    c.synthetic = ml_collections.ConfigDict()  # Only for dataset="synthetic" (smoke tests, no files).
    c.synthetic.num_classes = 4
    c.synthetic.num_train = 256
    c.synthetic.num_test = 64
    c.synthetic.size = 32

    # ---- augmentation (augment.py, on device) ----
    c.augment = ml_collections.ConfigDict()
    c.augment.resolution = 160  # Model input resolution; images are resized on device (32 -> 160).
    c.augment.crop_padding = 4  # Random crop with this much padding (in source pixels); 0 = off.
    c.augment.flip = True  # Random horizontal flip.
    c.augment.random_resized_crop = False  # Inception-style crop (replaces padded crop when on).
    c.augment.rrc_scale = (0.35, 1.0)  # Area range of random_resized_crop.
    c.augment.mixup_alpha = 0.0  # > 0 enables mixup with Beta(alpha, alpha).
    c.augment.cutmix_alpha = 0.0  # > 0 enables cutmix with Beta(alpha, alpha).

    # ---- model (models.py) and weights (pretrained.py) ----
    c.model = ml_collections.ConfigDict()
    c.model.layout = "v1.5"  # "v1" (Keras) or "v1.5" (torchvision); must match the weights.
    c.model.head_hidden = (256,)  # Hidden Dense widths of the head; () = linear head.
    c.model.head_dropout = 0.5  # Dropout before each Dense of the head (training only).
    c.model.zero_init_head = True  # Zero-init the final Dense layer.
    c.model.stage_sizes = (3, 4, 6, 3)  # Blocks per stage; ResNet50's. Smaller only for tests/smoke.
    c.model.base_width = 64  # Stem width; stage widths are 1x..8x it. 64 = ResNet50.
    c.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (params stay float32).

    c.pretrained = ml_collections.ConfigDict()
    c.pretrained.source = "torchvision"  # "torchvision", "keras" or "" (random init).
    c.pretrained.variant = "IMAGENET1K_V2"  # torchvision: IMAGENET1K_V1 / IMAGENET1K_V2.
    c.pretrained.file = ""  # Local weight file instead of downloading (.pth/.safetensors/.npz/.h5).
    c.pretrained.cache_dir = ""  # "" = $CIFAR_FLAX_CACHE or ~/.cache/cifar_flax.
    return c
