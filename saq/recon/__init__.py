"""Reconstruction after calibration: recon=none | qdrop (block MSE) | par (prompt-aware, with layer skipping)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from saq.errors import SaqError
from saq.recon.config import PAR_OFFICIAL_ITERS, ReconConfig, no_paper_eval
from saq.recon.loop import (
    EVAL_FULL,
    EVAL_PAPER,
    ReconReport,
    Reconstructor,
    UnitReport,
    apply_paper_eval_compat,
    reconstruction_state,
)

__all__ = ["EVAL_FULL", "EVAL_PAPER", "PAR_OFFICIAL_ITERS", "ReconConfig", "ReconReport", "Reconstructor",
           "UnitReport", "apply_paper_eval_compat", "checkpoint_path", "loaded_evaluation", "reconstruct",
           "reconstruction_state"]


def checkpoint_path(cfg: ReconConfig, key: str) -> Path:
    """Where the finished units of this run are kept: recon.state_dir / hash(key + every recon knob that changes what
    is learned; resume, logging, where tensors are cached and the evaluation mode do not). A run that finished
    removes it once its model is saved (quant.load evaluates that model again, in either evaluation mode)."""
    from saq.sweep import KNOBS_ADDED_SINCE

    # a knob added since, at the value that does what runs before it did, leaves their checkpoints resumable
    old_behaviour = {k.split(".", 1)[1]: v for k, v in KNOBS_ADDED_SINCE.items() if k.startswith("recon.")}
    old_behaviour.pop("budget", None)  # learned runs always had it (it is new to recon=none records): it stays hashed
    knobs = {k: v for k, v in vars(cfg).items() if k not in ("resume", "log_every", "paper_eval_compat", "state_dir",
                                                                  "cache_device")
             and not (k in old_behaviour and v == old_behaviour[k])}
    digest = hashlib.sha256(f"{key}|{json.dumps(knobs, sort_keys=True, default=str)}".encode()).hexdigest()[:24]
    return Path(cfg.state_dir) / f"{digest}.pt"


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, samples, recon_cfg, seed: int = 0, key: str | None = None,
                progress: bool = True) -> ReconReport | None:
    """Run the `recon` config on a calibrated quantized model, in place; None for recon=none.

    `key` identifies everything before reconstruction (model, data, quant and clip config, seed): with it, each
    finished unit is saved and recon.resume=true continues a killed run. On return the model is in its evaluation
    state: fully quantized, or — with recon.paper_eval_compat — the official evaluation's linear inputs at drop_prob.
    """
    cfg = ReconConfig.from_cfg(recon_cfg)
    if cfg.name == "none":
        return None
    cfg.check_run()
    checkpoint = checkpoint_path(cfg, key) if key is not None else None
    reconstructor = Reconstructor(qmodel, fp_model, cfg, seed, progress, checkpoint)
    report = reconstructor.run(samples)
    report.state_file = checkpoint
    if cfg.paper_eval_compat:
        apply_paper_eval_compat(reconstructor.learned_modules, cfg.drop_prob)
        report.eval_mode = EVAL_PAPER
    return report


def _learned(recon_cfg) -> ReconConfig | None:
    return None if not recon_cfg or recon_cfg.get("name", "none") == "none" else ReconConfig.from_cfg(recon_cfg)


def check_loaded_recon(saved_recon, run_recon, where) -> None:
    """quant.load evaluates what the saved model learned and reconstructs nothing: this run's `recon` may be none or
    the saved one (to set recon.paper_eval_compat), anything else is one SaqError line."""
    saved, run = _learned(saved_recon), _learned(run_recon)
    if run is None:
        return
    if saved is None:
        raise SaqError(f"quant.load={where} was not reconstructed (recon=none), so recon={run.name} has nothing to "
                       "evaluate; leave recon unset (and any method= preset that sets it)")
    if run.name != saved.name:
        raise SaqError(f"quant.load={where} was reconstructed with recon={saved.name}; this run sets recon={run.name} "
                       f"(quant.load reconstructs nothing: use recon={saved.name} or leave it unset)")


def loaded_evaluation(qmodel: nn.Module, saved_recon, run_recon, where) -> dict:
    """The `recon` record of a quant.load run: the reconstruction the saved model went through (its recipe) and the
    evaluation mode. recon.paper_eval_compat=true puts the saved units' linear/conv inputs back at drop_prob, as
    reconstruct() does, so both evaluation modes of one learned model cost an evaluation each, not a calibration."""
    check_loaded_recon(saved_recon, run_recon, where)
    saved, run = _learned(saved_recon), _learned(run_recon)
    record = {"method": saved.name if saved else "none", "eval_mode": EVAL_FULL, "loaded_from": str(where)}
    if saved is not None and run is not None and run.paper_eval_compat:
        if saved.drop_prob == 1.0:
            raise SaqError(no_paper_eval(f"the model quant.load={where} loads learned with recon.drop_prob=1.0, "
                                         "dropping nothing"))
        from saq.sam.units import build_chain

        modules = [m for step in build_chain(qmodel, saved.granularity) if step.learnable
                   for m in step.modules(qmodel)]
        apply_paper_eval_compat(modules, saved.drop_prob)
        record["eval_mode"] = EVAL_PAPER
    return record
