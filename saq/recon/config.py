"""The `recon` config: validation into a typed ReconConfig (SaqError naming the bad key) and the iteration budget."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from saq.errors import SaqError, check_bool, check_device, check_int, check_number, check_seed, is_finite_number
from saq.sam.unit_kinds import GRANULARITIES, check_unit_kind

RECON_NAMES = ("none", "qdrop", "par")  # conf/recon/*.yaml
LOSSES = ("mse", "par")
BUDGETS = ("official", "equal")
TARGET_INPUTS = ("fp", "quantized_encoder")
RESPONSE_INPUTS = ("mixed", "quantized")
MSE_SUMS = ("channels", "dim1")
# PAR's official schedule (paper.md §4.2): the total that recon.budget=equal gives every learned method.
PAR_OFFICIAL_ITERS = {"stage": 2000, "neck": 2000, "decoder_layer": 2000, "final_attn": 10000}


@dataclass(frozen=True)
class RoundingRegularizer:
    """AdaRound's λ·Σ(1 - |2h - 1|^b): off during the warm-up fraction, then b decays linearly b_start → b_end."""

    weight: float = 0.0
    b_start: float = 20.0
    b_end: float = 2.0
    warm_up: float = 0.2


@dataclass(frozen=True)
class ParLoss:
    """PAR's loss weights (paper.md §4.2): encoder = interaction term (+ output term, 0 in the official code);
    decoder = beta·(query_weight·‖ΔQ‖² + key_weight·‖ΔK‖²) + alpha·‖Δhs‖². mask_weight (saq's addition, 0 =
    official) adds mask_weight·‖Δmask‖² to every decoder unit: the FP mask head's probabilities of the mask a box
    prompt decodes, per pixel."""

    encoder_output_weight: float = 0.0
    query_weight: float = 0.01
    key_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    mask_weight: float = 0.0


