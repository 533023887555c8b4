"""The ablation rows: the original notebook's progression and the published fine-tuning recipes.

    python -m cifar_flax.main --config configs/ablation.py:dense --workdir runs/ablation/dense
    python -m cifar_flax.main --config configs/ablation.py:full,smoke ...  # synthetic data, tiny net

The progression of the original notebook (the Keras notebook this project started from;
experiments/notebook_ablation.py runs it), each row adding one change: `linear`, `dense` (the
notebook's frozen baseline), `top`, `all`, `aug`, `staged` (the notebook's staged unfreezing with
early stopping). The published alternatives: `full` (every layer from the first step; Kornblith et
al. 2019, BiT's HyperRule) and `lpft` (a linear probe, then every layer; Kumar et al. 2022).
`scratch` trains the same network from random init (what the weights buy), and `recipe` is
configs/finetune.py itself. experiments/data_efficiency.py compares linear, staged, full, lpft and
scratch at several data sizes.

The budget: every row trains for the same number of steps, the staged phases' 3 + 6 + 8 = 17
epochs (BUDGET_EPOCHS), split over its phases (`lpft`: a quarter for the probe). The frozen rows
spend it all on the head (cheap: cached features). experiments/data_efficiency.py sets the budget
in steps instead (scaled with the data size) and splits it over the phases in these proportions.

Weights are configs/finetune.py's (torchvision) unless overridden on the command line, as the
scripts do for keras or an earlier run (``--config.init_from``).
"""

import os

import ml_collections

from cifar_flax.config import load_config_file, phase

_HERE = os.path.dirname(os.path.abspath(__file__))
BUDGET_EPOCHS = 17.0  # Every row's length in epochs (the staged phases': 3 + 6 + 8).
SMOKE_EPOCHS = 3.0  # The budget of a `,smoke` row (phases scaled in proportion).

# Row -> what it changes relative to the row before it (the tables' second column).
ROWS = {
    "linear": "frozen backbone, linear head, no augmentation (feature extraction, whole budget)",
    "dense": "+ the original notebook's Dense(256)+Dropout(0.5) head (its frozen baseline)",
    "top": "the head phase, then unfreeze stage3+stage4 at a lower learning rate",
    "all": "+ phase 3: unfreeze every layer at a still lower learning rate",
    "aug": "+ augmentation (padded random crop, flip)",
    "staged": "+ early stopping on validation accuracy (the original notebook's staged recipe)",
    "full": "every layer from the first step, linear head, one learning rate, short warmup",
    "lpft": "linear probe (1/4 of the budget, BatchNorm statistics adapting), then every layer",
    "recipe": "configs/finetune.py (the default recipe)",
    "scratch": "random init, every layer, the same step budget (what the weights buy)",
}


PROGRESSION = ("linear", "dense", "top", "all", "aug", "staged", "scratch")  # The notebook's.


def staged_phases() -> list:
    """The original notebook's staged unfreezing: head -> stage3+stage4 -> every layer, 3 + 6 + 8
    epochs."""
    return [
        phase("head", epochs=3, trainable=("head",), lr=0.05, warmup_epochs=0.25,
              schedule="cosine"),
        phase("upper", epochs=6, trainable=("stage3", "stage4", "head"), lr=0.01,
              group_lr={"head": 0.02}, warmup_epochs=0.5, weight_decay=5e-5),
        phase("all", epochs=8, lr=0.002, warmup_epochs=0.5, weight_decay=5e-5),
    ]


def full_phases() -> list:
    """Every layer from the first step (SGD + Nesterov momentum, cosine), a warmup of 5% of the
    budget. The zero-initialised linear head keeps the backbone's learning rate: chosen on the
    validation split at 100 images per class (experiments/README.md, "pilot"): lr 0.01 ended at
    74.4% val; a head at 3x spiked (val loss 73) and ended at 75.2%, at 10x it diverged (val
    loss 15,794); lr 0.003 (head 0.03) ended at 71.6%."""
    return [phase("all", epochs=BUDGET_EPOCHS, lr=0.01, warmup_epochs=0.05 * BUDGET_EPOCHS,
                  weight_decay=5e-5)]


