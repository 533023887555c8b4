"""Export a trained run as a self-contained model:
``python -m cifar_flax.export --workdir RUN --output DIR [--force] [--checkpoint latest]``.

DIR receives (cifar_flax/exported.py loads it with what ``requirements.txt`` lists):
- ``model.jax``: jax.export serialized StableHLO of ``(variables, images) -> (logits,
  probabilities)`` for CPU, CUDA and TPU, with a symbolic batch dimension; ``images`` are uint8
  (N, H, W, 3) at the size the run's pipeline fed the model, and the resize to
  ``augment.resolution`` and the normalisation are inside (``exported.load`` resizes images of
  another size to H x W first, as predict does). It uses XLA's convolution everywhere
  (``model.conv_impl="xla"``), not the CPU-only small-map path.
- ``params.npz`` (weights, '/'-joined paths), ``model.json`` (class names, input shape,
  provenance, ``"format": "cifar_flax.export/1"``), ``exported.py`` (the loader, so the folder
  needs no cifar_flax) and ``requirements.txt`` (the loader's packages: jax, numpy and
  flatbuffers, which jax's deserializer imports but jax does not install).
- ``saved_model/`` when TensorFlow is importable: a TF SavedModel (jax2tf, native serialization)
  with a ``serving_default`` signature ``images`` uint8 -> ``logits``, ``probabilities``.
"""

import datetime
import importlib.metadata
import importlib.util
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from etils import epath

import cifar_flax
from cifar_flax import UserError, cli, exported
from cifar_flax.data.preprocessing import eval_preprocess
from cifar_flax.inference.trained_run import TrainedRun, load_run
from cifar_flax.run.checkpoints import flat_shapes
from cifar_flax.run.workdir import check_output_folder, output_folder, read_json

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training run's --workdir.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "A new (or empty) folder for the export (inside a run's "
                    "workdir: under RUN/exports/).", flag_values=FLAGS)
flags.DEFINE_boolean("force", False, "Replace an earlier export in --output.", flag_values=FLAGS)
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "The run's checkpoint.",
                  flag_values=FLAGS)
flags.DEFINE_boolean("saved_model", True, "Also write a TF SavedModel (--nosaved_model: skip).",
                     flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "output"], flag_values=FLAGS)

PLATFORMS = ("cpu", "cuda", "tpu")


def serving_function(run: TrainedRun) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(variables, uint8 images) -> (logits, probabilities)``: eval preprocessing + model."""
    model = run.model.clone(bn_axis_name=None)  # Inference BatchNorm: no cross-device axis.

    def serve(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = eval_preprocess(images, run.config.augment, run.preprocessing)
        logits = model.apply(variables, x, train=False).astype(jnp.float32)
        return logits, jax.nn.softmax(logits, axis=-1)

    return serve


def host_variables(run: TrainedRun) -> dict[str, np.ndarray]:
    """The run's variables as numpy, flattened to '/'-joined paths (params.npz's keys)."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(run.variables))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def export_stablehlo(run: TrainedRun) -> jax.export.Exported:
    """jax.export of serving_function for PLATFORMS, batch dimension symbolic."""
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *run.image_shape), jnp.uint8)
    variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.variables)
    return jax.export.export(jax.jit(serving_function(run)), platforms=PLATFORMS)(variables, images)


