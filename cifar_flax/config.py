"""The config schema: every field, its default and what it means.

The files in ``configs/`` start from :func:`default_config` and change what their recipe needs, so
a field is documented once, here. ``validate`` (in this module) checks a config before any work.
"""

from __future__ import annotations

import importlib.util
import os
import re
import types
from typing import Iterable, Mapping

import jax
import ml_collections
from absl import logging
from etils import epath

from cifar_flax import UserError
from cifar_flax.models import CONV_IMPLS, LAYOUTS
from cifar_flax.weights.registry import RELEASES, SOURCE_LAYOUT


def default_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (a CIFAR-10 fine-tune from torchvision V2 weights)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds init, shuffling, validation split, augmentation and dropout.

    # ---- data (input_pipeline.py) ----
    c.dataset = "cifar10"  # tfds name, "imagefolder:<dir>" (<dir>/<split>/<class>/*.jpg|png) or "synthetic".
    c.data_dir = ""  # tfds data_dir ("" = tfds default, ~/tensorflow_datasets).
    c.train_split = "train"  # Split (tfds name or ImageFolder sub-folder) to train on.
    c.test_split = "test"  # Split for the final test evaluation (every example exactly once).
    c.val_split = ""  # A named validation split; "" = hold out val_fraction of train_split.
    c.val_fraction = 0.1  # Fraction of train held out (seeded) for early stopping; 0 = no validation.
    c.image_size = 0  # Host-side resize to this square size when image sizes vary; 0 = keep (must be uniform).
    c.skip_bad_files = False  # ImageFolder: skip undecodable files (and report how many) instead of failing.
    c.shuffle_buffer = 50_000  # Per-host shuffle buffer; >= the shard size gives a full shuffle.
    c.cache = True  # tf.data cache of decoded uint8 images after the first epoch.
    c.batch_size = 128  # Global batch (over all devices and hosts); must divide by the device count.
    c.eval_batch_size = 256  # Global eval batch; the last batch is padded and masked.
    c.synthetic = ml_collections.ConfigDict()  # Only for dataset="synthetic" (smoke tests, no files).
    c.synthetic.num_classes = 4  # Classes (colour + stripe pattern + noise, from config.seed).
    c.synthetic.num_train = 256  # Examples of the "train" split.
    c.synthetic.num_test = 64  # Examples of the "test" split.
    c.synthetic.size = 32  # Image height = width.

    # ---- augmentation (data/preprocessing.py, on device) ----
    c.augment = ml_collections.ConfigDict()
    c.augment.resolution = 160  # Model input resolution; images are resized on device (32 -> 160).
    c.augment.crop_padding = 4  # Random crop with this much padding (in source pixels); 0 = off.
    c.augment.flip = True  # Random horizontal flip.
    c.augment.random_resized_crop = False  # Inception-style crop (replaces padded crop when on).
    c.augment.rrc_scale = (0.35, 1.0)  # Area range of random_resized_crop.
    c.augment.rrc_ratio = (3 / 4, 4 / 3)  # Aspect-ratio range (log-uniform) of random_resized_crop.
    c.augment.mixup_alpha = 0.0  # > 0 enables mixup with Beta(alpha, alpha).
    c.augment.cutmix_alpha = 0.0  # > 0 enables cutmix with Beta(alpha, alpha).

    # ---- model (models.py) and weights (pretrained.py) ----
    c.model = ml_collections.ConfigDict()
    c.model.layout = "v1.5"  # "v1" (Keras) or "v1.5" (torchvision); must match the weights.
    c.model.head_hidden = (256,)  # Hidden Dense widths of the head; () = linear head.
    # Dropout after each hidden Dense+ReLU (the original notebook's Dense(256, relu) ->
    # Dropout(0.5) -> Dense), or on the pooled features for a linear head; training only.
    c.model.head_dropout = 0.5
    c.model.zero_init_head = True  # Zero-init the final Dense layer.
    c.model.stage_sizes = (3, 4, 6, 3)  # Blocks per stage; ResNet50's. Smaller only for tests/smoke.
    c.model.base_width = 64  # Stem width; stage widths are 1x..8x it. 64 = ResNet50.
    # How the convs XLA:CPU runs slowly (1x1; 3x3 onto <= 2x2 output maps) are computed
    # (models.MatmulConv): as matmuls on CPU only ("auto"), always ("im2col"), or never ("xla":
    # XLA's convolution everywhere). Same parameters and results; export always uses "xla".
    c.model.conv_impl = "auto"
    c.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (params, loss, optimizer stay float32).

    c.pretrained = ml_collections.ConfigDict()
    c.pretrained.source = "torchvision"  # "torchvision", "keras" or "" (random init).
    c.pretrained.variant = ""  # "" = the source's default: IMAGENET1K_V2 (torchvision), notop (keras); or IMAGENET1K_V1.
    # A local (or gs://) weight file instead of downloading (.pth/.pt/.safetensors/.npz, Keras .h5),
    # or a `python -m cifar_flax.pretrained convert` output dir. Conversion is strict: a missing,
    # unexpected or misshapen tensor (a ResNet18 file) is an error listing the names.
    c.pretrained.file = ""
    c.pretrained.cache_dir = ""  # Converted weights; "" = $CIFAR_FLAX_CACHE or ~/.cache/cifar_flax.
    # Start from an earlier run instead of the pretrained weights: its workdir (its best checkpoint,
    # else its last) or a checkpoint folder. The backbone always (same layout, stage_sizes and
    # base_width, else an error listing the differences); the head only when its shapes (class
    # count, head_hidden) and class names match, else it is freshly initialised. The earlier run's
    # pretrained.source must be this config's (same input normalisation). See
    # run/model_setup.py.
    c.init_from = ""

    # ---- training: parameter groups, phases, early stopping (train.py) ----
    # Groups: name -> regex searched in '/'-joined param paths ("stage4/block1/conv1/kernel");
    # every parameter must match exactly one group (else one error lists up to 10 offenders).
    c.groups = ml_collections.ConfigDict(DEFAULT_GROUPS)
    c.phases = [phase("finetune")]  # Run in order; see phase() below for every phase field.
    # The batch size the phases' lr and group_lr are stated for: a run at another batch_size
    # trains every group at lr x batch_size / lr_batch_size (linear scaling, the convention of
    # flax's imagenet example and big_vision), so halving the batch to fit a device halves the
    # rates instead of doubling the per-image step. The phase start log line and results.json's
    # "learning_rates" show the rates a run uses. A config whose batch is not 128 sets this to
    # the batch its rates were chosen at (configs/smoke.py: 32).
    c.lr_batch_size = 128
    c.frozen_bn_inference = True  # BatchNorm of modules with no trainable group: running stats, not updated.
    c.sync_batchnorm = True  # Average BatchNorm batch statistics over all devices (device-count independent).
    c.eval_every_steps = 0  # Validate every N steps (0 = every epoch end) and at every phase's end.
    c.early_stopping = ml_collections.ConfigDict()
    c.early_stopping.enabled = True  # Stop a phase when the metric stops improving (moves on to the next phase).
    c.early_stopping.metric = "val_accuracy"  # "val_accuracy" (higher is better) or "val_loss" (lower).
    c.early_stopping.patience = 3  # Evaluations (epochs) without improvement before the phase ends.
    c.early_stopping.min_delta = 0.0  # An improvement must exceed this to reset the patience.
    # Test the run's best checkpoint (by the metric, over all phases), not the last weights; and
    # restore each phase's best weights (params and BatchNorm statistics, checkpoints/phase_best)
    # before the next phase, like Keras' restore_best_weights (a "restore_best" metrics record).
    # checkpoints/best is written only then: without it evaluate, predict and export read the
    # last weights, the ones the run tested.
    c.early_stopping.restore_best = True
    # Cached backbone features (feature_cache.py): a phase whose whole backbone is frozen (and its
    # BatchNorm in inference mode) trains the head on pooled features computed once per phase.
    # Never with mixup/cutmix or on several hosts (those phases use the full step); each phase's
    # "phase" record in metrics.jsonl says which ("feature_cache": true/false).
    c.feature_cache = ml_collections.ConfigDict()
    c.feature_cache.enabled = True  # Use the cache where a phase qualifies; exact when augmentation is off.
    c.feature_cache.passes = 0  # Augmentation on: cache N augmented passes, epoch e uses e % N (approximate); 0 = no cache.

    # ---- checkpoints, logging, devices (train.py) ----
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # Also save every N steps (0 = only at epoch ends / phase ends / exit).
    c.checkpoint.at_epoch_end = True  # Save after every epoch's validation.
    c.checkpoint.keep = 2  # Latest checkpoints kept in <workdir>/checkpoints/latest (the best is kept apart).
    c.checkpoint.async_save = True  # Write in the background (the run waits for it before exiting).
    c.log_every_steps = 50  # Train metrics to metrics.jsonl / TensorBoard (and a log line off-TTY).
    c.tensorboard = True  # Also write TensorBoard event files (<workdir>/tensorboard).
    c.progress_bar = True  # tqdm bar with ETA when stderr is a terminal; plain log lines otherwise.
    # A rerun of a workdir resumes only a run with the same fingerprint (run/workdir.py):
    # "auto" stops with the differing fields otherwise; "replace" moves such a different (or
    # unreadable) run to <workdir>/previous/<time>/ and starts this config (a run with the same
    # fingerprint still resumes, so "replace" is safe in a job script).
    c.resume = "auto"
    c.distributed = ml_collections.ConfigDict()  # Several processes/hosts (run/devices.py).
    c.distributed.enabled = False  # Call jax.distributed.initialize() before anything else.
    c.distributed.coordinator_address = ""  # Process 0's "host:port"; "" = detect (TPU pods, SLURM, GKE).
    c.distributed.num_processes = -1  # Number of processes; -1 = detect (else set all three).
    c.distributed.process_id = -1  # This process's index in [0, num_processes); -1 = detect.
    c.distributed.timeout_seconds = 300  # How long to wait for all processes to join.
    c.distributed.heartbeat_timeout_seconds = 100  # A dead process stops the others after this, never a hang.
    return c


