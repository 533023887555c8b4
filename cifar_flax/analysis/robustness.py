"""Accuracy under corruption (evaluate ``--shift=corruptions``): results.json's ``corruptions``
block, the heatmap and the accuracy-by-severity plot, and the report's section.

- ``accuracy[corruption][severity]``: the share of the images classified correctly (from the
  ``correct`` counts, kept beside it);
- mCA (mean corruption accuracy): the mean over every corruption x severity cell evaluated;
- relative robustness: mCA / the clean accuracy of the same images (Hendrycks & Dietterich,
  ICLR 2019, report both);
- ``corruption_heatmap.png``: corruption x severity, each cell annotated with its accuracy;
- ``accuracy_by_severity.png``: per severity the mean over the corruptions, clean at 0.
"""

from __future__ import annotations

from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from etils import epath

matplotlib.use("Agg")  # Files only, no display (pyplot picks its backend at the first figure).

HEATMAP, BY_SEVERITY = "corruption_heatmap.png", "accuracy_by_severity.png"
FILES = (HEATMAP, BY_SEVERITY)


def summary(correct: dict[str, dict[int, int]], count: int, clean_correct: int,
            about: dict[str, Any]) -> dict[str, Any]:
    """results.json's block: ``correct[corruption][severity]`` of ``count`` images each and
    ``clean_correct`` of the same images uncorrupted; ``about`` (which set, severity scale,
    images, seed) is kept first."""
    accuracy = {c: {str(s): n / count for s, n in row.items()} for c, row in correct.items()}
    cells = [a for row in accuracy.values() for a in row.values()]
    severities = sorted({s for row in accuracy.values() for s in row}, key=int)
    clean = clean_correct / count
    mca = float(np.mean(cells))
    return {**about, "images": count, "corruptions": list(accuracy),
            "severities": [int(s) for s in severities],
            "clean_accuracy": clean, "mca": mca,
            "relative_robustness": mca / clean if clean else None,
            "mean_by_severity": {s: float(np.mean([row[s] for row in accuracy.values()]))
                                 for s in severities},
            "mean_by_corruption": {c: float(np.mean(list(row.values())))
                                   for c, row in accuracy.items()},
            "accuracy": accuracy,
            "correct": {c: {str(s): int(n) for s, n in row.items()} for c, row in correct.items()},
            "clean_correct": int(clean_correct)}


def _grid(block: dict[str, Any]) -> tuple[list[str], list[str], np.ndarray]:
    severities = [str(s) for s in block["severities"]]
    grid = np.array([[block["accuracy"][c][s] for s in severities] for c in block["corruptions"]])
    return block["corruptions"], severities, grid


def heatmap_figure(block: dict[str, Any]) -> Any:
    """Accuracy per corruption (rows) and severity (columns), each cell annotated."""
    names, severities, grid = _grid(block)
    fig, ax = plt.subplots(figsize=(1.2 * len(severities) + 3.5, 0.42 * len(names) + 1.8),
                           layout="constrained")
    shown = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8,
                color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(severities)), severities)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    ax.set_title(f"Accuracy under corruption (clean {block['clean_accuracy']:.3f}, "
                 f"mCA {block['mca']:.3f})", fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.02, label="accuracy")
    return fig


def severity_figure(block: dict[str, Any]) -> Any:
    """Mean accuracy over the corruptions per severity, clean at severity 0."""
    severities = [0] + block["severities"]
    means = [block["clean_accuracy"]] + [block["mean_by_severity"][str(s)]
                                         for s in block["severities"]]
    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    ax.plot(severities, means, "o-")
    for s, m in zip(severities, means):
        ax.annotate(f"{m:.3f}", (s, m), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
    ax.set_xticks(severities, ["clean"] + [str(s) for s in block["severities"]])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("severity")
    ax.set_ylabel(f"mean accuracy over {len(block['corruptions'])} corruptions")
    ax.grid(alpha=0.3)
    return fig


def _save(fig: Any, path: epath.Path) -> None:
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write(out_dir: str, block: dict[str, Any]) -> None:
    """The two figures (FILES) into ``out_dir``, and the section appended to its report.md."""
    out = epath.Path(out_dir)
    _save(heatmap_figure(block), out / HEATMAP)
    _save(severity_figure(block), out / BY_SEVERITY)
    report = out / "report.md"
    report.write_text(report.read_text().rstrip("\n") + "\n\n" + markdown(block))


def markdown(block: dict[str, Any]) -> str:
    """The report's section: what was evaluated, mCA and relative robustness, the table."""
    names, severities, grid = _grid(block)
    rel = block["relative_robustness"]
    lines = ["## Accuracy under corruption", "",
             f"- Set: {block['set']}; severity scale: {block['severity_scale']}",
             f"- Images: {block['images']} of the split's {block['split_images']} "
             f"({block['subset']})",
             f"- Clean accuracy on these images: **{block['clean_accuracy']:.4f}**",
             f"- Mean corruption accuracy (mCA, over {grid.size} corruption x severity cells): "
             f"**{block['mca']:.4f}**",
             f"- Relative robustness (mCA / clean): **{rel:.4f}**" if rel is not None else
             "- Relative robustness: undefined (clean accuracy 0)",
             "", f"![accuracy under corruption]({HEATMAP})", "",
             f"![accuracy by severity]({BY_SEVERITY})", "",
             "| corruption | " + " | ".join(f"severity {s}" for s in severities) + " | mean |",
             "| --- |" + " --- |" * (len(severities) + 1)]
    lines += [f"| {c} | " + " | ".join(f"{v:.4f}" for v in row)
              + f" | {block['mean_by_corruption'][c]:.4f} |" for c, row in zip(names, grid)]
    lines += ["| mean | " + " | ".join(f"{block['mean_by_severity'][s]:.4f}" for s in severities)
              + f" | {block['mca']:.4f} |", ""]
    return "\n".join(lines)
