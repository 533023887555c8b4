"""cifar_flax: transfer learning with a pretrained Flax ResNet50 on small images."""

__version__ = "0.1.0"
