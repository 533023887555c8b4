"""Export a trained run as a self-contained model:
``python -m cifar_flax.export --workdir RUN --output DIR [--force] [--checkpoint latest]``.

DIR receives (cifar_flax/exported.py loads it with jax and numpy alone):
- ``model.jax``: jax.export serialized StableHLO of ``(variables, images) -> (logits,
  probabilities)`` for CPU, CUDA and TPU, with a symbolic batch dimension; ``images`` are uint8
  (N, H, W, 3) at the size the run's pipeline fed the model, and the resize to
  ``augment.resolution`` and the normalisation are inside. It uses XLA's convolution everywhere
  (``model.conv_impl="xla"``), not the CPU-only small-map path.
- ``params.npz`` (weights, '/'-joined paths), ``model.json`` (class names, input shape,
  provenance) and ``exported.py`` (the loader, so the folder needs no cifar_flax).
- ``saved_model/`` when TensorFlow is importable: a TF SavedModel (jax2tf, native serialization)
  with a ``serving_default`` signature ``images`` uint8 -> ``logits``, ``probabilities``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import cifar_flax
from cifar_flax import exported
from cifar_flax.data.augment import eval_preprocess
from cifar_flax.inference.cli import run_cli
from cifar_flax.training.checkpoints import flat_shapes
from cifar_flax.training.workdir import check_output_folder, output_folder

if TYPE_CHECKING:  # It imports TensorFlow, which run_cli imports first (quietly).
    from cifar_flax.inference.trained_run import LoadedRun

PLATFORMS = ("cpu", "cuda", "tpu")


def serving_function(run: LoadedRun) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(variables, uint8 images) -> (logits, probabilities)``: eval preprocessing + model."""
    model = run.model.clone(bn_axis_name=None)  # Inference BatchNorm: no cross-device axis.

    def serve(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = eval_preprocess(images, run.config.augment, run.preprocessing)
        logits = model.apply(variables, x, train=False).astype(jnp.float32)
        return logits, jax.nn.softmax(logits, axis=-1)

    return serve


def host_variables(run: LoadedRun) -> dict[str, np.ndarray]:
    """The run's variables as numpy, flattened to '/'-joined paths (params.npz's keys)."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(run.variables))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def export_stablehlo(run: LoadedRun) -> jax.export.Exported:
    """jax.export of serving_function for PLATFORMS, batch dimension symbolic."""
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *run.image_shape), jnp.uint8)
    variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.variables)
    return jax.export.export(jax.jit(serving_function(run)), platforms=PLATFORMS)(variables, images)


def model_info(run: LoadedRun, exp: jax.export.Exported) -> dict[str, Any]:
    """model.json: what a user of the folder needs to know, and where it came from."""
    trained = epath.Path(run.workdir) / "report" / "results.json"
    trained = json.loads(trained.read_text()) if trained.exists() else {}
    return {
        "format": "cifar_flax.export/1",
        "class_names": run.class_names,
        "input": {"shape": list(run.image_shape), "dtype": "uint8", "layout": "NHWC",
                  "note": "any batch size; resize and normalisation are inside the model"},
        "outputs": ["logits", "probabilities"],
        "platforms": list(exp.platforms),
        "model_resolution": int(run.config.augment.resolution),
        "preprocessing": run.preprocessing.to_json(),
        "parameters": int(sum(np.prod(s) for s in flat_shapes(run.variables["params"]).values())),
        "provenance": {
            "run": str(run.workdir), "checkpoint": run.checkpoint.kind or "given",
            "step": run.checkpoint.step, "dataset": run.dataset,
            "run_test_accuracy": trained.get("test_accuracy"),
            "cifar_flax": cifar_flax.__version__, "jax": jax.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": json.loads(run.config.to_json_best_effort()),
        },
    }


EXPORT_FILES = (exported.MODEL_FILE, exported.PARAMS_FILE, exported.INFO_FILE, "exported.py",
                "saved_model")  # All that an export folder holds.


def _is_export(folder: epath.Path) -> bool:
    """Whether ``folder`` holds an earlier export (its model.json says so)."""
    info = folder / exported.INFO_FILE
    try:
        return json.loads(info.read_text()).get("format", "").startswith("cifar_flax.export/")
    except (OSError, ValueError, AttributeError):
        return False


def export(workdir: str, output: str, force: bool = False, checkpoint: str = "best",
           savedmodel: bool = True) -> dict[str, Any]:
    """Write the export folder; returns model.json's content (+ "saved_model": bool)."""
    from cifar_flax.inference.trained_run import load_run

    check_output_folder(output, force, "export", _is_export, EXPORT_FILES)
    run = load_run(workdir, checkpoint, conv_impl="xla")
    exp = export_stablehlo(run)
    with output_folder(output) as out:
        return _write(run, exp, out, savedmodel)


def _write(run: LoadedRun, exp: jax.export.Exported, out: epath.Path,
           savedmodel: bool) -> dict[str, Any]:
    """The export folder's files into ``out``; model.json's content (+ "saved_model": bool)."""
    (out / exported.MODEL_FILE).write_bytes(bytes(exp.serialize()))
    with (out / exported.PARAMS_FILE).open("wb") as f:
        np.savez(f, **host_variables(run))
    info = model_info(run, exp)
    (out / exported.INFO_FILE).write_text(json.dumps(info, indent=2))
    (out / "exported.py").write_text(epath.Path(exported.__file__).read_text())
    info["saved_model"] = False
    if savedmodel:
        from cifar_flax.inference import savedmodel as sm

        info["saved_model"] = sm.write(run, serving_function(run), out / "saved_model")
    return info


def _main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar_flax.export",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the training run's --workdir")
    p.add_argument("--output", required=True, help="a new (or empty) folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--no-saved-model", "--no_saved_model", action="store_true", help="skip the TF SavedModel")
    args = p.parse_args(argv)
    info = export(args.workdir, args.output, args.force, args.checkpoint, not args.no_saved_model)
    extra = " + saved_model/" if info["saved_model"] else " (no TensorFlow: no SavedModel)"
    print(f"exported {len(info['class_names'])}-class model, input uint8 (N, "
          f"{', '.join(map(str, info['input']['shape']))}), for {'/'.join(info['platforms'])} "
          f"to {args.output}{extra}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 with one ``error:`` line on bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
