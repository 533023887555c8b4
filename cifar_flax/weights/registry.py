"""The weight sources, defined once: published releases and checksums, each source's default
variant, model layout and input preprocessing, and the spec that travels with converted weights.

No I/O here, so config validation (config.py) and the trainer can ask "which layout does
torchvision need?" without touching files or the network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cifar_flax import UserError
from cifar_flax.data import preprocessing
from cifar_flax.data.preprocessing import Preprocessing


@dataclasses.dataclass(frozen=True)
class Release:
    """A published weight file and its checksum."""

    url: str
    algorithm: str  # "sha256" or "md5"
    digest: str


# torchvision names its files after the sha256 prefix; the full digests are the ones torchvision
# users record for these files. Keras publishes md5 digests (keras.applications.resnet).
RELEASES: dict[str, dict[str, Release]] = {
    "torchvision": {
        "IMAGENET1K_V1": Release(
            "https://download.pytorch.org/models/resnet50-0676ba61.pth", "sha256",
            "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
        "IMAGENET1K_V2": Release(
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "sha256",
            "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca"),
    },
    "keras": {
        "notop": Release(
            "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5",
            "4d473c1dd8becc155b73f8504c6f6626"),
    },
}
SOURCES = tuple(sorted(RELEASES))
DEFAULT_VARIANT = {"torchvision": "IMAGENET1K_V2", "keras": "notop"}
SOURCE_LAYOUT = {"torchvision": "v1.5", "keras": "v1"}
SOURCE_PREPROCESSING = {"torchvision": preprocessing.TORCH, "keras": preprocessing.CAFFE}


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where converted weights came from and what they need; stored as spec.json beside them."""

    source: str  # "keras" | "torchvision" | "" (random init)
    variant: str  # e.g. "IMAGENET1K_V2", "notop" or "local"
    layout: str  # "v1" (keras) | "v1.5" (torchvision)
    preprocessing: Preprocessing
    file_sha256: str = ""  # sha256 of the file the weights were converted from

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WeightSpec":
        return cls(d["source"], d["variant"], d["layout"],
                   Preprocessing.from_json(d["preprocessing"]), d.get("file_sha256", ""))


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """Converted backbone variables (``stem``, ``stage1``..``stage4``) as float32 arrays."""

    params: dict
    batch_stats: dict
    spec: WeightSpec


def source_spec(source: str, variant: str = "", layout: str = "v1.5") -> WeightSpec:
    """The spec of a source/variant (no I/O). ``source=""`` is random init: ``layout``, SIMPLE."""
    if source == "":
        return WeightSpec("", "", layout, preprocessing.SIMPLE)
    if source not in RELEASES:
        raise UserError(
            f"Unknown pretrained.source {source!r}; expected one of {sorted(RELEASES)} or '' "
            "(random init)."
        )
    variant = variant or DEFAULT_VARIANT[source]
    if variant not in RELEASES[source] and variant != "local":
        raise UserError(
            f"Unknown pretrained.variant {variant!r} for source {source!r}; expected one of "
            f"{sorted(RELEASES[source])} or '' (the default, {DEFAULT_VARIANT[source]})."
        )
    return WeightSpec(source, variant, SOURCE_LAYOUT[source], SOURCE_PREPROCESSING[source])
