"""Perceptual-Consistency Clipping (SAQ-SAM, paper.md §3): decoder q/k ranges that keep the FP attention's focus.

Clip ranges are chosen by how well the quantized attention keeps the FP attention's focus, searched greedily over
percentile candidates on the first calibration image(s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from saq.clipping.base import RangeStrategy, percentile_list
from saq.clipping.percentile import tail_quantiles
from saq.errors import SaqError, check_int, is_number

# The official code's 29 percentile levels (paper.md §3.3): candidate ranges are [q(1 - p), q(p)].
PAPER_CANDIDATES = (0.85, 0.87, 0.88, 0.89, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.960, 0.965, 0.970, 0.975, 0.980,
                    0.983, 0.985, 0.987, 0.989, 0.99, 0.993, 0.995, 0.997, 0.999, 0.9993, 0.9995, 0.9997, 0.9999,
                    0.99999)
POINTS = ("q_in", "k_in", "q_out", "k_out")  # the official greedy order within one attention
FOCUS_MAX = ("row", "map")  # the max that θ scales: per query row (official code) or over the whole map
OTHER_STRATEGIES = ("minmax", "percentile", "mse")


def focus_mask(attn: torch.Tensor, theta: float, focus_max: str = "row") -> torch.Tensor:
    """The attention-focus mask 1[A > θ·max A], with the max per query row or over each (prompt, head) map."""
    peak = attn.amax(-1, keepdim=True) if focus_max == "row" else attn.amax((-2, -1), keepdim=True)
    return attn > theta * peak


def focus_iou(reference: torch.Tensor, attn: torch.Tensor, theta: float, focus_max: str = "row") -> torch.Tensor:
    """IoU of the focus masks of two (..., Nq, Nk) maps, one value per leading index (prompt, head)."""
    a, b = focus_mask(reference, theta, focus_max), focus_mask(attn, theta, focus_max)
    inter = (a & b).sum((-2, -1)).double()
    union = (a | b).sum((-2, -1)).double()
    return inter / (union + 1e-6)


def pcc_distance(references: Sequence[torch.Tensor], maps: Sequence[torch.Tensor], theta: float,
                 focus_max: str = "row") -> float:
    """1 - IoU of the focus masks, averaged over every (prompt, head) of every map pair (paper.md §3.2)."""
    ious = torch.cat([focus_iou(r, m, theta, focus_max).flatten() for r, m in zip(references, maps)])
    return float(1.0 - ious.mean())


@dataclass
class SearchedPoint:
    """What the search found for one quantization point, with the baselines it replaced (for results.json)."""

    name: str  # the quantizer's module path
    attention: str
    point: str  # q_in | k_in | q_out | k_out
    fp_min: float
    fp_max: float
    mse_lo: float
    mse_hi: float
    pcc_lo: float
    pcc_hi: float
    percentile: float
    dist_minmax: float  # PCC distance with the unclipped range, others as searched so far
    dist_mse: float  # ... with the range MSE would choose
    dist_pcc: float  # ... with the chosen range
    curve: list[float] = field(default_factory=list)  # distance per candidate, in candidate order (last sweep)
    histogram: tuple[list[float], list[float]] | None = None  # (counts, edges) of the input (for the figure)

    @property
    def clip_ratio(self) -> float:
        """How many times narrower the chosen range is than the input's full range."""
        return (self.fp_max - self.fp_min) / max(self.pcc_hi - self.pcc_lo, 1e-12)

    def record(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "attention", "point", "fp_min", "fp_max", "mse_lo", "mse_hi",
                                             "pcc_lo", "pcc_hi", "percentile", "dist_minmax", "dist_mse",
                                             "dist_pcc", "curve")}  # curve: distance per candidate, last sweep
        out["clip_ratio"] = self.clip_ratio
        return out


@dataclass
class ClippingReport:
    """The outcome of a point search: the searched points, the quantizers it fixed, the time, figure data."""

    method: str
    settings: dict
    points: list[SearchedPoint]
    frozen: list = field(default_factory=list)  # quantizers whose range the search fixed
    seconds: float = 0.0
    candidates: tuple[float, ...] = ()
    heatmaps: dict | None = None  # {"attention", "prompt", "fp", "mse", "pcc"}: token->image maps for one prompt

    def record(self) -> dict:
        return {"method": self.method, "settings": self.settings, "seconds": round(self.seconds, 2),
                "points": [p.record() for p in self.points]}


