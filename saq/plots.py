"""Figures of one run (matplotlib, headless): PCC's ranges and attention, reconstruction curves, sensitivity.

The clip ranges a point search chose and what they do to attention, how each reconstruction unit learned, and which
parts of a saved model lose accuracy when quantized.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from saq.errors import is_finite_number
from saq.log import atomic_path


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display here; files only)."""
    import matplotlib

    matplotlib.use("Agg")
    # labels are run names and paths: a '$' in one (task.data.root=/d/$HOME) must print as itself, not start mathtext
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


SUPERSCRIPTS = str.maketrans("0123456789-−", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁻")


def plain_tick_text(text: str) -> str:
    """A log axis's mathtext tick label ($\\mathdefault{4\\times10^{-2}}$) as plain text (4×10⁻²): mathtext is off
    (pyplot), so matplotlib's own log labels would print as their source."""
    match = re.fullmatch(r"\$\\mathdefault\{(.*)\}\$", text)
    if match is None:
        return text
    body = match.group(1).replace("\\times", "×").replace("\\minus", "−")
    return re.sub(r"\^\{([^}]*)\}", lambda m: m.group(1).translate(SUPERSCRIPTS), body)


def plain_log_ticks(fig) -> None:
    """Every log or symlog axis of fig labelled in plain text (its own formatter decides which ticks get a label)."""
    from matplotlib import ticker

    class PlainText(ticker.Formatter):
        def __init__(self, inner):
            self.inner = inner

        def set_locs(self, locs):
            self.inner.set_locs(locs)

        def format_ticks(self, values):
            return [plain_tick_text(t) for t in self.inner.format_ticks(values)]

        def __call__(self, x, pos=None):
            return plain_tick_text(self.inner(x, pos))

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() in ("log", "symlog"):
                for formatter, setter in ((axis.get_major_formatter(), axis.set_major_formatter),
                                          (axis.get_minor_formatter(), axis.set_minor_formatter)):
                    if not hasattr(formatter, "inner"):  # wrapped already (a figure saved twice)
                        setter(PlainText(formatter))
                        formatter.set_axis(axis)  # set_*_formatter gave the wrapper the axis, not what it wraps


def save_figure(fig, path: Path, dpi: int = 110, layout: dict | None = None, bbox_inches: str | None = None) -> Path:
    """Lay out (tight_layout with `layout`; None skips it), write and close a figure; returns its path.
    bbox_inches="tight" grows the image to hold what sits outside the axes (a legend beside them)."""
    try:
        plain_log_ticks(fig)
        if layout is not None:
            fig.tight_layout(**layout)
        with atomic_path(path) as tmp:  # whole or none: a killed report leaves no truncated PNG for W&B to upload
            fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches, format=Path(path).suffix.lstrip(".") or "png")
    finally:  # closed when saving fails too: a sweep's report draws many figures in one process
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
        filled = counts > 0  # empty bins drawn at all would look like a count of one on the log axis: a lone
        # outlier, which is what this figure is for, must stand apart from nothing
        ax.bar(edges[:-1][filled], counts[filled], width=np.diff(edges)[filled], align="edge", color="0.6", log=True)
        ax.set_ylim(bottom=0.5)
        ax.set_xlabel("activation", fontsize=6)
        ax.set_ylabel("count (log)", fontsize=6)
        for lo, hi, color, label in ((point.fp_min, point.fp_max, "k", "minmax"), (point.mse_lo, point.mse_hi, "tab:blue",
                                                                                    "mse"),
                                     (point.pcc_lo, point.pcc_hi, "tab:red", "pcc")):
            ax.axvline(lo, color=color, lw=1, label=label)
            ax.axvline(hi, color=color, lw=1)
        ax.set_title(f"{point.attention}\n{point.point}  (clip {point.clip_ratio:.3g}x)", fontsize=7)
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
    """PCC distance against candidate percentile for each searched point (last sweep), its chosen percentile dotted.
    x is -log10(1 - p), so the candidates packed near 1 (0.99 ... 0.99999), where the curves move, get room."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = plt.get_cmap("tab20").colors
    tail = lambda p: -np.log10(np.maximum(1 - np.asarray(p, dtype=float), 1e-12))  # noqa: E731
    order = np.argsort(report.candidates)  # clip.candidates may be listed in any order: drawn left to right
    for i, point in enumerate(p for p in report.points if p.curve):
        colour = colours[i % len(colours)]
        ax.plot(tail(np.asarray(report.candidates)[order]), np.asarray(point.curve)[order], lw=1, color=colour,
                ls="-" if i < len(colours) else "--", label=f"{point.attention} {point.point}")
        ax.plot(tail(point.percentile), point.dist_pcc, "o", ms=3, color=colour)
    ticks = [t for t in (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)
             if min(report.candidates) <= t <= max(report.candidates)]
    if len(ticks) < 2:  # candidates between the round levels: the candidates themselves are the ticks
        ticks = sorted(report.candidates)
    ax.set_xticks(tail(ticks), [f"{t:g}" for t in ticks])
    ax.set_xlabel("candidate percentile p (range [q(1-p), q(p)]); dots: the chosen p")
    ax.set_ylabel("PCC distance (1 - focus IoU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path, layout=None, bbox_inches="tight")


def clipping_figures(report, run_dir: Path) -> list[Path]:
    """All figures of a point search, written into the run directory."""
    run_dir = Path(run_dir)
    paths = [clip_range_histograms(report, run_dir / "pcc_clip_ranges.png"),
             pcc_distance_curves(report, run_dir / "pcc_distance_curves.png")]
    if report.heatmaps:
        paths.append(attention_heatmaps(report.heatmaps, run_dir / "pcc_attention_heatmaps.png"))
    return paths


def reconstruction_curves(recon: dict, path: Path) -> Path | None:
    """Per reconstruction unit: its training loss against iteration (QDrop dropping, soft rounding), with the unit's
    loss over all calibration samples before and after learning (hard rounding, fully quantized). None when no unit
    has a curve (recon=none, or only units resumed from a run that recorded none)."""
    units = [u for u in (recon or {}).get("units", []) if u.get("loss_curve")]
    if not units:
        return None
    plt = pyplot()
    rows, cols = _grid(len(units), cols=3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, unit in zip(axes.flat, units):
        its, losses = zip(*unit["loss_curve"])
        ax.plot(its, losses, lw=1, color="tab:blue", marker="o" if len(its) == 1 else None, label="training loss")
        for key, style, label in (("eval_before", "--", "all samples, before"), ("eval_after", "-", "after")):
            if is_finite_number(unit.get(key)):
                ax.axhline(unit[key], color="tab:red", ls=style, lw=1, label=label)
        if min(losses) > 0:
            ax.set_yscale("log")
        kept = "" if unit.get("kept") in (None, "learned") else f" [{unit['kept']}]"
        ax.set_title(f"{unit['name']} ({unit['kind']}){kept}", fontsize=7)
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylabel("unit loss", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(units):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"reconstruction ({recon.get('method')}): unit loss while learning", fontsize=9)
    return save_figure(fig, path, layout={"rect": (0, 0, 1, 0.98)})  # room for the title above the panels


def sensitivity_bars(rows: dict[str, dict], header: dict, path: Path) -> Path:
    """saq.sensitivity as bars: per part, what its main metric gains (or loses) when that part runs in FP, against
    the fully quantized run (the first row); a dashed line marks the whole FP model's gain, all there is to win."""
    metric = header.get("metric")
    full_label, *parts = rows
    full = rows[full_label]
    if metric not in full:  # a task without a known main metric: its first score
        from saq.report import is_table_metric

        metric = next(k for k, v in full.items() if is_table_metric(k, v))
    gains = [100 * (rows[p][metric] - full[metric]) for p in parts]
    labels = [p or "(whole model)" for p in parts]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(parts) + 1.4))
    y = np.arange(len(parts))[::-1]
    finite = [is_finite_number(g) for g in gains]
    ax.barh(y, [g if ok else 0.0 for g, ok in zip(gains, finite)],
            color=["tab:green" if g >= 0 else "tab:red" for g in gains], height=0.7)
    for yi, ok in zip(y, finite):  # no bar would read as no change
        if not ok:
            ax.annotate("NaN", (0, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                        color="tab:red")
    ax.set_yticks(y, labels, fontsize=7)
    fp = (header.get("fp") or {}).get(metric)
    if is_finite_number(fp):
        ax.axvline(100 * (fp - full[metric]), color="k", ls="--", lw=1, label=f"whole model in FP ({100 * fp:.2f})")
        ax.legend(fontsize=7, loc="lower right")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"{metric} gain with the part in FP (points; fully quantized {100 * full[metric]:.2f})", fontsize=8)
    ax.set_title(f"sensitivity: {header.get('model')} {str(header.get('quant')).upper()} {header.get('method')}, "
                 f"{header.get('images')} val images", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path, layout={}, bbox_inches="tight")  # long part names sit left of the axes
