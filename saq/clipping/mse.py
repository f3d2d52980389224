"""MSE (Lp, p = 2.4) range strategy: a per-channel grid search (weights) and a per-tensor bounded search (activations)."""

from __future__ import annotations

from functools import partial

import torch

from saq.clipping.base import RangeStrategy, channels_first, error_sample, error_settings
from saq.errors import SaqError, check_int, is_number
from saq.quant.grid import SCALE_EPS, QuantGrid, abs_pow_, bounded_minimize, fake_quant_range, lp_error


class MSEClipping(RangeStrategy):
    """The range minimising mean |x̂ - x|^p, searched as in paper.md §2.2.

    Per channel (PTQ4SAM's MSEObserver): one-sided or symmetric data tries r_i = i·max|x|/num_ranges; otherwise
    every zero-point z for each of the num_ranges ranges, lo = -zΔ, hi = r - zΔ. For a fixed step Δ each value's
    error is a convex function of the integer z (|·|^p of a clamped affine map), so the best z of every channel is
    found by binary search on the sign of err(z+1) - err(z): the grid optimum at a fraction of the cost.
    Per tensor (SAQ-SAM's AvgMSEFastObserver, one batch): a bounded Brent search of the range R, and for two-sided
    data an inner bounded search of the shift t, lo = max(-t, min x), hi = min(R - t, max x). Tensors larger than
    max_points are scored on their extremes plus a random sample of the rest (error_sample).
    """

    name = "mse"

    def __init__(self, p: float = 2.4, num_ranges: int = 100, max_points: int = 16384, rel_tol: float = 1e-3):
        self.p, self.max_points = error_settings(p, max_points)
        self.num_ranges = check_int(num_ranges, "clip.num_ranges")
        if not (is_number(rel_tol) and 0 < rel_tol < 0.5):
            raise SaqError(f"clip.rel_tol={rel_tol!r} invalid; expected a fraction in (0, 0.5)")
        self.rel_tol = float(rel_tol)

    def describe(self) -> str:
        return f"mse(p={self.p:g})"

    def batch_range(self, x: torch.Tensor, grid: QuantGrid, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if ch_axis is None:
            return self.search_tensor(x, grid)
        return self.search_channels(channels_first(x, ch_axis), grid)

    # -- per tensor: bounded searches ------------------------------------------------------------------------------
    def search_tensor(self, x: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
        x_min, x_max = (float(v) for v in torch.aminmax(x))
        sample = error_sample(x, self.max_points)

        def err(lo: float, hi: float) -> float:
            return sample.error(lo, hi, grid, self.p)

        def search(f, lower: float, upper: float) -> tuple[float, float]:
            return bounded_minimize(f, lower, upper, xatol=self.rel_tol * (upper - lower))

        if x_max <= x_min:
            return torch.tensor(x_min), torch.tensor(x_max)
        if grid.symmetric or x_min >= 0 or x_max <= 0:
            if grid.symmetric:
                span, lo_sign, hi_sign = max(-x_min, x_max), -1.0, 1.0
            elif x_min >= 0:
                span, lo_sign, hi_sign = x_max, 0.0, 1.0
            else:
                span, lo_sign, hi_sign = -x_min, -1.0, 0.0
            r, e = search(lambda r: err(lo_sign * r, hi_sign * r), min(0.1, 0.01 * span), span)
            if err(lo_sign * span, hi_sign * span) <= e:  # the full range, which Brent never evaluates
                r = span
            return torch.tensor(lo_sign * r), torch.tensor(hi_sign * r)

        best_shift: dict[float, float] = {}

        def window(r: float, t: float) -> tuple[float, float]:
            return max(-t, x_min), min(r - t, x_max)

        def range_error(r: float) -> float:
            t, e = search(lambda t: err(*window(r, t)), 0.0, r)
            best_shift[r] = t
            return e

        xrange = x_max - x_min
        r, e = search(range_error, min(0.1, 0.01 * xrange), xrange)
        lo, hi = window(r, best_shift[r])
        if err(x_min, x_max) <= e:  # Brent never evaluates the interval's ends: the full range is a candidate too
            lo, hi = x_min, x_max
        return torch.tensor(lo), torch.tensor(hi)

    # -- per channel: grid over ranges (and zero-points) -----------------------------------------------------------
    def search_channels(self, w: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (channel) grid search over ranges r_i = i·span/num_ranges, scanned from the widest down.

        A channel stops scanning once even the two extreme values' clipping error alone exceeds its best error; that
        bound only grows as r shrinks, so the result is the full grid's (ties keep the smaller range, as the paper's
        ascending scan does).
        """
        x_min, x_max = w.amin(1), w.amax(1)
        count = w.shape[1]
        best_err = torch.full_like(x_min, float("inf"))
        best_lo, best_hi = x_min.clone(), x_max.clone()
        positive, negative = bool((x_min >= 0).all()), bool((x_max <= 0).all())  # decided per tensor, like the code
        two_sided = not (grid.symmetric or positive or negative)
        if grid.symmetric:
            span = torch.maximum(-x_min, x_max)
        elif positive:
            span = x_max
        elif negative:
            span = -x_min
        else:  # a channel on one side of zero still spans to 0: every candidate range holds 0 (lo <= 0 <= hi)
            span = x_max.clamp(min=0) - x_min.clamp(max=0)
        levels = grid.qmax - grid.qmin
        rows = torch.arange(w.shape[0], device=w.device)
        for i in range(self.num_ranges, 0, -1):
            r_all = span * i / self.num_ranges
            # clipping error of the extremes alone: both ends share the uncovered span (two-sided), or one end does;
            # a symmetric grid reaches r·qmax/h above zero and r·|qmin|/h below (h = levels / 2), each end its own
            if grid.symmetric:
                reach = r_all / (levels / 2)
                bound = (torch.clamp(x_max - reach * grid.qmax, min=0) ** self.p
                         + torch.clamp(-x_min + reach * grid.qmin, min=0) ** self.p) / count
            else:
                uncovered = torch.clamp(span - r_all, min=0)
                bound = (2 * (uncovered / 2) ** self.p if two_sided else uncovered**self.p) / count
            rows = rows[bound[rows] <= best_err[rows]]
            if rows.numel() == 0:
                break
            wr, r = w[rows], r_all[rows]
            if not two_sided:
                lo = -r if (grid.symmetric or negative) else torch.zeros_like(r)
                hi = r if (grid.symmetric or positive) else torch.zeros_like(r)
                err = lp_error(fake_quant_range(wr, lo, hi, grid, ch_axis=0), wr, self.p, dim=1)
            else:
                step = torch.clamp(r / levels, min=SCALE_EPS)
                codes = torch.round(wr * (1.0 / step)[:, None])  # grid codes relative to the zero-point
                err_at = partial(_zero_point_error, wr, codes, step, levels, self.p)
                # z outside [min(L - n_max, -n_min), -n_min] is dominated by a neighbour (less clipping, same lattice)
                n_min, n_max = codes.amin(1), codes.amax(1)
                z_lo = torch.clamp(torch.minimum(levels - n_max, -n_min), 0, levels)
                z_hi = torch.clamp(-n_min, 0, levels)
                while True:
                    active = z_lo < z_hi
                    if not bool(active.any()):
                        break
                    mid = torch.floor((z_lo + z_hi) / 2)
                    e = err_at(torch.stack([mid, mid + 1]))
                    right = e[1] < e[0]
                    z_lo = torch.where(active & right, mid + 1, z_lo)
                    z_hi = torch.where(active & ~right, mid, z_hi)
                err = err_at(z_lo)
                lo, hi = -z_lo * step, r - z_lo * step
            better = err <= best_err[rows]
            best_err[rows] = torch.where(better, err, best_err[rows])
            best_lo[rows] = torch.where(better, lo, best_lo[rows])
            best_hi[rows] = torch.where(better, hi, best_hi[rows])
        return best_lo, best_hi


def _zero_point_error(w: torch.Tensor, codes: torch.Tensor, step: torch.Tensor, levels: int, p: float,
                      z: torch.Tensor) -> torch.Tensor:
    """Mean |x̂ - w|^p per row of w (C x K) for zero-points z (..., C): codes clamp to [-z, levels - z]."""
    zz = z[..., None]
    q = torch.minimum(torch.maximum(codes, -zz), levels - zz) * step[:, None]
    return abs_pow_(q - w, p).mean(-1)
