"""The math of fake quantization: grids, range → (scale, zero-point), uniform and log2 rounding, Lp error, Brent search."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Smallest scale we allow; torch's own observers use the same floor so that a constant tensor still has a grid.
SCALE_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QuantGrid:
    """The integer codes of a b-bit quantizer: [0, 2^b - 1] (asymmetric) or [-2^(b-1), 2^(b-1) - 1] (symmetric)."""

    bits: int
    symmetric: bool = False

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward, gradient multiplied by `factor` backward (LSQ's step-size gradient scaling)."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())  # exactly x forward ((x - x·f) + x·f can miss it by an ulp)


def channel_view(t: torch.Tensor, ndim: int, ch_axis: int | None) -> torch.Tensor:
    """Shape a per-channel parameter so that it broadcasts along `ch_axis` of an ndim tensor (as is, per tensor)."""
    if ch_axis is None or t.ndim == 0:
        return t
    shape = [1] * ndim
    shape[ch_axis] = -1
    return t.reshape(shape)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point (float, integer-valued) for a clipping range (paper.md §2.2); the range always holds 0."""
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32, device=lo.device), min=0.0)
    if grid.symmetric:
        scale = torch.maximum(-lo, hi) / ((grid.qmax - grid.qmin) / 2)
        scale = torch.clamp(scale, min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (grid.qmax - grid.qmin), min=SCALE_EPS)
    zero_point = torch.clamp(grid.qmin - torch.round(lo / scale), grid.qmin, grid.qmax)
    return scale, zero_point


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: QuantGrid,
               ch_axis: int | None = None, keep_prob: float = 1.0) -> torch.Tensor:
    """x̂ = (clamp(round(x / s) + z, qmin, qmax) - z) · s with STE rounding; differentiable in x and s.

    x / s is computed as x · (1/s), the way torch.fake_quantize_per_*_affine does, so the two agree bit for bit.
    Without autograd the same arithmetic runs in place (several times faster than torch's fused CPU kernel); with
    autograd one fused function saves two tensors for a two-op backward (reconstruction's hot path).
    keep_prob < 1 is QDrop: each element is quantized with that probability, else passed in FP.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad) and not zero_point.requires_grad:
        return _FakeQuant.apply(x, scale, zero_point, grid.qmin, grid.qmax, ch_axis, keep_prob)
    scale = channel_view(scale, x.ndim, ch_axis)
    zero_point = channel_view(zero_point, x.ndim, ch_axis)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        out = x * (1.0 / scale)
        out = out.round_().add_(zero_point).clamp_(grid.qmin, grid.qmax).sub_(zero_point).mul_(scale)
        return out if keep_prob >= 1.0 else mix(x, out, keep_mask(x, keep_prob))
    code = round_ste(x * (1.0 / scale)) + zero_point
    # torch.clamp has zero gradient at the bounds; LSQ (and torch's learnable fake-quant) count codes equal to
    # qmin/qmax as inside the grid, so clip by hand: clipped codes are constants
    inside = (code >= grid.qmin) & (code <= grid.qmax)
    code = torch.where(inside, code, torch.clamp(code.detach(), grid.qmin, grid.qmax))
    out = (code - zero_point) * scale
    return out if keep_prob >= 1.0 else mix(x, out, keep_mask(x, keep_prob))


def _reduce_to(grad: torch.Tensor, shape: torch.Size, ch_axis: int | None) -> torch.Tensor:
    """Sum a per-element gradient down to a (per-tensor or per-channel) parameter's shape."""
    if len(shape) == 0 or ch_axis is None:
        return grad.sum().reshape(shape)
    axis = ch_axis % grad.ndim
    return grad.sum(dim=[d for d in range(grad.ndim) if d != axis]).reshape(shape)


