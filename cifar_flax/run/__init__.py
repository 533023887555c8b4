"""What the training loop (cifar_flax/train.py) is built from: parameter groups and phases
(optim), evaluation and early stopping, the cached-feature fast path, checkpoints, the workdir and
its guards, devices, the initial model, metrics and signals. Uses data, models and weights;
nothing here imports the commands, the analysis or the benchmark packages."""
