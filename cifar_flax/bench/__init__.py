"""Throughput benchmarks against Keras and PyTorch (``python -m cifar_flax.bench``), the fast-path
measurements and the PyTorch reference ResNet50. Nothing in the library imports this package."""
