"""The seed notebook's progression, one row per config (experiments/seed_ablation.py runs them all).

Every row adds one change to the row before it; `recipe` is configs/finetune.py itself and
`scratch` trains the same network from random init for the step budget of `aug`. The frozen rows
(`linear`, `dense`) spend that whole epoch budget on the head (cheap: cached features); from `top`
on, the head gets the recipe's 3-epoch phase and the rest goes to the unfrozen phases:

    python -m cifar_flax.main --config configs/ablation.py:dense --workdir runs/ablation/dense
    python -m cifar_flax.main --config configs/ablation.py:top,smoke ...  # synthetic data, tiny net

Rows: linear, dense, top, all, aug, recipe, scratch (ROWS below says what each one changes).
Weights are configs/finetune.py's (torchvision) unless overridden on the command line, as the
ablation script does for keras or an earlier run (``--config.init_from``).
"""

import os

import ml_collections

from cifar_flax.cli import load_config_file
from cifar_flax.config import phase

_HERE = os.path.dirname(os.path.abspath(__file__))

# Row -> what it changes relative to the row before it (the table's second column).
ROWS = {
    "linear": "frozen backbone, linear head, no augmentation (feature extraction, whole budget)",
    "dense": "+ the seed's Dense(256)+Dropout(0.5) head (the seed's frozen baseline)",
    "top": "the recipe's head phase, then unfreeze stage3+stage4 at a lower learning rate",
    "all": "+ phase 3: unfreeze every layer at a still lower learning rate",
    "aug": "+ augmentation (padded random crop, flip)",
    "recipe": "+ early stopping on validation accuracy (= configs/finetune.py)",
    "scratch": "random init, every layer, the step budget of `aug` (what the weights buy)",
}


def get_config(arg: str = "recipe") -> ml_collections.ConfigDict:
    row, *options = arg.split(",")
    if row not in ROWS or set(options) - {"smoke"}:
        raise ValueError(f"configs/ablation.py:{arg}: expected ROW[,smoke] with ROW one of "
                         f"{', '.join(ROWS)}.")
    c = load_config_file(os.path.join(_HERE, "finetune.py"))
    if "smoke" in options:
        _smoke(c)
    if row != "recipe":  # Every other row runs its full budget and tests its last weights.
        c.early_stopping.enabled, c.early_stopping.restore_best = False, False
    budget = sum(p.epochs for p in c.phases)
    if row in ("linear", "dense", "top", "all"):
        c.augment.crop_padding, c.augment.flip = 0, False
        c.phases = c.phases[:{"linear": 1, "dense": 1, "top": 2, "all": 3}[row]]
    if row in ("linear", "dense"):
        # Feature extraction trains only the head, on cached features (seconds per epoch): give
        # it the whole budget, not the recipe's 3-epoch warm-up of the head, which leaves a
        # linear probe well short of where it converges (README, class-split transfer).
        c.phases[0].epochs = budget
    if row == "linear":
        c.model.head_hidden, c.model.head_dropout = (), 0.0
    if row == "scratch":
        c.pretrained.source, c.pretrained.variant = "", ""
        # configs/scratch.py's optimiser (its comment says why the head's lr is lower).
        c.phases = [phase("all", epochs=budget, lr=0.1, group_lr={"head": 0.005},
                          warmup_epochs=1, weight_decay=5e-4, schedule="cosine")]
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    """configs/smoke.py's data and network: the whole ablation in minutes, no downloads."""
    smoke = load_config_file(os.path.join(_HERE, "smoke.py"))
    for field in ("dataset", "synthetic", "val_fraction", "batch_size", "eval_batch_size",
                  "checkpoint", "log_every_steps"):
        c[field] = smoke[field]
    c.augment.resolution = smoke.augment.resolution
    c.model = smoke.model
    c.pretrained.source = ""
    c.tensorboard = False
    for p in c.phases:
        p.epochs = 1.0
        p.warmup_epochs = min(p.warmup_epochs, 0.5)