def lpft_phases() -> list:
    """LP-FT: a linear probe (the head alone) for a quarter of the budget, then every layer at a
    low learning rate (the head starts trained: no higher rate for it)."""
    probe, ft = BUDGET_EPOCHS / 4, BUDGET_EPOCHS * 3 / 4
    return [phase("probe", epochs=probe, trainable=("head",), lr=0.05, warmup_epochs=0.05 * probe),
            phase("finetune", epochs=ft, lr=0.003, warmup_epochs=0.05 * ft, weight_decay=5e-5)]


def get_config(arg: str = "recipe") -> ml_collections.ConfigDict:
    row, *options = arg.split(",")
    if row not in ROWS or set(options) - {"smoke"}:
        raise ValueError(f"configs/ablation.py:{arg}: expected ROW[,smoke] with ROW one of "
                         f"{', '.join(ROWS)}.")
    c = load_config_file(os.path.join(_HERE, "finetune.py"))
    if row != "recipe":
        _row(c, row)
    if "smoke" in options:
        _smoke(c)
    return c


def _row(c: ml_collections.ConfigDict, row: str) -> None:
    """Turn configs/finetune.py's config ``c`` into ``row``."""
    c.early_stopping.enabled = c.early_stopping.restore_best = row == "staged"
    if row == "staged":  # The notebook's recipe: each phase stops when validation stops improving.
        c.early_stopping.patience, c.early_stopping.min_delta = 2, 0.001
    c.phases = staged_phases()
    c.model.head_hidden, c.model.head_dropout = (256,), 0.5
    if row in ("linear", "dense", "top", "all"):
        c.augment.crop_padding, c.augment.flip = 0, False
        c.phases = c.phases[:{"linear": 1, "dense": 1, "top": 2, "all": 3}[row]]
    if row in ("linear", "dense"):
        # Feature extraction trains only the head, on cached features (seconds per epoch): give
        # it the whole budget, not the 3-epoch warm-up of the head, which leaves a linear probe
        # well short of where it converges (experiments/README.md, class-split transfer).
        c.phases[0].epochs = BUDGET_EPOCHS
    if row in ("linear", "full", "lpft", "scratch"):
        c.model.head_hidden, c.model.head_dropout = (), 0.0
    if row == "full":
        c.phases = full_phases()
    if row == "lpft":
        c.phases = lpft_phases()
        # BatchNorm on batch statistics in the probe too (no feature cache): a probe on the
        # inference-mode features of the pretrained statistics lost its accuracy when
        # fine-tuning switched BatchNorm to batch statistics (val 66% -> 16-40% in 15 steps).
        c.frozen_bn_inference = False
    if row == "scratch":
        c.pretrained.source, c.pretrained.variant = "", ""
        # configs/scratch.py's optimiser (its comment says why the head's lr is lower).
        c.phases = [phase("all", epochs=BUDGET_EPOCHS, lr=0.1, group_lr={"head": 0.005},
                          warmup_epochs=1, weight_decay=5e-4, schedule="cosine")]


def _smoke(c: ml_collections.ConfigDict) -> None:
    """configs/smoke.py's data and network: the whole ablation in minutes, no downloads."""
    smoke = load_config_file(os.path.join(_HERE, "smoke.py"))
    for field in ("dataset", "synthetic", "val_fraction", "batch_size", "lr_batch_size",
                  "eval_batch_size", "checkpoint", "log_every_steps"):
        c[field] = smoke[field]
    c.augment.resolution = smoke.augment.resolution
    c.model.stage_sizes, c.model.base_width = smoke.model.stage_sizes, smoke.model.base_width
    c.model.head_hidden = tuple(min(w, 32) for w in c.model.head_hidden)
    c.pretrained.source = ""
    c.tensorboard = False
    for p in c.phases:
        p.epochs *= SMOKE_EPOCHS / BUDGET_EPOCHS
        p.warmup_epochs *= SMOKE_EPOCHS / BUDGET_EPOCHS
