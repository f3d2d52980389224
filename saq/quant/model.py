"""Model-level quantization: quantize() a copy, the one state switch, calibrate() over prompted images, the summary."""

from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from saq.errors import SaqError
from saq.quant.big import BigResult, apply_big
from saq.quant.config import QuantConfig, QuantizerFactory, check_range_owner
from saq.quant.modules import QuantConv2d, QuantLayer, QuantLinear, QuantMatMul
from saq.quant.quantizers import Quantizer, QuantState, UniformQuantizer

CONFIG_ATTR = "saq_quant_config"  # where a quantized model keeps its validated QuantConfig


def quantize(model: nn.Module, quant_cfg) -> nn.Module:
    """A quantized deep copy of a SAM (the FP model is left untouched), every quantizer off.

    In the off state its outputs equal the FP model's bit for bit; calibrate() then sets ranges and switches on.
    """
    cfg = QuantConfig.from_cfg(quant_cfg)
    # the map of what to quantize is SAM knowledge and lives with SAM; imported here to avoid an import cycle
    from saq.sam.attention import quantize_sam_modules

    qmodel = copy.deepcopy(model)
    quantize_sam_modules(qmodel, QuantizerFactory(cfg))
    parameter = next(model.parameters(), None)
    if parameter is not None:
        qmodel.to(parameter.device)  # the new quantizers' tensors live where the model does
    for name, module in qmodel.named_modules():
        if isinstance(module, Quantizer):
            module.name = name
    setattr(qmodel, CONFIG_ATTR, cfg)
    return qmodel.eval()


def quant_config(qmodel: nn.Module) -> QuantConfig:
    cfg = getattr(qmodel, CONFIG_ATTR, None)
    if cfg is None:
        raise SaqError("this model was not made by saq.quant.quantize()")
    return cfg


def iter_quantizers(model: nn.Module, kind: str | None = None) -> Iterator[Quantizer]:
    """Every quantizer of the model (kind 'weight' or 'act' to filter)."""
    for module in model.modules():
        if isinstance(module, Quantizer) and (kind is None or module.kind == kind):
            yield module


def set_quant_state(model: nn.Module, state: QuantState | str, kind: str | None = None) -> None:
    """The model-level switch: put every quantizer (or every one of `kind`) in `state`."""
    if kind not in (None, "weight", "act"):
        raise SaqError(f"quantizer kind {kind!r} unknown; expected 'weight', 'act' or None (all)")
    try:
        state = QuantState(state)
    except ValueError:
        raise SaqError(f"quantizer state {state!r} unknown; expected one of {[s.value for s in QuantState]}") from None
    quantizers = list(iter_quantizers(model, kind))
    if state is QuantState.QUANT:  # all or none: a failure half-way would leave some quantizing, some not
        problem = next(filter(None, (q.cannot_quantize() for q in quantizers)), None)
        if problem:
            raise SaqError(problem)
    for quantizer in quantizers:
        quantizer.set_state(state)


def quant_states(model: nn.Module) -> Counter:
    """How many quantizers are in each state."""
    return Counter(q.state.value for q in iter_quantizers(model))


def assert_fully_quantized(model: nn.Module, allow_dropped_inputs: bool = False) -> None:
    """Raise unless every quantizer quantizes every element with hard rounding (evaluation must never run half-FP;
    paper.md §7). allow_dropped_inputs admits QDrop on linear/conv inputs only: the labelled paper-compatible mode."""
    stray = [q.name for q in iter_quantizers(model) if q.state is not QuantState.QUANT]
    if stray:
        raise SaqError(f"{len(stray)} quantizers are not quantizing (first: {stray[0]}); evaluation needs all of them on")
    soft = [q.name for q in iter_quantizers(model) if getattr(q, "mode", None) == "soft"]
    if soft:
        raise SaqError(f"{len(soft)} weight quantizers still round softly (first: {soft[0]}); harden them first")
    inputs = {id(m.input_quantizer) for m in model.modules() if isinstance(m, QuantLayer)} if allow_dropped_inputs else set()
    dropping = [q.name for q in iter_quantizers(model) if q.drop_prob < 1.0 and id(q) not in inputs]
    if dropping:
        raise SaqError(f"{len(dropping)} quantizers still drop quantization (first: {dropping[0]}, drop_prob "
                       "< 1); evaluation must quantize every element (recon.paper_eval_compat allows linear inputs only)")
    if not any(True for _ in iter_quantizers(model)):
        raise SaqError("the model has no quantizers")


@dataclass
class CalibrationReport:
    """What calibrate() did."""

    images: int
    prompts: int
    seconds: float
    big: list[BigResult] = field(default_factory=list)
    states: dict = field(default_factory=dict)
    clipping: object = None  # a point search's report (saq.clipping.pcc.ClippingReport), when the strategy ran one


