"""Using a trained run: load it with its checkpoint and run the evaluation's model step on images
(trained_run.py), and read images the way its pipeline did (images.py). The commands are
``cifar_flax.predict``, ``evaluate`` and ``export`` at the top level. Imports run/, data/,
models and weights/; nothing in run/ imports this."""
