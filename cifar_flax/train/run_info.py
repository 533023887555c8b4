"""``<workdir>/run_info.json``: what a trained run's users need besides its config.

Written once at the start of training (process 0), next to ``config.json``: the class names in
label order, the uint8 image shape the host pipeline fed the model, the dataset name and the
class count. Predict, evaluate and export read it, so they work on a machine that never saw the
training data (re-reading the dataset just to learn its class names would need the data).
"""

from __future__ import annotations

import json
from typing import Any

import jax
from etils import epath

from cifar_flax.data.types import DatasetInfo

FILENAME = "run_info.json"


def write_run_info(workdir: str, info: DatasetInfo) -> None:
    """Write ``<workdir>/run_info.json`` (process 0 only; any other process returns)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "dataset": info.name,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "image_shape": list(info.image_shape),
    }
    (path / FILENAME).write_text(json.dumps(record, indent=2))


def read_run_info(workdir: str) -> dict[str, Any]:
    """The content of ``<workdir>/run_info.json``; FileNotFoundError when the run has none
    (runs trained before it existed)."""
    path = epath.Path(workdir) / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    record = json.loads(path.read_text())
    record["class_names"] = list(record["class_names"])
    record["image_shape"] = tuple(int(x) for x in record["image_shape"])
    return record