def calibrate(qmodel: nn.Module, samples: Sequence, quant_cfg=None, clip_cfg=None,
              progress: bool = True) -> CalibrationReport:
    """Set every quantizer's range from calibration samples (list[PromptedImage]) and switch the model on.

    Order (paper.md §2.4): BIG on sample 0 in FP (quant.big), then activation observers over all samples with weights
    FP (`clip_cfg` chooses the activation range strategy; None keeps the observers' own), then weight observers on
    the weights, then every quantizer to the quantizing state; that last step is checked before returning.
    """
    from saq.clipping import build_range_strategy
    from saq.sam.segmenter import Segmenter

    cfg = QuantConfig.from_cfg(quant_cfg) if quant_cfg is not None else quant_config(qmodel)
    built = getattr(qmodel, CONFIG_ATTR, None)
    if built is not None:  # BIG would follow one config, the quantizers another (the label and the calibration
        # data's size and batching change no quantizer)
        same = replace(cfg, name=built.name, calib_images=built.calib_images, calib_decode_batch=built.calib_decode_batch)
        if same != built:
            from saq.log import flatten

            ours, theirs = flatten(same.to_dict()), flatten(built.to_dict())
            key = next(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
            raise SaqError(f"calibrate(): quant_cfg sets quant.{key}={ours.get(key)!r}, but the model was quantized "
                           f"with {theirs.get(key)!r}; pass that config (or None to use it)")
    strategy = build_range_strategy(clip_cfg)
    check_range_owner(cfg, None if strategy is None else strategy.name)
    samples = list(samples)
    if not samples:
        raise SaqError("calibration needs at least one sample (quant.calib_images >= 1)")
    if not any(s.num_prompts for s in samples):
        raise SaqError("no calibration sample has prompts; the decoder would never be calibrated")
    if not any(True for _ in iter_quantizers(qmodel)):
        raise SaqError("calibrate() needs a model made by saq.quant.quantize()")
    start = time.perf_counter()
    qmodel.eval()
    segmenter = Segmenter(qmodel, cfg.calib_decode_batch)

    def run(sample) -> int:
        segmenter.set_image(sample.image)
        if sample.num_prompts:
            for _ in segmenter.predict_chunks(sample.boxes, sample.points, sample.point_labels):
                pass
        return sample.num_prompts

    set_quant_state(qmodel, QuantState.OFF)
    big = []
    if cfg.big:
        first = next(s for s in samples if s.num_prompts)
        big = apply_big(qmodel, lambda: run(first))

    # a strategy with a point search (PCC) fixes its points' ranges after BIG and before the other activations are
    # observed, which then see the clipped q/k path (paper.md §3.3)
    clipping, frozen = None, set()
    if strategy is not None and hasattr(strategy, "search"):
        from saq.sam.attention import decoder_attention_probes

        prompted = [s for s in samples if s.num_prompts]
        current = {"sample": None}

        def decoder_for(sample):
            def decode() -> None:
                if current["sample"] is not sample:  # the encoder is FP during the search: embed each image once
                    segmenter.set_image(sample.image)
                    current["sample"] = sample
                for _ in segmenter.predict_chunks(sample.boxes, sample.points, sample.point_labels):
                    pass
            return decode

        clipping = strategy.search(decoder_attention_probes(qmodel), [decoder_for(s) for s in prompted],
                                   progress=progress)
        frozen = {id(q) for q in clipping.frozen}

    if strategy is not None:
        for quantizer in iter_quantizers(qmodel, "act"):
            if isinstance(quantizer, UniformQuantizer) and id(quantizer) not in frozen:
                quantizer.observer.use_strategy(strategy)
    for quantizer in iter_quantizers(qmodel, "act"):
        if id(quantizer) not in frozen:
            quantizer.set_state(QuantState.OBSERVE)
    prompts = 0
    for sample in tqdm(samples, desc="calibrate", disable=not progress, leave=False):
        with one_observer_batch(qmodel):  # an image in several decoder chunks is one batch, as in the paper
            prompts += run(sample)
    calibrate_weights(qmodel)
    set_quant_state(qmodel, QuantState.QUANT)
    assert_fully_quantized(qmodel)
    return CalibrationReport(len(samples), prompts, time.perf_counter() - start, big, dict(quant_states(qmodel)),
                             clipping)


@contextlib.contextmanager
def one_observer_batch(qmodel: nn.Module) -> Iterator[None]:
    """Every observer counts what it sees inside the block as one batch (see Observer.begin_batch); nothing of a
    block that raises is kept."""
    observers = list({id(o): o for q in iter_quantizers(qmodel)
                      if (o := getattr(q, "observer", None)) is not None}.values())
    for observer in observers:
        observer.begin_batch()
    finished = False
    try:
        yield
        finished = True
    finally:
        failed = None
        for observer in observers:  # every one leaves batch mode, whatever happens to another
            try:
                observer.end_batch(commit=finished)
            except Exception as exc:  # noqa: BLE001 - raised below, after the others
                failed = failed or exc
        if failed is not None and finished:
            raise failed


@torch.no_grad()
def calibrate_weights(qmodel: nn.Module) -> None:
    """Weight observers look at the weights directly (no data needed); their quantizers are left observed."""
    for module in qmodel.modules():
        if isinstance(module, QuantLayer):
            module.weight_quantizer.set_state(QuantState.OBSERVE)
            module.weight_quantizer(module.weight)


def quant_summary(qmodel: nn.Module) -> str:
    """A table of every quantizer (layer, role, quantizer, bits, granularity, observer, state) and counts."""
    rows = []
    for name, module in qmodel.named_modules():
        if isinstance(module, Quantizer):
            layer, _, role = name.rpartition(".")
            info = module.describe()
            rows.append((layer, role.replace("_quantizer", ""), info["quantizer"], str(info["bits"]),
                         info["granularity"], info["observer"], module.state.value))
    header = ("layer", "role", "quantizer", "bits", "granularity", "observer", "state")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    counts = Counter(type(m).__name__ for m in qmodel.modules() if isinstance(m, (QuantLinear, QuantConv2d,
                                                                                      QuantMatMul)))
    lines.append(f"quantized: {counts['QuantLinear']} linear, {counts['QuantConv2d']} conv, "
                 f"{counts['QuantMatMul']} matmul ({len(rows)} quantizers); everything else FP")
    return "\n".join(lines)
