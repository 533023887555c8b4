"""The `keras` benchmark row: the same ResNet50 v1.5 built with the Keras functional API (NHWC),
trained with ``train_on_batch``, Keras 3 on TensorFlow (oneDNN kernels on CPU).

Keras and TensorFlow are imported inside the functions: they are this row's optional framework,
and the worker imports this module in every row's process (the torch and flax_bare rows' never
load TensorFlow).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

from cifar_flax.bench.workload import LR, MOMENTUM, NUM_CLASSES, Workload, time_steps


def build_keras_resnet50(size: int, num_classes: int, stage_sizes: Sequence[int]) -> Any:
    """ResNet50 v1.5 (torchvision layout) with the Keras functional API, NHWC.

    ``keras.applications.ResNet50`` is the v1 layout (stride in the first 1x1 conv, conv biases),
    which does ~5-10% fewer FLOPs, so it would not be a like-for-like row.
    """
    import keras  # The keras row's optional framework (pip install -e ".[test]").
    from keras import layers

    def bn(x):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

    def conv(x, filters, kernel, stride=1):
        if kernel > 1:
            x = layers.ZeroPadding2D((kernel - 1) // 2)(x)
        return layers.Conv2D(
            filters, kernel, strides=stride, use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "normal"),
        )(x)

    inputs = keras.Input((size, size, 3))
    x = layers.ReLU()(bn(conv(inputs, 64, 7, 2)))
    x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1)(x))
    for i, n in enumerate(stage_sizes):
        width = 64 * 2**i
        for b in range(n):
            stride = 2 if (b == 0 and i > 0) else 1
            shortcut = bn(conv(x, 4 * width, 1, stride)) if b == 0 else x
            y = layers.ReLU()(bn(conv(x, width, 1)))
            y = layers.ReLU()(bn(conv(y, width, 3, stride)))
            y = bn(conv(y, 4 * width, 1))
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, dtype="float32")(x)
    return keras.Model(inputs, outputs, name="resnet50_v15")


def run(w: Workload) -> dict:
    """Keras 3 on TensorFlow, ``model.train_on_batch`` with Keras' default ``jit_compile``."""
    os.environ["KERAS_BACKEND"] = "tensorflow"  # This row measures Keras on TensorFlow.
    import keras  # The keras row's optional framework, as above.
    import tensorflow as tf  # Keras' backend: part of the keras row's optional framework.

    _give_tensorflow_the_accelerators(tf)
    if w.dtype == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = build_keras_resnet50(w.size, NUM_CLASSES, w.stage_sizes)
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = tf.random.normal((w.batch, w.size, w.size, 3))
    y = tf.random.uniform((w.batch,), 0, NUM_CLASSES, dtype=tf.int32)
    timing = time_steps(lambda: model.train_on_batch(x, y), lambda out: None, w.warmup, w.steps)
    out = {"layout": "v1.5 (NHWC), functional API",
           "mode": f"train_on_batch, jit_compile={model.jit_compile}"}
    out["compile_s"] = timing["first_step_s"]  # tf.function tracing + graph build on first call
    out["final_loss"] = float(model.train_on_batch(x, y))
    if tf.config.list_physical_devices("GPU"):
        out["device_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return {**out, **timing}


def _give_tensorflow_the_accelerators(tf: Any) -> None:
    """Make every device visible to TensorFlow again: the commands keep it on the CPU (there it
    only feeds the input pipeline, run/startup.hide_accelerators), but here it is the framework
    measured. Possible until TensorFlow has run its first op, which nothing in this process did
    yet."""
    with contextlib.suppress(RuntimeError, ValueError):  # Already initialised: it keeps those.
        tf.config.set_visible_devices(tf.config.list_physical_devices())
