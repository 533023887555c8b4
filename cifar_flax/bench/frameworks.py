"""The benchmark worker: one framework's ResNet50 training step, timed in its own process.

Every row does the same work (bench/workload.py) with channels-last activations; each framework
runs in a fresh process (started by ``python -m cifar_flax.bench``) so that peak memory
(``ru_maxrss``) and thread pools stay apart. A row's process loads only what the row uses:
TensorFlow only in the `flax` (its input pipeline's import) and `keras` rows, torch only in the
`torch` row (every process holds JAX: the command-line module imports it). The worker prints one
line ``BENCH_RESULT <json>`` that :func:`run_worker` (the comparison's side) parses; a framework
that is not installed is a ``skipped`` row::

    python -m cifar_flax.bench.frameworks --framework=keras --size=32 --batch=128 --steps=10

The rows that never use TensorFlow (ROWS_WITHOUT_TENSORFLOW) are started with
``CIFAR_FLAX_WITHOUT_TENSORFLOW=1`` in their environment, which keeps it out of their process.
"""

import json
import os
import subprocess
import sys
from typing import Any, Callable

from absl import flags

from cifar_flax import UserError, cli, user_errors
from cifar_flax.bench import bare_step, keras_resnet
from cifar_flax.bench.workload import (
    define_workload_flags,
    FRAMEWORKS,
    Workload,
    missing_reason,
    peak_rss_mb,
    stage_sizes,
)
from cifar_flax.models import CONV_IMPLS
from cifar_flax.run import startup

RESULT_PREFIX = "BENCH_RESULT "
# The rows that never use TensorFlow: run_worker starts them with $CIFAR_FLAX_WITHOUT_TENSORFLOW
# set, so the command's start-up (run/startup.py) keeps TensorFlow out instead of importing it
# (~700 MB of resident memory that the row's peak_rss_mb would count; its import fails there).
ROWS_WITHOUT_TENSORFLOW = ("flax_bare", "torch")
LOADED = ("jax", "tensorflow", "keras", "torch")  # The frameworks a row's result says it holds.

FLAGS = flags.FlagValues()
flags.DEFINE_enum("framework", None, list(FRAMEWORKS), "The row to time.", flag_values=FLAGS)
define_workload_flags(FLAGS)
flags.DEFINE_boolean("tiny", False, "stage_sizes (1,1,1,1) (tests only).", flag_values=FLAGS)
flags.DEFINE_list("stage_sizes", None, "e.g. 3,4,6,3 (default: ResNet50's, or (1,1,1,1) with "
                  "--tiny).", flag_values=FLAGS)
flags.DEFINE_enum("conv_impl", "auto", list(CONV_IMPLS), "The flax rows' model.conv_impl.",
                  flag_values=FLAGS)
flags.mark_flag_as_required("framework", flag_values=FLAGS)


def _run_flax(w: Workload) -> dict:
    from cifar_flax.bench import project_step  # Loads TensorFlow, kept out of the other rows' RSS.

    return project_step.run(w)


def _run_torch(w: Workload) -> dict:
    from cifar_flax.bench import torch_resnet  # Imports torch: this row's optional framework.

    return torch_resnet.run(w)


RUNNERS: dict[str, Callable[[Workload], dict]] = {
    "flax": _run_flax,
    "flax_bare": bare_step.run,
    "keras": keras_resnet.run,
    "torch": _run_torch,
}


def finish(framework: str, w: Workload, out: dict) -> dict:
    """Derive images/s and ms/step from the timed block; add the process' peak RSS and the
    frameworks it holds (``loaded``: what that peak includes)."""
    out = dict(out)
    out.update(framework=framework, status="ok", size=w.size, batch=w.batch, steps=w.steps,
               dtype=w.dtype, peak_rss_mb=peak_rss_mb(),
               loaded=[m for m in LOADED if sys.modules.get(m) is not None])
    out["ms_per_step"] = 1000.0 * out["timed_s"] / w.steps
    out["images_per_s"] = w.batch * w.steps / out["timed_s"]
    return out


def result(framework: str, w: Workload) -> dict:
    """The row's result dict: measured, or ``skipped`` with the reason and the install command."""
    reason = missing_reason(framework)
    if reason:
        return {"framework": framework, "status": "skipped", "reason": reason}
    return finish(framework, w, RUNNERS[framework](w))


def workload_from_flags() -> Workload:
    """The Workload the flags describe (``--stage_sizes`` over ``--tiny``)."""
    with user_errors(lambda e: f"--stage_sizes={','.join(FLAGS.stage_sizes)}: give integers, "
                     "e.g. --stage_sizes=3,4,6,3.", ValueError):
        stages = tuple(int(s) for s in FLAGS.stage_sizes or ())
    if any(s < 1 for s in stages):
        raise UserError(f"--stage_sizes={','.join(FLAGS.stage_sizes)}: every stage needs >= 1 "
                        "block.")
    return Workload(FLAGS.size, FLAGS.batch, FLAGS.steps, FLAGS.warmup, FLAGS.dtype,
                    stages or stage_sizes(FLAGS.tiny), FLAGS.conv_impl)


def run_worker(framework: str, w: Workload, env: dict | None = None,
               timeout: float = 3600) -> dict[str, Any]:
    """Run one framework's timed step in a fresh worker process (this module) and return its
    result dict; ``env`` is added to the environment (e.g. ``XLA_FLAGS``)."""
    cmd = [sys.executable, "-m", "cifar_flax.bench.frameworks", f"--framework={framework}",
           f"--size={w.size}", f"--batch={w.batch}", f"--steps={w.steps}",
           f"--warmup={w.warmup}", f"--dtype={w.dtype}", f"--conv_impl={w.conv_impl}",
           f"--stage_sizes={','.join(map(str, w.stage_sizes))}"]
    full_env = {**os.environ, **(env or {})}
    full_env[startup.WITHOUT_TENSORFLOW] = "1" if framework in ROWS_WITHOUT_TENSORFLOW else "0"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "status": "error", "reason": f"timed out after {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"framework": framework, "status": "error", "reason": f"exit {proc.returncode}: {tail}"}


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    print(RESULT_PREFIX + json.dumps(result(FLAGS.framework, workload_from_flags())), flush=True)


def main(argv: list[str] | None = None) -> int:
    """The worker; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
