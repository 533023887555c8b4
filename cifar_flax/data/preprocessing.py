"""What happens to images on the device: each weight release's normalisation, the training
augmentation and the evaluation resize (pure jax; jit- and shard_map-friendly).

Normalisation: the weights only compute what ImageNet training computed if the images are
preprocessed the way their authors did: Keras' "caffe" mode (RGB->BGR, subtract the BGR ImageNet
mean, no scaling) or torchvision's (scale to [0, 1], subtract the RGB mean, divide by the RGB
std). Both are one affine map per channel, ``(x[..., order] - mean) / std`` (:class:`Preprocessing`).

Augmentation, inside the train step on uint8 batches as the host pipeline delivers them
(``config.augment``): padded random crop or random-resized crop, horizontal flip, resize to
``augment.resolution`` (32 -> 160 by default), optional mixup/cutmix (soft labels), then the
normalisation. :func:`eval_preprocess` (validation, test, predict, export) only resizes and
normalises. Every geometric step of one example is a single ``jax.image.scale_and_translate``
with that example's scale and offset, vmapped over the batch: one resampling pass. Pixels that
a padded crop takes from outside the image are zero (black), as in the usual zero-padded CIFAR
crop. With no crop the map is exactly ``jax.image.resize``, what :func:`eval_preprocess` does,
so train and eval see the same geometry. ``key`` is split into one key per example (plus one
for mixup/cutmix partners): the same key gives the same output, examples draw independently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Per-channel affine normalisation on uint8-valued pixels: ``(x[..., order] - mean) / std``.

    ``mean`` and ``std`` are in the 0..255 pixel scale and in the *output* channel order.
    """

    name: str
    channel_order: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            name=d["name"],
            channel_order=tuple(d["channel_order"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


CAFFE = Preprocessing("caffe", (2, 1, 0), CAFFE_BGR_MEAN, (1.0, 1.0, 1.0))
TORCH = Preprocessing(
    "torch",
    (0, 1, 2),
    tuple(255.0 * m for m in IMAGENET_RGB_MEAN),
    tuple(255.0 * s for s in IMAGENET_RGB_STD),
)
# For random init: centre and scale roughly to [-1, 1].
SIMPLE = Preprocessing("simple", (0, 1, 2), (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))

BY_NAME = {p.name: p for p in (CAFFE, TORCH, SIMPLE)}


def get(name: str) -> Preprocessing:
    """Look a preprocessing up by name ("caffe", "torch" or "simple")."""
    if name not in BY_NAME:
        raise ValueError(f"Unknown preprocessing {name!r}; expected one of {sorted(BY_NAME)}.")
    return BY_NAME[name]


def normalize(images: Any, spec: Preprocessing, dtype: Any = jnp.float32) -> jnp.ndarray:
    """Normalise NHWC images with pixel values in [0, 255] (any dtype) as ``spec`` says (jax)."""
    x = jnp.asarray(images, jnp.float32)[..., jnp.array(spec.channel_order)]
    x = (x - jnp.array(spec.mean, jnp.float32)) / jnp.array(spec.std, jnp.float32)
    return x.astype(dtype)


def crop_box(key: jax.Array, height: int, width: int, aug_config: Any) -> jnp.ndarray:
    """One example's crop window ``(y0, x0, h, w)`` in source pixels (float32).

    Padded crop: an ``h x w = height x width`` window shifted by an integer in
    ``[-crop_padding, crop_padding]`` per axis (the part outside the image reads as zero).
    Random-resized crop: area fraction in ``rrc_scale``, aspect ratio log-uniform in
    ``rrc_ratio``, clipped to the image and placed uniformly inside it.
    """
    if aug_config.random_resized_crop:
        k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
        lo, hi = aug_config.rrc_scale
        r_lo, r_hi = aug_config.rrc_ratio
        area = height * width * jax.random.uniform(k_area, (), minval=lo, maxval=hi)
        ratio = jnp.exp(jax.random.uniform(k_ratio, (), minval=jnp.log(r_lo), maxval=jnp.log(r_hi)))
        h = jnp.clip(jnp.sqrt(area / ratio), 1.0, height)
        w = jnp.clip(jnp.sqrt(area * ratio), 1.0, width)
        y0 = jax.random.uniform(k_y, ()) * (height - h)
        x0 = jax.random.uniform(k_x, ()) * (width - w)
        return jnp.stack([y0, x0, h, w])
    pad = int(aug_config.crop_padding)
    shift = jax.random.randint(key, (2,), -pad, pad + 1).astype(jnp.float32)
    return jnp.concatenate([shift, jnp.array([height, width], jnp.float32)])


def _crop_resize(image: jnp.ndarray, box: jnp.ndarray, resolution: int) -> jnp.ndarray:
    """Resample the window ``box = (y0, x0, h, w)`` of ``image`` (H, W, C) to (R, R, C)."""
    y0, x0, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([resolution / h, resolution / w])
    translation = -jnp.stack([y0, x0]) * scale
    shape = (resolution, resolution, image.shape[-1])
    return jax.image.scale_and_translate(image, shape, (0, 1), scale, translation, "linear")


def _mix_one(x, y, xp, yp, key, mixup_alpha: float, cutmix_alpha: float):
    """Mixup or cutmix of one example with its partner (chosen 50/50 when both are on)."""
    k_choice, k_lam, k_cy, k_cx = jax.random.split(key, 4)
    alpha = cutmix_alpha if cutmix_alpha > 0 else mixup_alpha
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_choice)
        alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha)
    # Cutmix: paste a box of area (1 - lam) from the partner; lam becomes the kept area.
    r = x.shape[0]
    cut = r * jnp.sqrt(1.0 - lam)
    cy, cx = jax.random.uniform(k_cy, (), maxval=r), jax.random.uniform(k_cx, (), maxval=r)
    rows, cols = jnp.arange(r) + 0.5, jnp.arange(r) + 0.5
    in_rows = jnp.abs(rows - cy) < cut / 2
    in_cols = jnp.abs(cols - cx) < cut / 2
    box = in_rows[:, None] & in_cols[None, :]
    kept = 1.0 - box.mean()
    x_cut = jnp.where(box[..., None], xp, x)
    x_mix = lam * x + (1.0 - lam) * xp
    lam = jnp.where(use_cutmix, kept, lam)
    return jnp.where(use_cutmix, x_cut, x_mix), lam * y + (1.0 - lam) * yp


