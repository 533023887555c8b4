"""The TF SavedModel of an export (jax2tf, native serialization), for TF Serving / TFLite users.

The jax function is embedded as StableHLO (the same computation as ``model.jax``, for CPU, CUDA
and TPU), the weights as TF variables; the ``serving_default`` signature takes ``images`` uint8
(None, H, W, 3) and returns ``logits`` and ``probabilities``. Only written when TensorFlow is
importable (it is not on a Colab TPU runtime).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from absl import logging
from etils import epath

from cifar_flax.inference.trained_run import LoadedRun


def write(run: LoadedRun, serve: Callable[[Any, Any], Any], directory: epath.Path) -> bool:
    """Write the SavedModel into ``directory``; False (and a log line) without TensorFlow."""
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError:
        logging.warning("TensorFlow is not importable: no SavedModel written.")
        return False
    h, w, c = run.image_shape
    converted = jax2tf.convert(serve, polymorphic_shapes=[None, f"(b, {h}, {w}, {c})"],
                               native_serialization_platforms=("cpu", "cuda", "tpu"),
                               with_gradient=False)
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