@dataclass(frozen=True)
class ReconConfig:
    """A validated `recon` config (defaults: SAQ-SAM's PAR, paper.md §4.2)."""

    name: str = "par"
    granularity: str = "stage"
    loss: str = "par"
    mse_sum: str = "channels"
    iters: dict = field(default_factory=lambda: dict(PAR_OFFICIAL_ITERS, layer=2000, block=2000, decoder_block=2000))
    budget: str = "official"
    drop_prob: float = 0.5
    input_mix: bool = True
    max_prompts: int = 16
    weight_lr: float = 1e-3
    scale_lr: float = 2e-3
    softmax_scale_lr: float = 0.0
    scale_lr_schedule: str = "cosine"
    round_reg: RoundingRegularizer = field(default_factory=RoundingRegularizer)
    par_loss: ParLoss = field(default_factory=ParLoss)
    target_input: str = "quantized_encoder"
    response_input: str = "mixed"
    best_state: bool = True
    cache_device: str | None = None
    seed: int | None = None
    resume: bool = False
    state_dir: str = "outputs/.cache/recon"
    paper_eval_compat: bool = False
    log_every: int = 10

    @classmethod
    def from_cfg(cls, cfg) -> ReconConfig:
        data = _plain(cfg)
        if not isinstance(data, Mapping):
            raise SaqError(f"recon config must be a mapping, got {type(data).__name__}")
        _check_keys(data, cls, "recon")
        values = dict(data)
        name = values.get("name", cls.name)
        if name not in RECON_NAMES:  # the name decides whether anything is learned: no free-form labels
            raise SaqError(f"recon.name={name!r} unknown; expected one of {list(RECON_NAMES)} (choose the preset "
                           "with recon=...)")
        # budget and resume are sweep-wide: a sweep of statistic and learned methods (table_instance) sets them for
        # every job
        sweep_wide = {"name", "budget", "resume"}
        if name == "none" and set(values) - sweep_wide:
            raise SaqError(f"recon=none learns nothing, so recon.{sorted(set(values) - sweep_wide)[0]} would "
                           "have no effect; choose recon=qdrop or recon=par (or a method= preset that learns)")
        for key, choices in (("granularity", GRANULARITIES), ("loss", LOSSES), ("mse_sum", MSE_SUMS), ("budget", BUDGETS),
                             ("target_input", TARGET_INPUTS), ("response_input", RESPONSE_INPUTS),
                             ("scale_lr_schedule", ("cosine", "constant"))):
            if key in values and values[key] not in choices:
                raise SaqError(f"recon.{key}={values[key]!r} unknown; expected one of {list(choices)}")
        if "iters" in values:
            iters = values["iters"]
            if not isinstance(iters, Mapping):
                raise SaqError(f"recon.iters must map unit kinds to iterations, got {iters!r}")
            for kind in iters:
                check_unit_kind(kind)
            values["iters"] = dict(cls().iters, **{kind: check_int(n, f"recon.iters.{kind}", 0)
                                                   for kind, n in iters.items()})
        if "drop_prob" in values:
            # the range said for nan too (check_number's own line would say ">= 0")
            p = values["drop_prob"]
            if not (is_finite_number(p) and 0.0 < p <= 1.0):
                raise SaqError(f"recon.drop_prob={p!r} invalid; expected 0 < p <= 1 (QDrop: 0.5; 1 = no dropping)")
            values["drop_prob"] = float(p)
        for key in ("weight_lr", "scale_lr", "softmax_scale_lr"):
            if key in values:
                values[key] = check_number(values[key], f"recon.{key}", 0.0)
        for key in ("max_prompts", "log_every"):
            if key in values:
                values[key] = check_int(values[key], f"recon.{key}", 1)
        if "seed" in values:
            values["seed"] = check_seed(values["seed"], "recon.seed", allow_none=True)
        if "state_dir" in values and not (isinstance(values["state_dir"], str) and values["state_dir"].strip()):
            raise SaqError(f"recon.state_dir={values['state_dir']!r} invalid; expected a folder path (default "
                           f"{cls.state_dir})")
        if values.get("cache_device") is not None:
            values["cache_device"] = check_device(values["cache_device"], "recon.cache_device")
        for key in ("input_mix", "best_state", "resume", "paper_eval_compat"):
            if key in values:
                check_bool(values[key], f"recon.{key}")
        for key, sub in (("round_reg", RoundingRegularizer), ("par_loss", ParLoss)):
            if key in values:
                if not isinstance(values[key], Mapping):
                    raise SaqError(f"recon.{key} must be a mapping, got {values[key]!r}")
                _check_keys(values[key], sub, f"recon.{key}")
                values[key] = sub(**{name: check_number(v, f"recon.{key}.{name}", 0.0) for name, v in values[key].items()})
                if key == "round_reg" and not values[key].warm_up < 1.0:
                    raise SaqError(f"recon.round_reg.warm_up={values[key].warm_up!r} invalid; expected a fraction of "
                                   "the iterations in [0, 1) (AdaRound: 0.2)")
        return cls(**values)

    def check_run(self) -> None:
        """A run's own recon (saved recipes are not checked: an old model must stay loadable): the paper-compatible
        evaluation needs inputs that drop, and PAR's loss knobs need PAR's loss (with the block MSE nothing reads
        them, and the run would be reported under a setting that did nothing)."""
        if self.name == "none":
            return
        if self.paper_eval_compat and self.drop_prob == 1.0:
            raise SaqError(no_paper_eval("recon.drop_prob=1.0 drops nothing"))
        if self.round_reg.weight == 0:  # the schedule of a regulariser that is off would be reported but unused
            changed = [f.name for f in fields(RoundingRegularizer) if f.name != "weight"
                       and getattr(self.round_reg, f.name) != getattr(RoundingRegularizer(), f.name)]
            if changed:
                raise SaqError(f"recon.round_reg.{changed[0]}={getattr(self.round_reg, changed[0]):g} shapes AdaRound's "
                               "rounding regulariser, which is off (recon.round_reg.weight=0); set its weight (PTQ4SAM: "
                               "0.01) or leave the schedule at its default")
        if self.loss == "mse":
            unused = [f"par_loss.{f.name}={getattr(self.par_loss, f.name)!r}" for f in fields(ParLoss)
                      if getattr(self.par_loss, f.name) != getattr(ParLoss(), f.name)]
            if self.response_input != ReconConfig.response_input:
                unused.append(f"response_input={self.response_input!r}")
            if unused:
                raise SaqError(f"recon.{unused[0]} is a knob of PAR's loss, but recon.loss=mse learns every unit "
                               "against its own output MSE and would not read it; set recon.loss=par (recon=par) or "
                               "leave it at its default")

    def unit_iters(self, kinds: list[str], reference_kinds: list[str]) -> list[int]:
        """Iterations of each unit (in chain order). official: recon.iters per kind. equal: the total of PAR's
        official schedule on this model (its units: reference_kinds), shared in proportion to recon.iters."""
        official = [int(self.iters[k]) for k in kinds]
        if self.budget == "official":
            return official
        total = sum(PAR_OFFICIAL_ITERS[k] for k in reference_kinds)
        weight = sum(official)
        if weight == 0:
            return official
        # largest remainders: the shares add up to exactly the total (rounding each alone missed it by a few)
        exact = [total * n / weight for n in official]
        shares = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
        for i in by_remainder[:total - sum(shares)]:
            shares[i] += 1
        return shares


def budget_line(budget: str, kinds: list[str], shares: list[int]) -> str:
    """The iterations each unit kind learns, said once at the start. equal: what it made of recon.iters (their
    proportions, not their totals: recon.iters.stage=20 there still learns PAR's whole total). official: recon.iters
    as set, so a partial override (recon.iters.block=500 on qdrop) shows the kinds left at 20k each."""
    per_kind: dict[str, list[int]] = {}
    for kind, share in zip(kinds, shares):
        per_kind.setdefault(kind, []).append(share)
    parts = [f"{kind} {min(n)}" + (f"-{max(n)}" if max(n) != min(n) else "") + (f" x{len(n)}" if len(n) > 1 else "")
             for kind, n in per_kind.items()]
    if budget == "official":
        return (f"recon.budget=official: {sum(shares):,} iterations over {len(shares)} units, recon.iters as set: "
                f"{', '.join(parts)}")
    return (f"recon.budget=equal: {sum(shares):,} iterations (PAR's official total on this model) over {len(shares)} "
            f"units, shared in proportion to recon.iters: {', '.join(parts)} (recon.budget=official learns "
            "recon.iters as set)")


def no_paper_eval(reason: str) -> str:
    """Why recon.paper_eval_compat=true cannot run on a model learned without dropping."""
    return (f"recon.paper_eval_compat=true leaves linear inputs dropping at recon.drop_prob, but {reason}: the "
            "evaluation would be the fully quantized one under the paper-compatible label; set "
            "recon.paper_eval_compat=false")


def _plain(cfg):
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return cfg


def _check_keys(data: Mapping, cls, where: str) -> None:
    allowed = {f.name for f in fields(cls)}
    for key in data:
        if key not in allowed:
            raise SaqError(f"{where}.{key} is not a known key; expected one of {sorted(allowed)}")

