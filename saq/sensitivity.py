"""Quantization sensitivity of a saved run: its task metrics fully quantized, then with one part at a time in FP.

`python -m saq.sensitivity RUN_DIR [parts=a,b,...] [max_images=N] [threads=N] [device=cpu|cuda]`. The run is rebuilt
as `quant.load` would (the config in its results.json, evaluated fully quantized) on the run's own device and with
its own torch thread count unless device= or threads= is given: float sums differ in the last bits between thread
counts, which can move mask AP by 0.01-0.02.
Parts are module paths of the SAM (`image_encoder`, `mask_decoder.transformer.layers.0.cross_attn_image_to_token`,
..., down to one quantizer such as `...cross_attn_image_to_token.q_proj.input_quantizer`); by default
saq.sam.units.model_parts (encoder, decoder, each two-way layer and its sub-blocks, final attention), then
`iou_scores`: the quantized masks with the FP model's predicted IoU scores (box-prompt mAP ranks masks by them, the
semantic task filters by them), which splits a metric's loss into what the scores cost and what the masks cost.
A part in FP has its quantizers off and its layers' FP weights back (reconstruction writes its learned rounding into
the weights, so quantizers off alone would keep it). A part that gains holds quantization error; one that loses had
learned to make up for error elsewhere.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from saq.errors import SaqError, check_device
from saq.log import (
    RESULTS_FILE,
    SENSITIVITY_FILE,
    RunDirHeld,
    analyse_run_dir,
    labelled_config,
    method_label,
    set_aside,
    shown_path,
    write_json_atomic,
)

USAGE = "python -m saq.sensitivity RUN_DIR [parts=a,b,...] [max_images=N] [threads=N] [device=cpu|cuda]"
FULL = "(fully quantized)"
IOU_SCORES = "iou_scores"  # not a module: the FP model's predicted IoUs with the quantized model's masks
# ||saved - FP|| / ||FP|| of a layer's weight: at most 0.12 at W4 on sam_tiny, ~0.55 for W2 min/max rounding;
# an unrelated checkpoint's weights of the same spread give ~1.4
MAX_WEIGHT_QUANT_ERROR = 0.75


def sensitivity(run_dir: str | Path, parts: Sequence[str] | None = None, max_images: int | None = None,
                threads: int | None = None, report=print, save: bool = True, device: str | None = None
                ) -> dict[str, dict]:
    """{FULL or part: scalar task metrics} for the saved run in `run_dir`; `report(line)` gets one line per row.
    With `save`, the rows go to RUN_DIR/sensitivity.json as they come and, at the end, to a bar chart beside it
    (an earlier file is kept aside, never overwritten)."""
    from saq.pipeline import build_task
    from saq.quant import iter_quantizers
    from saq.quant.export import read_recipe
    from saq.sam.build import build_sam
    from saq.sam.units import model_parts
    from saq.saved import load_run, loaded_provenance, reading_saved_model, saved_dir

    results = Path(run_dir) / RESULTS_FILE
    if Path(run_dir).is_file():
        raise SaqError(f"sensitivity: {run_dir} is a file; give its folder ({Path(run_dir).parent}), the directory of "
                       "a finished quantized run")
    if not Path(run_dir).is_dir():
        raise SaqError(f"sensitivity: no such directory: {run_dir}; give the directory of a finished quantized run")
    if not results.is_file():
        raise SaqError(f"sensitivity: {results} not found; give the directory of a finished quantized run")
    try:
        record = json.loads(results.read_text())
    except (ValueError, OSError) as exc:
        raise SaqError(f"sensitivity: {results} is not a saq run record ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise SaqError(f"sensitivity: {results} is not a saq run record (no \"config\" object); give the directory "
                       "of a finished quantized run")
    cfg = OmegaConf.create(record["config"])
    missing = [key for key in ("model.name", "quant.name", "task._target_") if OmegaConf.select(cfg, key) is None]
    if missing:
        raise SaqError(f"sensitivity: {results} is not a saq run record (config.{missing[0]} missing); give the "
                       "directory of a finished quantized run")
    if cfg.quant.name == "fp":
        raise SaqError(f"sensitivity: {run_dir} is an FP run; give a quantized run's directory")
    device = check_device(device or cfg.get("device") or "cpu", "device")
    own_threads = threads or cfg.get("threads") or record.get("threads_used")  # threads=null: what the run had
    if own_threads:
        torch.set_num_threads(own_threads)
    if max_images is not None:
        cfg.task.max_images = max_images
    # the run is rebuilt as it was: what it read must be where it had it (this tool has no settings to move it)
    checkpoint = cfg.model.get("checkpoint")
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise SaqError(f"sensitivity: {run_dir} was run on checkpoint {checkpoint}, which is not there any more; "
                       "the run's checkpoint must be where the run had it")
    try:
        task = build_task(cfg)
    except SaqError as exc:  # its "(set task.data...)" hint names settings this tool does not have
        why = re.sub(r" \(set [^)]*\)$", "", str(exc))
        raise SaqError(f"sensitivity: cannot rebuild the task of {run_dir}: {why}; the run's data must be where the "
                       f"run had it (config.task.data in {results})") from None
    # a run that evaluated a model saved by another (quant.load) reads that model where the run did
    source = cfg.quant.get("load") or run_dir
    if not cfg.quant.get("load") and cfg.quant.get("save") is False:
        raise SaqError(f"sensitivity: {run_dir} was run with quant.save=false and kept no quantized model; run it "
                       "again with quant.save=true")
    try:
        saved_dir(source, "")
    except SaqError:
        raise SaqError(f"sensitivity: the quantized model of {run_dir} is not there any more ({source} holds no "
                       "recipe.json, in it or in quantized_model/); it must be where the run had it") from None
    with ExitStack() as held:
        # the saved model is checked, read and reloaded for every row: the run that saved it must not rewrite it from
        # here on (a shared hold, as quant.load's: other readers go on; this run's own folder is held by main)
        if cfg.quant.get("load"):
            held.enter_context(reading_saved_model(cfg, Path(run_dir)))
        if cfg.quant.get("load") and isinstance(record.get("loaded_model"), dict):
            now = loaded_provenance(cfg)  # a later run saving into that folder sets the evaluated model aside
            changed = [key for key in record["loaded_model"] if now.get(key) != record["loaded_model"][key]]
            if changed:
                why = "saved later" if changed[0] == "export_id" else f"its {changed[0]} differs"
                raise SaqError(f"sensitivity: {source} now holds another model than the one {run_dir} evaluated ({why}); "
                               "the evaluated one may be beside it as quantized_model.*.previous: run the analysis on a "
                               "run of the model there now")
        cfg.quant.load = str(source)
        report(f"{run_dir}: one part at a time in FP (its quantizers off, its FP weights back), "
               f"{cfg.task.get('max_images') or 'all'} val images")
        model = build_sam(cfg.model.name, checkpoint).to(device)
        names = list(dict.fromkeys(parts)) if parts is not None else [*model_parts(model), IOU_SCORES]  # each once
        saved, _ = load_run(model, cfg)
        # checked on the quantized model, so a single quantizer (`...q_proj.input_quantizer`) is a part too
        known = {name for name, _ in saved.named_modules()} | {IOU_SCORES}
        unknown = [p for p in names if p not in known]
        if unknown:
            raise SaqError(f"sensitivity: no module {unknown[0]!r} in quantized {cfg.model.name}; parts are module paths "
                           f"such as {', '.join(model_parts(model)[:3])}, down to single quantizers, or {IOU_SCORES}")
        without = [p for p in names if p != IOU_SCORES and not any(True for _ in iter_quantizers(saved.get_submodule(p)))]
        if without:
            report(f"skipped, no quantizers in them (nothing to switch to FP): {', '.join(without)}")
            names = [p for p in names if p not in without]
            if not names:  # the fully quantized row alone would compare nothing (and draw an empty chart)
                raise SaqError(f"sensitivity: none of the parts has quantizers ({', '.join(without)}); name modules "
                               f"that are quantized, such as {', '.join(model_parts(model)[:3])}")
        # a recipe with the checkpoint's SHA-256 was checked against the file on loading; older ones go by the weights
        hashed = bool(read_recipe(saved_dir(source)).get("extra", {}).get("checkpoint_sha256"))
        fp_weights = fp_reference(model, saved, run_dir, check_weights=not hashed)
        del saved  # one model at a time beside the FP weights (ViT-H is large)
        rows = {}
        out = SensitivityFile(Path(run_dir), record, cfg, task.name, report) if save else None
        _rows(rows, names, model, cfg, task, fp_weights, out, report)
    if out is not None:
        out.plot(rows)
    return rows


def _rows(rows, names, model, cfg, task, fp_weights, out, report) -> None:
    """Evaluate the fully quantized model, then each part in FP, into `rows` (and `out`) as they come."""
    from saq.pipeline import scalar_metrics, seed_everything
    from saq.quant import set_quant_state
    from saq.report import is_table_metric
    from saq.sam.segmenter import ScoreSwapSegmenter, Segmenter
    from saq.saved import load_run

    for part in [None, *names]:
        qmodel, _ = load_run(model, cfg)
        segmenter = Segmenter(qmodel, cfg.model.decode_batch_size)
        if part == IOU_SCORES:
            # the run's FP model: the saved one with every quantizer off and its FP weights back, so the planted
            # outliers (biases, never learned) and BIG's exact sign folding are there as in the run
            scorer, _ = load_run(model, cfg)
            quiet_fp(scorer)
            restore_fp_weights(scorer, fp_weights, "")
            segmenter = ScoreSwapSegmenter(qmodel, scorer, cfg.model.decode_batch_size)
        elif part is not None:
            set_quant_state(qmodel.get_submodule(part), "off")
            restore_fp_weights(qmodel, fp_weights, part)
        seed_everything(cfg.seed)  # paper_eval_compat leaves linear inputs randomly dropped: same draws every row
        start = time.perf_counter()
        metrics = scalar_metrics(task.evaluate(segmenter, progress=False))
        rows[FULL if part is None else part] = metrics
        label = FULL if part is None else f"{part or '(whole model)'} in FP"
        shown = "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if is_table_metric(k, v))
        report(f"{label:<66} {shown}  ({time.perf_counter() - start:.0f} s)")
        if out is not None:
            out.write(rows)


class SensitivityFile:
    """RUN_DIR/sensitivity.json, rewritten after every row (a killed run keeps what it measured), and the bar chart
    sensitivity.png. A run directory that cannot be written costs only the files: the rows are printed anyway."""

    def __init__(self, run_dir: Path, record: dict, cfg, task: str, report):
        from saq.pipeline import scalar_metrics
        from saq.report import METRIC_ORDER

        self.path, self.report = run_dir / SENSITIVITY_FILE, report
        # a quant.load run is labelled by the run that made its model, as in the report and W&B
        self.header = {"run_dir": str(run_dir), "method": method_label(labelled_config(record)), "model": cfg.model.name,
                       "quant": cfg.quant.name, "task": task, "images": cfg.task.get("max_images") or "all",
                       "metric": METRIC_ORDER.get(task, [None])[0],
                       "fp": None}
        fp = (record.get("metrics") or {}).get("fp")
        if isinstance(fp, dict) and cfg.task.get("max_images") == record["config"]["task"].get("max_images"):
            self.header["fp"] = scalar_metrics(fp)  # the run's FP row, on the same images as these rows
        self.ok = True
        try:
            for earlier in (self.path, self.path.with_suffix(".png")):
                if earlier.exists():
                    report(f"{earlier} held an earlier sensitivity run; kept as {set_aside(earlier, 'previous')}")
        except OSError as exc:
            self.ok = False
            report(f"warning: cannot write {self.path} ({exc.strerror or exc}); the rows are printed only")
        self.write({})

    def write(self, rows: dict[str, dict]) -> None:
        if not self.ok:
            return
        try:
            write_json_atomic(self.path, {**self.header, "rows": rows})
        except OSError as exc:  # a read-only run directory or a full disk: keep measuring, the rows are printed
            self.ok = False
            self.report(f"warning: cannot write {self.path} ({exc.strerror or exc}); the rows are printed only")

    def plot(self, rows: dict[str, dict]) -> None:
        if not self.ok:
            return
        from saq.plots import sensitivity_bars

        self.report(f"results: {shown_path(self.path)}")
        try:
            self.report(f"figure: {shown_path(sensitivity_bars(rows, self.header, self.path.with_suffix('.png')))}")
        except Exception as exc:  # a figure must not cost the rows, which are written already
            self.report(f"warning: the sensitivity figure failed ({type(exc).__name__}: {exc}); rows are in {self.path}")


@torch.no_grad()
def fp_reference(model: torch.nn.Module, saved: torch.nn.Module, run_dir, check_weights: bool = True
                 ) -> dict[str, torch.Tensor]:
    """The FP weight of each quantized layer of the saved run ({layer path: weight}).

    Reconstruction writes its learned rounding into the weights, so switching a part's quantizers off is not FP there:
    its FP weights must come back. They are the checkpoint's, with BIG's sign folding read back from the saved model
    (folded_signs). Biases are never learned (the saved ones, planted outliers included, are the FP ones), so only
    weights are taken from here. With `check_weights` each saved weight must be near its FP weight: a check that
    the checkpoint is the run's where the recipe holds no hash of it (a W2 min/max layer can come near the bound).
    """
    from saq.quant import quant_config, quantize
    from saq.quant.big import fold_channel_signs
    from saq.quant.modules import QuantLayer

    reference = quantize(model, quant_config(saved))  # a copy in the saved model's structure (BIG's q/k pairs)
    for name, attention in reference.named_modules():
        if getattr(attention, "big_sign_fold", False):
            pair = attention.sign_fold_pair()
            sign = pair_signs([saved.get_submodule(f"{name}.{role}") for role in ("q_proj", "k_proj")], pair)
            if sign is None:
                raise SaqError(f"sensitivity: cannot rebuild the FP model of {run_dir}: the signs of {name}'s query "
                               "and key projections against the checkpoint's do not agree, as BIG's folding leaves "
                               "them; the run's checkpoint must be where the run had it")
            fold_channel_signs(*pair, sign)
    weights = {}
    for name, layer in saved.named_modules():
        if isinstance(layer, QuantLayer):
            fp = weights[name] = reference.get_submodule(name).weight
            off = float((layer.weight - fp).norm() / fp.norm().clamp_min(1e-12)) if check_weights else 0.0
            if off > MAX_WEIGHT_QUANT_ERROR:
                raise SaqError(f"sensitivity: cannot rebuild the FP model of {run_dir}: {name}'s saved weight is no "
                               f"quantization of the checkpoint's (relative difference {off:.2f}); the run's checkpoint "
                               "must be where the run had it")
    return weights


def pair_signs(saved_pair, fp_pair) -> torch.Tensor | None:
    """BIG's per-channel signs (±1) of a saved q/k projection pair against its FP pair: from the weight rows; where
    both rounded to zero, from the biases (never learned: the FP ones times the sign); else +1. None when the q and
    k rows disagree (the checkpoint is not the run's)."""
    q_sign, k_sign = (folded_signs(s.weight, f.weight) for s, f in zip(saved_pair, fp_pair))
    signs = [torch.where(q_sign == 0, k_sign, q_sign), torch.where(k_sign == 0, q_sign, k_sign)]
    if not torch.equal(*signs):
        return None
    sign = signs[0]
    for s, f in zip(saved_pair, fp_pair):
        if s.bias is not None and f.bias is not None:
            sign = torch.where(sign == 0, torch.sign(s.bias * f.bias), sign)
    return torch.where(sign == 0, 1.0, sign)


def folded_signs(saved: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Per output row, -1 where BIG flipped `fp`'s row into `saved`, +1 where not, 0 where the saved row does not say
    (all rounded to zero: its partner projection's row tells). Rounding to a grid that holds 0 (and clamping to a
    range that holds it) keeps each weight's sign or zeroes it, so a saved row's product with its FP row is negative
    only when the row was flipped."""
    return torch.sign((saved * fp).flatten(1).sum(1))


def quiet_fp(qmodel: torch.nn.Module) -> torch.nn.Module:
    """Every quantizer off and drawing nothing: as the FP scorer beside the quantized model, a paper-compat run's
    dropping quantizers would still draw their masks and move the quantized model's draws off the full row's."""
    from saq.quant import iter_quantizers, set_quant_state

    set_quant_state(qmodel, "off")
    for quantizer in iter_quantizers(qmodel):
        quantizer.drop_prob = 1.0
    return qmodel


@torch.no_grad()
def restore_fp_weights(qmodel: torch.nn.Module, fp_weights: dict[str, torch.Tensor], part: str) -> None:
    """Write the FP weight (fp_reference's) into every quantized layer inside `part` (a module path, or a layer's
    weight_quantizer; "" is the whole model)."""
    from saq.quant.modules import QuantLayer

    for name, layer in qmodel.named_modules():
        inside = part == "" or name == part or name.startswith(f"{part}.") or part == f"{name}.weight_quantizer"
        if inside and isinstance(layer, QuantLayer):
            layer.weight.copy_(fp_weights[name])


def main(argv: list[str] | None = None) -> int:
    from saq.cli import tool_args

    try:
        path, options = tool_args(sys.argv[1:] if argv is None else argv, USAGE,
                                  {"parts": None, "max_images": None, "threads": None, "device": ("cpu", "cuda")},
                                  about=__doc__)
        try:
            threads = int(options["threads"]) if "threads" in options else None
            max_images = int(options["max_images"]) if "max_images" in options else None
        except ValueError:
            raise SaqError(f"threads and max_images take whole numbers; usage: {USAGE}") from None
        if (threads is not None and threads < 1) or (max_images is not None and max_images < 1):
            raise SaqError(f"threads and max_images must be >= 1; usage: {USAGE}")
        # "a, b" and a trailing comma name a and b (an empty name would be the whole model, asked for by no one)
        parts = [n.strip() for n in options["parts"].split(",") if n.strip()] if "parts" in options else None
        if parts == []:  # parts=, would evaluate the fully quantized row alone and draw an empty chart
            raise SaqError(f"parts={options['parts']} names no module; give module paths such as "
                           f"parts=image_encoder,mask_decoder (or leave parts out for every part); usage: {USAGE}")
        # the run's folder is held while its model is read and its rows written: a run into it would set them aside
        with analyse_run_dir(path) if Path(path).is_dir() else nullcontext():
            sensitivity(path, parts, max_images, threads, report=lambda line: print(line, flush=True),
                        device=options.get("device"))
    except RunDirHeld as exc:  # a run, saq.deploy or another analysis: this tool has no folder of its own to give
        print(f"error: another saq process is writing into {exc.folder}; wait for it to finish, then run the "
              "analysis again", file=sys.stderr)
        return 2
    except SaqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
