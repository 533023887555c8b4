"""Using a trained run: load it (run.py), read images the way its pipeline did (images.py),
predict, evaluate and export (the CLIs ``cifar_flax.predict|evaluate|export`` at the top level).
May import train, data, models, weights and analysis.report; nothing in train imports this."""