def keep_mask(like: torch.Tensor, prob: float) -> torch.Tensor:
    """QDrop's mask: 1.0 with probability `prob`, else 0.0, shaped and typed like `like`. When prob is a multiple of
    1/256 (QDrop's 0.5) it compares random bytes, 4x faster than torch.rand on CPU; otherwise uniform floats."""
    levels = prob * 256
    if levels == int(levels) and levels < 256:  # a byte is below 256 always: lt(256) on uint8 would wrap to none
        count = (like.numel() + 7) // 8
        raw = torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, device=like.device).view(torch.uint8)
        return raw[: like.numel()].lt(int(levels)).to(like.dtype).view(like.shape)
    return torch.rand_like(like).lt_(prob)


def mix(fp: torch.Tensor, quantized: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """quantized where keep is 1, fp where it is 0: exactly torch.where(keep, quantized, fp) for finite values (lerp
    with weights 0 and 1 returns its ends), several times faster on CPU."""
    return torch.lerp(fp, quantized, keep)


class _FakeQuant(torch.autograd.Function):
    """Uniform fake quantization with the gradients of fake_quant's reference graph, computed in one pass:
    d x̂/dx = 1 inside the grid (STE), 0 outside; d x̂/ds = round(x/s) - x/s inside, code - z outside (LSQ).
    With dropping, FP elements pass their gradient to x and none to s."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, ch_axis, keep_prob):
        s = channel_view(scale, x.ndim, ch_axis)
        z = channel_view(zero_point, x.ndim, ch_axis)
        v = x * (1.0 / s)
        rounded = v.round()
        code = rounded + z
        inside = (code >= qmin) & (code <= qmax)
        shifted = code.clamp_(qmin, qmax).sub_(z)
        out = shifted * s
        ds = torch.lerp(shifted, rounded.sub_(v), inside.to(x.dtype)) if ctx.needs_input_grad[1] else None
        if keep_prob < 1.0:
            keep = keep_mask(x, keep_prob)
            out = mix(x, out, keep)
            inside = (~inside).to(x.dtype).mul_(keep).neg_().add_(1.0)  # dropped elements pass their gradient
            if ds is not None:
                ds.mul_(keep)
        ctx.ch_axis, ctx.scale_shape = ch_axis, scale.shape
        ctx.save_for_backward(inside, ds)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = _reduce_to(grad * ds, ctx.scale_shape, ctx.ch_axis) if ds is not None else None
        return grad_x, grad_s, None, None, None, None, None


def log2_fake_quant(a: torch.Tensor, scale: torch.Tensor, tau: float, bits: int, ste: bool = True,
                    keep_prob: float = 1.0) -> torch.Tensor:
    """PTQ4SAM's log quantizer: code = clamp(round(-τ·log2(a/s)), 0, 2^b - 1), â = s·2^(-code/τ); codes that round to
    2^b or more (tiny values) flush to 0. A zero is first raised to the smallest normal float, so it flushes at 4-6
    bits; at 7-8 bits its code can stay below 2^b and â(0) is ~1e-38 instead of 0 (negligible). Without autograd the
    same arithmetic runs in place; with autograd and STE one fused function does it (reconstruction's hot path).
    keep_prob < 1: QDrop, as in fake_quant."""
    tiny = torch.finfo(a.dtype).tiny  # log2(0) would give inf codes and NaN gradients
    levels = 2**bits
    if torch.is_grad_enabled() and (a.requires_grad or scale.requires_grad) and ste:
        return _Log2FakeQuant.apply(a, scale, float(tau), levels, keep_prob)
    if not (torch.is_grad_enabled() and (a.requires_grad or scale.requires_grad)):
        code = (torch.clamp(a, min=tiny) / scale).log2_().mul_(-tau).round_()
        flushed = code >= levels
        a_hat = code.clamp_(0, levels - 1).div_(-tau).exp2_().mul_(scale)
        a_hat = a_hat.masked_fill_(flushed, 0.0)
        return a_hat if keep_prob >= 1.0 else mix(a, a_hat, keep_mask(a, keep_prob))
    exponent = -tau * torch.log2(torch.clamp(a, min=tiny) / scale)
    code = exponent.round()
    if ste:
        code = (code - exponent).detach() + exponent
    keep = code.detach() < levels
    a_hat = scale * torch.exp2(torch.clamp(code, 0, levels - 1) / -tau)
    a_hat = torch.where(keep, a_hat, torch.zeros_like(a_hat))
    return a_hat if keep_prob >= 1.0 else mix(a, a_hat, keep_mask(a, keep_prob))


class _Log2FakeQuant(torch.autograd.Function):
    """log2_fake_quant with STE, the gradients of its reference graph in one pass. torch.clamp passes no gradient
    at its bounds (since torch 2.14; the official code's older torch passed it: measured worse here, see README), so:
    codes strictly inside (0, 2^b - 1) give dâ/da = â/a and dâ/ds = 0 (â follows a); codes at or beyond a bound give
    dâ/da = 0 and dâ/ds = â/s; flushed codes give 0."""

    @staticmethod
    def forward(ctx, a, scale, tau, levels, keep_prob):
        tiny = torch.finfo(a.dtype).tiny
        clamped = torch.clamp(a, min=tiny)
        code = (clamped / scale).log2_().mul_(-tau).round_()
        flushed = code >= levels
        inside = (code > 0) & (code < levels - 1)
        power = code.clamp_(0, levels - 1).div_(-tau).exp2_().mul_(~flushed)  # 2^(-code/τ), 0 where flushed
        a_hat = power * scale
        # a_hat / clamped is finite (clamped >= tiny); inputs below tiny get no gradient, flushed or not (at 7-8 bits
        # a zero's code can stay below 2^b)
        grad_a = (a_hat / clamped).mul_(inside & (a >= tiny)) if ctx.needs_input_grad[0] else None
        grad_s = power.mul_(~inside) if ctx.needs_input_grad[1] else None  # â/s at the bounds
        if keep_prob < 1.0:
            keep = keep_mask(a, keep_prob)
            a_hat = mix(a, a_hat, keep)
            if grad_a is not None:
                grad_a = torch.addcmul(1.0 - keep, keep, grad_a)  # dropped elements pass their gradient
            if grad_s is not None:
                grad_s.mul_(keep)
        ctx.scale_shape = scale.shape
        ctx.save_for_backward(grad_a, grad_s)
        return a_hat

    @staticmethod
    def backward(ctx, grad):
        grad_a, grad_s = ctx.saved_tensors
        ga = grad * grad_a if grad_a is not None else None
        gs = (grad * grad_s).sum().reshape(ctx.scale_shape) if grad_s is not None else None
        return ga, gs, None, None, None


def fake_quant_range(x: torch.Tensor, lo, hi, grid: QuantGrid, ch_axis: int | None = None) -> torch.Tensor:
    """Fake-quantize x on the grid spanning [lo, hi] (no gradient needed; used by range searches)."""
    scale, zero_point = qparams_from_range(lo, hi, grid)
    return fake_quant(x, scale.to(x.device), zero_point.to(x.device), grid, ch_axis)


def abs_pow_(t: torch.Tensor, p: float) -> torch.Tensor:
    """|t|^p in place for tensors that need no gradient; exp(p·log|t|) runs about twice as fast as pow on CPU."""
    return t.abs_().log_().mul_(p).exp_()


def lp_error(x_hat: torch.Tensor, x: torch.Tensor, p: float, dim=None) -> torch.Tensor:
    """Mean |x̂ - x|^p (over `dim`, or everything)."""
    diff = x_hat - x
    err = diff.abs().pow(p) if diff.requires_grad else abs_pow_(diff, p)
    return err.mean() if dim is None else err.mean(dim)


def bounded_minimize(f: Callable[[float], float], lower: float, upper: float, xatol: float = 1e-5,
                     max_evals: int = 500) -> tuple[float, float]:
    """The minimum of f on [lower, upper] by Brent's bounded search (scipy's minimize_scalar, method 'bounded': the
    search the paper's observers use); returns (x, f(x)). f gets python floats."""
    from scipy.optimize import minimize_scalar

    a, b = float(lower), float(upper)
    if not b > a:
        return a, f(a)
    result = minimize_scalar(lambda x: f(float(x)), bounds=(a, b), method="bounded",
                             options={"xatol": xatol, "maxiter": max_evals})
    return float(result.x), float(result.fun)
