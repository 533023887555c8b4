"""``python -m cifar_flax.eda --config configs/finetune.py --workdir OUT [--config.x=...]``.

Dataset statistics and plots of the dataset a config selects (cifar_flax.analysis.eda) written
to OUT: stats.json, class_distribution.png, samples.png, pixel_histograms.png, eda.md.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from cifar_flax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/finetune.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for stats.json, PNGs and eda.md.")
_SAMPLES = flags.DEFINE_integer("samples_per_class", 8, "Sample images per class in samples.png.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    from cifar_flax.analysis.dataset_stats import run_eda
    from cifar_flax.data.sources import DataError

    from cifar_flax.config import ConfigError

    try:
        run_eda(_CONFIG.value, _WORKDIR.value, _SAMPLES.value)
    except (DataError, ConfigError) as e:
        cli.fail(str(e))
    except OSError as e:
        cli.fail(f"{type(e).__name__}: {e} (writing the EDA to --workdir {_WORKDIR.value}).")
    print(f"EDA written to {_WORKDIR.value}/eda.md")


if __name__ == "__main__":
    cli.run(main, interrupted="EDA stopped; nothing was written for the unfinished scan")
