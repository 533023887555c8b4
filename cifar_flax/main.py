"""Entry point: ``python -m cifar_flax.main --config configs/finetune.py --workdir runs/ft``.

``--config configs/x.py`` or ``configs/x.py:arg``, with ``--config.a.b=value`` overrides (e.g.
``--config.dataset=imagefolder:/data/pets --config.phases[0].lr=0.1``). Rerunning with the same
``--workdir`` resumes. Config, data and weights errors print one line and exit with status 1.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cifar_flax.config import ConfigError, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, report.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record: logging.logging.LogRecord) -> bool:
    """Drop Orbax's per-save INFO chatter (dozens of lines per checkpoint); keep its warnings."""
    return "orbax" not in record.pathname or record.levelno >= logging.logging.WARNING


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    config = _CONFIG.value
    from cifar_flax.datasets import DataError
    from cifar_flax.pretrained import WeightsError

    try:
        if config.distributed:
            jax.distributed.initialize()
        validate(config)
        from cifar_flax.train import train_and_evaluate

        results = train_and_evaluate(config, _WORKDIR.value)
    except (ConfigError, DataError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if "test_accuracy" in results and jax.process_index() == 0:
        print(f"test accuracy {results['test_accuracy']:.4f} "
              f"({results['images_per_sec']:.1f} images/s); report in {_WORKDIR.value}/report")


if __name__ == "__main__":
    app.run(main)
