"""The range-strategy interface (one tensor → its clipping range) and the weighted value sample range searches score on."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from saq.errors import SaqError, check_int, is_finite_number, is_number
from saq.quant.grid import SCALE_EPS, QuantGrid, abs_pow_


class RangeStrategy(ABC):
    """Chooses the clipping range [lo, hi] of one batch; observers reduce these per-batch ranges over batches.

    Per tensor (ch_axis None) it returns two scalar tensors, per channel two tensors of length C along ch_axis.
    """

    name: str = "range"
    reduction: str = "mean"  # how an observer combines per-batch ranges: mean (PTQ4SAM's Avg*) | extreme (running)
    union_by_extremes: bool = False  # a tensor's range is its pieces' widest (true of min/max, not of a search)

    @abstractmethod
    def batch_range(self, x: torch.Tensor, grid: QuantGrid, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def describe(self) -> str:
        return self.name

    def check_quant_config(self, cfg) -> None:
        """SaqError before any compute when a QuantConfig cannot host this strategy (any can, unless it says)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def channels_first(x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """x as a C x N matrix, one row per channel along ch_axis."""
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


@dataclass
class WeightedValues:
    """Values with multiplicities: a whole tensor, or a compressed stand-in used to score candidate ranges fast."""

    values: torch.Tensor  # 1-D float32
    weights: torch.Tensor | None = None  # None: every value counts once

    def __post_init__(self):
        self.total = float(self.values.numel() if self.weights is None else self.weights.sum())

    def error(self, lo, hi, grid: QuantGrid, p: float) -> float:
        """Mean |x̂ - x|^p over the represented tensor when quantized on the grid spanning [lo, hi]."""
        # searches call this hundreds of times per tensor, so it is fake_quant written out with scalar
        # qparams and in-place ops
        scale, zero_point = scalar_qparams(float(lo), float(hi), grid)
        x_hat = torch.round(self.values * (1.0 / scale)).add_(zero_point).clamp_(grid.qmin, grid.qmax)
        err = abs_pow_(x_hat.sub_(zero_point).mul_(scale).sub_(self.values), p)
        if self.weights is None:
            return float(err.sum()) / self.total
        return float(torch.dot(err, self.weights)) / self.total


def scalar_qparams(lo: float, hi: float, grid: QuantGrid) -> tuple[float, float]:
    """qparams_from_range for one range in python floats (float64 instead of float32 arithmetic)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if grid.symmetric:
        return max(max(-lo, hi) / ((grid.qmax - grid.qmin) / 2), SCALE_EPS), 0.0
    scale = max((hi - lo) / (grid.qmax - grid.qmin), SCALE_EPS)
    return scale, float(min(max(grid.qmin - round(lo / scale), grid.qmin), grid.qmax))


def error_settings(p: float, max_points: int) -> tuple[float, int]:
    """Validated (p, max_points) of a strategy that scores ranges by Lp error on an error_sample."""
    # p >= 1: the searches' pruning bound and their zero-point bisection need an error convex in the range
    if not (is_finite_number(p) and p >= 1):
        raise SaqError(f"clip.p={p!r} invalid; expected a finite Lp exponent >= 1 (paper: 2.4)")
    return float(p), check_int(max_points, "clip.max_points", 16)


def percentile_list(values, key: str, paper: str) -> list[float]:
    """A non-empty list of percentiles in (0.5, 1] (the upper tail a range keeps), or a SaqError naming key."""
    if not (isinstance(values, (list, tuple)) and values and all(is_number(v) and 0.5 < v <= 1 for v in values)):
        raise SaqError(f"{key}={values!r} invalid; expected a non-empty list of percentiles in (0.5, 1] ({paper})")
    return sorted(float(v) for v in values)  # ascending: the searches' ties keep the first, the tightest clip


def error_sample(x: torch.Tensor, max_points: int, seed: int = 0) -> WeightedValues:
    """The tensor itself when small; otherwise its max_points/4 lowest and highest values exactly (outliers decide
    clipping errors, so they are never sampled away), the values tied with the edges of those two sets exactly (a
    ReLU output's zeros: one entry each, weighted by its count), and a seeded random sample of the values strictly
    between them, weighted to their count."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    if n <= max_points:
        return WeightedValues(flat)
    k = max(1, max_points // 4)
    top = torch.topk(flat, k).values
    bottom = -torch.topk(-flat, k).values
    low_edge, high_edge = bottom[-1], top[-1]
    gen = torch.Generator(device=flat.device).manual_seed(seed)
    sample = flat[torch.randint(n, (max(1, max_points // 2),), generator=gen, device=flat.device)]
    inner = sample[(sample > low_edge) & (sample < high_edge)]
    middle = int(((flat > low_edge) & (flat < high_edge)).sum())
    if inner.numel() == 0 and middle:  # the sample missed a small middle: it is small enough to keep whole
        inner = flat[(flat > low_edge) & (flat < high_edge)]
    if low_edge == high_edge:  # every value outside the two sets equals the edge
        tied = [(low_edge, n - 2 * k)]
    else:  # the edge values beyond the k of each set that topk kept
        tied = [(low_edge, int((flat == low_edge).sum() - (bottom == low_edge).sum())),
                (high_edge, int((flat == high_edge).sum() - (top == high_edge).sum()))]
    tied = [(v, c) for v, c in tied if c > 0]
    values = torch.cat([bottom, top, inner, *(v.reshape(1) for v, _ in tied)])
    weights = torch.cat([torch.ones(2 * k, device=flat.device),
                         torch.full_like(inner, middle / max(inner.numel(), 1)),
                         torch.tensor([float(c) for _, c in tied], device=flat.device)])
    return WeightedValues(values, weights)
