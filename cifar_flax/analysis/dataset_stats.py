"""Exploratory data analysis of the dataset a config selects.

Scans every logical split once through the same host pipeline that training uses (so it sees
exactly the images training sees: decoded, uint8, resized only if sizes vary), streaming: per
channel it keeps a 256-bin histogram of exact integer counts, from which the mean, std, min and
max follow in float64 without holding the images in memory. Writes to OUT: ``stats.json``,
``class_distribution.png``, ``samples.png``, ``pixel_histograms.png`` and ``eda.md``.
"""

from __future__ import annotations

import json
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from etils import epath
from tqdm import tqdm

from cifar_flax.data import input_pipeline, sources
from cifar_flax.data.sources import DatasetInfo

matplotlib.use("Agg")  # Files only, no display (pyplot picks its backend at the first figure).

CHANNELS = ("R", "G", "B")
WRITTEN_BY = "cifar_flax.eda"  # stats.json's mark of an EDA output (eda --force replaces it).
EDA_FILES = ("stats.json", "class_distribution.png", "samples.png", "pixel_histograms.png",
             "eda.md")  # All that an EDA output folder holds.
SCAN_BATCH = 512


def scan_split(
    config: Any, info: DatasetInfo, split: str, samples_per_class: int = 0
) -> tuple[dict, np.ndarray, list[list[np.ndarray]]]:
    """Stream one logical split: (stats, per-channel histograms (3, 256), sample images per class)."""
    hist = np.zeros((3, 256), np.int64)
    per_class = np.zeros(info.num_classes, np.int64)
    non_finite = 0
    samples: list[list[np.ndarray]] = [[] for _ in range(info.num_classes)]
    ds = input_pipeline.host_dataset(config, info, split, shard=(0, 1)).batch(SCAN_BATCH)
    with tqdm(total=info.split_sizes[split], desc=f"scanning {split}", unit="img") as bar:
        for batch in ds.as_numpy_iterator():
            images, labels = batch["image"], batch["label"]
            for c in range(3):
                hist[c] += np.bincount(images[..., c].ravel(), minlength=256)
            per_class += np.bincount(labels, minlength=info.num_classes)
            non_finite += int(np.count_nonzero(~np.isfinite(images.astype(np.float32))))
            for k in np.unique(labels):
                room = samples_per_class - len(samples[k])
                samples[k] += list(images[labels == k][:room]) if room > 0 else []
            bar.update(len(labels))
    return _summarise(hist, per_class, non_finite, info), hist, samples


def _summarise(hist: np.ndarray, per_class: np.ndarray, non_finite: int, info: DatasetInfo) -> dict:
    """Exact float64 moments of pixel values from per-channel integer histograms."""
    values = np.arange(256, dtype=np.float64)
    n = hist.sum(1).astype(np.float64)  # pixels per channel
    mean = (hist * values).sum(1) / np.maximum(n, 1)
    var = (hist * values**2).sum(1) / np.maximum(n, 1) - mean**2
    all_mean = (hist * values).sum() / max(n.sum(), 1)
    all_var = (hist * values**2).sum() / max(n.sum(), 1) - all_mean**2
    present = [np.nonzero(h)[0] for h in hist]
    return {
        "num_images": int(per_class.sum()),
        "images_per_class": dict(zip(info.class_names, per_class.tolist())),
        "channel_mean": mean.tolist(),
        "channel_std": np.sqrt(np.maximum(var, 0)).tolist(),
        "channel_min": [int(p[0]) if len(p) else None for p in present],
        "channel_max": [int(p[-1]) if len(p) else None for p in present],
        "mean": float(all_mean),
        "std": float(np.sqrt(max(all_var, 0.0))),
        "non_finite": non_finite,
    }


def plot_class_distribution(stats: dict, class_names: tuple[str, ...], path: str) -> None:
    splits = [s for s, v in stats["splits"].items() if v["num_images"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(class_names) * len(splits)), 4))
    x, width = np.arange(len(class_names)), 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        counts = [stats["splits"][split]["images_per_class"][c] for c in class_names]
        ax.bar(x + i * width, counts, width, label=split)
    ax.set_xticks(x + width * (len(splits) - 1) / 2, class_names, rotation=45, ha="right")
    ax.set_ylabel("images")
    ax.set_title("Images per class")
    ax.legend()
    fig.tight_layout()
    _save(fig, path, dpi=100)


