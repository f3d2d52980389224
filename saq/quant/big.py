"""PTQ4SAM's BIG: find bimodal key activations by KDE peaks, fold per-channel signs into the q/k projections."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# PTQ4SAM's detection constants: KDE evaluation points, minimum peak height (fraction of the density's sum) and
# minimum spacing between peaks (in evaluation points)
GLOBAL_NUM = 128
PEAK_HEIGHT = 0.01
PEAK_DISTANCE = 32


def gaussian_kde(samples: torch.Tensor, points: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """1-D Gaussian KDE with Scott's bandwidth (std·n^(-1/5), scipy.stats.gaussian_kde's default) at `points`."""
    samples = samples.reshape(-1).double()
    n = samples.numel()
    bandwidth = float(samples.std(unbiased=True)) * n ** (-1 / 5)
    if not bandwidth > 0:
        return torch.zeros_like(points, dtype=torch.float64)
    out = []
    for start in range(0, points.numel(), chunk):
        z = (points[start:start + chunk].double()[:, None] - samples[None]) / bandwidth
        out.append(torch.exp(-0.5 * z * z).mean(1))
    return torch.cat(out) / (bandwidth * math.sqrt(2 * math.pi))


def count_modes(values: torch.Tensor) -> int:
    """Number of KDE peaks of the flattened values, with PTQ4SAM's constants."""
    values = values.detach().reshape(-1).float()
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return 1
    density = gaussian_kde(values, torch.linspace(lo, hi, GLOBAL_NUM, device=values.device)).tolist()
    from scipy.signal import find_peaks  # here: scipy is slow to import and most tools never count modes

    peaks, _ = find_peaks(np.asarray(density), height=PEAK_HEIGHT * sum(density), distance=PEAK_DISTANCE)
    return len(peaks)


@torch.no_grad()
def fold_channel_signs(query: nn.Linear, key: nn.Linear, gamma: torch.Tensor) -> None:
    """Multiply output channel j of both projections (weight row and bias) by gamma_j ∈ {-1, +1}."""
    for layer in (query, key):
        layer.weight.mul_(gamma.to(layer.weight)[:, None])
        if layer.bias is not None:
            layer.bias.mul_(gamma.to(layer.bias))


@dataclass
class BigResult:
    """What BIG found in one attention: the peak count of its first prompt's keys and the channels it flipped."""

    name: str
    peaks: int
    flipped: list[int] = field(default_factory=list)

    @property
    def bimodal(self) -> bool:
        return self.peaks == 2


class _KeyRecorder:
    """Forward hook on a key projection: keeps K[0] of the first call and per-channel sums over every call."""

    def __init__(self):
        self.first: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module, inputs, output):
        k = output.detach().float()
        if self.first is None:
            self.first = k[0].clone()
        flat = k.reshape(-1, k.shape[-1])
        self.sum = flat.sum(0) if self.sum is None else self.sum + flat.sum(0)
        self.count += flat.shape[0]


def apply_big(model: nn.Module, run_first_sample: Callable[[], None]) -> list[BigResult]:
    """Detect and fold, for every module that declares `big_sign_fold = True` and a sign_fold_pair().

    run_first_sample runs the FP forward of calibration sample 0 (all prompts). A key tensor is bimodal when its first
    prompt's values have exactly two KDE peaks; then γ_j = sign(mean over prompts and tokens of K[:, j]) is folded.
    """
    targets = [(name, m) for name, m in model.named_modules() if getattr(m, "big_sign_fold", False)]
    recorders, handles = {}, []
    for name, module in targets:
        recorders[name] = _KeyRecorder()
        handles.append(module.sign_fold_pair()[1].register_forward_hook(recorders[name]))
    try:
        run_first_sample()
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for name, module in targets:
        rec = recorders[name]
        if rec.first is None:
            continue  # the sample never reached this attention (no prompts); calibrate() rejects such samples
        result = BigResult(name, count_modes(rec.first))
        if result.bimodal:
            gamma = torch.where(rec.sum / rec.count < 0, -1.0, 1.0)
            result.flipped = torch.nonzero(gamma < 0).flatten().tolist()
            fold_channel_signs(*module.sign_fold_pair(), gamma)
        results.append(result)
    return results
