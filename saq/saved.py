"""A run's quantized model on disk: quant.save writes it into the run directory, quant.load evaluates it again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from saq.errors import SaqError
from saq.log import (
    DEPLOY_DIR,
    RESULTS_FILE,
    RUN_LOCK,
    SAVED_DIR,
    file_lock,
    flatten,
    folder_in_use,
    place_pending_record,
    set_aside,
    set_aside_run,
    set_aside_stamp,
)
from saq.quant.config import RUN_KEYS, QuantConfig
from saq.quant.export import RECIPE_FILE, check_state_file, export_quantized, load_quantized, read_recipe

# Settings that change how a model is calibrated, not what the calibrated model computes: free to differ on load.
CALIBRATION_ONLY = ("name", "calib_images", "calib_decode_batch")
# On a model saved or loaded here: its recipe's export_id, which a deployment of it records (saq.deploy checks it).
EXPORT_ID_ATTR = "saq_export_id"


def _outliers(cfg: DictConfig) -> dict | None:
    """The planted-outlier settings of the run's model (sam_tiny_outliers), None for a plain model."""
    outliers = cfg.model.get("outliers")
    return OmegaConf.to_container(outliers, resolve=True) if outliers else None


def save_run(qmodel: nn.Module, run_dir: str | Path, cfg: DictConfig, planted: list | None = None,
             checkpoint_sha256: str | None = None) -> Path:
    """Export the calibrated model to <run_dir>/quantized_model; the recipe's `extra` says what produced it.
    planted: the outlier offsets planted in the FP model (sam_tiny_outliers), which a run loading it plants again.
    checkpoint_sha256: the digest of the checkpoint as the run read it (default: the file as it is now; a file
    replaced during a long run would otherwise be recorded as the one the model came from)."""
    from saq.sam.build import checkpoint_digest

    if checkpoint_sha256 is None:
        checkpoint_sha256 = checkpoint_digest(cfg.model.name, cfg.model.checkpoint)
    calib = OmegaConf.select(cfg, "task.calib")  # which calibration images, in what order
    extra = {
        "model": cfg.model.name,
        # absolute: a later quant.load compares it from whatever folder it runs in
        "checkpoint": str(Path(cfg.model.checkpoint).expanduser().resolve()) if cfg.model.checkpoint else None,
        "checkpoint_sha256": checkpoint_sha256,
        "outliers": _outliers(cfg),  # the FP model the run evaluates beside it plants the same ones
        # ... with these offsets: measured on this task's calibration images, which another task's would not give
        "planted_outliers": planted,
        "quant_preset": cfg.quant.name,
        "clip": OmegaConf.to_container(cfg.clip, resolve=True) if "clip" in cfg else None,
        "recon": OmegaConf.to_container(cfg.recon, resolve=True) if "recon" in cfg else None,
        "task": cfg.task.get("_target_") if "task" in cfg else None,
        "calib_images": cfg.quant.get("calib_images"),
        "calib_decode_batch": cfg.quant.get("calib_decode_batch"),
        "task_calib": OmegaConf.to_container(calib, resolve=True) if calib is not None else None,
        "seed": cfg.get("seed"),
        "method": cfg.get("method", "custom"),
        # this export itself: a later model saved into the folder by the same command is another one (a retrained
        # checkpoint, other code), which a run that loaded this one must not be analysed on
        "export_id": uuid.uuid4().hex,
    }
    target = Path(run_dir) / SAVED_DIR
    if (Path(run_dir) / RESULTS_FILE).exists():  # an earlier run's results go aside with its model, before this
        # run's model is written: were this run to fail, its model would otherwise sit beside their results.json
        kept = set_aside_run(run_dir, "previous")
        print(f"{kept.parent / RESULTS_FILE} held an earlier run; kept as {kept} (its model, figures and analyses "
              "renamed alike)")
        place_pending_record(run_dir)  # the folder is this run's now: its record too, were it to fail from here
    else:  # an earlier run here saved its model (and maybe deployed it) but wrote no results (killed): both go
        # aside together, under one stamp, so no deployment of that model stays beside this run's
        stamp = set_aside_stamp()
        for path, what in ((target, "model"), (Path(run_dir) / DEPLOY_DIR, "deployment")):
            if path.exists():
                print(f"{path} held an earlier run's {what}; kept as {set_aside(path, 'previous', stamp)}")
    saved = export_quantized(qmodel, target, extra=extra)
    setattr(qmodel, EXPORT_ID_ATTR, extra["export_id"])  # a deployment made from it now records this export
    return saved


