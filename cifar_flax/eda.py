"""``python -m cifar_flax.eda --config configs/finetune.py --workdir OUT [--config.x=...]``.

Dataset statistics and plots of the dataset a config selects (cifar_flax.analysis.dataset_stats)
written to OUT: stats.json, class_distribution.png, samples.png, pixel_histograms.png, eda.md.
"""

from cifar_flax import cli

if __name__ == "__main__":  # Before the imports below: Ctrl-C as one line, TensorFlow quiet.
    cli.start(interrupted="EDA stopped; nothing was written for the unfinished scan")

from absl import flags  # noqa: E402

from cifar_flax import UserError  # noqa: E402
from cifar_flax.analysis.dataset_stats import run_eda  # noqa: E402

FLAGS = flags.FlagValues()
cli.config_flag(FLAGS, "Config file (e.g. configs/finetune.py); --config.<field>=value overrides.")
flags.DEFINE_string("workdir", None, "Output folder for stats.json, the PNGs and eda.md.",
                    flag_values=FLAGS)
flags.DEFINE_integer("samples_per_class", 8, "Sample images per class in samples.png.",
                     lower_bound=1, flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def _main(argv: list[str]) -> str:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    run_eda(FLAGS.config, FLAGS.workdir, FLAGS.samples_per_class)
    return f"EDA written to {FLAGS.workdir}/eda.md"


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
