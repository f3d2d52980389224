"""One run, top to bottom: build SAM, build the task, FP metrics, quantize + calibrate, quantized metrics, log."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from saq import CONF_DIR
from saq.errors import (
    SaqError,
    check_bool,
    check_device,
    check_int,
    check_number,
    check_seed,
    check_settings_taken,
    is_number,
)
from saq.log import (
    PAPER_COMPAT_SUFFIX,
    bits_label,
    flatten,
    folder_write_problem,
    git_commit,
    log_to_wandb,
    os_reason,
    package_versions,
    shown_path,
    write_json_atomic,
    write_results,
)
from saq.sam.build import build_sam, checkpoint_digest, checkpoint_file, checkpoint_path
from saq.sam.segmenter import Segmenter
from saq.sam.unit_kinds import DECODER_KINDS, KINDS_AT, UNIT_KINDS, check_unit_kind

FP_CACHE_DIR = Path("outputs/.cache/fp_metrics")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_fingerprint(cfg_model: DictConfig) -> str:
    path = checkpoint_path(cfg_model.name, cfg_model.checkpoint)  # the file build_sam loaded
    st = path.stat()
    outliers = OmegaConf.to_container(cfg_model.outliers, resolve=True) if cfg_model.get("outliers") else None
    return f"{cfg_model.name}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{outliers}"


def _progress_kwarg(node: DictConfig, progress: bool) -> dict:
    """{"progress": ...} for a _target_ that takes it (a prompt source reading a detector's results, a task checking
    its label maps show their progress as the run's own bars do), else {}; a target that does not load is left to
    instantiate's error."""
    try:
        takes = "progress" in inspect.signature(get_class(node._target_)).parameters
    except Exception:
        return {}
    return {"progress": progress} if takes else {}


def build_task(cfg: DictConfig):
    """Instantiate the task (tasks.<name>) with its prompt source, both from config `_target_`s."""
    for name in ("prompts", "task"):  # a key added with + that the class does not take ('takes no arguments' too)
        try:
            cls = get_class(cfg[name]._target_)
        except Exception:  # noqa: BLE001 - a target that does not load is left to Hydra's message
            continue
        check_settings_taken(cls, [key for key in cfg[name] if not key.startswith("_")], name, cfg[name]._target_)
    group = "prompts"
    try:
        prompts = instantiate(cfg.prompts, _convert_="all", **_progress_kwarg(cfg.prompts, cfg.get("progress", True)))
        group = "task"
        return instantiate(cfg.task, prompts=prompts, _convert_="all",
                           **_progress_kwarg(cfg.task, cfg.get("progress", True)))
    except InstantiationException as exc:
        # Hydra wraps constructor errors; a user-input error keeps its own one-line message.
        if isinstance(exc.__cause__, SaqError):
            raise exc.__cause__ from None
        if isinstance(exc.__cause__, OSError):  # Hydra's message keeps only PermissionError(13, ...): no file name
            raise SaqError(f"the {group} ({cfg[group].get('_target_', group)}) cannot be built: "
                           f"{os_reason(exc.__cause__)}; check the paths among its {group}.* settings") from None
        raise


FP_SOURCES = ("saq/sam", "tasks")  # the code that produces FP metrics
RECON_SOURCES = (*FP_SOURCES, "saq/quant", "saq/clipping", "saq/recon")  # ... and a reconstructed unit
DEFAULT_THREADS = torch.get_num_threads()  # the process's own (OMP_NUM_THREADS or the cores), for threads=null


def source_digest(parts: tuple[str, ...] = FP_SOURCES) -> str:
    """A hash of the code under `parts` (folders of the repository), so edits there invalidate a cache."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for part in parts for p in (root / part).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fp_cache_path(cfg: DictConfig, task, planted: list | None = None) -> Path:
    """Where the FP metrics of this model, data (file contents by size and mtime), prompts, seed, decoding, device,
    threads, package versions and metric code are cached. planted: the outliers planted at load time, which depend
    on the calibration images they were measured on, not only on model.outliers' settings."""
    # device, threads and versions are in the key because the cached metrics include timings (semantic task); the
    # threads in use, not the setting (threads=null is the process's own count, OMP_NUM_THREADS's say)
    key = (f"{checkpoint_fingerprint(cfg.model)}|{task.fingerprint()}|{cfg.seed}|{cfg.model.decode_batch_size}|"
           f"{cfg.device}|{torch.get_num_threads()}|{sorted(package_versions().items())}|{source_digest()}")
    if planted is not None:
        key += f"|{json.dumps(planted, sort_keys=True)}"
    return FP_CACHE_DIR / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


MODEL_KEYS = ("name", "checkpoint", "decode_batch_size", "outliers")  # every key of conf/model/*.yaml
FP_QUANT_KEYS = ("name", "save", "load")  # conf/quant/fp.yaml
DEFAULT_CLIP = "mse"  # conf/config.yaml's clip default: what an FP run carries untouched
LOGGER_MODES = ("offline", "online", "disabled")
LOGGER_KEYS = ("name", "mode", "project", "entity", "group", "tags", "init_timeout_s")  # conf/logger/wandb.yaml
CONFIG_GROUPS = ("model", "task", "prompts", "quant", "clip", "recon", "logger", "method")  # conf/config.yaml defaults
REQUIRED_GROUPS = ("model", "task", "prompts", "quant", "clip", "recon")  # logger and method may be removed
SWITCHES = ("fp_cache", "progress", "deploy", "figures", "resume")  # run-level true/false knobs


def run_keys() -> set[str]:
    """The top-level keys a run may have: conf/config.yaml's own, its groups, and a sweep preset's name."""
    return (set(OmegaConf.load(CONF_DIR / "config.yaml")) - {"defaults", "hydra"}) | set(CONFIG_GROUPS) | {"sweeps"}


def check_resolves(cfg: DictConfig) -> None:
    """Every ${...} resolves: a broken one in a key read only at the end (logger.group) would otherwise cost the
    finished run its results.json."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaqError(f"{getattr(exc, 'full_key', None) or 'the config'} cannot be resolved: {message}") from None


def check_method_preset(cfg: DictConfig) -> None:
    """A method= preset names a paper row by its clipping and reconstruction: a run that swaps either is another
    method and must not be reported (and matched to the paper) under the preset's label."""
    method = cfg.get("method", "custom")
    path = CONF_DIR / "method" / f"{method}.yaml"
    if method == "custom" or not path.is_file():
        return
    preset = OmegaConf.load(path)
    fix = ("drop method= and set the switches yourself (clip=..., recon=..., quant.big/quant.agq), or use the preset "
           "as it is")
    defining = {}  # dotted key -> the preset's value: what makes the paper's row, beside the group choices
    for entry in preset.get("defaults") or []:
        for key, preset_choice in (entry.items() if isinstance(entry, DictConfig) else ()):
            group = key.removeprefix("override /")
            chosen = (cfg.get(group) or {}).get("name")
            if group in ("clip", "recon") and chosen != preset_choice:
                raise SaqError(f"method={method} is {group}={preset_choice}; this run sets {group}={chosen}, so it "
                               f"is not {method} and would be reported as it: {fix}")
            if group == "recon" and (CONF_DIR / "recon" / f"{preset_choice}.yaml").is_file():
                loss = OmegaConf.load(CONF_DIR / "recon" / f"{preset_choice}.yaml").get("loss")
                if loss is not None:  # QDrop's block MSE or PAR's losses: the method itself, not a tuning of it
                    defining["recon.loss"] = loss
    own = {k: v for k, v in OmegaConf.to_container(preset, resolve=True).items() if k not in ("defaults", "method")}
    defining |= flatten(own)  # quant.big / quant.agq, clip.reduction
    for key, value in defining.items():
        chosen = OmegaConf.select(cfg, key)
        if chosen != value:
            raise SaqError(f"method={method} sets {key}={_yaml(value)}; this run sets {key}={_yaml(chosen)}, so it "
                           f"is another of the paper's rows (or none) and would be reported as {method}: {fix}")


def _yaml(value) -> str:
    """A config value as an override writes it (true, null, extreme)."""
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


LABELLED_GROUPS = ("quant", "clip", "recon")  # groups whose `name` is the label their preset gives a run


def check_group_labels(cfg: DictConfig, choices: dict | None = None) -> None:
    """A labelled group's `name` is what its preset calls the run (results.json, report rows, W&B): renamed by hand
    (quant.name=w4a4 on the FP preset, recon=qdrop recon.name=par) the run would be one preset under another's name.
    choices: the group presets chosen (Hydra's runtime choices; read from Hydra when it runs the job)."""
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        # the presets compared are this repository's: a run composed from another config tree is not checked
        ours = HydraConfig.initialized() and any(
            source.get("provider") == "main"
            and Path(str(source.get("path", "")).removeprefix("file://")).resolve() == CONF_DIR
            for source in HydraConfig.get().runtime.config_sources)
        choices = dict(HydraConfig.get().runtime.choices) if ours else {}
    for group in LABELLED_GROUPS:
        choice, node = choices.get(group), cfg.get(group)
        preset = CONF_DIR / group / f"{choice}.yaml"
        if choice is None or not isinstance(node, DictConfig) or not preset.is_file():
            continue
        own, name = OmegaConf.load(preset).get("name"), node.get("name")
        if own is not None and name != own:
            hint = (f"choose the preset with {group}={name}" if (CONF_DIR / group / f"{name}.yaml").is_file()
                    else f"leave {group}.name at the preset's {own!r}")
            raise SaqError(f"{group}.name={name!r} would label this run, but {group}={choice} sets its knobs: "
                           f"{hint}")


def check_overrides_read(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """An override the run would not read is refused: recon.iters of a unit kind the granularity does not make
    (recon.iters.layer at granularity=stage). Every preset lists every kind, so only the user's overrides can tell.
    overrides: the command line's (read from Hydra when it runs a single job; a sweep's shared overrides may serve
    jobs of several granularities, as recon.iters.stage=10 recon.iters.block=10 over a table sweep)."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from saq.sweep import override_strings

        single = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN
        overrides = override_strings(HydraConfig.get().overrides.task) if single else []
    check_clip_grid_read(cfg, overrides)
    check_load_overrides_read(cfg, overrides)
    check_switched_off_overrides(cfg, overrides)
    recon = cfg.get("recon") or {}
    granularity = recon.get("granularity")
    if granularity not in KINDS_AT:  # recon=none, or a granularity ReconConfig names as unknown
        return
    kinds = iters_kinds_set(overrides)
    for kind in kinds:  # not 'not read at this granularity': no granularity reads it
        check_unit_kind(kind)
    unread = [kind for kind in kinds if kind not in KINDS_AT[granularity]]
    if unread:
        raise SaqError(f"recon.iters.{unread[0]} is not read at recon.granularity={granularity}: its units are "
                       f"{', '.join(KINDS_AT[granularity])} (set recon.iters of one of those)")


# recon knobs a quant.load run reads (how it evaluates) or takes without effect as a sweep's shared setting
LOAD_READS_RECON = ("paper_eval_compat", "budget", "resume")


def check_load_overrides_read(cfg: DictConfig, overrides: list[str]) -> None:
    """quant.load evaluates a saved model and learns nothing: a clip.* or recon.* knob set beside it (recon.weight_lr,
    clip.percentile) would change nothing, yet the run's record would hold it as if it had."""
    if not cfg.quant.get("load"):
        return
    for key, value in parsed_overrides(overrides):
        group, _, knob = key.partition(".")
        knobs = [knob] if knob else list(value) if group in ("clip", "recon") and isinstance(value, dict) else []
        unread = [k for k in knobs if group == "clip" or k.split(".")[0] not in LOAD_READS_RECON]
        if group in ("clip", "recon") and unread:
            raise SaqError(f"{group}.{unread[0]} would not be read: quant.load evaluates the saved model as it was "
                           f"calibrated{' and learned' if group == 'recon' else ''} (its recipe holds the settings "
                           "that made it); drop it, or calibrate anew without quant.load")


def check_switched_off_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """A knob of something this run switches off (AGQ's bases with quant.agq=false, a quantizer setting of a part
    with enabled=false, a channel axis of a per-tensor quantizer, a W&B setting with logger=none) would change
    nothing, yet the run's record would hold it; the presets set them all, so only the user's overrides can tell."""
    quant, logger = cfg.get("quant") or {}, cfg.get("logger") or {}
    for key, _ in parsed_overrides(overrides):
        parts = key.split(".")
        reason = None
        if parts[0] == "logger" and len(parts) > 1 and parts[1] != "name" and logger.get("name") == "none":
            reason = "logger=none sends nothing to W&B (results.json only); use logger=wandb"
        elif key == "quant.agq_taus" and quant.get("agq") is False:
            reason = "quant.agq=false quantizes the softmax output uniformly; AGQ's bases are read with quant.agq=true"
        elif parts[0] == "quant" and len(parts) > 2 and parts[1] in ("encoder", "decoder") and parts[2] != "enabled" \
                and isinstance(quant.get(parts[1]), DictConfig) and quant[parts[1]].get("enabled") is False:
            reason = f"quant.{parts[1]}.enabled=false keeps the {parts[1]} in full precision"
        elif parts[:2] == ["recon", "iters"] and len(parts) == 3 and parts[2] in UNIT_KINDS:
            part = "decoder" if parts[2] in DECODER_KINDS else "encoder"
            if isinstance(quant.get(part), DictConfig) and quant[part].get("enabled") is False:
                reason = f"quant.{part}.enabled=false leaves the {part}'s units nothing to learn (they run 0 iterations)"
        elif parts[0] == "quant" and len(parts) == 4 and parts[3] == "ch_axis" and parts[2] in ("weight", "act"):
            node = (quant.get(parts[1]) or {}).get(parts[2]) or {}
            if node.get("granularity") == "per_tensor":
                reason = f"quant.{parts[1]}.{parts[2]}.granularity=per_tensor has no channel axis"
        if reason:
            raise SaqError(f"{key} would not be read: {reason}")


def check_clip_grid_read(cfg: DictConfig, overrides: list[str]) -> None:
    """clip.num_ranges sizes MSE's per-channel grid, which only a per-channel activation quantizer searches (the
    per-tensor ones search one range; weights have their own observer, quant.*.weight.observer): set on a run
    without one it would change nothing, yet make a row of its own in a report."""
    if not any(key == "clip.num_ranges" or (key == "clip" and isinstance(value, dict) and "num_ranges" in value)
               for key, value in parsed_overrides(overrides)):
        return
    quant = cfg.get("quant") or {}
    parts = [name for name in ("encoder", "decoder") if isinstance(quant.get(name), DictConfig | dict)
             and quant[name].get("enabled", True)]
    if quant.get("name") != "fp" and not any(
            quant[name].get("act", {}).get("granularity") == "per_channel" for name in parts):
        raise SaqError("clip.num_ranges is read only by per-channel activation quantizers "
                       "(quant.encoder.act.granularity=per_channel or quant.decoder.act.granularity=per_channel); "
                       "this run's are per-tensor, and weights use quant.*.weight.observer (mse: 100 ranges, p = 2.4)")


def parsed_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    """(key, value) of each command-line override, as Hydra parses them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [(o.key_or_group, o.value()) for o in OverridesParser.create().parse_overrides(overrides)]


def iters_kinds_set(overrides: list[str]) -> list[str]:
    """The unit kinds whose recon.iters the command-line overrides set: recon.iters.<kind>=N or recon.iters={...}."""
    kinds = []
    for key, value in parsed_overrides(overrides):
        kinds += ([key.removeprefix("recon.iters.")] if key.startswith("recon.iters.")
                  else list(value) if key == "recon.iters" and isinstance(value, dict) else [])  # {stage: 10, ...}
    return kinds


def check_run_knobs(cfg: DictConfig) -> None:
    """The run-level knobs (seed, threads, image count, batch size, model keys, logger mode): checked
    before anything uses them, so a typo or a wrong type is one line rather than a torch or numpy traceback."""
    check_resolves(cfg)
    removed = [g for g in REQUIRED_GROUPS if cfg.get(g) is None]
    if removed:  # ~model on the command line: every later step reads the group
        raise SaqError(f"the {removed[0]} group is required (removed with ~{removed[0]}?); choose one with "
                       f"{removed[0]}=NAME (conf/{removed[0]}/)")
    unknown = sorted(set(cfg) - run_keys())
    if unknown:  # a key added with + (a typo such as +thread=1) would be ignored
        raise SaqError(f"{unknown[0]} is not a run setting; expected one of {sorted(run_keys() - {'sweeps'})}")
    own = OmegaConf.load(CONF_DIR / "config.yaml")
    gone = [k for k in own if k not in ("defaults", "hydra", "method") and k not in cfg]
    gone += [f"model.{k}" for k in ("name", "decode_batch_size") if k not in cfg.model]
    if gone:  # ~device on the command line: later steps read it (a traceback hours in)
        raise SaqError(f"{gone[0]} is required (removed with ~{gone[0]}?); set it ({gone[0]}=VALUE) or leave it "
                       "to its default")
    for key in SWITCHES:
        if key in cfg:
            check_bool(cfg[key], key)
    check_seed(cfg.get("seed"), "seed")
    check_int(cfg.get("threads"), "threads", allow_none=True)
    check_int(cfg.task.get("max_images"), "task.max_images", allow_none=True)
    check_int(cfg.model.get("decode_batch_size", 64), "model.decode_batch_size")
    checkpoint = cfg.model.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):  # Path() of a number, a bool or a list fails
        raise SaqError(f"model.checkpoint={checkpoint!r} invalid; expected null or the path of a SAM .pth file")
    unknown = sorted(set(cfg.model) - set(MODEL_KEYS))
    if unknown:
        raise SaqError(f"model.{unknown[0]} is not a model setting; expected one of {list(MODEL_KEYS)}")
    logger = cfg.get("logger") or {}
    unknown = sorted(set(logger) - set(LOGGER_KEYS))
    if unknown:
        raise SaqError(f"logger.{unknown[0]} is not a logger setting; expected one of {list(LOGGER_KEYS)}")
    if logger.get("name") == "wandb" and logger.get("mode") not in LOGGER_MODES:
        raise SaqError(f"logger.mode={logger.get('mode')!r} is unknown; expected one of {list(LOGGER_MODES)}")
    if "init_timeout_s" in logger:
        check_number(logger.init_timeout_s, "logger.init_timeout_s", 1)
    tags, scalar = logger.get("tags"), (str, int, float)  # Hydra reads logger.group=2024 as a number: a name too
    if tags is not None and not isinstance(tags, scalar) and not (
            OmegaConf.is_list(tags) and all(isinstance(t, scalar) for t in tags)):
        raise SaqError(f"logger.tags={tags!r} is not a tag list; expected e.g. logger.tags=[baseline,w4]")
    for key in ("project", "entity", "group"):
        if logger.get(key) is not None and not isinstance(logger.get(key), scalar):
            raise SaqError(f"logger.{key}={logger.get(key)!r} is not a name; expected text or null")


def validate(cfg: DictConfig, run_dir: Path | None = None):
    """Check every knob that would otherwise fail late (after minutes of FP evaluation on a real model) and return
    the validated quant config and clip strategy (None for an FP run). run_dir: the run's own folder."""
    check_run_knobs(cfg)
    check_device(cfg.device, "device")
    from saq.quant.config import check_run_keys

    check_run_keys(cfg.quant)  # on quant=fp too: quant.save='false' would read as true, a number as a path
    if cfg.quant.get("load"):  # the saved model exists and fits this run
        from saq.saved import check_load

        check_load(cfg, run_dir)
    if cfg.get("deploy"):
        from saq.deploy import require_onnx

        require_onnx("deploy=true")  # found now, not after the FP and quantized evaluations
    quant_cfg, strategy = check_config(cfg)
    check_recon_state_dir(cfg, learns=quant_cfg is not None and not cfg.quant.get("load"))
    checkpoint_file(cfg.model.name, cfg.model.get("checkpoint"))  # last: a bad knob is named before a missing file
    return quant_cfg, strategy


def check_recon_state_dir(cfg: DictConfig, learns: bool) -> None:
    """recon.state_dir can be written when the run learns (it calibrates, so a recon=... saves its units): found
    now, not after calibration and the first unit. The FP cache is not asked for: a failed write of it only warns."""
    recon = cfg.get("recon") or {}
    if learns and recon.get("name", "none") != "none":
        from saq.recon import ReconConfig

        state_dir = ReconConfig.from_cfg(recon).state_dir  # the default when the preset leaves it out
        problem = folder_write_problem(Path(state_dir))
        if problem:  # written at every finished unit, resume or not: a later run may resume from it
            raise SaqError(f"recon.state_dir={state_dir} cannot be written ({problem}); set recon.state_dir to a "
                           "writable folder")


def check_config(cfg: DictConfig, choices: dict | None = None, overrides: list[str] | None = None):
    """validate's checks that read only the config (no device, saved model or installed package): a sweep runs them
    on every job before the first starts (choices, overrides: the job's, else read from Hydra's running job).
    Returns the quant config and clip strategy (None for an FP run)."""
    check_run_knobs(cfg)
    if cfg.quant.get("name") == "custom":  # conf/quant/_base.yaml, which Hydra lists beside the presets
        raise SaqError("quant=_base is the quantizing presets' shared settings, not a preset; choose quant=w4a4, "
                       "quant=w6a6 or quant=w8a8 (and set quant.w_bits / quant.a_bits for other widths)")
    check_group_labels(cfg, choices)
    check_overrides_read(cfg, overrides)
    check_method_preset(cfg)
    if cfg.get("deploy"):  # int8 kernels need a W8A8 model
        from saq.deploy import check_deploy_config

        check_deploy_config(None if cfg.quant.name == "fp" else cfg.quant)
        if (cfg.get("recon") or {}).get("paper_eval_compat"):  # metrics.quantized would keep inputs FP, deployed not
            raise SaqError("deploy=true evaluates the int8 graph fully quantized, but recon.paper_eval_compat=true "
                           "evaluates the model with half its linear inputs in FP: the two would not compare; deploy "
                           "the saved model from a fully quantized evaluation (drop recon.paper_eval_compat)")
    from saq.sam.build import VARIANTS

    variant = cfg.model.name in VARIANTS  # a model that is another's weights with outliers planted at load time
    if variant != bool(cfg.model.get("outliers")):  # either way the run would be reported as the other model
        raise SaqError(f"model={cfg.model.name} plants its outliers with model.outliers; it cannot be null"
                       if variant else f"model.outliers plants outliers in a model named {cfg.model.name}, which is "
                       f"then not {cfg.model.name}: use model={next(iter(VARIANTS))} (sam_tiny's weights with "
                       "planted outliers), or leave model.outliers out")
    if variant:
        from saq.sam.outliers import OutlierSpec

        OutlierSpec.from_cfg(cfg.model.outliers)
    if cfg.quant.name == "fp":
        # a method preset or a reconstruction asked for on an FP run would otherwise run FP under its label
        recon_name = (cfg.get("recon") or {}).get("name", "none")
        asked = (f"method={cfg.method}" if cfg.get("method", "custom") != "custom"
                 else f"recon={recon_name}" if recon_name != "none" else None)
        if asked:
            raise SaqError(f"{asked} quantizes the model but quant=fp runs it in full precision; "
                           "add a bit-width: quant=w4a4, quant=w6a6 or quant=w8a8")
        unknown = sorted(set(cfg.quant) - set(FP_QUANT_KEYS))
        if unknown:
            raise SaqError(f"quant=fp has no quant.{unknown[0]}: it runs the model in full precision; choose a "
                           "quantizing preset (quant=w4a4, quant=w6a6 or quant=w8a8) to set quant knobs")
        if cfg.quant.get("save"):
            raise SaqError("quant.save=true with quant=fp: nothing is quantized to save; add a bit-width (quant=w4a4, "
                           "quant=w6a6 or quant=w8a8)")
        # clipping is read only when quantizing: an FP run under clip=pcc clip.theta=0.3 would just be FP again
        default_clip = CONF_DIR / "clip" / f"{DEFAULT_CLIP}.yaml"
        if (cfg.get("clip") is not None and default_clip.is_file()
                and OmegaConf.to_container(cfg.clip, resolve=True) != OmegaConf.to_container(OmegaConf.load(default_clip))):
            raise SaqError(f"clip={cfg.clip.get('name')} (or a clip.* knob) with quant=fp: the ranges of a quantized "
                           "run are not used in full precision; add a bit-width (quant=w4a4, quant=w6a6 or quant=w8a8) "
                           "or leave clip at its default")
        return None, None
    from saq.clipping import build_range_strategy
    from saq.quant import QuantConfig
    from saq.quant.config import check_range_owner

    quant_cfg = QuantConfig.from_cfg(cfg.quant)  # both parts disabled is refused there
    strategy = build_range_strategy(cfg.clip)
    check_range_owner(quant_cfg, None if strategy is None else strategy.name)
    if strategy is not None:
        strategy.check_quant_config(quant_cfg)
        images = getattr(strategy, "images", None)
        if is_number(images) and images > quant_cfg.calib_images and not cfg.quant.get("load"):
            raise SaqError(f"clip.images={images} scores more images than calibration has (quant.calib_images="
                           f"{quant_cfg.calib_images}); lower clip.images or raise quant.calib_images")
    if cfg.get("recon") is not None:
        from saq.recon import ReconConfig

        recon = ReconConfig.from_cfg(cfg.recon)
        recon.check_run()
        preset = CONF_DIR / "recon" / f"{recon.name}.yaml"  # method=qdrop: its recon preset's lr beside agq=false
        preset_lr = OmegaConf.load(preset).get("softmax_scale_lr", 0.0) if preset.is_file() else 0.0
        if recon.name != "none" and recon.softmax_scale_lr != preset_lr and not quant_cfg.agq:
            raise SaqError(f"recon.softmax_scale_lr={recon.softmax_scale_lr:g} learns AGQ's post-softmax scale, but "
                           "quant.agq=false quantizes post-softmax maps uniformly (their steps learn at "
                           "recon.scale_lr); set quant.agq=true or leave recon.softmax_scale_lr at 0")
    return quant_cfg, strategy


def fp_metrics(cfg: DictConfig, model, task, planted: list | None = None) -> tuple[dict, str | None]:
    """FP metrics, and the cache file they came from when this evaluation was done before (else None)."""
    cache = fp_cache_path(cfg, task, planted)
    if cfg.fp_cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = None
        if isinstance(cached, dict) and scalar_metrics(cached):
            print(f"FP metrics from cache {cache}")
            return cached, str(cache)
        # derived data only: a broken entry (a full disk, a killed writer) is recomputed and replaced
        print(f"warning: FP cache entry {cache} is unreadable or empty; evaluating FP again", file=sys.stderr)
    metrics = task.evaluate(Segmenter(model, cfg.model.decode_batch_size), progress=cfg.progress)
    if cfg.fp_cache:
        try:
            write_json_atomic(cache, metrics)
        except OSError as exc:  # a cache only: the evaluation (hours on a large model) goes on into results.json
            print(f"warning: cannot write the FP cache {cache} ({os_reason(exc)}); the next run evaluates FP again",
                  file=sys.stderr)
    return metrics, None


def scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if is_number(v)}


def table_rows(metrics: dict, recon: dict | None) -> dict[str, dict]:
    """The printed table's rows: each precision's scalar metrics; a paper-compatible evaluation (half the linear
    inputs left FP) says so in its row, as in the report, not only in results.json."""
    from saq.recon import EVAL_PAPER

    paper_compat = recon is not None and recon.get("eval_mode") == EVAL_PAPER
    return {prec + (PAPER_COMPAT_SUFFIX if prec == "quantized" and paper_compat else ""): scalar_metrics(m)
            for prec, m in metrics.items()}


def format_table(model: str, task: str, prompts: str, rows: dict[str, dict]) -> str:
    """A small fixed-width table: one row per precision, one column per scalar metric."""
    names = [k for k in next(iter(rows.values())) if k not in ("images", "prompts")]
    head = ["model", "task", "prompts", "precision", *names]
    body = [[model, task, prompts, prec, *(f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k, ""))
                                            for k in names)] for prec, m in rows.items()]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def samples_digest(samples) -> str:
    """A hash of the calibration samples themselves (ids, pixels, prompts): the calibration data a unit learned
    from, whichever files, order or prompt source produced it."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(repr(sample.image_id).encode())
        for array in (sample.image, sample.boxes, sample.points, sample.point_labels):
            digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def reconstruct_for_run(cfg: DictConfig, qmodel, model, samples) -> tuple[dict, Path | None]:
    """recon=... on the calibrated model (saq.recon): its record, which says which evaluation mode follows, and the
    file its finished units were saved to for recon.resume (None without recon)."""
    from saq.recon import EVAL_FULL, reconstruct

    recon_cfg = cfg.get("recon") or {"name": "none"}
    # a saved unit is reused (recon.resume) only with the same model, calibration data, settings and code
    # torch's version and the thread count change the numbers too (a clamp's gradient; float sums at 4 bits)
    key = (f"{checkpoint_fingerprint(cfg.model)}|{samples_digest(samples)}|{cfg.quant}|{cfg.clip}|{cfg.seed}|"
           f"{cfg.device}|{source_digest(RECON_SOURCES)}|torch {torch.__version__}|{torch.get_num_threads()} threads")
    report = reconstruct(qmodel, model, samples, recon_cfg, cfg.seed, key, progress=cfg.progress)
    if report is None:
        return {"method": "none", "eval_mode": EVAL_FULL}, None
    return report.as_dict(), report.state_file


def run(cfg: DictConfig, run_dir: Path, accepted: Callable[[], None] | None = None) -> dict:
    """The whole story of one run; returns the record written to results.json. accepted: called once the config
    is validated, before anything is computed (the entry point writes the run's .hydra record there)."""
    start = time.time()
    commit = git_commit()  # the code that runs, read before it runs (the tree may change during a long run)
    quant_cfg, strategy = validate(cfg, run_dir)  # before anything is computed, seed and threads included
    if accepted is not None:
        accepted()
    seed_everything(cfg.seed)
    # threads=null is the process's own default, also after an earlier job of a sweep in this process set another
    torch.set_num_threads(cfg.threads or DEFAULT_THREADS)

    model = build_sam(cfg.model.name, cfg.model.checkpoint).to(cfg.device)
    # what the run reads, recorded as it reads it: the file may be replaced by the end of a long run
    checkpoint_sha256 = checkpoint_digest(cfg.model.name, cfg.model.checkpoint)
    if strategy is not None and hasattr(strategy, "check_targets"):
        from saq.sam.attention import decoder_attention_names

        strategy.check_targets(decoder_attention_names(model))
    task = build_task(cfg)
    samples = None
    if quant_cfg is not None and not cfg.quant.get("load"):
        # before the FP evaluation, which on real data takes long: a missing split, too few images with prompts or
        # an order the images cannot take fail now
        task.check_calibration_split()
        samples = task.calibration_samples(quant_cfg.calib_images)
    planted = None
    saved_model = loaded = loaded_run = None  # where the quantized model was saved to or loaded from; what made it
    loading = quant_cfg is not None and bool(cfg.quant.get("load"))
    from saq.saved import load_run, loaded_provenance, reading_saved_model, saved_planted_outliers

    # a quant.load run reads the saved model's offsets, tensors and provenance under one hold of its folder: a run
    # saving into that folder meanwhile would mix two models
    with reading_saved_model(cfg, run_dir) if loading else contextlib.nullcontext():
        if cfg.model.get("outliers"):
            from saq.sam.outliers import OutlierSpec, add_key_offsets, plant_key_outliers

            # a loaded model's FP twin takes the offsets it was saved with: measured again on this run's task
            # (another one's calibration images) they would differ, and the FP row would be of another model
            planted = saved_planted_outliers(cfg) if loading else None
            if planted is not None:
                add_key_offsets(model, planted)
            else:
                spec = OutlierSpec.from_cfg(cfg.model.outliers)
                planted = plant_key_outliers(
                    model, task.calibration_samples(spec.calib_images, "model.outliers.calib_images"), spec)
        if loading:
            # before the FP evaluation (hours on ViT-H): a saved model whose tensors or quantizers do not fit fails now
            loaded_run, saved_model = load_run(model, cfg, run_dir), str(cfg.quant.load)
            loaded = loaded_provenance(cfg)  # now: a run saving into that folder later must not relabel this one
    fp, fp_cache_file = fp_metrics(cfg, model, task, planted)
    metrics = {"fp": fp}
    calibration = clipping = recon = recon_state = None

    deploy_error = None
    if quant_cfg is not None:
        from saq.quant import assert_fully_quantized, calibrate, quant_summary, quantize
        from saq.recon import EVAL_FULL
        from saq.saved import save_run

        if loaded_run is not None:  # a model an earlier run calibrated: no calibration here
            qmodel, recon = loaded_run
        else:
            qmodel = quantize(model, quant_cfg)
            report = calibrate(qmodel, samples, quant_cfg, strategy, progress=cfg.progress)
            calibration = {"prompts": task.calibration_prompts, "images": report.images,
                           "prompt_count": report.prompts, "image_ids": [s.image_id for s in samples],
                           "seconds": round(report.seconds, 2)}
            clipping = report.clipping
            recon, recon_state = reconstruct_for_run(cfg, qmodel, model, samples)
        # calibrated, learned or loaded: every quantizer hard and on (inputs dropping only in the labelled
        # paper-compatible evaluation), before the model is saved or evaluated
        assert_fully_quantized(qmodel, allow_dropped_inputs=recon["eval_mode"] != EVAL_FULL)
        if not cfg.quant.get("load") and cfg.quant.get("save", True):  # before evaluation: a later failure keeps it
            saved_model = str(save_run(qmodel, run_dir, cfg, planted, checkpoint_sha256))
        print(quant_summary(qmodel))  # after calibration: shows the chosen ranges' strategy and AGQ's tau
        # the evaluation's random draws (recon.paper_eval_compat's dropping) from the seed alone, not from what
        # calibration and reconstruction drew before: quant.load and saq.sensitivity then draw the same
        seed_everything(cfg.seed)
        metrics["quantized"] = task.evaluate(Segmenter(qmodel, cfg.model.decode_batch_size), progress=cfg.progress)
        if cfg.get("deploy"):  # the same model as int8 ONNX Runtime graphs, through the same task code
            from saq.deploy import evaluate_deployed

            try:
                metrics["deployed"] = evaluate_deployed(qmodel, run_dir, task, cfg.model.decode_batch_size,
                                                        cfg.progress)
            except Exception as exc:  # the FP and quantized metrics (hours on a large model) are still written
                from saq.sweep import one_line

                deploy_error = one_line(exc)
                metrics["deployed"] = {"error": deploy_error}

    prompts_name = getattr(task.prompts, "name", "-") if hasattr(task, "prompts") else "-"
    bits = bits_label(OmegaConf.to_container(cfg, resolve=True))  # the bit-widths that ran (quant.w_bits=8 on w4a4)
    record = {
        "run_name": f"{cfg.model.name}-{task.name}-{bits}",
        "model": cfg.model.name,
        "checkpoint_sha256": checkpoint_sha256,  # the weights, whatever path
        "task": task.name,
        "prompts": prompts_name,
        "quant": bits,
        "method": cfg.get("method", "custom"),  # the paper row preset (conf/method), or custom
        "recon": recon,  # method, eval_mode (fully quantized or the labelled paper-compatible mode), per-unit figures
        "seed": cfg.seed,
        "metrics": metrics,
        "calibration": calibration,  # None for an FP run
        "clipping": clipping.record() if clipping is not None else None,  # a point search's ranges (clip=pcc)
        "planted_outliers": planted,  # sam_tiny_outliers: the key offsets planted at load time
        "fp_from_cache": fp_cache_file,  # the FP row was computed by an earlier run with the same key
        "quantized_model": saved_model,  # saved to (quant.save) or loaded from (quant.load)
        "loaded_model": loaded,  # what made a loaded model
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": commit,
        "versions": package_versions(),
        "threads_used": torch.get_num_threads(),  # threads=null: the process's own count, which sums depend on
        "wall_time_s": round(time.time() - start, 2),
        "run_dir": str(run_dir),
    }
    table = format_table(cfg.model.name, task.name, prompts_name, table_rows(metrics, recon))
    try:
        path = write_results(run_dir, record)  # before anything optional, printing included
    except SaqError:
        print(table)  # a full disk: the numbers are at least on screen
        raise
    if recon_state is not None and saved_model is not None:  # finished, written and its model saved: the resume
        recon_state.unlink(missing_ok=True)  # file (a whole model) is not needed (quant.save=false keeps it)
    print(table)
    print(f"results: {shown_path(path)}")
    if cfg.get("figures", True) and (clipping is not None or recon is not None):
        try:  # figures are optional: results.json is already written
            from saq.plots import clipping_figures, reconstruction_curves

            figures = clipping_figures(clipping, run_dir) if clipping is not None else []
            figures.append(reconstruction_curves(recon, run_dir / "recon_units.png"))
            for figure in filter(None, figures):
                print(f"figure: {shown_path(figure)}")
        except Exception as exc:
            print(f"warning: figures failed ({type(exc).__name__}: {exc}); results are in {shown_path(path)}",
                  file=sys.stderr)
    logger = cfg.get("logger")  # removed (~logger): no W&B
    log_to_wandb(OmegaConf.to_container(logger, resolve=True) if logger is not None else {}, record, run_dir)
    if deploy_error:
        raise SaqError(f"deploy=true failed ({deploy_error}); the FP and quantized metrics are in {path}")
    return record
