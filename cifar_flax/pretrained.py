"""Convert published ResNet50 weights, or compute their backbone features::

    python -m cifar_flax.pretrained convert --source=keras --input=FILE --output=DIR
    python -m cifar_flax.pretrained features --weights=DIR --images=IMAGES.npy --output=FEATS.npy

``convert`` writes a folder usable as ``--config.pretrained.file=DIR`` (a published Keras .h5 or
torchvision .pth/.safetensors/.npz ResNet50 file, converted exactly); ``features`` writes the
pooled (N, 2048) float32 backbone features of uint8 NHWC images.
"""

import jax
import numpy as np
from absl import flags

from cifar_flax import UserError, cli, user_errors
from cifar_flax.weights.convert import convert_file
from cifar_flax.weights.registry import SOURCES
from cifar_flax.weights.store import extract_features, load_weights, save_weights

COMMANDS = ("convert", "features")
FLAGS = flags.FlagValues()
flags.DEFINE_enum("source", None, list(SOURCES), "convert: the file's source.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "convert: a .h5 / .pth / .safetensors / .npz file.",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "convert: the folder to write; features: the .npy to write.",
                    flag_values=FLAGS)
flags.DEFINE_string("variant", "local", "convert: recorded in spec.json.", flag_values=FLAGS)
flags.DEFINE_string("weights", None, "features: a folder written by convert.", flag_values=FLAGS)
flags.DEFINE_string("images", None, "features: uint8 (N, H, W, 3) .npy, H, W >= 32.",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "features: images per model call.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "features: compute dtype.",
                  flag_values=FLAGS)

NEEDS = {"convert": ("source", "input", "output"), "features": ("weights", "images", "output")}


def _main(argv: list[str]) -> str:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise UserError(f"give one command, {' or '.join(COMMANDS)} (got {argv[1:]}); --help "
                        "lists the flags.")
    command = argv[1]
    missing = [f"--{name}" for name in NEEDS[command] if FLAGS[name].value is None]
    if missing:
        raise UserError(f"{command} needs {', '.join(missing)}.")
    return (_convert if command == "convert" else _features)()


def _convert() -> str:
    weights = convert_file(FLAGS.source, FLAGS.input, FLAGS.variant)
    save_weights(weights, FLAGS.output)
    n = sum(v.size for v in jax.tree.leaves((weights.params, weights.batch_stats)))
    return (f"Converted {FLAGS.input} -> {FLAGS.output}: {n:,} values, layout "
            f"{weights.spec.layout}, preprocessing {weights.spec.preprocessing.name}.")


def _features() -> str:
    weights = load_weights(FLAGS.weights)
    with user_errors(lambda e: f"could not read --images {FLAGS.images!r}: {e}",
                     OSError, ValueError):
        images = np.load(FLAGS.images, mmap_mode="r", allow_pickle=False)
    feats = extract_features(weights, images, FLAGS.batch_size, FLAGS.dtype, progress=True)
    np.save(FLAGS.output, feats)
    return f"Wrote {feats.shape} features to {FLAGS.output}."


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` (without the program name) for a call in-process. Its status."""
    return cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    cli.exit(main())
