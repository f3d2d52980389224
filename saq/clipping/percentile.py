"""Percentile range strategy: symmetric-in-probability percentile pairs, the candidate with the lowest Lp error wins."""

from __future__ import annotations

import math

import torch

from saq.clipping.base import RangeStrategy, channels_first, error_sample, error_settings, percentile_list
from saq.quant.grid import QuantGrid, fake_quant_range, lp_error

PAPER_PERCENTILES = (0.99, 0.999, 0.9999, 0.99999)  # PTQ4SAM's PCTObserver candidates (paper.md §2.2)


def tail_quantiles(flat: torch.Tensor, probs: list[float]) -> torch.Tensor:
    """torch.quantile(flat, probs) (linear interpolation) from top-k / bottom-k only, so huge tensors need no sort."""
    n = flat.numel()
    out = []
    need_top = max([n - 1 - math.floor(q * (n - 1)) + 1 for q in probs if q >= 0.5] or [0])
    need_bottom = max([math.floor(q * (n - 1)) + 2 for q in probs if q < 0.5] or [0])
    top = torch.topk(flat, min(n, need_top)).values if need_top else None  # descending
    bottom = -torch.topk(-flat, min(n, need_bottom)).values if need_bottom else None  # ascending
    for q in probs:
        pos = q * (n - 1)
        i = math.floor(pos)
        frac = pos - i
        j = min(i + 1, n - 1)
        if q >= 0.5:
            a, b = top[n - 1 - i], top[n - 1 - j]
        else:
            a, b = bottom[i], bottom[j]
        out.append(a + frac * (b - a))
    return torch.stack(out)


class PercentileClipping(RangeStrategy):
    """Candidates [q(1-p), q(p)] for p in `percentiles`; keeps the one whose quantization has the lowest Lp error."""

    name = "percentile"

    def __init__(self, percentiles=PAPER_PERCENTILES, p: float = 2.4, max_points: int = 65536):
        self.percentiles = percentile_list(percentiles, "clip.percentiles", "paper: 0.99, 0.999, 0.9999, 0.99999")
        self.p, self.max_points = error_settings(p, max_points)

    def describe(self) -> str:
        return f"percentile(p={self.p:g})"

    def batch_range(self, x: torch.Tensor, grid: QuantGrid, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if ch_axis is None:
            flat = x.reshape(-1)
            highs = tail_quantiles(flat, self.percentiles)
            lows = tail_quantiles(flat, [1.0 - v for v in self.percentiles])
            sample = error_sample(flat, self.max_points)
            errors = [sample.error(lo, hi, grid, self.p) for lo, hi in zip(lows, highs)]
            best = min(range(len(errors)), key=errors.__getitem__)  # ties: the first candidate (0.99: the narrowest range)
            return lows[best], highs[best]
        rows = channels_first(x, ch_axis)
        probs = torch.tensor(self.percentiles + [1.0 - v for v in self.percentiles], device=rows.device)
        q = torch.quantile(rows, probs, dim=1)  # 2K x C
        k = len(self.percentiles)
        best_err = torch.full((rows.shape[0],), float("inf"), device=rows.device)
        best_lo, best_hi = rows.amin(1), rows.amax(1)
        for i in range(k):
            lo, hi = q[k + i], q[i]
            err = lp_error(fake_quant_range(rows, lo, hi, grid, ch_axis=0), rows, self.p, dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi
