"""The reconstruction loop over a chain's units, and the context manager that restores the evaluation state.

One loop for every unit kind: cached inputs/targets, QDrop, AdaRound, LSQ, best-state restore, resume after a finished
unit.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from saq.errors import SaqError
from saq.quant.grid import SCALE_EPS, keep_mask, mix
from saq.quant.model import iter_quantizers
from saq.quant.modules import QuantLayer
from saq.quant.quantizers import AdaRoundQuantizer, Log2AGQQuantizer, Quantizer
from saq.recon.config import ReconConfig, budget_line
from saq.recon.losses import rounding_regularizer, unit_loss
from saq.sam.units import SampleData, build_chain, encode_sample, mask_probabilities, move, probe_image_tokens

CURVE_POINTS = 200  # loss-curve points kept per unit in results.json (a figure's worth, not every iteration)
EVAL_FULL = "fully_quantized"
EVAL_PAPER = "paper_compat: linear/conv inputs left at drop_prob (official SAQ-SAM / PTQ4SAM evaluation, paper.md §7)"


@dataclass
class UnitReport:
    """What happened to one unit."""

    name: str
    kind: str
    iters: int
    seconds: float = 0.0  # wall time of the learning iterations
    cpu_seconds: float = 0.0  # CPU time of the same (all threads); on a shared machine the better speed measure
    loss_first: float | None = None  # mean training loss over the first log_every iterations
    loss_last: float | None = None  # ... and over the last
    eval_before: float | None = None  # unit loss over all samples, hard and undropped, before learning
    eval_after: float | None = None  # ... after learning and hardening
    kept: str = "learned"  # learned | start (best-state restore kept the starting state) | nothing to learn
    resumed: bool = False  # learned by the killed run this one resumed (its iterations are not this run's)
    loss_curve: list = field(default_factory=list)  # [iteration, mean training loss since the previous point], <= 200

    @property
    def it_per_s(self) -> float:
        return self.iters / self.seconds if self.seconds else 0.0


@dataclass
class ReconReport:
    """What reconstruct() did; `as_dict` goes into results.json."""

    method: str
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0
    eval_mode: str = EVAL_FULL
    resumed_from: str | None = None
    state_file: Path | None = None  # where finished units were saved for recon.resume (not part of results.json)

    def as_dict(self) -> dict:
        return {"method": self.method, "eval_mode": self.eval_mode, "seconds": round(self.seconds, 2),
                "iters": sum(u.iters for u in self.units if not u.resumed), "resumed_from": self.resumed_from,
                "units": [dict(asdict(u), it_per_s=round(u.it_per_s, 2)) for u in self.units]}


@contextlib.contextmanager
def reconstruction_state(*models: nn.Module) -> Iterator[None]:
    """Freeze every parameter of `models` (reconstruction turns on only what it learns) and, on leaving — normally
    or by an exception — restore the evaluation state: requires_grad as before, no quantizer dropping, no soft
    rounding (an unfinished AdaRound falls back to round-to-nearest)."""
    saved = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for model in models:
            for quantizer in iter_quantizers(model):
                quantizer.drop_prob = 1.0
                if isinstance(quantizer, AdaRoundQuantizer) and quantizer.mode == "soft":
                    quantizer.set_mode("nearest")


def apply_paper_eval_compat(modules: Sequence[nn.Module], drop_prob: float) -> int:
    """The official evaluation (bug, paper.md §7): inputs of every linear/conv in the reconstructed units keep
    dropping quantization with drop_prob. Returns how many quantizers were set."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, QuantLayer):
                layer.input_quantizer.drop_prob = drop_prob
                count += 1
    return count


def _unique_quantizers(modules: Sequence[nn.Module]) -> list[Quantizer]:
    seen, out = set(), []
    for module in modules:
        for q in iter_quantizers(module):
            if id(q) not in seen:
                seen.add(id(q))
                out.append(q)
    return out


def _to(state: tuple, device) -> tuple:
    return tuple(move(t, device) for t in state)


