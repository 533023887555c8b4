"""Statistics and plots of the dataset a config selects:
``python -m cifar_flax.eda --config configs/finetune.py --workdir OUT [--config.x=...]``.

They are computed by cifar_flax.analysis.dataset_stats and written to OUT: stats.json,
class_distribution.png, samples.png, pixel_histograms.png, eda.md.
OUT is a new or empty folder, or with ``--force`` an earlier EDA output (its stats.json says so,
and it holds nothing else); never a run's workdir or a folder holding other files (the rule of
export and evaluate: workdir.check_output_folder). The files are written into a folder next to
OUT and moved into place when complete.
"""

from absl import flags
from etils import epath

from cifar_flax import UserError, cli
from cifar_flax.analysis.dataset_stats import EDA_FILES, WRITTEN_BY, run_eda
from cifar_flax.run.workdir import check_output_folder, output_folder, read_json

FLAGS = flags.FlagValues()
cli.config_flag(FLAGS, "Config file (e.g. configs/finetune.py); --config.<field>=value overrides.")
flags.DEFINE_string("workdir", None, "A new (or empty) output folder for stats.json, the PNGs "
                    "and eda.md (inside a run's workdir: under RUN/eda/).", flag_values=FLAGS)
flags.DEFINE_boolean("force", False, "Replace an earlier EDA output in --workdir.",
                     flag_values=FLAGS)
flags.DEFINE_integer("samples_per_class", 8, "Sample images per class in samples.png.",
                     lower_bound=1, flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def _is_eda(folder: epath.Path) -> bool:
    """Whether ``folder`` holds an earlier EDA output (its stats.json says so)."""
    stats = read_json(folder / "stats.json")
    return isinstance(stats, dict) and stats.get("written_by") == WRITTEN_BY


def _main(argv: list[str]) -> str:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    check_output_folder(FLAGS.workdir, FLAGS.force, "eda", _is_eda, EDA_FILES, "eda",
                        flag="--workdir")
    with output_folder(FLAGS.workdir) as tmp:
        run_eda(FLAGS.config, str(tmp), FLAGS.samples_per_class)
    return f"EDA written to {FLAGS.workdir}/eda.md"


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv,
                   interrupted="EDA stopped; nothing was written for the unfinished scan")


if __name__ == "__main__":
    cli.exit(main())
