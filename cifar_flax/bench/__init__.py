"""Throughput benchmarks against Keras and PyTorch (``python -m cifar_flax.bench``, each row in
its own process: ``python -m cifar_flax.bench.frameworks``), the fast-path measurements
(``python -m cifar_flax.bench.fastpaths``) and the PyTorch reference ResNet50
(``torch_resnet``). One module per row: ``project_step`` (ours), ``bare_step``, ``keras_resnet``,
``torch_resnet``; ``workload`` is the work they share and how it is timed. Nothing in the
library imports this package."""