class PerceptualConsistencyClipping(RangeStrategy):
    """PCC: for each searched decoder attention, in forward order, and each of its q·kᵀ points in `points` order, try
    every candidate percentile pair on the point's input and keep the one whose attention map keeps the FP focus best;
    the winner stays on while the next point is searched (greedy coordinate descent), `sweeps` times over.

    Every other activation gets its range from `others` (MSE by default, as SAQ-SAM★), per batch like any strategy.
    """

    name = "pcc"

    def __init__(self, theta: float = 0.5, candidates: Sequence[float] = PAPER_CANDIDATES, focus_max: str = "row",
                 points: Sequence[str] = POINTS, attentions: str | Sequence[str] = "all", sweeps: int = 2,
                 images: int = 1, others: str = "mse"):
        if not (is_number(theta) and 0 < theta < 1):
            raise SaqError(f"clip.theta={theta!r} invalid; expected a number in (0, 1) (paper: 0.5)")
        candidates = percentile_list(candidates, "clip.candidates", "paper: 29 levels from 0.85 to 0.99999")
        if focus_max not in FOCUS_MAX:
            raise SaqError(f"clip.focus_max={focus_max!r} is unknown; expected one of {list(FOCUS_MAX)}")
        if not (isinstance(points, (list, tuple)) and points and all(p in POINTS for p in points)
                and len(set(points)) == len(points)):
            raise SaqError(f"clip.points={points!r} invalid; expected distinct names from {list(POINTS)}")
        points = list(points)
        if isinstance(attentions, (list, tuple)) and not attentions:
            raise SaqError("clip.attentions is empty; expected 'all' or a list of decoder attention names")
        if attentions != "all" and not (isinstance(attentions, (list, tuple))
                                        and all(isinstance(a, str) for a in attentions)):
            raise SaqError(f"clip.attentions={attentions!r} invalid; expected 'all' or a list of decoder "
                           "attention names such as layers.0.cross_attn_token_to_image")
        attentions = attentions if attentions == "all" else list(attentions)
        for key, value in (("sweeps", sweeps), ("images", images)):
            check_int(value, f"clip.{key}")
        if others not in OTHER_STRATEGIES:
            raise SaqError(f"clip.others={others!r} is unknown; expected one of {list(OTHER_STRATEGIES)}")
        from saq.clipping import CLIPPING

        self.theta, self.candidates, self.focus_max = float(theta), [float(c) for c in candidates], focus_max
        self.points, self.attentions, self.sweeps, self.images = points, attentions, sweeps, images
        self.others = CLIPPING[others]()

    def describe(self) -> str:
        # observers holding this strategy are the non-searched activations: their batches get `others`' ranges
        # (the searched points are relabelled when their range is fixed)
        return self.others.describe()

    def batch_range(self, x: torch.Tensor, grid, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.others.batch_range(x, grid, ch_axis)

    @property
    def union_by_extremes(self) -> bool:
        return self.others.union_by_extremes

    def settings(self) -> dict:
        return {"theta": self.theta, "candidates": self.candidates, "focus_max": self.focus_max,
                "points": self.points, "attentions": self.attentions, "sweeps": self.sweeps, "images": self.images,
                "others": self.others.describe()}

    # -- the search ----------------------------------------------------------------------------------------------
    def check_quant_config(self, cfg) -> None:
        """The search runs on the quantized decoder's attentions and sets per-tensor ranges."""
        if not cfg.decoder.enabled:
            raise SaqError("clip=pcc searches the quantized mask decoder's attention ranges, but "
                           "quant.decoder.enabled=false; enable the decoder or choose another clip=")
        if cfg.decoder.act.granularity != "per_tensor":
            raise SaqError(f"clip=pcc searches per-tensor ranges, but quant.decoder.act.granularity="
                           f"{cfg.decoder.act.granularity}; set it to per_tensor or choose another clip=")

    def check_targets(self, names: Sequence[str]) -> None:
        """Fail before any compute when clip.attentions names an attention the model does not have."""
        if self.attentions == "all":
            return
        for name in self.attentions:
            if name not in names:
                raise SaqError(f"clip.attentions names {name!r}, which is not a decoder attention; expected some of "
                               f"{list(names)}")

    def search(self, probes: Sequence, decoders: Sequence[Callable[[], None]], progress: bool = True
               ) -> ClippingReport:
        """Run the search. probes: the decoder attentions (saq.sam.attention.AttentionProbe); decoders: one callable
        per calibration image, each running the decoder over that image's prompts with the quantizers as they are.
        Every quantizer is expected off; the searched points end quantizing with their ranges fixed."""
        from tqdm import tqdm

        self.check_targets([p.name for p in probes])
        selected = [p for p in probes if self.attentions == "all" or p.name in self.attentions]
        decoders = list(decoders)[: self.images]
        start = time.perf_counter()
        reference = self._record(selected, decoders)  # FP maps: nothing is quantizing yet
        reference_maps = {name: rec.maps for name, rec in reference.items()}
        del reference  # its recorded inputs (every attention's, all prompts) are recorded again per probe below
        found: dict[str, SearchedPoint] = {}
        steps = self.sweeps * len(selected) * len(self.points)
        with tqdm(total=steps, desc="pcc search", disable=not progress, leave=False) as bar:
            for sweep in range(self.sweeps):
                for probe in selected:
                    inputs = self._record([probe], decoders)[probe.name].inputs
                    for point in self.points:
                        quantizer = probe.points[point]
                        found[quantizer.name or f"{probe.name}.{point}"] = self._search_point(
                            probe, point, quantizer, inputs, reference_maps[probe.name], last=sweep == self.sweeps - 1)
                        bar.update()
        report = ClippingReport("pcc", self.settings(), list(found.values()),
                                [p.points[q] for p in selected for q in self.points],
                                time.perf_counter() - start, tuple(self.candidates))
        report.heatmaps = self._heatmaps(selected, decoders, report, reference_maps)
        return report

    @staticmethod
    def _record(probes: Sequence, decoders: Sequence[Callable[[], None]]) -> dict:
        with ExitStack() as stack:
            recordings = {p.name: stack.enter_context(p.record()) for p in probes}
            with torch.no_grad():
                for decode in decoders:
                    decode()
        return recordings

    def _search_point(self, probe, point: str, quantizer, inputs, references, last: bool) -> SearchedPoint:
        if getattr(quantizer, "ch_axis", None) is not None:
            raise SaqError(f"PCC searches per-tensor ranges, but {quantizer.name} is per-channel "
                           "(set quant.decoder.act.granularity=per_tensor)")
        seen: list[torch.Tensor] = []
        handle = quantizer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        try:
            with torch.no_grad():
                self._maps(probe, inputs)
        finally:
            handle.remove()
        flat = torch.cat([x.reshape(-1) for x in seen]).float()
        highs = tail_quantiles(flat, self.candidates)
        lows = tail_quantiles(flat, [1.0 - c for c in self.candidates])

        def distance(lo, hi) -> float:
            quantizer.freeze_range(lo, hi)
            with torch.no_grad():
                return pcc_distance(references, self._maps(probe, inputs), self.theta, self.focus_max)

        curve = [distance(lo, hi) for lo, hi in zip(lows, highs)]
        best = min(range(len(curve)), key=curve.__getitem__)  # ties: the first, i.e. the tightest clip
        fp_min, fp_max = (float(v) for v in torch.aminmax(flat))
        mse_lo, mse_hi = (float(v) for v in self.others_mse_range(flat, quantizer.grid))
        result = SearchedPoint(quantizer.name, probe.name, point, fp_min, fp_max, mse_lo, mse_hi,
                               float(lows[best]), float(highs[best]), self.candidates[best],
                               distance(fp_min, fp_max), distance(mse_lo, mse_hi), curve[best],
                               curve if last else [])
        if last:
            counts, edges = np.histogram(flat.cpu().numpy(), bins=200)
            result.histogram = (counts.tolist(), edges.tolist())
        quantizer.freeze_range(lows[best], highs[best])
        quantizer.observer.relabel(f"pcc(theta={self.theta:g},pct={self.candidates[best]:g})")
        return result

    @staticmethod
    def others_mse_range(x: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        from saq.clipping.mse import MSEClipping

        return MSEClipping().batch_range(x, grid, None)

    @staticmethod
    def _maps(probe, inputs) -> list[torch.Tensor]:
        return [probe.attention_map(q, k) for q, k in inputs]

    def _heatmaps(self, probes, decoders, report: ClippingReport, references: dict) -> dict | None:
        """Token->image maps of one prompt (its mask token, heads averaged) for FP, MSE-clipped and PCC-clipped q/k
        points: the attention among the searched token->image ones whose focus PCC kept best against MSE."""
        gains: dict[str, float] = {}
        for p in report.points:
            if "token_to_image" in p.attention:
                gains[p.attention] = gains.get(p.attention, 0.0) + p.dist_mse - p.dist_pcc
        if not gains:
            return None
        name = max(gains, key=gains.get)
        probe = next(p for p in probes if p.name == name)

        def mask_token_map(maps: list[torch.Tensor]) -> list[list[float]]:
            row = maps[0][0, :, 1].mean(0)  # prompt 0, query 1 = the single-mask output token, mean over heads
            side = int(round(row.numel() ** 0.5))
            return row.reshape(side, side).tolist()

        out = {"attention": name, "prompt": 0, "fp": mask_token_map(references[name])}
        out["pcc"] = mask_token_map(self._record([probe], decoders[:1])[name].maps)
        chosen = {p.name: (p.pcc_lo, p.pcc_hi) for p in report.points}
        for quantizer in report.frozen:
            point = next(p for p in report.points if p.name == quantizer.name)
            quantizer.freeze_range(point.mse_lo, point.mse_hi)
        try:
            out["mse"] = mask_token_map(self._record([probe], decoders[:1])[name].maps)
        finally:
            for quantizer in report.frozen:
                quantizer.freeze_range(*chosen[quantizer.name])
        return out