DEFAULT_GROUPS = {
    "stem": r"^stem/",
    "stage1": r"^stage1/",
    "stage2": r"^stage2/",
    "stage3": r"^stage3/",
    "stage4": r"^stage4/",
    "head": r"^head/",
}


def phase(name: str, **overrides) -> ml_collections.ConfigDict:
    """One training phase with its defaults; ``overrides`` set any of the fields below.

    Every phase starts with a fresh optimizer state and a new schedule; early stopping ends only
    the current phase (see early_stopping.restore_best).
    """
    p = ml_collections.ConfigDict()
    p.name = name  # Shown in logs, metrics and the curves' phase markers.
    p.epochs = 1.0  # Length in epochs (fractions allowed); used when steps == 0.
    p.steps = 0  # Length in steps; > 0 overrides epochs. Early stopping may end a phase sooner.
    # Groups trained. The others are frozen: no update, no optimizer state and no gradient, so no
    # backward pass runs through a frozen prefix of the network.
    p.trainable = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
    p.lr = 0.01  # Peak learning rate of every trainable group ...
    p.group_lr = ml_collections.ConfigDict()  # ... unless set here per group, e.g. {"head": 0.1}.
    p.schedule = "cosine"  # "cosine" (linear warmup, then cosine decay to 0) or "constant" (after warmup).
    p.warmup_epochs = 0.0  # Linear warmup from 0 to lr over this many epochs.
    p.optimizer = "sgd"  # "sgd" (momentum) or "adamw".
    p.momentum = 0.9  # SGD momentum (0 = plain SGD); for adamw it is b1.
    p.nesterov = True  # SGD: Nesterov momentum.
    p.weight_decay = 0.0  # L2 (sgd) / decoupled (adamw) decay on kernels only (not BN or biases).
    p.update(overrides)
    return p


