"""Training: parameter groups and phases, the data-parallel steps, the phase loop, evaluation,
checkpoints, early stopping and metrics. Uses data, models and weights; nothing here imports the
analysis or benchmark packages."""