def saved_dir(path: str | Path, setting: str = "quant.load=") -> Path:
    """The export folder of quant.load=PATH: PATH itself when it holds a recipe, else PATH/quantized_model.
    `setting` names PATH in errors (a tool names its own argument, e.g. "RUN_DIR ")."""
    path = Path(path)
    for candidate in (path, path / SAVED_DIR):
        if (candidate / RECIPE_FILE).is_file():
            return candidate
    if not path.exists():
        raise SaqError(f"{setting}{path}: no such directory")
    if path.is_file():
        folder = path.parent.parent if path.parent.name == SAVED_DIR else path.parent
        if (folder / SAVED_DIR / RECIPE_FILE).is_file():  # recipe.json or results.json itself: its folder is meant
            raise SaqError(f"{setting}{path} is a file; give the run's folder ({folder}) or its {SAVED_DIR}/ folder")
        checkpoint = " (a SAM checkpoint goes in model.checkpoint)" if path.suffix in (".pth", ".pt") else ""
        raise SaqError(f"{setting}{path} is a file; give the folder of a run that saved its quantized model (it holds "
                       f"{SAVED_DIR}/{RECIPE_FILE}){checkpoint}")
    loaded = _loaded_by(path)
    if loaded:  # a run that evaluated another run's model saves none of its own
        raise SaqError(f"{setting}{path} holds no saved quantized model: that run evaluated the one saved in {loaded} "
                       f"(quant.load); give {loaded}")
    # a later run into the folder (quant.save=false, FP) set the earlier model aside: name it, the newest first
    aside = sorted((p for p in path.glob(f"{SAVED_DIR}.*.previous") if (p / RECIPE_FILE).is_file()), reverse=True)
    earlier = (f"; an earlier run's model there was set aside as {aside[0]}{' (and others)' if len(aside) > 1 else ''}:"
               f" give {setting}{aside[0]} to load it") if aside else ""
    raise SaqError(f"{setting}{path} holds no saved quantized model ({RECIPE_FILE} in it or in {SAVED_DIR}/); "
                   f"runs save one unless quant.save=false{earlier}")


def _loaded_by(run_dir: Path) -> str | None:
    """The quant.load of the run whose results.json is in run_dir, if it has one."""
    import json

    try:
        config = json.loads((run_dir / RESULTS_FILE).read_text()).get("config") or {}
        return (config.get("quant") or {}).get("load") or None
    except (OSError, ValueError, AttributeError):
        return None


def _checkpoint(model: str, checkpoint) -> Path | None:
    """The file a model.checkpoint value loads (None or "": sam_tiny's shipped one), resolved for comparison."""
    from saq.sam.build import checkpoint_path

    path = checkpoint_path(model, checkpoint)
    return None if path is None else path.resolve()