def model_info(run: TrainedRun, exp: jax.export.Exported) -> dict[str, Any]:
    """model.json: what a user of the folder needs to know, and where it came from."""
    trained = epath.Path(run.workdir) / "report" / "results.json"
    trained = json.loads(trained.read_text()) if trained.exists() else {}
    return {
        "format": FORMAT,
        "class_names": run.class_names,
        "input": {"shape": list(run.image_shape), "dtype": "uint8", "layout": "NHWC",
                  "note": "any batch size; the resize to model_resolution and the normalisation "
                          "are inside the model; exported.load resizes other sizes to shape"},
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


FORMAT = "cifar_flax.export/1"  # model.json's mark of an export (--force replaces only these).
REQUIRED_FILES = (exported.MODEL_FILE, exported.PARAMS_FILE, exported.INFO_FILE, "exported.py")
EXPORT_FILES = (*REQUIRED_FILES, exported.REQUIREMENTS_FILE,
                "saved_model")  # All that an export folder holds (older ones: no requirements).


def _is_export(folder: epath.Path) -> bool:
    """Whether ``folder`` holds an earlier export: every file an export always writes, and a
    model.json whose format is this export's (a folder that merely has a model.json is not)."""
    info = read_json(folder / exported.INFO_FILE)
    return (isinstance(info, dict) and info.get("format") == FORMAT
            and all((folder / name).is_file() for name in REQUIRED_FILES))


def requirements() -> str:
    """requirements.txt: what exported.py needs to load the folder, from the versions that
    wrote it. jax (its jaxlib follows) reads exports of older jax versions, within jax.export's
    compatibility window (about 6 months); numpy only reads params.npz; flatbuffers is imported
    by jax's deserializer, which jax does not install."""
    used = {name: importlib.metadata.version(name) for name in ("jax", "numpy", "flatbuffers")}
    return (
        "# The packages exported.py needs to load this folder: pip install -r requirements.txt\n"
        f"# Written with jax {used['jax']}, numpy {used['numpy']}, flatbuffers "
        f"{used['flatbuffers']}. A jax much newer than this\n"
        f"# (beyond jax.export's ~6-month compatibility window) may refuse it: then install "
        f"jax=={used['jax']}.\n"
        f"jax>={used['jax']}\nnumpy>=1.26,<3\nflatbuffers>={used['flatbuffers']}\n")


def export(workdir: str, output: str, force: bool = False, checkpoint: str = "best",
           savedmodel: bool = True) -> dict[str, Any]:
    """Write the export folder; returns model.json's content (+ "saved_model": bool)."""
    check_output_folder(output, force, "export", _is_export, EXPORT_FILES, "exports")
    run = load_run(workdir, checkpoint, conv_impl="xla")
    exp = export_stablehlo(run)
    with output_folder(output) as out:
        return _write(run, exp, out, savedmodel)


def _write(run: TrainedRun, exp: jax.export.Exported, out: epath.Path,
           savedmodel: bool) -> dict[str, Any]:
    """The export folder's files into ``out``; model.json's content (+ "saved_model": bool)."""
    (out / exported.MODEL_FILE).write_bytes(bytes(exp.serialize()))
    with (out / exported.PARAMS_FILE).open("wb") as f:
        np.savez(f, **host_variables(run))
    info = model_info(run, exp)
    (out / exported.INFO_FILE).write_text(json.dumps(info, indent=2))
    (out / "exported.py").write_text(epath.Path(exported.__file__).read_text())
    (out / exported.REQUIREMENTS_FILE).write_text(requirements())
    info["saved_model"] = savedmodel and write_saved_model(run, serving_function(run),
                                                           out / "saved_model")
    return info


def write_saved_model(run: TrainedRun, serve: Callable[[Any, Any], Any],
                      directory: epath.Path) -> bool:
    """The TF SavedModel (jax2tf, native serialization: the same StableHLO as model.jax for CPU,
    CUDA and TPU; the weights as TF variables), for TF Serving / TFLite users: signature
    ``serving_default``, ``images`` uint8 (None, H, W, 3) -> ``logits``, ``probabilities``.
    False (and a log line) without TensorFlow (the Colab TPU runtime has none)."""
    if importlib.util.find_spec("tensorflow") is None:
        logging.warning("TensorFlow is not installed: no SavedModel written.")
        return False
    import tensorflow as tf  # Optional: TensorFlow is not on every machine that exports.
    from jax.experimental import jax2tf  # Needs TensorFlow too.

    h, w, c = run.image_shape
    converted = jax2tf.convert(serve, polymorphic_shapes=[None, f"(b, {h}, {w}, {c})"],
                               native_serialization_platforms=PLATFORMS, with_gradient=False)
    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(tf.Variable, jax.device_get(run.variables))

    @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name="images")],
                 autograph=False)
    def serving(images):
        logits, probabilities = converted(module.variables_tree, images)
        return {"logits": logits, "probabilities": probabilities}

    module.serving = serving
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serving})
    return True


def _main(argv: list[str]) -> str:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    info = export(FLAGS.workdir, FLAGS.output, FLAGS.force, FLAGS.checkpoint, FLAGS.saved_model)
    extra = " + saved_model/" if info["saved_model"] else " (no SavedModel)"
    return (f"exported {len(info['class_names'])}-class model, input uint8 (N, "
            f"{', '.join(map(str, info['input']['shape']))}), for {'/'.join(info['platforms'])} "
            f"to {FLAGS.output}{extra}")


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
