"""sam_tiny_outliers: SAM-B-like outliers planted in the mask decoder's keys in a way that leaves the FP model exact.

Adding one constant vector b to every key of an attention adds q_i·b to every logit of query row i, and softmax is
blind to a per-row constant: the FP outputs do not change (up to float rounding). A per-tensor quantizer of the keys,
though, must now cover |b|. Constant per-channel key offsets are what PTQ4SAM describes in SAM's token->image keys
and what the "massive activations" literature finds in few channels of trained transformers. The offset of each chosen
channel is `magnitude` times the unplanted key projection's own p99 |k|, measured on calibration images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam

from saq.errors import SaqError, check_int, check_seed, is_finite_number
from saq.sam.attention import decoder_attentions
from saq.sam.segmenter import PromptedImage, Segmenter

SIGNS = ("alternate", "positive", "negative")


@dataclass(frozen=True)
class OutlierSpec:
    """What to plant (the model.outliers config)."""

    attentions: str | tuple[str, ...] = "all"  # decoder attention names (layers.0.self_attn, ...) or all
    heads: int = 1  # heads per attention that carry an offset
    channels_per_head: int = 1  # offset channels in each of those heads
    sign: str = "alternate"  # alternate (+, -, +, ... over attentions in forward order) | positive | negative
    magnitude: float = 150.0  # offset as a multiple of the unplanted keys' p99 |k| (paper: [-167, 177] vs ~[-1, 1])
    calib_images: int = 4  # calibration images the p99 is measured on
    seed: int = 0  # which heads and channels

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> OutlierSpec:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:
            pass
        if not isinstance(cfg, Mapping):  # model.outliers=strong: not read letter by letter as keys
            raise SaqError(f"model.outliers={cfg!r} invalid; expected a mapping of {sorted(cls.__dataclass_fields__)}; "
                           "set one knob as model.outliers.magnitude=...")
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise SaqError(f"model.outliers.{sorted(unknown)[0]} is not a known key; expected one of "
                           f"{sorted(cls.__dataclass_fields__)}")
        values = dict(cfg)
        attentions = values.get("attentions", "all")
        if (isinstance(attentions, (list, tuple)) and attentions and all(isinstance(a, str) for a in attentions)
                and len(set(attentions)) == len(attentions)):  # none would plant nothing, a repeat two offsets
            values["attentions"] = tuple(attentions)
        elif attentions != "all":
            raise SaqError(f"model.outliers.attentions={attentions!r} invalid; expected all or a non-empty list of "
                           "distinct decoder attention names")
        spec = cls(**values)
        for key in ("heads", "channels_per_head", "calib_images"):
            check_int(getattr(spec, key), f"model.outliers.{key}")
        check_seed(spec.seed, "model.outliers.seed")
        if spec.sign not in SIGNS:
            raise SaqError(f"model.outliers.sign={spec.sign!r} is unknown; expected one of {list(SIGNS)}")
        if not (is_finite_number(spec.magnitude) and spec.magnitude > 0):
            raise SaqError(f"model.outliers.magnitude={spec.magnitude!r} invalid; expected a positive finite multiple "
                           "of p99")
        return spec


@torch.no_grad()
def key_p99(sam: Sam, samples: Sequence[PromptedImage], names: Sequence[str],
            predictions: list | None = None) -> dict[str, float]:
    """p99 of |k_proj output| of each named decoder attention over the samples' prompts (the samples' predictions
    are appended to `predictions` when given)."""
    from saq.clipping.percentile import tail_quantiles

    attentions = decoder_attentions(sam)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [attentions[name].k_proj.register_forward_hook(
        lambda _m, _i, out, name=name: values[name].append(out.detach().abs().flatten().float())) for name in names]
    try:
        segmenter = Segmenter(sam)
        for sample in samples:
            prediction = segmenter.run(sample)
            if predictions is not None:
                predictions.append(prediction)
    finally:
        for handle in handles:
            handle.remove()
    if not all(values.values()):
        raise SaqError("the calibration samples reached no decoder attention (no prompts?)")
    return {name: float(tail_quantiles(torch.cat(chunks), [0.99])[0]) for name, chunks in values.items()}


@torch.no_grad()
def plant_key_outliers(sam: Sam, samples: Sequence[PromptedImage], spec: OutlierSpec) -> list[dict]:
    """Add the offsets to the chosen key-projection biases in place; returns what was planted, per attention."""
    attentions = decoder_attentions(sam)
    for name in [] if spec.attentions == "all" else spec.attentions:
        if name not in attentions:
            raise SaqError(f"model.outliers.attentions names {name!r}, which is not a decoder attention; expected "
                           f"some of {list(attentions)}")
    names = [name for name in attentions if spec.attentions == "all" or name in spec.attentions]
    if spec.attentions != "all" and list(spec.attentions) != names:  # signs and the drawn heads follow the order
        raise SaqError(f"model.outliers.attentions must list the attentions in forward order: {names}")
    before: list = []
    p99 = key_p99(sam, samples, names, before)
    gen = torch.Generator().manual_seed(spec.seed)
    planted = []
    for index, name in enumerate(names):
        attn = attentions[name]
        per_head = attn.internal_dim // attn.num_heads
        if spec.heads > attn.num_heads or spec.channels_per_head > per_head:
            raise SaqError(f"model.outliers: {name} has {attn.num_heads} heads of {per_head} channels; asked for "
                           f"{spec.heads} heads x {spec.channels_per_head} channels")
        heads = torch.randperm(attn.num_heads, generator=gen)[: spec.heads]
        channels = sorted(int(h) * per_head + int(c) for h in heads
                          for c in torch.randperm(per_head, generator=gen)[: spec.channels_per_head])
        sign = {"positive": 1.0, "negative": -1.0}.get(spec.sign, 1.0 if index % 2 == 0 else -1.0)
        offset = sign * spec.magnitude * p99[name]
        planted.append({"attention": name, "channels": channels, "offset": offset, "p99": p99[name]})
    add_key_offsets(sam, planted)
    _check_fp_masks_kept(sam, samples, before, spec)
    return planted


@torch.no_grad()
def add_key_offsets(sam: Sam, planted: Sequence[Mapping]) -> None:
    """Add planted offsets (plant_key_outliers' record) to the key-projection biases in place: how a saved model's FP
    twin gets the very offsets it was quantized with, whatever images this run's task would measure p99 on."""
    attentions = decoder_attentions(sam)
    for entry in planted:
        if not (isinstance(entry, Mapping) and isinstance(entry.get("attention"), str) and is_finite_number(
                entry.get("offset")) and isinstance(entry.get("channels"), list | tuple) and all(
                isinstance(c, int) for c in entry["channels"])):
            raise SaqError(f"planted outlier record {entry!r} is malformed; expected {{attention, channels, offset}} "
                           "as plant_key_outliers writes it (a saved recipe's planted_outliers)")
        attn = attentions.get(entry["attention"])
        if attn is None:
            raise SaqError(f"planted outliers name {entry['attention']!r}, which is not a decoder attention of this "
                           "model")
        if attn.k_proj.bias is None:
            raise SaqError(f"{entry['attention']}.k_proj has no bias to carry the offset")
        attn.k_proj.bias[list(entry["channels"])] += float(entry["offset"])


# Largest change of the FP decoder's mask logits that planting may cause: float rounding of the offset logits grows
# with the magnitude (sam_tiny, measured: 1e-4 at the default 150x p99, 8e-4 at 1000x, 7e-3 at 10000x, where a few
# boundary pixels flip); a mask pixel whose logit lies that close to 0 may flip at any magnitude, so pixels are no test
FP_LOGIT_TOLERANCE = 1e-3


@torch.no_grad()
def _check_fp_masks_kept(sam: Sam, samples: Sequence[PromptedImage], before: list, spec: OutlierSpec) -> None:
    """The offsets cancel in softmax only up to float rounding: refuse a planting that moves the FP mask logits on
    the planting images by more than FP_LOGIT_TOLERANCE."""
    segmenter = Segmenter(sam)
    change = 0.0
    for sample, old in zip(samples, before):
        new = segmenter.run(sample)
        if old is not None:
            change = max(change, float((new.low_res_logits - old.low_res_logits).abs().max()))
    if change > FP_LOGIT_TOLERANCE:
        raise SaqError(f"model.outliers.magnitude={spec.magnitude:g} moves the FP model's mask logits by up to "
                       f"{change:.2g} on the planting images (float rounding of the offset logits; allowed: "
                       f"{FP_LOGIT_TOLERANCE:g}); the testbed must keep FP exact: use a smaller magnitude (the default "
                       "is 150)")
