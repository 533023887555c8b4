"""Data: sources (tfds, ImageFolder, synthetic), the tf.data host pipeline, on-device augmentation
and the normalisation each weight source expects."""