class Reconstructor:
    """Reconstructs the units of a quantized SAM against its FP twin, one unit after the other."""

    def __init__(self, qmodel: nn.Module, fp_model: nn.Module, cfg: ReconConfig, seed: int, progress: bool = True,
                 checkpoint: Path | None = None, chain: list | None = None):
        """chain: the steps to run (default: SAM's chain at recon.granularity, saq.sam.units.build_chain); any list
        of Step-like objects works, which is how the loop is tested on toy blocks."""
        self.qmodel, self.fp_model, self.cfg = qmodel, fp_model, cfg
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.progress = progress
        self.checkpoint = checkpoint
        self.device = next(qmodel.parameters()).device
        self.cache_device = torch.device(cfg.cache_device) if cfg.cache_device else self.device
        self.chain = chain if chain is not None else build_chain(qmodel, cfg.granularity)
        units = [s for s in self.chain if s.learnable]
        reference = [s.kind for s in build_chain(qmodel, "stage") if s.learnable] if cfg.budget == "equal" else []
        self.iters = dict(zip((s.name for s in units), cfg.unit_iters([s.kind for s in units], reference)))
        self.budget_line = (budget_line(cfg.budget, [s.kind for s in units], list(self.iters.values()))
                            if any(self.iters.values()) else None)
        self.learned_modules: list[nn.Module] = []

    # data -----------------------------------------------------------------------------------------------------------
    def encode(self, samples) -> list[SampleData]:
        generator = torch.Generator().manual_seed(self.seed)
        return [encode_sample(self.fp_model, s, self.cfg.max_prompts, generator).to(self.cache_device)
                for s in samples if s.num_prompts]

    @torch.no_grad()
    def _run_all(self, model, step, states, data) -> list[tuple]:
        return [_to(step.run(model, _to(s, self.device), d.to(self.device)), self.cache_device)
                for s, d in zip(states, data)]

    def _downstream(self, index: int):
        """The later FP decoder steps' response to a unit's output: (tokens hs,), and with recon.par_loss.mask_weight
        the mask head's probabilities too."""
        later = self.chain[index + 1:]
        masks = self.cfg.par_loss.mask_weight != 0.0

        def response(out: tuple, data: SampleData) -> tuple:
            state = out
            for step in later:
                state = step.run(self.fp_model, state, data)
            return (state[0], mask_probabilities(self.fp_model, state, data)) if masks else (state[0],)
        return response

    def _probe(self, out: tuple, data: SampleData) -> tuple:
        return (probe_image_tokens(self.fp_model, out[0], data),)

    # the loop -------------------------------------------------------------------------------------------------------
    def run(self, samples=None, data: list | None = None) -> ReconReport:
        """Reconstruct every unit of the chain from calibration samples (PromptedImage), or from ready `data`
        (one object per sample with .to(device), handed to each step)."""
        start = time.perf_counter()
        report = ReconReport(self.cfg.name)
        if self.budget_line:
            print(self.budget_line)
        done = self._resume(report)
        data = data if data is not None else self.encode(samples)
        if not data:
            raise SaqError("reconstruction needs calibration images with prompts; none has any")
        q_states = fp_states = [()] * len(data)
        # units reseed the global RNG; leave it as found, so what follows (the paper-compat evaluation's dropping
        # masks) does not depend on how many units were learned here rather than resumed
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), reconstruction_state(self.qmodel, self.fp_model):
            for index, step in enumerate(self.chain):
                if self.cfg.target_input == "quantized_encoder" and step.part == "encoder":
                    fp_states = q_states  # SAQ-SAM's code: the FP twin runs on the reconstructed encoder's output
                targets = self._run_all(self.fp_model, step, fp_states, data)
                if step.learnable:
                    self.learned_modules += step.modules(self.qmodel)
                    if index > done:
                        report.units.append(self._learn(index, step, data, q_states, fp_states, targets))
                        self._save(index, report)
                q_states = self._run_all(self.qmodel, step, q_states, data)
                fp_states = targets
        report.seconds = time.perf_counter() - start
        return report

    def _learn(self, index, step, data, q_states, fp_states, targets) -> UnitReport:
        cfg, iters = self.cfg, self.iters[step.name]
        unit = UnitReport(step.name, step.kind, iters)
        modules = step.modules(self.qmodel)
        quantizers = _unique_quantizers(modules)
        loss_fn = unit_loss(cfg, step, self._probe, self._downstream(index))
        responses = [None] * len(data)
        if loss_fn.uses_response:
            with torch.no_grad():
                responses = [_to(loss_fn.response(_to(t, self.device), d.to(self.device)), self.cache_device)
                             for t, d in zip(targets, data)]

        def evaluate() -> float:
            with torch.no_grad():
                return sum(float(loss_fn(step.run(self.qmodel, _to(q, self.device), d.to(self.device)),
                                         _to(t, self.device), d.to(self.device),
                                         None if r is None else _to(r, self.device)))
                           for q, t, d, r in zip(q_states, targets, data, responses)) / len(data)

        snapshot = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules] if cfg.best_state else None
        if cfg.best_state:
            unit.eval_before = evaluate()
        if iters == 0:
            return unit
        torch.manual_seed(self.seed + 7919 * index)
        start, cpu_start = time.perf_counter(), time.process_time()
        rounding, alphas, scales, softmax_scales, soft_layers = [], [], [], [], []
        for module in modules:
            for layer in module.modules():
                # weight_lr=0 learns no rounding: the weights stay round-to-nearest (soft rounding would let the
                # steps learn against near-FP weights that hardening then takes away)
                if (cfg.weight_lr > 0 and isinstance(layer, QuantLayer)
                        and isinstance(layer.weight_quantizer, AdaRoundQuantizer)):
                    layer.weight_quantizer.init_soft(layer.weight)
                    soft_layers.append(layer)
                    rounding.append(layer.weight_quantizer)
                    alphas.append(layer.weight_quantizer.alpha)
        for q in quantizers:
            scale = getattr(q, "scale", None)
            if isinstance(scale, nn.Parameter):
                # AGQ's log2 scale has its own lr (recon.softmax_scale_lr): entries flushed to zero below its grid give
                # no gradient, so nothing stops a large lr from raising it until much of the map is flushed
                (softmax_scales if isinstance(q, Log2AGQQuantizer) else scales).append(scale)
            if q.kind == "act":
                q.drop_prob = cfg.drop_prob
        cosine = cfg.scale_lr_schedule == "cosine"
        groups, schedules = [], []  # steps decay by cosine to 0 over the unit's iterations; rounding keeps its lr
        for params, lr, decay in ((alphas, cfg.weight_lr, False), (scales, cfg.scale_lr, cosine),
                                  (softmax_scales, cfg.softmax_scale_lr, cosine)):
            if params and lr > 0:
                groups.append({"params": params, "lr": lr})
                schedules.append((lambda k: 0.5 * (1 + math.cos(math.pi * k / iters))) if decay
                                 else (lambda k: 1.0))
        if not groups:  # no quantizer here, or every lr 0: iterating would change nothing
            for q in quantizers:
                q.drop_prob = 1.0
            unit.iters, unit.kept = 0, "nothing to learn"
            return unit
        learned = [p for g in groups for p in g["params"]]
        for p in learned:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        picks = torch.randint(len(data), (iters,), generator=torch.Generator().manual_seed(self.seed + index))
        mixing = cfg.input_mix and cfg.drop_prob < 1.0
        unmixed_response = loss_fn.uses_response and step.response != "probe" and cfg.response_input == "quantized"
        bar = tqdm(range(iters), desc=f"recon {step.name}", disable=not self.progress, leave=False)
        window, losses = cfg.log_every, []
        curve_every = max(window, math.ceil(iters / CURVE_POINTS))
        for it in bar:
            i = int(picks[it])
            d = data[i].to(self.device)
            q_in = unmixed = _to(q_states[i], self.device)
            if mixing and fp_states[i] is not q_states[i]:
                fp_in = _to(fp_states[i], self.device)
                q_in = tuple(mix(f, q, keep_mask(q, cfg.drop_prob)) for q, f in zip(q_in, fp_in))
            out = step.run(self.qmodel, q_in, d)
            # the official decoder response runs the unit again on its quantized input, unmixed (paper.md §4.2)
            response_from = (step.run(self.qmodel, unmixed, d) if unmixed_response and q_in is not unmixed
                             else None)
            loss = loss_fn(out, _to(targets[i], self.device), d,
                           None if responses[i] is None else _to(responses[i], self.device), response_from)
            reg = rounding_regularizer(rounding, cfg.round_reg, it, iters)
            total = loss if reg is None else loss + reg
            if total.requires_grad:
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():  # a step at or below zero quantizes everything to the zero point
                    for scale in scales + softmax_scales:
                        scale.clamp_(min=SCALE_EPS)
            losses.append(float(loss.detach()))
            if (it + 1) % window == 0 or it + 1 == iters:
                recent = sum(losses[-window:]) / len(losses[-window:])
                unit.loss_first = recent if unit.loss_first is None else unit.loss_first
                unit.loss_last = recent
                bar.set_postfix(loss=f"{recent:.4g}")
            if (it + 1) % curve_every == 0 or it + 1 == iters:
                points = losses[-((it % curve_every) + 1):]  # since the previous curve point
                unit.loss_curve.append([it + 1, sum(points) / len(points)])
        bar.close()
        for p in learned:
            p.requires_grad_(False)
        for q in quantizers:
            q.drop_prob = 1.0
        for layer in soft_layers:
            layer.harden_weight()
        unit.seconds, unit.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if cfg.best_state:
            unit.eval_after = evaluate()
            # learning made this unit worse on the whole calibration set, or diverged (a NaN compares False)
            if not math.isfinite(unit.eval_after) or unit.eval_after > unit.eval_before:
                for module, state in zip(modules, snapshot):
                    module.load_state_dict(state)
                unit.kept = "start"
        return unit

    # resume ---------------------------------------------------------------------------------------------------------
    def _save(self, index: int, report: ReconReport) -> None:
        if self.checkpoint is None:
            return
        from saq.log import atomic_path, os_reason

        try:
            with atomic_path(self.checkpoint) as tmp:  # two sweep jobs can share a checkpoint key
                torch.save({"done": index, "units": [asdict(u) for u in report.units],
                            "model": {k: v.detach().cpu() for k, v in self.qmodel.state_dict().items()}}, tmp)
        # a full disk after the run's checks: the file only serves a resume, so learning goes on (torch's own
        # writer reports a failed write as a RuntimeError)
        except (OSError, RuntimeError) as exc:
            reason = os_reason(exc) if isinstance(exc, OSError) else (str(exc).strip().splitlines() or ["?"])[0]
            print(f"recon: warning: cannot save finished units to {self.checkpoint} ({reason}); this run cannot be "
                  "resumed", file=sys.stderr)
            self.checkpoint = None

    def _resume(self, report: ReconReport) -> int:
        """Index of the last finished unit restored from the checkpoint (-1: start from the first unit)."""
        if not (self.cfg.resume and self.checkpoint is not None and self.checkpoint.is_file()):
            return -1
        from saq.torchfile import damaged_record

        damaged = damaged_record(self.checkpoint)
        if damaged is not None:  # a flipped bit would resume learned units with a wrong weight
            print(f"recon: warning: cannot resume from {self.checkpoint} (its record {damaged} does not match its "
                  "checksum); learning every unit again", file=sys.stderr)
            return -1
        try:
            saved = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            done = int(saved["done"])
            units = [UnitReport(**dict(u, resumed=True)) for u in saved["units"]]
            if not 0 <= done < len(self.chain):
                raise ValueError(f"unit {done} of a chain of {len(self.chain)}")
            current = self.qmodel.state_dict()
            if set(saved["model"]) != set(current) or any(saved["model"][k].shape != v.shape
                                                            for k, v in current.items()):
                raise ValueError("another model layout")  # checked first: a failed load would leave a partial model
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file; all mean "start afresh"
            print(f"recon: warning: cannot resume from {self.checkpoint} ({type(exc).__name__}); learning every unit "
                  "again", file=sys.stderr)
            return -1
        self.qmodel.load_state_dict(saved["model"])
        report.units = units
        report.resumed_from = str(self.checkpoint)
        print(f"recon: resumed after unit {self.chain[done].name} from {self.checkpoint}")
        return done
