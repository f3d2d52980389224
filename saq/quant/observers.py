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
        """Swap the range strategy (the `clip` choice, with its reduction); the name then says reduction + strategy."""
        self.strategy = strategy
        self.reduction = getattr(strategy, "reduction", self.reduction)
        self._name = None
        self.reset()

    def relabel(self, name: str) -> None:
        """Name what set the range when something other than this observer did (a point search)."""
        self._name = name

    def reset(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0
        self._pieces: list | None = [] if getattr(self, "_pieces", None) is not None else None  # a batch stays open

    def begin_batch(self) -> None:
        """Collect what is observed until end_batch() as the pieces of one batch (an image's prompts decoded in
        several chunks: paper.md §2.3 averages over images, not over however many forwards memory allows)."""
        self._pieces = []

    def end_batch(self, commit: bool = True) -> None:
        """Reduce the pieces since begin_batch() to one batch range: their extremes where the strategy's range of a
        whole is that of its parts (min/max; exact), else their mean weighted by element count."""
        pieces, self._pieces = self._pieces, None
        if not commit or not pieces:
            return
        if len(pieces) == 1:
            lo, hi = pieces[0][:2]
        elif getattr(self.strategy, "union_by_extremes", False):
            lo = torch.stack([p[0] for p in pieces]).amin(0)
            hi = torch.stack([p[1] for p in pieces]).amax(0)
        else:
            total = sum(p[2] for p in pieces)
            lo = sum(p[0] * (p[2] / total) for p in pieces)
            hi = sum(p[1] * (p[2] / total) for p in pieces)
        self._add(lo, hi)

    @property
    def seen(self) -> bool:
        return self.batches > 0

    def observe(self, x: torch.Tensor, grid, ch_axis: int | None) -> None:
        lo, hi = self.strategy.batch_range(x.detach(), grid, ch_axis)
        lo, hi = lo.float(), hi.float()
        if self._pieces is not None:
            self._pieces.append((lo, hi, x.numel()))
        else:
            self._add(lo, hi)

    def _add(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
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

    The interval always comes from the whole map's maximum (paper.md §2.2). Maps up to max_elements are scored on
    every row. Larger ones (a ViT-B global attention, a decoder map with many prompts) are scored on the rows with the
    largest maxima (sharp rows decide the upper end of the scale, so they are never sampled away) plus a seeded
    random sample of the other rows, weighted to their count; rows are independent in A·V.
    """

    def __init__(self, taus=(1, 2, 4), p: float = 2.4, points_per_period: int = 2, max_elements: int = 1 << 18,
                 seed: int = 0):
        self.taus = tuple(float(t) for t in taus)
        self.p = float(p)
        self.points_per_period = int(points_per_period)
        self.max_elements = int(max_elements)
        self.seed = int(seed)
        self.reset()

    @property
    def name(self) -> str:
        return f"agq(p={self.p:g})"

    def reset(self) -> None:
        self.scale_sum = {t: 0.0 for t in self.taus}
        self.error_sum = {t: 0.0 for t in self.taus}
        self.batches = 0
        self._pieces: list | None = [] if getattr(self, "_pieces", None) is not None else None  # a batch stays open

    def begin_batch(self) -> None:
        """As Observer.begin_batch: the maps until end_batch() are the pieces of one batch."""
        self._pieces = []

    def end_batch(self, commit: bool = True) -> None:
        """One batch from the pieces: each τ's best scale and error averaged, weighted by the pieces' sizes."""
        pieces, self._pieces = self._pieces, None
        if not commit or not pieces:
            return
        total = sum(n for _, n in pieces)
        self._add({t: (sum(best[t][0] * n for best, n in pieces) / total,
                       sum(best[t][1] * n for best, n in pieces) / total) for t in self.taus}
                  if len(pieces) > 1 else pieces[0][0])

    @property
    def seen(self) -> bool:
        return self.batches > 0

    def rows(self, a: torch.Tensor, v: torch.Tensor, max_elements: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A as (G, Nq, Nk), V as (G, Nk, d) and row weights: None (every row, weight 1) or, for maps over
        max_elements, (K,) weights of K scored rows returned as (K, 1, Nk) with their V as (K, Nk, d)."""
        max_elements = self.max_elements if max_elements is None else max_elements
        a3 = a.detach().float().reshape(-1, a.shape[-2], a.shape[-1])
        v3 = v.detach().float().expand(*a.shape[:-2], *v.shape[-2:]).reshape(-1, v.shape[-2], v.shape[-1])
        g, nq, nk = a3.shape
        total = g * nq
        keep = max(2, max_elements // nk)
        if a3.numel() <= max_elements or keep >= total:
            return a3, v3, None
        flat = a3.reshape(total, nk)
        n_top = keep // 2
        top = torch.topk(flat.amax(1), n_top).indices
        rest = torch.ones(total, dtype=torch.bool, device=flat.device)
        rest[top] = False
        rest = torch.nonzero(rest).flatten()
        gen = torch.Generator().manual_seed(self.seed)
        picked = rest[torch.randperm(rest.numel(), generator=gen)[: keep - n_top].to(rest.device)]
        index = torch.cat([top, picked])
        weights = torch.cat([torch.ones(n_top, device=flat.device),
                             torch.full((picked.numel(),), (total - n_top) / picked.numel(), device=flat.device)])
        return flat[index][:, None, :], v3[index // nq], weights

    def errors(self, scored: tuple, scales: torch.Tensor, tau: float, bits: int) -> torch.Tensor:
        """The stated error for each scale, in batches of scales (one tensor op per batch, not per scale);
        scored = (A, V, A·V, row weights) from rows(). On the CPU, like the scale grids it indexes."""
        a3, v3, target, weights = scored
        per_batch = max(1, (1 << 21) // a3.numel())
        out = []
        for chunk in scales.split(per_batch):
            a_hat = log2_fake_quant(a3[None], chunk.to(a3)[:, None, None, None], tau, bits, ste=False)
            per_row = abs_pow_(a_hat @ v3 - target, self.p).mean(-1).flatten(1)  # (scales, rows)
            out.append(per_row.mean(1) if weights is None else per_row @ weights / weights.sum())
        return torch.cat(out).cpu()

    def batch_best(self, a: torch.Tensor, v: torch.Tensor, bits: int) -> dict[float, tuple[float, float]]:
        """{τ: (best scale, its error)} for one batch.

        The grid and Brent's refinement score a quarter of the rows budget (the sharpest rows plus a sample); the
        three best grid points and the refined scale are then scored on the full budget, which picks the winner."""
        lower, upper = agq_search_bounds(float(a.detach().max()))
        a3, v3, weights = self.rows(a, v)
        scored = (a3, v3, a3 @ v3, weights)
        a3, v3, weights = self.rows(a, v, max(1, self.max_elements // 4))
        coarse_scored = (a3, v3, a3 @ v3, weights)
        out = {}
        for tau in self.taus:
            if not upper > lower:
                out[tau] = (upper, float(self.errors(scored, torch.tensor([upper], dtype=torch.float64), tau, bits)))
                continue
            n = max(2, math.ceil(math.log2(upper / lower) * tau * self.points_per_period) + 1)
            grid = torch.logspace(math.log10(lower), math.log10(upper), n, dtype=torch.float64)
            coarse_errors = self.errors(coarse_scored, grid, tau, bits)
            i = int(coarse_errors.argmin())

            def coarse_err(s: float, tau=tau, coarse_scored=coarse_scored) -> float:
                return float(self.errors(coarse_scored, torch.tensor([s], dtype=torch.float64), tau, bits)[0])

            s, _ = bounded_minimize(coarse_err, float(grid[max(i - 1, 0)]), float(grid[min(i + 1, n - 1)]),
                                    xatol=1e-3 * float(grid[i]))
            finalists = torch.cat([grid[torch.topk(-coarse_errors, min(3, n)).indices],
                                   torch.tensor([s], dtype=torch.float64)])
            errors = self.errors(scored, finalists, tau, bits)
            best = int(errors.argmin())
            out[tau] = (float(finalists[best]), float(errors[best]))
        return out

    def observe(self, a: torch.Tensor, v: torch.Tensor, bits: int) -> None:
        best = self.batch_best(a, v, bits)
        if self._pieces is not None:
            self._pieces.append((best, a.numel()))
        else:
            self._add(best)

    def _add(self, best: dict[float, tuple[float, float]]) -> None:
        for tau, (s, e) in best.items():
            self.scale_sum[tau] += s
            self.error_sum[tau] += e
        self.batches += 1

    def choose(self) -> tuple[float, float]:
        """(τ, scale): the τ with the smallest summed error and its batch-averaged scale."""
        if not self.seen:
            raise SaqError("observer saw no data")
        tau = min(self.taus, key=lambda t: self.error_sum[t])  # ties: the first (coarsest) τ
        return tau, self.scale_sum[tau] / self.batches
