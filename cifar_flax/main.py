"""Train a model (or resume its run), test it and write its report:
``python -m cifar_flax.main --config configs/finetune.py --workdir runs/finetune``.

``--config configs/x.py`` or ``configs/x.py:arg``, with ``--config.a.b=value`` overrides (e.g.
``--config.dataset=imagefolder:/data/pets --config.phases[0].lr=0.1``). Rerunning with the same
``--workdir`` resumes (only the same run: run/workdir.py); one run per workdir at a time.
The report (curves, confusion matrix, classification report, calibration with the temperature
fitted on the validation split, results.json) goes to ``<workdir>/report``.
"""

import jax
from absl import flags
from etils import epath

from cifar_flax import UserError, cli, config as config_lib
from cifar_flax.analysis import calibration
from cifar_flax.analysis.report import write_report
from cifar_flax.train import train_and_evaluate
from cifar_flax.run import devices, workdir as workdir_lib

FLAGS = flags.FlagValues()
cli.config_flag(FLAGS, "Config file (configs/*.py[:arg]); --config.<field>=value overrides.")
flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, report.",
                    flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def run(config, workdir: str, stop_after_steps: int | None = None) -> dict:
    """Check the config and the workdir, lock it, train (or resume) and write the report into
    ``<workdir>/report``; results.json's content. ``stop_after_steps``: as
    train_and_evaluate's."""
    config_lib.validate(config)
    workdir_lib.check_workdir(workdir)

    def report(history, labels, logits, class_names, results, validation):
        write_report(str(epath.Path(workdir) / "report"), history, labels, logits, class_names,
                     results, calibration.from_validation(validation))  # Never fitted on test.

    with workdir_lib.WorkdirLock(workdir, take=jax.process_index() == 0):
        return train_and_evaluate(config, workdir, stop_after_steps, report)


def main(argv: list[str]) -> str | None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    config, workdir = FLAGS.config, FLAGS.workdir
    config_lib.validate_distributed(config.distributed)
    devices.join_processes(config.distributed)  # Before anything touches a device.
    results = run(config, workdir)
    if jax.process_index() != 0:
        return None
    rate = results["images_per_sec"]  # None: no training step was timed.
    speed = f" (training {rate:.1f} images/s)" if rate else ""
    bad = results["unstable"]  # The last line says it too: a warning can scroll away.
    unstable = (f"; UNSTABLE: the {bad['what']} reached {bad['value']:.4g} at step {bad['step']}"
                " (lower the learning rate)" if bad else "")
    return (f"test accuracy {results['test_accuracy']:.4f} on {results['test_examples']} "
            f"images{speed}{unstable}; report in {workdir}/report")


if __name__ == "__main__":
    cli.exit(cli.run(main, FLAGS, progress=True, interrupted="nothing new was saved; rerun the "
                     "same command to resume from the last checkpoint"))