def check_recipe(recipe: dict, cfg: DictConfig, where: Path) -> None:
    """SaqError (one line) unless the saved recipe fits this run's model and quant settings."""
    saved_model = recipe.get("extra", {}).get("model")
    preset = recipe.get("extra", {}).get("quant_preset") or recipe.get("quant", {}).get("name", "?")
    if saved_model is not None and saved_model != cfg.model.name:
        raise SaqError(f"quant.load={where} holds a {saved_model} model; this run builds model={cfg.model.name} "
                       f"(use model={saved_model})")
    extra = recipe.get("extra", {})
    saved_checkpoint, run_checkpoint = extra.get("checkpoint"), cfg.model.get("checkpoint")
    other_path = ("checkpoint" in extra and saved_checkpoint != run_checkpoint
                  and _checkpoint(cfg.model.name, saved_checkpoint) != _checkpoint(cfg.model.name, run_checkpoint))
    changed = False
    if extra.get("checkpoint_sha256"):  # the weights decide; recipes of earlier versions lack it and go by path
        from saq.sam.build import checkpoint_digest

        run_file = _checkpoint(cfg.model.name, run_checkpoint)
        if run_file is not None and not run_file.is_file():
            raise SaqError(f"checkpoint not found: {run_file} (set model.checkpoint to the file quant.load={where} "
                           "was made from)")
        changed = checkpoint_digest(cfg.model.name, run_checkpoint) != extra["checkpoint_sha256"]
        other_path = other_path and changed  # the same bytes moved or copied elsewhere are the same model
    if other_path:
        # the FP row would come from another model than the one quantized: two models side by side
        made_from = saved_checkpoint or f"the shipped {cfg.model.name} one (model.checkpoint unset)"
        use = f"use model.checkpoint={saved_checkpoint}" if saved_checkpoint else "leave model.checkpoint unset"
        sets = f"model.checkpoint={run_checkpoint}" if run_checkpoint else "the shipped one (model.checkpoint unset)"
        raise SaqError(f"quant.load={where} holds a model made from checkpoint {made_from}; this run's FP model is "
                       f"{sets} ({use}: the FP row must be of the model that was quantized)")
    if changed:
        raise SaqError(f"quant.load={where} was made from another version of the checkpoint file "
                       f"{_checkpoint(cfg.model.name, run_checkpoint)} (it has changed since: retrained or "
                       "replaced); the FP row would be of another model than the one quantized")
    if "outliers" in extra and extra["outliers"] != _outliers(cfg):
        raise SaqError(f"quant.load={where} holds a model with planted outliers {extra['outliers']}; this run plants "
                       f"{_outliers(cfg)} (use the model preset and model.outliers settings it was saved with)")
    if cfg.quant.name == "fp":
        raise SaqError(f"quant.load={where} needs the quantizing preset it was saved with (quant={preset}); "
                       "quant=fp means no quantization")
    # the loaded model is reported under its own seed and method: this run may not claim others
    saved_seed, saved_method = recipe.get("extra", {}).get("seed"), recipe.get("extra", {}).get("method")
    if saved_seed is not None and saved_seed != cfg.get("seed"):
        raise SaqError(f"quant.load={where} was calibrated with seed={saved_seed}; this run sets seed={cfg.get('seed')} "
                       f"(use seed={saved_seed}: a loaded model is reported under the seed that made it)")
    run_method = cfg.get("method", "custom")
    if saved_method is not None and run_method not in ("custom", saved_method):
        if saved_method == "custom":
            raise SaqError(f"quant.load={where} holds a model made without a method preset; this run sets "
                           f"method={run_method} (leave method unset: the report names it by its clip and recon)")
        raise SaqError(f"quant.load={where} holds a method={saved_method} model; this run sets method={run_method} "
                       f"(use method={saved_method})")
    wanted = flatten(QuantConfig.from_cfg({k: v for k, v in OmegaConf.to_container(cfg.quant, resolve=True).items()
                                         if k not in RUN_KEYS}).to_dict())
    saved = flatten(QuantConfig.from_cfg(recipe["quant"]).to_dict())
    for key, value in wanted.items():
        if key.split(".")[0] not in CALIBRATION_ONLY and saved.get(key) != value:
            raise SaqError(f"quant.load={where} was saved with quant.{key}={saved.get(key)!r} but this run sets "
                           f"{value!r}; use its preset (quant={preset}) and the same overrides")