def train_augment(
    images: jnp.ndarray,
    labels: jnp.ndarray,
    key: jax.Array,
    aug_config: Any,
    num_classes: int,
    preprocessing: Preprocessing,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """uint8 (B, H, W, 3) + int labels -> normalised float32 (B, R, R, 3) + soft labels (B, K)."""
    b, height, width, _ = images.shape
    resolution = int(aug_config.resolution)
    keys = jax.random.split(key, b + 1)
    ex_keys = jax.vmap(lambda k: jax.random.split(k, 3))(keys[1:])  # (B, 3): crop, flip, mix

    def one(image, k):
        box = crop_box(k[0], height, width, aug_config)
        if aug_config.flip:
            image = jnp.where(jax.random.bernoulli(k[1]), image[:, ::-1], image)
        return _crop_resize(image, box, resolution)

    x = jax.vmap(one)(images.astype(jnp.float32), ex_keys)
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    mixup, cutmix = float(aug_config.mixup_alpha), float(aug_config.cutmix_alpha)
    if mixup > 0 or cutmix > 0:
        perm = jax.random.permutation(keys[0], b)
        mix = jax.vmap(lambda *a: _mix_one(*a, mixup_alpha=mixup, cutmix_alpha=cutmix))
        x, y = mix(x, y, x[perm], y[perm], ex_keys[:, 2])
    return normalize(x, preprocessing), y


def eval_preprocess(images: jnp.ndarray, aug_config: Any, preprocessing: Preprocessing) -> jnp.ndarray:
    """uint8 (B, H, W, 3) -> normalised float32 (B, R, R, 3): resize and normalise only."""
    resolution = int(aug_config.resolution)
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (resolution, resolution):
        x = jax.image.resize(x, (x.shape[0], resolution, resolution, x.shape[3]), "linear")
    return normalize(x, preprocessing)