def load_module(path: str) -> types.ModuleType:
    """The Python file at ``path`` as a module (config files are not in a package)."""
    name = "cifar_flax_config_" + path.replace("/", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``file.py:arg`` (``get_config()`` of ``file.py``): what
    ``--config file.py[:arg]`` loads."""
    file, *arg = path.split(":", 1)
    return load_module(file).get_config(*arg)


def assign_groups(paths: Iterable[str], groups: Mapping[str, str]) -> dict[str, str]:
    """Map each '/'-joined parameter path (``stage4/block1/conv1/kernel``) to the one group of
    ``groups`` (name -> regex searched in the path); UserError if a path matches none or several."""
    compiled = {name: re.compile(pattern) for name, pattern in groups.items()}
    assignment, orphans, doubles = {}, [], []
    for path in paths:
        hits = [name for name, rx in compiled.items() if rx.search(path)]
        if not hits:
            orphans.append(path)
        elif len(hits) > 1:
            doubles.append(f"{path} ({', '.join(hits)})")
        else:
            assignment[path] = hits[0]
    errors = []
    if orphans:
        errors.append(
            f"{len(orphans)} parameters match no entry of config.groups, e.g. {orphans[:10]}: "
            "add a group whose regex matches them."
        )
    if doubles:
        errors.append(
            f"{len(doubles)} parameters match several entries of config.groups, e.g. "
            f"{doubles[:10]}: make the regexes disjoint."
        )
    if errors:
        raise UserError("\n".join(errors))
    return assignment


def peak_learning_rates(config: ml_collections.ConfigDict, index: int) -> dict[str, float]:
    """Each trainable group's peak learning rate in phase ``index`` as the run trains with it:
    its ``group_lr`` entry or the phase's ``lr``, times batch_size / lr_batch_size, in
    config.groups' order. The one place that scales them: computed from the config whenever a
    phase is built (a resumed run too), never stored scaled, so never scaled twice."""
    phase_, scale = config.phases[index], config.batch_size / config.lr_batch_size
    group_lr = dict(phase_.group_lr)
    return {g: group_lr.get(g, phase_.lr) * scale
            for g in dict(config.groups) if g in tuple(phase_.trainable)}


def lr_text(config: ml_collections.ConfigDict, index: int) -> str:
    """Phase ``index``'s peak learning rates (:func:`peak_learning_rates`) and, when the batch
    scaled them, where they come from: for the log and the error lines."""
    rates = peak_learning_rates(config, index)
    shown = (f"{next(iter(rates.values())):g}" if len(set(rates.values())) == 1
             else ", ".join(f"{g} {v:g}" for g, v in rates.items()))
    if config.batch_size == config.lr_batch_size:
        return f"peak lr {shown}"
    return (f"peak lr {shown} (the config's rates are for --config.lr_batch_size="
            f"{config.lr_batch_size}, x {config.batch_size}/{config.lr_batch_size} at "
            f"batch_size {config.batch_size})")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Check a config before any work starts; raise UserError with one line per invalid field.

    ``num_devices`` (default: ``jax.device_count()``) is what the global batch must divide by.
    Checks needing the parameters (orphan or doubly matched parameters): :func:`assign_groups`.
    """
    errors = (
        _data_errors(config, num_devices)
        + _model_errors(config)
        + _group_phase_errors(config)
        + _loop_errors(config)
        + _feature_cache_errors(config.feature_cache)
        + _init_from_errors(config.init_from)
        + _slip_errors(config)
        + _distributed_errors(config.distributed)
    )
    if errors:
        raise UserError("\n".join(errors))


def validate_distributed(distributed: ml_collections.ConfigDict) -> None:
    """Check the config's ``distributed`` group alone (before jax.distributed.initialize; the
    rest of the config needs the global device count, known only after it)."""
    errors = _distributed_errors(distributed)
    if errors:
        raise UserError("\n".join(errors))


def _data_errors(c: ml_collections.ConfigDict, num_devices: int | None) -> list[str]:
    errors = []
    n = jax.device_count() if num_devices is None else num_devices
    dataset = str(c.dataset)
    if not dataset:
        errors.append("dataset is empty: set --config.dataset=cifar10, imagefolder:<dir> or synthetic.")
    elif dataset.startswith("imagefolder:") and not os.path.isdir(dataset.split(":", 1)[1]):
        errors.append(
            f"dataset={dataset!r}: folder {dataset.split(':', 1)[1]!r} does not exist "
            "(expected <dir>/<split>/<class>/*.jpg)."
        )
    for field in ("batch_size", "eval_batch_size"):
        b = c[field]
        if not isinstance(b, int) or b <= 0:
            errors.append(f"{field}={b!r} must be a positive integer.")
        elif b % n:
            errors.append(
                f"{field}={b} is not divisible by the {n} devices: use a multiple of {n}."
            )
    if c.early_stopping.enabled and not c.val_split and (
        c.val_fraction <= 0
    ):
        errors.append(
            "early_stopping.enabled needs validation data: set val_fraction > 0 or val_split "
            "(or early_stopping.enabled=False)."
        )
    if c.augment.resolution <= 0:
        errors.append(f"augment.resolution={c.augment.resolution} must be positive.")
    return errors


def _model_errors(c: ml_collections.ConfigDict) -> list[str]:
    errors = []
    if c.model.layout not in LAYOUTS:
        errors.append(f"model.layout={c.model.layout!r} must be 'v1' (Keras) or 'v1.5' (torchvision).")
    if c.model.conv_impl not in CONV_IMPLS:
        errors.append(f"model.conv_impl={c.model.conv_impl!r} must be one of {CONV_IMPLS}.")
    if c.dtype not in ("float32", "bfloat16"):
        errors.append(f"dtype={c.dtype!r} must be 'float32' or 'bfloat16'.")
    source = c.pretrained.source
    if source and source not in SOURCE_LAYOUT:
        errors.append(f"pretrained.source={source!r} must be 'torchvision', 'keras' or '' (random init).")
    elif source and c.model.layout != SOURCE_LAYOUT[source]:
        errors.append(
            f"model.layout={c.model.layout!r} does not match pretrained.source={source!r}: "
            f"set model.layout={SOURCE_LAYOUT[source]!r}."
        )
    return errors


def _group_phase_errors(c: ml_collections.ConfigDict) -> list[str]:
    errors = []
    groups = dict(c.groups)
    for name, pattern in groups.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            errors.append(f"groups.{name}={pattern!r} is not a valid regex ({e}).")
    if not c.phases:
        errors.append("phases is empty: give at least one phase (see config.phase()).")
    for i, p in enumerate(c.phases):
        errors += [f"phases[{i}] ({p.name}): {e}" for e in _phase_errors(p, groups)]
    return errors


def _phase_errors(p: ml_collections.ConfigDict, groups: dict) -> list[str]:
    errors = []
    if p.steps < 0 or p.epochs < 0 or (p.steps == 0 and p.epochs <= 0):
        errors.append(f"steps={p.steps}, epochs={p.epochs}: set steps > 0 or epochs > 0.")
    unknown = [g for g in p.trainable if g not in groups]
    if unknown:
        errors.append(f"trainable names unknown groups {unknown}; known groups: {sorted(groups)}.")
    if not p.trainable:
        errors.append("trainable is empty: name at least one group.")
    for g in p.group_lr:
        if g not in p.trainable:
            errors.append(f"group_lr.{g} is set but {g!r} is not in trainable {tuple(p.trainable)}.")
    if p.optimizer not in ("sgd", "adamw"):
        errors.append(f"optimizer={p.optimizer!r} must be 'sgd' or 'adamw'.")
    if p.schedule not in ("cosine", "constant"):
        errors.append(f"schedule={p.schedule!r} must be 'cosine' or 'constant'.")
    lrs = [p.lr] + list(dict(p.group_lr).values())
    if any(lr < 0 for lr in lrs):
        errors.append(f"lr / group_lr must be >= 0, got {lrs}.")
    if p.warmup_epochs < 0 or p.weight_decay < 0 or not 0 <= p.momentum < 1:
        errors.append(
            f"warmup_epochs={p.warmup_epochs}, weight_decay={p.weight_decay} must be >= 0 "
            f"and momentum={p.momentum} in [0, 1)."
        )
    return errors


def _loop_errors(c: ml_collections.ConfigDict) -> list[str]:
    errors = []
    stopping = c.early_stopping
    if stopping.metric not in ("val_accuracy", "val_loss"):
        errors.append(f"early_stopping.metric={stopping.metric!r} must be 'val_accuracy' or "
                      "'val_loss'.")
    if stopping.patience < 1 or stopping.min_delta < 0:
        errors.append(f"early_stopping.patience={stopping.patience} must be >= 1 and "
                      f"min_delta={stopping.min_delta} >= 0.")
    if c.checkpoint.every_steps < 0 or c.checkpoint.keep < 1:
        errors.append(
            f"checkpoint.every_steps={c.checkpoint.every_steps} must be >= 0 and "
            f"checkpoint.keep={c.checkpoint.keep} >= 1."
        )
    lr_batch = c.lr_batch_size
    if isinstance(lr_batch, bool) or not isinstance(lr_batch, int) or lr_batch <= 0:
        errors.append(f"lr_batch_size={lr_batch!r} must be a positive integer: the batch size "
                      "the phases' learning rates are stated for (see config.py).")
    if c.log_every_steps < 1 or c.eval_every_steps < 0:
        errors.append(
            f"log_every_steps={c.log_every_steps} must be >= 1 and "
            f"eval_every_steps={c.eval_every_steps} >= 0."
        )
    return errors


def _feature_cache_errors(fc: ml_collections.ConfigDict) -> list[str]:
    """One line per invalid field of the ``feature_cache`` group (empty when valid)."""
    errors = []
    if not isinstance(fc.enabled, bool):
        errors.append(f"feature_cache.enabled={fc.enabled!r} must be True or False.")
    passes = fc.passes
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        errors.append(
            f"feature_cache.passes={passes!r} must be an integer >= 0 (0 = no cache when "
            "augmentation is on)."
        )
    return errors


def _distributed_errors(d: ml_collections.ConfigDict) -> list[str]:
    """One line per invalid field of the ``distributed`` group (empty when valid)."""
    errors = []
    if not isinstance(d.enabled, bool):
        errors.append(f"distributed.enabled={d.enabled!r} must be True or False.")
    addr = d.coordinator_address
    if addr and (":" not in addr or not addr.rsplit(":", 1)[1].isdigit()):
        errors.append(f"distributed.coordinator_address={addr!r} must be 'host:port' "
                      "(process 0's address) or '' to detect it (TPU pods, SLURM).")
    n, i = d.num_processes, d.process_id
    if addr and (n < 1 or not 0 <= i < n):
        errors.append(f"distributed.num_processes={n}, process_id={i}: with a coordinator_address "
                      "set num_processes >= 1 and 0 <= process_id < num_processes on each process.")
    if not addr and (n != -1 or i != -1):
        errors.append("distributed.num_processes / process_id are set but coordinator_address is "
                      "empty: set all three, or none (-1, -1, '') to let JAX detect them.")
    for field in ("timeout_seconds", "heartbeat_timeout_seconds"):
        if d[field] < 1:
            errors.append(f"distributed.{field}={d[field]} must be >= 1.")
    return errors

RESUME_MODES = ("auto", "replace")


def _slip_errors(c: ml_collections.ConfigDict) -> list[str]:
    """Slips caught before any data or weights are read: the resume mode, a weight variant of
    another source, a class with no training images; a warmup longer than its phase warns."""
    errors = []
    if c.resume not in RESUME_MODES:
        errors.append(f"resume={c.resume!r} must be one of {RESUME_MODES} (see config.py).")
    p = c.pretrained
    if p.source in RELEASES and p.variant and not p.file and p.variant not in RELEASES[p.source]:
        errors.append(
            f"pretrained.variant={p.variant!r} is not a {p.source} variant (known: "
            f"{sorted(RELEASES[p.source])}): set --config.pretrained.variant='' (the default) "
            "or one of those."
        )
    for i, ph in enumerate(c.phases):
        if ph.steps == 0 and 0 < ph.epochs < ph.warmup_epochs:
            logging.warning(f"phases[{i}] ({ph.name}): warmup_epochs={ph.warmup_epochs} is longer "
                       f"than the phase (epochs={ph.epochs}): its learning rate never reaches "
                       f"lr={ph.lr}.")
    return errors + _empty_class_errors(c)


def _empty_class_errors(c: ml_collections.ConfigDict) -> list[str]:
    """imagefolder: a train split with fewer than two class folders (nothing to tell apart: such
    a run would report accuracy 1.0), or a class folder of it with no files (the model would be
    tested on a class it never saw). Classes left without training images by the validation
    hold-out or skipped files are caught when the data is read (input_pipeline.check_train_classes);
    a split lacking a class folder of another, by sources.imagefolder_source."""
    dataset = str(c.dataset)
    if not dataset.startswith("imagefolder:"):
        return []
    split_dir = os.path.join(dataset.split(":", 1)[1], c.train_split)
    if not os.path.isdir(split_dir):
        return []  # The data check names a missing split folder.
    classes = sorted(name for name in os.listdir(split_dir)
                     if not name.startswith(".") and os.path.isdir(os.path.join(split_dir, name)))
    if len(classes) == 1:
        return [f"split folder {split_dir} has one class folder ({classes[0]}): a classifier "
                "needs at least two classes; add a folder of images for each other class "
                f"({split_dir}/<class>/, and the same in every split)."]
    empty = [name for name in classes
             if not any(not f.startswith(".") for f in os.listdir(os.path.join(split_dir, name)))]
    if not empty:
        return []
    return [f"class folder {os.path.join(split_dir, empty[0])} has no training images"
            + (f" (nor {len(empty) - 1} more: {empty[1:4]})" if len(empty) > 1 else "")
            + ": add images, or delete that class's folder from every split."]


def _init_from_errors(path: str) -> list[str]:
    """config.init_from must name an existing run folder (gs:// paths are checked when read)."""
    if not path or str(path).startswith("gs://") or epath.Path(path).exists():
        return []
    return [f"init_from={path!r} does not exist: give the workdir (or a checkpoint folder) of "
            "an earlier run, or '' for the pretrained weights."]
