"""Figures of one run (matplotlib, headless): the clip ranges a point search chose, and what they do to attention."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display here; files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110, layout: dict | None = None) -> Path:
    """Lay out (tight_layout with `layout`; None skips it), write and close a figure; returns its path."""
    if layout is not None:
        fig.tight_layout(**layout)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    return max(1, math.ceil(n / cols)), min(cols, max(n, 1))


def clip_range_histograms(report, path: Path) -> Path:
    """Per searched point: its input's histogram (log counts) with the MinMax, MSE and PCC ranges (paper's Fig. 1)."""
    plt = pyplot()
    points = [p for p in report.points if p.histogram is not None]
    rows, cols = _grid(len(points))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, point in zip(axes.flat, points):
        counts, edges = (np.asarray(v) for v in point.histogram)
        ax.bar(edges[:-1], np.maximum(counts, 0.8), width=np.diff(edges), align="edge", color="0.6", log=True)
        for lo, hi, color, label in ((point.fp_min, point.fp_max, "k", "minmax"), (point.mse_lo, point.mse_hi, "tab:blue",
                                                                                    "mse"),
                                     (point.pcc_lo, point.pcc_hi, "tab:red", "pcc")):
            ax.axvline(lo, color=color, lw=1, label=label)
            ax.axvline(hi, color=color, lw=1)
        ax.set_title(f"{point.attention}\n{point.point}  (clip {point.clip_ratio:.0f}x)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(points):]:
        ax.axis("off")
    if points:
        axes.flat[0].legend(fontsize=6)
    fig.suptitle("q/k activations and the clip ranges of MinMax, MSE and PCC", fontsize=9)
    return save_figure(fig, path, layout={"rect": (0, 0, 1, 0.97)})


def attention_heatmaps(heatmaps: dict, path: Path) -> Path:
    """One prompt's token->image attention over the image grid: FP, MSE-clipped, PCC-clipped (paper's Fig. 3)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    maps = [np.asarray(heatmaps[k]) for k in ("fp", "mse", "pcc")]
    vmax = max(float(m.max()) for m in maps)
    for ax, m, title in zip(axes, maps, ("FP", "MSE-clipped q/k", "PCC-clipped q/k")):
        image = ax.imshow(m, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.suptitle(f"{heatmaps['attention']}: mask token of prompt {heatmaps['prompt']} (heads averaged)", fontsize=9)
    return save_figure(fig, path)


def pcc_distance_curves(report, path: Path) -> Path:
    """PCC distance against candidate percentile for each searched point (last sweep)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for point in report.points:
        if point.curve:
            ax.plot(report.candidates, point.curve, lw=1, label=f"{point.attention} {point.point}")
    ax.set_xscale("function", functions=(lambda p: -np.log10(np.maximum(1 - p, 1e-9)),
                                         lambda y: 1 - 10.0 ** (-y)))
    ax.set_xlabel("candidate percentile p (range [q(1-p), q(p)])")
    ax.set_ylabel("PCC distance (1 - focus IoU)")
    ax.legend(fontsize=5, ncol=2)
    return save_figure(fig, path, layout={})


def clipping_figures(report, run_dir: Path) -> list[Path]:
    """All figures of a point search, written into the run directory."""
    run_dir = Path(run_dir)
    paths = [clip_range_histograms(report, run_dir / "pcc_clip_ranges.png"),
             pcc_distance_curves(report, run_dir / "pcc_distance_curves.png")]
    if report.heatmaps:
        paths.append(attention_heatmaps(report.heatmaps, run_dir / "pcc_attention_heatmaps.png"))
    return paths
