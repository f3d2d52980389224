"""Reconstruction losses: unit-output MSE (QDrop / BRECQ), PAR's response losses, AdaRound's rounding regulariser."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from saq.quant.quantizers import AdaRoundQuantizer
from saq.recon.config import ReconConfig, RoundingRegularizer

Response = Callable[[tuple, object], tuple]  # (unit output, sample data) → what PAR compares downstream (tensors)


def squared_error(out: torch.Tensor, target: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """‖out - target‖² summed over channels, averaged over every other dim (tokens, prompts, pixels)."""
    return (out - target).square().sum(channel_dim).mean()


class UnitLoss:
    """β·Σ_i w_i·‖out_i - target_i‖² + Σ_j a_j·‖response(out)_j - response_target_j‖² (response terms when used).

    One class serves both methods: QDrop's block MSE is output weights of 1 and no response; PAR's encoder loss is
    the response through the FP neck and two-way transformer (layer skipping) with output weight 0; PAR's decoder
    loss is 0.01·queries + 1·keys plus the response of the later FP decoder (α·tokens hs, and with
    recon.par_loss.mask_weight the mask head's probabilities).
    """

    def __init__(self, output_weights: dict[int, float], channel_dims: Sequence[int], response: Response | None = None,
                 response_weights: Sequence[float] = (1.0,), beta: float = 1.0):
        self.output_weights = {i: w for i, w in output_weights.items() if w != 0.0}
        self.channel_dims = tuple(channel_dims)
        self.response = response
        self.response_weights = tuple(response_weights)
        self.beta = beta

    @property
    def uses_response(self) -> bool:
        return self.response is not None and any(w != 0.0 for w in self.response_weights)

    def __call__(self, out: tuple, target: tuple, data, response_target: tuple | None,
                 response_from: tuple | None = None) -> torch.Tensor:
        """`response_from`: the unit output the response is computed from, when not `out` (recon.response_input)."""
        loss = out[0].new_zeros(())
        for i, weight in self.output_weights.items():
            loss = loss + self.beta * weight * squared_error(out[i], target[i], self.channel_dims[i])
        if self.uses_response:
            for weight, got, want in zip(self.response_weights,
                                         self.response(out if response_from is None else response_from, data),
                                         response_target):
                if weight != 0.0:
                    loss = loss + weight * squared_error(got, want)
        return loss


def unit_loss(cfg: ReconConfig, step, probe: Response, downstream: Response | None) -> UnitLoss:
    """The loss of one unit: recon.loss=mse → output MSE everywhere; par → interaction loss on encoder units (layer
    skipping probe), unit + response loss on decoder layers, output MSE on the neck and the final attention (plus the
    mask response with recon.par_loss.mask_weight). `downstream` gives (hs,) or, with mask_weight, (hs, masks)."""
    dims = step.channel_dims
    # QDrop's official loss sums over dim 1 whatever it holds (a ViT block's rows of tokens, a decoder unit's tokens)
    mse_dims = (1,) * len(dims) if cfg.mse_sum == "dim1" else dims
    mse = UnitLoss({i: 1.0 for i in step.compared}, mse_dims)
    par = cfg.par_loss
    if cfg.loss == "mse" or step.response is None or (step.response == "masks" and par.mask_weight == 0.0):
        return mse
    if step.response == "probe":
        return UnitLoss({0: par.encoder_output_weight}, dims, probe, (par.alpha,))  # β weighs decoder unit terms only
    if step.response == "masks":  # the unit's output is hs itself: compare it once, as an output
        return UnitLoss(mse.output_weights, mse_dims, downstream, (0.0, par.mask_weight))
    weights = {0: par.query_weight, 1: par.key_weight}
    return UnitLoss({i: weights[i] for i in step.compared}, dims, downstream, (par.alpha, par.mask_weight), par.beta)


def rounding_regularizer(quantizers: Sequence[AdaRoundQuantizer], reg: RoundingRegularizer, it: int,
                         iters: int) -> torch.Tensor | None:
    """λ·Σ(1 - |2h(α) - 1|^b) at iteration `it` of `iters`; None while off (λ = 0 or warm-up, as in BRECQ)."""
    warm = reg.warm_up * iters
    if reg.weight == 0.0 or not quantizers or it < warm:
        return None
    progress = (it - warm) / max(1.0, iters - warm)
    b = reg.b_end + (reg.b_start - reg.b_end) * max(0.0, 1.0 - progress)
    total = sum((1 - (2 * q.rectified_sigmoid() - 1).abs().pow(b)).sum() for q in quantizers)
    return reg.weight * total
