"""TensorFlow runs only the host input pipeline (tf.data), so it must never take an accelerator:
on a GPU it would reserve memory JAX needs, and two runtimes opening one TPU fail (a known Colab
failure). Every command calls :func:`hide_accelerators` first, through cli.prepare_runtime."""

from __future__ import annotations

ACCELERATOR_TYPES = ("GPU", "TPU")


def hide_accelerators() -> list[str]:
    """Make TensorFlow see only the CPU; returns the device types TF still sees (["CPU"]).

    A no-op when TensorFlow is not installed (exported models and the Colab TPU runtime may not
    have it); when TF was already initialised its visible devices cannot change any more, and the
    returned list says what it sees."""
    try:
        import tensorflow as tf
    except ImportError:
        return []
    for kind in ACCELERATOR_TYPES:
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # Already initialised, or TF knows no such type.
            pass
    return sorted({d.device_type for d in tf.config.get_visible_devices()})