def _source_run_folder(directory: Path, held: Path | None) -> Path | None:
    """The run folder whose quantized_model/ an export folder is, unless it is `held` (a folder this process holds
    already: a run's own, the one saq.sensitivity analyses); None for an export copied elsewhere or set aside,
    which no run writes into."""
    if directory.name != SAVED_DIR:
        return None
    folder = directory.parent
    return None if held is not None and folder.resolve() == Path(held).resolve() else folder


def _in_use_error(cfg: DictConfig, folder: Path) -> SaqError:
    return SaqError(f"quant.load={cfg.quant.load}: another saq process holds {folder} now (a run writing its model "
                    "there, or saq.sensitivity / saq.deploy); wait for it to finish")


@contextmanager
def reading_saved_model(cfg: DictConfig, held: Path | None = None) -> Iterator[None]:
    """A shared hold on the run folder quant.load reads, for as long as the block reads it: a run into that folder
    (which sets its model aside and saves another) is refused meanwhile, and one already there refuses this read, so
    the recipe, the tensors and the provenance read are of one model. held: a folder this process holds already."""
    folder = _source_run_folder(saved_dir(cfg.quant.load), held)
    if folder is None:
        yield
        return
    try:
        with file_lock(folder / RUN_LOCK, wait=False, shared=True):
            yield
    except BlockingIOError:
        raise _in_use_error(cfg, folder) from None


def check_load(cfg: DictConfig, held: Path | None = None) -> Path:
    """The export folder quant.load names, after checking that its recipe fits this run and that no other saq
    process holds its run folder (SaqError otherwise). held: a folder this process holds already (its own)."""
    from saq.recon import check_loaded_recon

    directory = saved_dir(cfg.quant.load)
    folder = _source_run_folder(directory, held)
    if folder is not None and folder_in_use(folder):  # before the FP evaluation, not after it
        raise _in_use_error(cfg, folder)
    recipe = read_recipe(directory)
    check_recipe(recipe, cfg, Path(cfg.quant.load))
    check_loaded_recon(recipe.get("extra", {}).get("recon"), cfg.get("recon"), cfg.quant.load)
    check_state_file(directory)  # a missing or truncated state file fails now, not after the FP evaluation
    return directory


def saved_planted_outliers(cfg: DictConfig) -> list | None:
    """The outlier offsets planted in the FP model of the run quant.load names (None when it recorded none: a plain
    model, or one saved before they were recorded)."""
    return read_recipe(saved_dir(cfg.quant.load)).get("extra", {}).get("planted_outliers")


def loaded_provenance(cfg: DictConfig) -> dict:
    """What produced the model quant.load names (results.json's `loaded_model`): the method, clipping,
    reconstruction, calibration data and seed of the run that saved it, by which reports and W&B label this run."""
    extra = read_recipe(saved_dir(cfg.quant.load)).get("extra", {})
    return {key: extra.get(key) for key in ("method", "clip", "recon", "seed", "calib_images", "calib_decode_batch",
                                            "task_calib", "export_id")}


def load_run(model: nn.Module, cfg: DictConfig, held: Path | None = None) -> tuple[nn.Module, dict]:
    """The quantized model saved by an earlier run (quant.load), rebuilt on `model`'s architecture, and its `recon`
    record: evaluated fully quantized, or with recon.paper_eval_compat as the official code evaluates. Called inside
    reading_saved_model; held: a folder this process holds already (its own)."""
    from saq.recon import loaded_evaluation

    directory = check_load(cfg, held)
    qmodel = load_saved(model, directory)
    saved_recon = read_recipe(directory).get("extra", {}).get("recon")
    return qmodel, loaded_evaluation(qmodel, saved_recon, cfg.get("recon"), cfg.quant.load)


def load_saved(model: nn.Module, directory: str | Path) -> nn.Module:
    """load_quantized, the model tagged with its recipe's export_id (EXPORT_ID_ATTR), so that a deployment of it
    records, and deployed_sam checks, which saved model it is."""
    qmodel = load_quantized(model, directory)
    setattr(qmodel, EXPORT_ID_ATTR, read_recipe(directory).get("extra", {}).get("export_id"))
    return qmodel
