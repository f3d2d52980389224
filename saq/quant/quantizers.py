"""Fake quantizers with one explicit state each (off / observing / quantizing): uniform affine, LSQ, AdaRound, log2-AGQ."""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import nn

from saq.errors import SaqError, is_int
from saq.quant.grid import (
    QuantGrid,
    channel_view,
    fake_quant,
    grad_scale,
    keep_mask,
    log2_fake_quant,
    mix,
    qparams_from_range,
)
from saq.quant.observers import AGQObserver, Observer

MIN_BITS, MAX_BITS = 2, 8


class QuantState(str, Enum):
    """What a quantizer does with its input."""

    OFF = "off"  # pass-through: the model computes in FP
    OBSERVE = "observe"  # pass-through while the observer records ranges
    QUANT = "quant"  # fake-quantize with the calibrated parameters


def check_bits(bits, config_key: str = "bits") -> int:
    """bits as an int in [MIN_BITS, MAX_BITS], or SaqError naming config_key."""
    if not is_int(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise SaqError(f"{config_key}={bits!r} is not allowed; expected an integer from {MIN_BITS} to {MAX_BITS}")
    return bits


class Quantizer(nn.Module):
    """Base class. forward() obeys `state`; subclasses define observe() and quantize().

    Tensors that hold calibrated parameters are registered buffers/parameters, so a state_dict carries them; their
    shapes are known only after calibration, so loading resizes them to what the state dict holds.
    """

    kind = "act"  # "weight" or "act"; set by the factory
    uses_partner = False  # True when observing needs the other matmul operand (AGQ needs V)

    def __init__(self, bits: int, config_key: str = "quant"):
        super().__init__()
        self.bits = check_bits(bits, f"{config_key}.bits")
        self.config_key = config_key
        self.name = ""  # the module path, filled in by quantize(); used in messages and the summary
        self._state = QuantState.OFF
        # QDrop: the probability that an element is quantized (the rest pass in FP). 1.0 = always quantized; lower
        # only inside reconstruction (saq.recon) or the labelled paper-compatible evaluation; a python float, never
        # saved, so a loaded model always quantizes fully.
        self.drop_prob = 1.0
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    @property
    def state(self) -> QuantState:
        return self._state

    def cannot_quantize(self) -> str | None:
        """Why switching to QUANT now would fail, or None."""
        if self._state is QuantState.OBSERVE:
            if not self.observer_seen():
                return (f"quantizer {self.name or self.config_key} saw no data while observing; the calibration "
                        "samples never reached it")
        elif not bool(self.calibrated):
            return f"quantizer {self.name or self.config_key} cannot quantize: it was never calibrated"
        return None

    def set_state(self, state: QuantState | str) -> None:
        state = QuantState(state)
        if state is QuantState.OBSERVE and self._state is not QuantState.OBSERVE:
            self.reset_observer()
        if state is QuantState.QUANT:
            problem = self.cannot_quantize()
            if problem:
                raise SaqError(problem)
            if self._state is QuantState.OBSERVE:
                self.finish_observing()
                self.calibrated.fill_(True)
        self._state = state

    def forward(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> torch.Tensor:
        if self._state is QuantState.OFF:
            if self.drop_prob < 1.0:  # draw the mask it would have drawn: the quantizers after it keep theirs
                keep_mask(x, self.drop_prob)  # (a sensitivity row with this part in FP compares with the full one)
            return x
        if self._state is QuantState.OBSERVE:
            with torch.no_grad():
                if not bool(torch.isfinite(x).all()):  # one inf would make the range, and every later output, NaN
                    raise SaqError(f"quantizer {self.name or self.config_key}: its calibration input holds NaN or "
                                   "inf, so no range can be set (the FP model produces them there: check the "
                                   "checkpoint and the calibration images)")
                self.observe(x, partner)
            return x
        if self.drop_prob < 1.0:
            return self.quantize_dropping(x)
        return self.quantize(x)

    def quantize_dropping(self, x: torch.Tensor) -> torch.Tensor:
        """QDrop: each element quantized with probability drop_prob, else passed in FP."""
        return mix(x, self.quantize(x), keep_mask(x, self.drop_prob))

    # -- to implement ------------------------------------------------------------------------------------------------
    def reset_observer(self) -> None:
        raise NotImplementedError

    def observer_seen(self) -> bool:
        raise NotImplementedError

    def observe(self, x: torch.Tensor, partner: torch.Tensor | None) -> None:
        raise NotImplementedError

    def finish_observing(self) -> None:
        """Turn what the observer measured into quantization parameters."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """Row of the quant summary: quantizer type, bits, granularity, observer."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved_scale, calibrated = state_dict.get(prefix + "scale"), state_dict.get(prefix + "calibrated")
        if (getattr(self, "ch_axis", None) is not None and saved_scale is not None and saved_scale.ndim == 0
                and calibrated is not None and bool(calibrated)):  # a fresh per-channel scale is 0-d as well
            error_msgs.append(f"{prefix}scale holds one per-tensor step, but this quantizer is per channel (axis "
                              f"{self.ch_axis}): the state was saved with another granularity")
            return
        # calibrated shapes (per-channel scales, AdaRound's α) exist only after calibration: take the saved shape,
        # except where the quantizer's granularity rules it out (a per-tensor scale holds one value: torch then
        # reports the size mismatch instead of a per-channel state loading silently)
        for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
            key = prefix + name
            if tensor is not None and key in state_dict and state_dict[key].shape != tensor.shape:
                if name in ("scale", "zero_point") and getattr(self, "ch_axis", None) is None \
                        and state_dict[key].numel() != 1:
                    continue
                tensor.data = torch.empty_like(state_dict[key], device=tensor.device, dtype=tensor.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class UniformQuantizer(Quantizer):
    """Uniform affine fake quantization with STE rounding; per tensor (ch_axis None) or per channel on any axis."""

    type_name = "uniform"

    def __init__(self, bits: int, observer: Observer, symmetric: bool = False, ch_axis: int | None = None,
                 config_key: str = "quant"):
        super().__init__(bits, config_key)
        self.grid = QuantGrid(bits, symmetric)
        self.ch_axis = ch_axis
        self.observer = observer
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    # observing ----------------------------------------------------------------------------------------------------
    def axis_for(self, x: torch.Tensor) -> int | None:
        """The channel axis, made non-negative, or SaqError when it does not exist in x."""
        if self.ch_axis is None:
            return None
        if not -x.ndim <= self.ch_axis < x.ndim:
            raise SaqError(f"{self.config_key}.ch_axis={self.ch_axis} is out of range for {self.name or 'a tensor'} "
                           f"with {x.ndim} dims (allowed {-x.ndim}..{x.ndim - 1})")
        return self.ch_axis % x.ndim

    def reset_observer(self) -> None:
        self.observer.reset()

    def observer_seen(self) -> bool:
        return self.observer.seen

    def observe(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> None:
        self.observer.observe(x, self.grid, self.axis_for(x))

    def finish_observing(self) -> None:
        lo, hi = self.observer.range()
        self.set_range(lo, hi)

    def set_range(self, lo, hi) -> None:
        """Set scale and zero-point from a clipping range (also what clipping searches call)."""
        scale, zero_point = qparams_from_range(lo, hi, self.grid)
        with torch.no_grad():
            self.scale.data = scale.to(self.scale.device, self.scale.dtype).clone()
            self.zero_point.data = zero_point.to(self.zero_point.device, self.zero_point.dtype).clone()

    def freeze_range(self, lo, hi) -> None:
        """Quantize with [lo, hi] from now on: a range chosen by a search rather than observed (calibrate() then
        leaves this quantizer out of observing)."""
        self.set_range(lo, hi)
        self.calibrated.fill_(True)
        self._state = QuantState.QUANT

    def current_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The [lo, hi] the current scale and zero-point represent."""
        scale, zp = self.scale.detach(), self.zero_point.detach()
        return (self.grid.qmin - zp) * scale, (self.grid.qmax - zp) * scale

    # quantizing ---------------------------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.step(x), self.zero_point, self.grid, self.axis_for(x))

    def quantize_dropping(self, x: torch.Tensor) -> torch.Tensor:
        if type(self).quantize is not UniformQuantizer.quantize:  # AdaRound's own rounding: the generic way
            return super().quantize_dropping(x)
        return fake_quant(x, self.step(x), self.zero_point, self.grid, self.axis_for(x), keep_prob=self.drop_prob)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The scale used in forward (LSQ scales its gradient here)."""
        return self.scale

    def describe(self) -> dict:
        gran = "per_tensor" if self.ch_axis is None else f"per_channel({self.ch_axis})"
        sym = "sym" if self.grid.symmetric else "asym"
        return {"quantizer": f"{self.type_name}/{sym}", "bits": self.bits, "granularity": gran,
                "observer": self.observer.name}


class LSQQuantizer(UniformQuantizer):
    """Uniform quantizer with a learnable step (LSQ); zero-point fixed; step gradient scaled by 1/√(n·qmax)."""

    type_name = "lsq"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self._buffers["scale"]
        self.scale = nn.Parameter(torch.ones(()))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = x.numel() / max(1, self.scale.numel())
        return grad_scale(self.scale, 1.0 / math.sqrt(per_channel * self.grid.qmax))


class AdaRoundQuantizer(UniformQuantizer):
    """Weight quantizer with learnable rounding: ŵ = s·(clamp(floor(w/s) + h(α) + z, qmin, qmax) - z).

    mode 'nearest' (the default until reconstruction): round-to-nearest, the same as a UniformQuantizer.
    mode 'soft': h(α) = clamp(σ(α)(ζ - γ) + γ, 0, 1), after init_soft(w) set α so that h(α) = frac(w/s).
    mode 'hard': h = 1[α >= 0]; harden() returns that quantized weight, for writing back into the layer.
    """

    type_name = "adaround"
    ZETA, GAMMA = 1.1, -0.1
    MODES = ("nearest", "soft", "hard")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = nn.Parameter(torch.empty(0))  # sized by init_soft
        self.register_buffer("mode_index", torch.zeros((), dtype=torch.long))  # persisted copy of `mode`
        self.mode = "nearest"  # a python copy, so that forward never syncs with the device

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.mode = self.MODES[int(self.mode_index)]

    def set_mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise SaqError(f"AdaRound mode {mode!r} unknown; expected one of {list(self.MODES)}")
        if mode != "nearest" and self.alpha.numel() == 0:
            raise SaqError(f"AdaRound quantizer {self.name}: call init_soft(weight) before mode {mode!r}")
        self.mode_index.fill_(self.MODES.index(mode))
        self.mode = mode

    def _scaled(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        axis = self.axis_for(w)
        return (channel_view(self.scale, w.ndim, axis), channel_view(self.zero_point, w.ndim, axis),
                w / channel_view(self.scale, w.ndim, axis))

    def rectified_sigmoid(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    @torch.no_grad()
    def init_soft(self, w: torch.Tensor) -> None:
        """Create α with h(α) = frac(w/s) and switch to soft rounding (the start of AdaRound's optimisation)."""
        if not bool(self.calibrated):
            raise SaqError(f"AdaRound quantizer {self.name}: calibrate its range before init_soft")
        _, _, ws = self._scaled(w.detach())
        rest = ws - torch.floor(ws)
        self.alpha.data = -torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1)
        self.set_mode("soft")

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return super().quantize(w)
        scale, zp, ws = self._scaled(w)
        h = self.rectified_sigmoid() if self.mode == "soft" else (self.alpha >= 0).to(w.dtype)
        q = torch.clamp(torch.floor(ws).detach() + h + zp, self.grid.qmin, self.grid.qmax)
        return (q - zp) * scale

    @torch.no_grad()
    def harden(self, w: torch.Tensor) -> torch.Tensor:
        """The hard-rounded weight (h = 1[α >= 0]); the layer writes it back, after which round-to-nearest is exact."""
        self.set_mode("hard")
        w_hat = self.quantize(w)
        self.set_mode("nearest")
        self.alpha.data = self.alpha.data.new_empty(0)  # read no more: not held in memory, nor saved beside the weight
        return w_hat


class Log2AGQQuantizer(Quantizer):
    """Post-softmax log2 quantizer with PTQ4SAM's adaptive granularity: â = s·2^(-code/τ), τ chosen from `taus`
    together with s by the error of (Â - A)·V; the scale is learnable (its gradient flows through STE rounding)."""

    uses_partner = True

    def __init__(self, bits: int, taus=(1, 2, 4), p: float = 2.4, config_key: str = "quant"):
        super().__init__(bits, config_key)
        self.observer = AGQObserver(taus, p)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("tau", torch.ones(()))  # persisted copy of tau_value
        self.tau_value = 1.0

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.tau_value = float(self.tau)

    def reset_observer(self) -> None:
        self.observer.reset()

    def observer_seen(self) -> bool:
        return self.observer.seen

    def observe(self, a: torch.Tensor, partner: torch.Tensor | None = None) -> None:
        if partner is None:
            raise SaqError(f"AGQ quantizer {self.name}: observing needs V (the other operand of A·V)")
        self.observer.observe(a, partner, self.bits)

    def finish_observing(self) -> None:
        tau, scale = self.observer.choose()
        with torch.no_grad():
            self.tau.fill_(tau)
            self.scale.fill_(scale)
        self.tau_value = float(tau)

    def quantize(self, a: torch.Tensor) -> torch.Tensor:
        return log2_fake_quant(a, self.scale.to(a.dtype), self.tau_value, self.bits,
                               ste=torch.is_grad_enabled())

    def quantize_dropping(self, a: torch.Tensor) -> torch.Tensor:
        return log2_fake_quant(a, self.scale.to(a.dtype), self.tau_value, self.bits,
                               ste=torch.is_grad_enabled(), keep_prob=self.drop_prob)

    def describe(self) -> dict:
        taus = ",".join(f"{t:g}" for t in self.observer.taus)
        chosen = f", chose {self.tau_value:g}" if bool(self.calibrated) else ""
        return {"quantizer": "log2_agq", "bits": self.bits, "granularity": f"per_tensor, tau in {{{taus}}}{chosen}",
                "observer": self.observer.name}
