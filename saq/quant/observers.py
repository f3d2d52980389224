"""Observers: they watch tensors while calibrating and reduce per-batch ranges (from a range strategy) to one range."""

from __future__ import annotations

import math

import torch

from saq.errors import SaqError
from saq.quant.grid import abs_pow_, bounded_minimize, log2_fake_quant


class Observer:
    """Running reduction of per-batch (lo, hi): 'extreme' keeps the widest seen, 'mean' averages over batches.

    An observer measures; which range a batch gets is its RangeStrategy's decision (saq.clipping), swappable at will.
    The AGQ observer below is the exception: it scores post-softmax scales by (Â - A)·V, so it needs V too.
    """

    reductions = ("extreme", "mean")

    def __init__(self, strategy=None, reduction: str = "mean", name: str | None = None):
        if reduction not in self.reductions:
            raise SaqError(f"observer reduction {reduction!r} unknown; expected one of {list(self.reductions)}")
        if strategy is None:
            from saq.clipping import MinMaxClipping  # imported late: saq.clipping builds on saq.quant.grid

            strategy = MinMaxClipping()
        self.strategy = strategy
        self.reduction = reduction
        self._name = name
        self.reset()

    @property
    def name(self) -> str:
        prefix = "" if self.reduction == "extreme" else "avg_"
        return self._name or f"{prefix}{self.strategy.describe()}"

    def use_strategy(self, strategy) -> None:
        """Swap the range strategy (the `clip` choice); the name then says reduction + strategy."""
        self.strategy = strategy
        self._name = None
        self.reset()

    def reset(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    @property
    def seen(self) -> bool:
        return self.batches > 0

    def observe(self, x: torch.Tensor, grid, ch_axis: int | None) -> None:
        lo, hi = self.strategy.batch_range(x.detach(), grid, ch_axis)
        lo, hi = lo.float(), hi.float()
        self.batches += 1
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.reduction == "extreme":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            self.lo = self.lo + (lo - self.lo) / self.batches
            self.hi = self.hi + (hi - self.hi) / self.batches

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise SaqError("observer saw no data")
        return self.lo, self.hi


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything seen."""

    def __init__(self, strategy=None):
        super().__init__(strategy, "extreme")


class AvgMinMaxObserver(Observer):
    """Running mean of the per-batch minimum and maximum (PTQ4SAM's activation observer)."""

    def __init__(self, strategy=None):
        super().__init__(strategy, "mean")


class PercentileObserver(Observer):
    """Running mean of per-batch percentile ranges, candidates chosen by Lp error (the Percentile baseline)."""

    def __init__(self, strategy=None):
        from saq.clipping import PercentileClipping

        super().__init__(strategy or PercentileClipping(), "mean")


class MSEObserver(Observer):
    """Running mean of per-batch Lp-optimal ranges: the per-channel grid for weights, the bounded search (SAQ-SAM's
    AvgMSEFastObserver) per tensor."""

    def __init__(self, strategy=None):
        from saq.clipping import MSEClipping

        super().__init__(strategy or MSEClipping(), "mean")


OBSERVERS = {"minmax": MinMaxObserver, "avg_minmax": AvgMinMaxObserver, "percentile": PercentileObserver,
             "mse": MSEObserver}


def make_observer(name: str, config_key: str = "observer") -> Observer:
    if name not in OBSERVERS:
        raise SaqError(f"{config_key}={name!r} is unknown; expected one of {sorted(OBSERVERS)}")
    observer = OBSERVERS[name]()
    observer._name = name
    return observer


def agq_search_bounds(a_max: float) -> tuple[float, float]:
    """The scale interval searched for a post-softmax map with maximum a_max (paper.md §2.2)."""
    return min(0.1, 0.01 * a_max), a_max


class AGQObserver:
    """PTQ4SAM's adaptive-granularity observer: for each τ the scale minimising mean |Â_τ·V - A·V|^p.

    Per batch and τ: a log-spaced grid over the scale interval with `points_per_period` points per lattice period
    2^(1/τ), refined by Brent's bounded search around the best grid point. (The paper's code runs Brent alone over
    the whole interval; the objective ripples with that period, so Brent alone stops in whichever dip it meets.)
    Per-τ scales are averaged over batches and per-τ errors summed; choose() returns the τ with the least total.
    Maps larger than max_elements are scored on an evenly spaced subset of their rows (rows are independent in A·V).
    """

    def __init__(self, taus=(1, 2, 4), p: float = 2.4, points_per_period: int = 2, max_elements: int = 1 << 14):
        self.taus = tuple(float(t) for t in taus)
        self.p = float(p)
        self.points_per_period = int(points_per_period)
        self.max_elements = int(max_elements)
        self.reset()

    @property
    def name(self) -> str:
        return f"agq(p={self.p:g})"

    def reset(self) -> None:
        self.scale_sum = {t: 0.0 for t in self.taus}
        self.error_sum = {t: 0.0 for t in self.taus}
        self.batches = 0

    @property
    def seen(self) -> bool:
        return self.batches > 0

    def rows(self, a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (G, Nq, Nk) and V as (G, Nk, d), rows of A subsampled evenly when A is large."""
        a3 = a.detach().float().reshape(-1, a.shape[-2], a.shape[-1])
        v3 = v.detach().float().expand(*a.shape[:-2], *v.shape[-2:]).reshape(-1, v.shape[-2], v.shape[-1])
        if a3.numel() > self.max_elements:
            g, nq, nk = a3.shape
            keep_rows = max(1, self.max_elements // nk)
            if keep_rows < g * nq:
                flat_rows = torch.linspace(0, g * nq - 1, keep_rows, device=a3.device).round().long()
                group, row = flat_rows // nq, flat_rows % nq
                a3 = a3[group, row][:, None, :]
                v3 = v3[group]
        return a3, v3

    def errors(self, a3, v3, target, scales: torch.Tensor, tau: float, bits: int) -> torch.Tensor:
        """The stated error for each scale, in batches of scales (one tensor op per batch, not per scale)."""
        per_batch = max(1, (1 << 21) // a3.numel())
        out = []
        for chunk in scales.split(per_batch):
            a_hat = log2_fake_quant(a3[None], chunk.to(a3)[:, None, None, None], tau, bits, ste=False)
            out.append(abs_pow_(a_hat @ v3 - target, self.p).flatten(1).mean(1))
        return torch.cat(out)

    def batch_best(self, a: torch.Tensor, v: torch.Tensor, bits: int) -> dict[float, tuple[float, float]]:
        """{τ: (best scale, its error)} for one batch."""
        a3, v3 = self.rows(a, v)
        target = a3 @ v3
        lower, upper = agq_search_bounds(float(a3.max()))
        out = {}
        for tau in self.taus:
            def err(s: float, tau=tau) -> float:
                return float(self.errors(a3, v3, target, torch.tensor([s]), tau, bits)[0])

            if not upper > lower:
                out[tau] = (upper, err(upper))
                continue
            n = max(2, math.ceil(math.log2(upper / lower) * tau * self.points_per_period) + 1)
            grid = torch.logspace(math.log10(lower), math.log10(upper), n, dtype=torch.float64)
            errors = self.errors(a3, v3, target, grid, tau, bits).tolist()
            grid = grid.tolist()
            i = min(range(n), key=errors.__getitem__)
            s, e = bounded_minimize(err, grid[max(i - 1, 0)], grid[min(i + 1, n - 1)], xatol=1e-4 * grid[i])
            out[tau] = (s, e) if e <= errors[i] else (grid[i], errors[i])
        return out

    def observe(self, a: torch.Tensor, v: torch.Tensor, bits: int) -> None:
        for tau, (s, e) in self.batch_best(a, v, bits).items():
            self.scale_sum[tau] += s
            self.error_sum[tau] += e
        self.batches += 1

    def choose(self) -> tuple[float, float]:
        """(τ, scale): the τ with the smallest summed error and its batch-averaged scale."""
        if not self.seen:
            raise SaqError("observer saw no data")
        tau = min(self.taus, key=lambda t: self.error_sum[t])  # ties: the first (coarsest) τ
        return tau, self.scale_sum[tau] / self.batches