def _save(fig, path: str, dpi: int) -> None:
    """Save a PNG to a local path or a gs:// URL (etils.epath) and free the figure."""
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)


def plot_samples(samples: list[list[np.ndarray]], class_names: tuple[str, ...], path: str) -> None:
    """A grid: one row per class, its name on the left, up to ``cols`` images, no empty bands
    (cells sized to the square images, the title placed by the layout engine)."""
    cols, rows = max(1, max(len(s) for s in samples)), len(class_names)
    label_w = 0.1 + 0.075 * max(len(n) for n in class_names)  # inches for the row names
    fig, axes = plt.subplots(rows, cols, figsize=(label_w + 0.85 * cols, 0.35 + 0.85 * rows),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.02)
    for row, (name, images) in enumerate(zip(class_names, samples)):
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(images):
                ax.imshow(images[col], interpolation="nearest")
            else:
                ax.axis("off")
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle("Training samples per class")
    _save(fig, path, dpi=100)


def plot_histograms(hist: np.ndarray, path: str, split: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
    for c, (ax, colour) in enumerate(zip(axes, ("tab:red", "tab:green", "tab:blue"))):
        ax.fill_between(np.arange(256), hist[c] / max(hist[c].sum(), 1), step="mid", color=colour)
        ax.set_title(f"{CHANNELS[c]} channel ({split})")
        ax.set_xlabel("pixel value")
    axes[0].set_ylabel("fraction of pixels")
    fig.tight_layout()
    _save(fig, path, dpi=100)


def write_markdown(stats: dict, path: str) -> None:
    lines = [
        f"# EDA: {stats['dataset']}", "",
        f"Images: {stats['image_shape']} {stats['dtype']}; classes: {len(stats['class_names'])}; "
        f"all source images one size: {stats['uniform_size']}; "
        f"skipped bad files: {stats['skipped_files']}.", "",
        "| split | images | mean | std | R mean/std | G mean/std | B mean/std | non-finite |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split, s in stats["splits"].items():
        ch = " | ".join(f"{m:.2f} / {d:.2f}" for m, d in zip(s["channel_mean"], s["channel_std"]))
        lines.append(
            f"| {split} | {s['num_images']} | {s['mean']:.2f} | {s['std']:.2f} | {ch} | {s['non_finite']} |"
        )
    lines += ["", "Pixel values in 0..255 (uint8, as the host pipeline yields them).", ""]
    for title, png in (("Class distribution", "class_distribution.png"), ("Samples", "samples.png"),
                       ("Pixel histograms", "pixel_histograms.png")):
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    epath.Path(path).write_text("\n".join(lines))


def run_eda(config: Any, workdir: str, samples_per_class: int = 8) -> dict:
    """Scan all splits, write stats.json, the three PNGs and eda.md to ``workdir``; return stats."""
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    config = config.copy_and_resolve_references()
    config.cache = False  # one pass; nothing to reuse
    info = input_pipeline.get_info(config)
    sizes = sorted(set().union(*[s.sizes or set() for s in sources.get_source(config).splits.values()]))
    stats = {
        "written_by": WRITTEN_BY, "dataset": info.name, "class_names": list(info.class_names),
        "image_shape": list(info.image_shape), "dtype": "uint8",
        "uniform_size": info.uniform_size, "source_sizes": [list(s) for s in sizes[:20]],
        "resized_to": list(info.image_shape[:2]) if not info.uniform_size else None,
        "skipped_files": info.skipped_files, "splits": {},
    }
    hists, samples = {}, None
    for split in input_pipeline.SPLITS:
        if info.split_sizes[split]:
            n = samples_per_class if split == "train" else 0
            stats["splits"][split], hists[split], s = scan_split(config, info, split, n)
            samples = s if split == "train" else samples
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    plot_class_distribution(stats, info.class_names, str(out / "class_distribution.png"))
    plot_samples(samples, info.class_names, str(out / "samples.png"))
    first = next(iter(hists))
    plot_histograms(hists[first], str(out / "pixel_histograms.png"), first)
    write_markdown(stats, str(out / "eda.md"))
    return stats

