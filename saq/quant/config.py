"""The `quant` config: validation into typed specs (SaqError naming the bad key) and the factory that builds quantizers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from torch import nn

from saq.errors import SaqError, check_bool, check_int, is_int
from saq.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from saq.quant.observers import OBSERVERS, make_observer
from saq.quant.quantizers import (
    AdaRoundQuantizer,
    Log2AGQQuantizer,
    LSQQuantizer,
    Quantizer,
    UniformQuantizer,
    check_bits,
)

WEIGHT_QUANTIZERS = {"adaround": AdaRoundQuantizer, "lsq": LSQQuantizer, "uniform": UniformQuantizer}
ACT_QUANTIZERS = {"lsq": LSQQuantizer, "uniform": UniformQuantizer}
GRANULARITIES = ("per_tensor", "per_channel")
DEFAULT_ACT_OBSERVER = "avg_minmax"
PARTS = ("encoder", "decoder")
# Keys of the `quant` config group that say what a run does with its quantized model, not how it quantizes: checked
# here, read by the pipeline (saq/saved.py), never part of a QuantConfig or of a saved recipe.
RUN_KEYS = ("save", "load")


@dataclass(frozen=True)
class TensorSpec:
    """How one kind of tensor (weights or activations) of one model part is quantized."""

    quantizer: str
    granularity: str
    ch_axis: int
    symmetric: bool
    observer: str | None  # activations: None, because clip= owns their range strategy (see check_range_owner)


@dataclass(frozen=True)
class PartSpec:
    """Settings of one model part (the paper configures encoder and decoder separately, with equal values)."""

    enabled: bool = True
    w_bits: int | None = None  # None: quant.w_bits
    a_bits: int | None = None  # None: quant.a_bits
    weight: TensorSpec = field(default_factory=lambda: TensorSpec("adaround", "per_channel", 0, False, "mse"))
    act: TensorSpec = field(default_factory=lambda: TensorSpec("lsq", "per_tensor", -1, False, None))


@dataclass(frozen=True)
class QuantConfig:
    """A validated `quant` config; defaults are PTQ4SAM's / SAQ-SAM's settings (paper.md §2.2)."""

    name: str = "custom"
    w_bits: int = 8
    a_bits: int = 8
    calib_images: int = 32
    calib_decode_batch: int = 64
    big: bool = True
    agq: bool = True
    agq_taus: tuple[int, ...] = (1, 2, 4)
    encoder: PartSpec = field(default_factory=PartSpec)
    decoder: PartSpec = field(default_factory=PartSpec)

    def part(self, name: str) -> PartSpec:
        return getattr(self, name)

    def bits(self, part: str, kind: str) -> int:
        spec = self.part(part)
        own = spec.w_bits if kind == "weight" else spec.a_bits
        return own if own is not None else (self.w_bits if kind == "weight" else self.a_bits)

    def to_dict(self) -> dict:
        """Plain data (the JSON recipe); from_cfg(to_dict()) gives back an equal config."""
        out = asdict(self)
        out["agq_taus"] = list(self.agq_taus)
        return out

    @classmethod
    def from_cfg(cls, cfg) -> QuantConfig:
        """Validate a mapping (dict or OmegaConf) into a QuantConfig; SaqError names the first bad key."""
        if isinstance(cfg, QuantConfig):  # built by hand: checked like a mapping (its validation lives here)
            return cls.from_cfg(cfg.to_dict())
        data = _plain(cfg)
        if not isinstance(data, Mapping):
            raise SaqError(f"quant config must be a mapping, got {type(data).__name__}")
        base = cls()
        check_run_keys(data)
        data = {k: v for k, v in data.items() if k not in RUN_KEYS}
        _check_keys(data, cls, "quant")
        values = {}
        for key in ("name",):
            if key in data:
                values[key] = str(data[key])
        if values.get("name", base.name) == "fp":
            raise SaqError("quant=fp means no quantization; quantize() needs a quantizing preset such as quant=w8a8")
        for key in ("w_bits", "a_bits"):
            if key in data:
                values[key] = check_bits(data[key], f"quant.{key}")
        for key, minimum in (("calib_images", 1), ("calib_decode_batch", 1)):
            if key in data:
                values[key] = check_int(data[key], f"quant.{key}", minimum)
        for key in ("big", "agq"):
            if key in data:
                values[key] = check_bool(data[key], f"quant.{key}")
        if "agq_taus" in data:
            taus = data["agq_taus"]
            if not isinstance(taus, (list, tuple)) or not taus or not all(
                    is_int(t) and t >= 1 for t in taus):
                raise SaqError(f"quant.agq_taus={taus!r} invalid; expected a non-empty list of integers >= 1 "
                               "(paper: [1, 2, 4])")
            values["agq_taus"] = tuple(taus)
        for part in PARTS:
            if part in data:
                values[part] = _part(data[part], f"quant.{part}", getattr(base, part))
        cfg = replace(base, **values)
        if not any(cfg.part(part).enabled for part in PARTS):
            raise SaqError("quant.encoder.enabled and quant.decoder.enabled are both false: nothing would be "
                           "quantized; enable one, or use quant=fp")
        return cfg


def check_run_keys(data: Mapping) -> None:
    """quant.save must be true/false and quant.load null or a path (a run directory or a model export)."""
    if "save" in data:
        check_bool(data["save"], "quant.save")
    load = data.get("load")
    if load is not None and (not isinstance(load, str) or not load.strip()):
        raise SaqError(f"quant.load={load!r} invalid; expected null or the path of a run directory that saved its "
                       "quantized model")


def _plain(cfg):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return cfg


def _check_keys(data: Mapping, cls, where: str) -> None:
    allowed = set(cls.__dataclass_fields__)
    for key in data:
        if key not in allowed:
            raise SaqError(f"{where}.{key} is not a known key; expected one of {sorted(allowed)}")


def _part(data, where: str, base: PartSpec) -> PartSpec:
    if not isinstance(data, Mapping):
        raise SaqError(f"{where} must be a mapping, got {data!r}")
    _check_keys(data, PartSpec, where)
    values = {}
    if "enabled" in data:
        values["enabled"] = check_bool(data["enabled"], f"{where}.enabled")
    for key in ("w_bits", "a_bits"):
        if data.get(key) is not None:
            values[key] = check_bits(data[key], f"{where}.{key}")
    for kind, choices in (("weight", WEIGHT_QUANTIZERS), ("act", ACT_QUANTIZERS)):
        if kind in data:
            values[kind] = _tensor(data[kind], f"{where}.{kind}", getattr(base, kind), choices)
    weight = values.get("weight", base.weight)
    if weight.granularity == "per_channel" and weight.ch_axis not in (0, 1):
        # a part's linears (out, in) and convs (out, in, kh, kw) share the spec: only these axes mean channels in both
        raise SaqError(f"{where}.weight.ch_axis={weight.ch_axis} invalid; expected 0 (output channels) or 1 (input "
                       "channels), the same axes of a linear's and a convolution's weight")
    if weight.observer is None:  # the activation default (running mean of min/max) would range the weights silently
        raise SaqError(f"{where}.weight.observer=None invalid; expected one of {sorted(OBSERVERS)} (paper: mse)")
    act = values.get("act", base.act)
    if act.granularity == "per_channel" and act.ch_axis != -1:
        # linear inputs differ in their leading axes (images, tokens, prompts: a count that changes per image), so
        # any other axis would quantize per prompt or per token
        raise SaqError(f"{where}.act.ch_axis={act.ch_axis} invalid; expected -1: a linear input's channels are its "
                       "last axis (conv inputs use their channel axis 1 by themselves)")
    return replace(base, **values)


def _tensor(data, where: str, base: TensorSpec, quantizers: Mapping) -> TensorSpec:
    if not isinstance(data, Mapping):
        raise SaqError(f"{where} must be a mapping, got {data!r}")
    _check_keys(data, TensorSpec, where)
    values = dict(data)
    for key in ("quantizer", "granularity", "observer"):  # a list ([adaround]) would fail the lookups with a TypeError
        if values.get(key) is not None and not isinstance(values[key], str):
            raise SaqError(f"{where}.{key}={values[key]!r} invalid; expected a name")
    if "quantizer" in values and values["quantizer"] not in quantizers:
        raise SaqError(f"{where}.quantizer={values['quantizer']!r} is unknown; expected one of {sorted(quantizers)}")
    if "granularity" in values and values["granularity"] not in GRANULARITIES:
        raise SaqError(f"{where}.granularity={values['granularity']!r} is unknown; expected one of "
                       f"{list(GRANULARITIES)}")
    if "ch_axis" in values and not is_int(values["ch_axis"]):
        raise SaqError(f"{where}.ch_axis={values['ch_axis']!r} invalid; expected an integer axis")
    if "symmetric" in values:
        check_bool(values["symmetric"], f"{where}.symmetric")
    if values.get("observer") is not None and values["observer"] not in OBSERVERS:
        raise SaqError(f"{where}.observer={values['observer']!r} is unknown; expected one of {sorted(OBSERVERS)}")
    return replace(base, **values)


def check_range_owner(cfg: QuantConfig, clip_name: str | None) -> None:
    """clip= is the one home of the activation range strategy: an activation observer set beside it is an error."""
    if clip_name is None:
        return
    for part in PARTS:
        observer = cfg.part(part).act.observer
        if observer is not None:
            # the minmax observer keeps the widest range seen; clip=minmax averages per-batch ranges unless told
            same = "clip=minmax clip.reduction=extreme" if observer == "minmax" \
                else f"clip={observer.removeprefix('avg_')}"
            raise SaqError(f"quant.{part}.act.observer={observer} conflicts with clip={clip_name}: clip= alone sets the "
                           f"activation range strategy (the same as this observer: {same}); "
                           f"leave quant.{part}.act.observer unset")


class QuantizerFactory:
    """Builds the quantizers and quantized modules of a model part from a QuantConfig.

    Model mappings (saq/sam/) call it; it knows parts ('encoder', 'decoder') and tensor roles, never model classes.
    """

    def __init__(self, cfg: QuantConfig):
        self.cfg = cfg

    def enabled(self, part: str) -> bool:
        return self.cfg.part(part).enabled

    def _bits(self, part: str, kind: str) -> int:
        return self.cfg.bits(part, kind)

    def weight_quantizer(self, part: str) -> Quantizer:
        spec = self.cfg.part(part).weight
        # 0 or 1 (checked with the config): output or input channels of a linear's and a convolution's weight alike
        ch_axis = spec.ch_axis if spec.granularity == "per_channel" else None
        return self._build(WEIGHT_QUANTIZERS, spec, part, "weight", ch_axis)

    def act_quantizer(self, part: str, operand: bool = False, channel_axis: int | None = None) -> Quantizer:
        """A linear/conv input quantizer, or (operand=True) one for an operand of an attention matmul: those stay
        per-tensor, since a transposed key or a head-split tensor keeps no channel on one fixed axis. Per channel,
        the axis is the config's ch_axis (a linear's input: channels last), or channel_axis where the layer fixes
        it (a convolution's NCHW input: 1)."""
        spec = self.cfg.part(part).act
        per_channel = spec.granularity == "per_channel" and not operand
        ch_axis = (spec.ch_axis if channel_axis is None else channel_axis) if per_channel else None  # checked per input
        return self._build(ACT_QUANTIZERS, spec, part, "act", ch_axis)

    def _build(self, classes: dict, spec, part: str, kind: str, ch_axis: int | None) -> Quantizer:
        """One quantizer of `kind` ('weight' | 'act') from its validated spec."""
        key = f"quant.{part}.{kind}"
        # an activation observer left unset keeps the running mean of per-batch ranges; calibrate() gives it clip='s
        # range strategy
        observer = make_observer(spec.observer or DEFAULT_ACT_OBSERVER, f"{key}.observer")
        quantizer = classes[spec.quantizer](self._bits(part, kind), observer, spec.symmetric, ch_axis, config_key=key)
        quantizer.kind = kind
        return quantizer

    def softmax_quantizer(self, part: str) -> Quantizer:
        """The post-softmax operand of attn·v: AGQ log2 (quant.agq) or a uniform activation quantizer."""
        if not self.cfg.agq:
            return self.act_quantizer(part, operand=True)
        quantizer = Log2AGQQuantizer(self._bits(part, "act"), self.cfg.agq_taus, config_key=f"quant.{part}.act")
        quantizer.kind = "act"
        return quantizer

    def linear(self, linear: nn.Linear, part: str) -> QuantLinear:
        return QuantLinear.from_float(linear, self.weight_quantizer(part),
                                      self.act_quantizer(part))

    def conv(self, conv: nn.Conv2d, part: str) -> QuantConv2d:
        return QuantConv2d.from_float(conv, self.weight_quantizer(part),
                                      self.act_quantizer(part, channel_axis=1))

    def matmul(self, part: str) -> QuantMatMul:
        """Activation × activation, e.g. q·kᵀ."""
        return QuantMatMul(self.act_quantizer(part, operand=True), self.act_quantizer(part, operand=True))

    def softmax_matmul(self, part: str) -> QuantMatMul:
        """softmax(...)·v: the left operand is a probability map."""
        return QuantMatMul(self.softmax_quantizer(part), self.act_quantizer(part, operand=True))
