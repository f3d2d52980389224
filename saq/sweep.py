"""Sweep jobs: skip a job already finished with the same config, isolate a failed job, report at the end of a multirun."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from saq import CONF_DIR
from saq.errors import SaqError
from saq.log import (
    RESULTS_FILE,
    folder_write_problem,
    record_problem,
    run_folder_error,
    set_aside_run,
    write_json_atomic,
)

FAILURE_FILE = "failure.json"
RUNNING_FILE = "running.json"  # while a sweep job runs; left behind only when its process was killed
SWEEP_STARTED = ".sweep_started"  # .sweep_started.<id>: touched in the sweep folder while a multirun runs
# Keys that change how a run is logged or shown, not what it computes: a finished run still counts when they differ.
RESUME_IGNORED_KEYS = ("logger", "progress", "threads", "fp_cache", "resume", "figures")
# ... and nested ones: where a run keeps or finds its files, how often it logs (recon.resume=true must continue a
# killed job without every finished job of the sweep counting as another config)
RESUME_IGNORED_NESTED = ("quant.save", "recon.resume", "recon.state_dir", "recon.cache_device", "recon.log_every")


def score_before_the_knob(stored: dict) -> str:
    """What task.score a run made before it existed ranked with: detector × SAM's IoU, which auto still gives
    ground-truth and jittered boxes; a detector's boxes it now ranks by their score alone."""
    prompts = stored.get("prompts")
    detections = isinstance(prompts, dict) and str(prompts.get("_target_", "")).endswith("DetectionsFile")
    return "detector_x_iou" if detections else "auto"


# Knobs added after runs were made, with the value that does what those runs did (or a function of the run's stored
# config giving it): a finished run whose stored config lacks one ran with that value (a new knob's default keeps the
# old behaviour where it can), so reruns of old sweeps still skip it, unless the knob is now set otherwise.
KNOBS_ADDED_SINCE = {"recon.response_input": "mixed", "recon.mse_sum": "channels", "prompts.class_names": None,
                     "task.difficult_above": 0, "recon.budget": "official", "task.score": score_before_the_knob,
                     "task.protocol": "dota_devkit", "task.amg.crop_n_layers": 0,
                     "task.amg.crop_overlap_ratio": 512 / 1500, "task.amg.crop_n_points_downscale_factor": 1,
                     "task.amg.crop_nms_thresh": 0.7, "task.amg.min_mask_region_area": 0}


def job_dirname(overrides: str, max_len: int = 160) -> str:
    """A job's folder name from its overrides (Hydra's override_dirname): one path component, stable across reruns.

    Slashes in values (paths) are percent-encoded (with '%' itself, so two jobs never share a folder) and a job is
    never nested. A name over max_len drops the groups of its keys (recon.iters.stage=20 -> stage=20), so every
    value, the seed's too, stays readable, plus a hash of the whole; still too long, it keeps its start.
    """
    name = re.sub(r"[%/\\\x00]", lambda m: f"%{ord(m.group()):02X}", overrides) or "default"
    if len(name.encode()) <= max_len:
        return name
    short = re.sub(r"(^|,)([+~]*)(?:[\w-]+\.)+(?=[\w-]+=)", r"\1\2", name)
    return bounded_name(short, overrides, max_len, always_hash=True)


def bounded_name(name: str, source: str, max_len: int, always_hash: bool = False) -> str:
    """name when it fits in max_len bytes (UTF-8), else its start plus a hash of source (what it was made from), so
    names made from different sources stay different (file systems refuse components over 255 bytes; a non-ASCII
    path in an override takes up to 4 a character); always_hash: the hash also on a name that fits (one shortened
    from source)."""
    if len(name.encode()) > max_len or always_hash:
        start = name.encode()[:max_len].decode(errors="ignore")  # cut on a character boundary
        name = f"{start}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"
    return name


def register_resolvers() -> None:
    """${saq_dirname:...} (conf/config.yaml's hydra.sweep.subdir) and ${saq_presets:} (its hydra.help.template),
    registered when saq is imported."""
    if not OmegaConf.has_resolver("saq_dirname"):
        OmegaConf.register_new_resolver("saq_dirname", job_dirname)
    if not OmegaConf.has_resolver("saq_presets"):
        OmegaConf.register_new_resolver("saq_presets", preset_listing)


def group_options(folders: list[Path]) -> list[str]:
    """The presets a user can choose in a config group's folders: _-prefixed files are shared parts (quant/_base)."""
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml") if not p.stem.startswith("_")})


def preset_listing() -> str:
    """--help's list of config groups and their presets (conf/config.yaml hydra.help.template), and the sweep presets:
    Hydra's own list shows shared parts such as quant/_base, which cannot be chosen, and no sweeps."""
    groups = sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra" and group_options([d]))
    lines = [f"{d.name}: {', '.join(group_options([d]))}" for d in groups]
    try:  # Hydra's launchers with the installed plugins' (joblib, submitit) and conf/hydra/launcher's (slurm)
        from hydra.core.global_hydra import GlobalHydra

        launchers = sorted(GlobalHydra.instance().config_loader().get_group_options("hydra/launcher"))
        lines.append(f"hydra/launcher (parallel or Slurm jobs with -m): {', '.join(launchers)}")
    except Exception:  # noqa: BLE001 - outside Hydra's help there is no loader to ask; the list is a convenience
        pass
    sweeps = group_options([Path.cwd() / "sweeps"])  # where Hydra looks for them (hydra.searchpath file://.)
    lines.append(f"+sweeps (with -m, or make sweep SWEEP=NAME): {', '.join(sweeps)}" if sweeps else
                 "+sweeps: the sweep presets are found from the repository root (sweeps/); run there to use them")
    return "\n".join(lines)


def override_strings(overrides) -> list[str]:
    """Hydra's command-line overrides (hydra.overrides.task) as written: Hydra passes them on unresolved, while
    iterating the config node would resolve a ${...} inside a value (one that does not resolve would raise there,
    before saq's checks could name it)."""
    return [str(o) for o in (OmegaConf.to_container(overrides, resolve=False) if overrides is not None else [])]


def sweeper_params(params: DictConfig | None) -> list[str]:
    """A sweeper's params as key=value overrides, resolved as Hydra resolves them when it builds the sweeper (one
    that does not resolve is left as written, for the job's composition to name)."""
    if params is None:
        return []
    try:
        values = OmegaConf.to_container(params, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation of the job's own config: the job's check says which
        values = OmegaConf.to_container(params, resolve=False)
    return [f"{k}={v}" for k, v in values.items()]


def check_preset_found(cfg: DictConfig) -> None:
    """`+sweeps=NAME` run outside the repository root adds a plain string instead of the preset: refuse it."""
    if isinstance(cfg.get("sweeps"), str):
        raise SaqError(preset_not_found(cfg.sweeps))


def preset_not_found(name: str) -> str:
    return (f"sweep preset '{name}' not found: run from the repository root (sweeps/ is searched there), where "
            f"sweeps/{name}.yaml must exist")


def check_single_run_of_a_sweep(hydra_cfg) -> None:
    """`python -m saq +sweeps=NAME` without -m runs one job: fine when the overrides give every swept key a value (a
    W&B agent's runs), otherwise -m was forgotten and the job would run none of the sweep's values."""
    params = hydra_cfg.sweeper.get("params") or {}
    given = {override.split("=", 1)[0].lstrip("+~") for override in override_strings(hydra_cfg.overrides.task)}
    missing = [key for key in params if key not in given]
    if missing:
        raise SaqError(f"this sweep preset sweeps {', '.join(params)}, but without -m one job runs with none of "
                       f"their values ({missing[0]} unset): add -m (python -m saq -m +sweeps=...), or give each "
                       "swept key one value")


def comparable_config(config: dict) -> dict:
    """The config as results.json stores it (JSON round trip), without the keys that do not change results."""
    plain = json.loads(json.dumps(config, default=str))
    plain = {k: v for k, v in plain.items() if k not in RESUME_IGNORED_KEYS}
    for dotted in RESUME_IGNORED_NESTED:
        *parents, leaf = dotted.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (missing on one side counts)."""
    keys = sorted(set(a) | set(b), key=str)
    out: list[str] = []
    for k in keys:
        path = f"{prefix}{k}"
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, path + ".")
        elif va != vb:
            out.append(path)
    return out


def with_knobs_added_since(stored: dict, current: dict | None = None) -> dict:
    """A stored config with each knob of KNOBS_ADDED_SINCE it lacks set to the value that does what it ran: where
    the current config has the knob, or (no current config) wherever the knob's parent group is there."""
    stored = json.loads(json.dumps(stored))
    for dotted, value in KNOBS_ADDED_SINCE.items():
        *parents, leaf = dotted.split(".")
        old, new = stored, current
        for part in parents:
            old, new = old.get(part), new.get(part) if isinstance(new, dict) else None
            if not isinstance(old, dict):
                break
        else:
            if leaf not in old and (current is None or (isinstance(new, dict) and leaf in new)):
                old[leaf] = value(stored) if callable(value) else value
    return stored


def finished_record(run_dir: Path) -> dict | None:
    """The record in run_dir/results.json if it is a finished run (FP, and quantized unless FP-only), else None."""
    try:
        record = json.loads((Path(run_dir) / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return None if record_problem(record) else record


def should_skip(cfg: DictConfig, run_dir: Path) -> bool:
    """True when run_dir already holds a finished run of this config (resume); sets aside what cannot be resumed."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return False
    record = finished_record(run_dir)
    if record is None:
        print(f"{path}: not a finished run (corrupt or partial), recomputing; kept as "
              f"{set_aside_run(run_dir, 'unfinished')}")
        return False
    if not cfg.get("resume", True):
        print(f"{path}: resume=false, recomputing; kept as {set_aside_run(run_dir, 'previous')}")
        return False
    diff = finished_config_differences(cfg, record)
    if diff:
        shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
        print(f"{path}: holds a run of another config (differs at {shown}), recomputing; "
              f"kept as {set_aside_run(run_dir, 'other-config')}")
        return False
    return True


def finished_config_differences(cfg: DictConfig, record: dict) -> list[str]:
    """Where a finished run's stored config differs from cfg, apart from keys that do not change results."""
    current = comparable_config(OmegaConf.to_container(cfg, resolve=True))
    return config_differences(with_knobs_added_since(comparable_config(record["config"]), current), current)


def holds_this_finished_run(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether run_dir holds a finished run of cfg that the job would skip (should_skip, without its side effects)."""
    record = finished_record(run_dir)
    if record is None or not cfg.get("resume", True):
        return False
    try:
        return not finished_config_differences(cfg, record)
    except Exception:  # a config that cannot be resolved here: the job itself finds out
        return False


def one_line(exc: BaseException) -> str:
    """An exception as one line: saq's own message as it is, anything else prefixed with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, SaqError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def write_failure(run_dir: Path, cfg: DictConfig, exc: BaseException, overrides: list[str]) -> Path:
    """failure.json in the job's directory: the one-line error, the traceback and the job's overrides."""
    path = Path(run_dir) / FAILURE_FILE
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable config may be the failure itself
        config = None
    write_json_atomic(path, {
        "status": "failed",
        "error": one_line(exc),
        "error_type": type(exc).__name__,
        "overrides": overrides,
        "traceback": "".join(traceback.format_exception(exc)),
        "config": config,
        "run_dir": str(run_dir),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    return path


SWEEP_HOLD_GRACE_S = 3.0  # how long a sweep job waits on a held job folder before counting the hold a tool's


def claim_sweep_job_folder(run_dir: Path, stack: contextlib.ExitStack, grace_s: float = SWEEP_HOLD_GRACE_S) -> str:
    """Hold a sweep job's folder (claim_run_dir) inside `stack`: "claimed"; "running" when another multirun's job
    computes it (its running.json); RunDirHeld when a hold without one outlasts grace_s: a tool's (saq.sensitivity,
    saq.deploy). Another multirun's job holds the folder a moment before it writes running.json, or while it finds
    the job finished and skips it, and is not a failure of this one."""
    from saq.log import RunDirHeld, claim_run_dir

    waited = 0.0
    while True:
        try:
            stack.enter_context(claim_run_dir(run_dir))
            return "claimed"
        except RunDirHeld:
            if (run_dir / RUNNING_FILE).exists():
                return "running"
            if waited >= grace_s:
                raise
            time.sleep(0.1)
            waited += 0.1


def run_sweep_job(cfg: DictConfig, run_dir: Path, run: Callable[[DictConfig, Path], dict],
                  overrides: list[str]) -> dict | None:
    """One multirun job: skipped when finished before; any error is recorded in failure.json and never raised."""
    run_dir = Path(run_dir)
    # a job whose worker is killed (out of memory, a parallel launcher tearing its pool down) writes nothing else:
    # this file makes the report list it as unfinished instead of leaving it out
    running = run_dir / RUNNING_FILE
    try:
        if should_skip(cfg, run_dir):  # inside: a config that cannot be compared fails this job, not the sweep
            print(f"skipped: {run_dir / RESULTS_FILE} already holds this finished run (resume=false recomputes)")
            (run_dir / FAILURE_FILE).unlink(missing_ok=True)
            running.unlink(missing_ok=True)  # an attempt killed after it wrote its results
            return None
        write_json_atomic(running, {"status": "running", "pid": os.getpid(), "host": platform.node(),
                                    "overrides": overrides, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        record = run(cfg, run_dir)
    except Exception as exc:  # one failed job must not stop the sweep; the summary lists it
        path = write_failure(run_dir, cfg, exc, overrides)
        if not isinstance(exc, SaqError):
            traceback.print_exception(exc, file=sys.stderr)
        print(f"error: {one_line(exc)} (job {' '.join(overrides)}; {path})", file=sys.stderr)
        return None
    except KeyboardInterrupt as exc:  # Ctrl-C stops the sweep; the report lists this job as unfinished, not nothing
        exc.args = exc.args or ("interrupted (Ctrl-C) before it finished; rerun the sweep to compute it",)
        with contextlib.suppress(OSError):
            write_failure(run_dir, cfg, exc, overrides)
        raise
    finally:
        running.unlink(missing_ok=True)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure of this job is now fixed
    return record


def sweep_job_overrides(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job the basic sweeper will launch (preset params, then the command line's)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    arguments = sweeper_params(config.hydra.sweeper.get("params")) + override_strings(config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def composed_jobs(config: DictConfig, folders: list | None = None) -> list[tuple[list[str], DictConfig | str]]:
    """Every job's overrides with its composed config, or the reason it cannot run: Hydra's (it does not compose),
    saq's config checks (pipeline.check_config: a preset whose switches the sweep changes, a knob nothing reads) or
    its model checkpoint file, missing or of another model (a job would find it only when it starts, hours into the
    sweep; on Slurm a file this machine lacks may be on the compute nodes only). A refused job whose folder already holds its
    finished run is kept: it will be skipped, and rerunning a finished sweep for its report still works. folders:
    a list that gets each composed job's (overrides, folder), None where the folder resolves only at launch."""
    from hydra import compose

    from saq.pipeline import check_config, check_load_overrides_read
    from saq.sam.build import check_checkpoint_fits, checkpoint_file

    on_slurm = submits_to_slurm(config)
    jobs = []
    fits: dict[tuple, str | None] = {}  # (model, file) -> why it does not fit, checked once for all its jobs
    for num, job in enumerate(sweep_job_overrides(config) or []):
        try:
            cfg = compose(config_name=config.hydra.job.config_name, overrides=job, return_hydra_config=True)
        except Exception as exc:  # Hydra's composition errors: missing option, bad key, bad value
            jobs.append((job, " ".join(str(exc).split()).split(" Config search path:")[0]))
            continue
        choices = dict(cfg.hydra.runtime.choices)
        run_dir = job_folder(config, cfg, num)
        if folders is not None:
            folders.append((job, run_dir))
        with open_dict(cfg):
            del cfg["hydra"]
        try:  # the sweep's shared recon.iters overrides are checked across its jobs (recon_iters_no_job_reads)
            check_config(cfg, choices, overrides=[])
            check_load_overrides_read(cfg, job)  # quant.load beside clip.*/recon.* knobs: each job's own overrides
            # every job builds its model first; a Slurm job may read a file only its compute nodes have. A file of
            # another model size (a link to the wrong one) is found here too, from its tensors' shapes
            path = checkpoint_file(cfg.model.name, cfg.model.get("checkpoint"), must_exist=not on_slurm)
            if path.is_file():
                key = (cfg.model.name, str(path.resolve()))
                if key not in fits:
                    try:
                        check_checkpoint_fits(cfg.model.name, cfg.model.get("checkpoint"))
                        fits[key] = None
                    except SaqError as exc:
                        fits[key] = str(exc)
                if fits[key]:
                    raise SaqError(fits[key])
        except SaqError as exc:
            if run_dir is not None and holds_this_finished_run(cfg, run_dir):  # refused since it finished (or its
                # checkpoint moved since)
                print(f"job {' '.join(job)}: kept as it finished in {run_dir} (it would not run now: {exc})")
            else:
                jobs.append((job, str(exc)))
                continue
        jobs.append((job, cfg))
    return jobs


def job_folder(config: DictConfig, job_cfg: DictConfig, num: int) -> Path | None:
    """The folder job number `num` of the sweep runs in: the sweep's hydra.sweep.dir and subdir as the command line
    set them (a composed job lacks the command's hydra overrides), resolved with the job's own override_dirname and
    number; None when it cannot be told here."""
    try:
        subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]
        with open_dict(job_cfg):
            job_cfg.hydra.job.num = num
            job_cfg.hydra.sweep.subdir = subdir
        return Path(str(config.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
    except Exception:  # an interpolation only the launched job resolves
        return None


def recon_iters_no_job_reads(jobs: list[tuple[list[str], DictConfig | str]]) -> list[tuple[str, list[str]]]:
    """recon.iters.<kind> overrides that no job of the sweep reads, each with the granularities its jobs run (a
    single run refuses such a key itself; in a sweep one shared override may serve jobs of several granularities)."""
    from saq.pipeline import iters_kinds_set
    from saq.sam.unit_kinds import KINDS_AT

    given, read, granularities = [], set(), []
    for overrides, cfg in jobs:
        if isinstance(cfg, str):
            continue
        given += [kind for kind in iters_kinds_set(overrides) if kind not in given]
        granularity = (cfg.get("recon") or {}).get("granularity")
        if granularity in KINDS_AT:
            read |= set(KINDS_AT[granularity])
            granularities += [granularity] if granularity not in granularities else []
    return [(kind, granularities) for kind in given if granularities and kind not in read]


def jobs_sharing_a_folder(folders: list[tuple[list[str], Path | None]]) -> list[tuple[list[str], list[str]]]:
    """Pairs of jobs whose folders (composed_jobs' `folders`) would be one, so the second would be skipped or set
    the first aside: jobs that differ only in keys job folder names leave out (override_dirname's exclude_keys, e.g.
    threads), or any folder scheme that does not name what the jobs differ in (hydra.sweep.subdir=${clip.name})."""
    seen: dict[str, list[str]] = {}
    clashes = []
    for job, folder in folders:
        if folder is None:  # resolved only when the job is launched
            continue
        key = os.path.normpath(os.path.abspath(folder))
        if key in seen:
            clashes.append((seen[key], job))
        else:
            seen[key] = job
    return clashes


def submits_to_slurm(config: DictConfig) -> bool:
    """Whether the sweep's launcher submits its jobs to Slurm (they run on other machines)."""
    return str(config.hydra.launcher.get("_target_", "")).endswith("SlurmLauncher")


def missing_slurm_commands(config: DictConfig) -> list[str]:
    """The Slurm commands a Slurm launcher needs but PATH lacks (submitit fails on them only at launch, deep inside)."""
    if not submits_to_slurm(config):
        return []
    return [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]


# sbatch options that exclude each other: the first of each pair is set by conf/hydra/launcher/slurm.yaml, so
# following a comment's "alternative" without nulling it would submit both and sbatch refuses the script
SLURM_EXCLUSIVE = (("mem_gb", "mem_per_gpu"), ("mem_gb", "mem_per_cpu"), ("mem_per_gpu", "mem_per_cpu"),
                   ("cpus_per_task", "cpus_per_gpu"), ("gpus_per_node", "gres"), ("gpus_per_node", "gpus_per_task"))


def slurm_conflicts(config: DictConfig) -> list[tuple[str, str]]:
    """Pairs of mutually exclusive Slurm launcher options that are both set."""
    launcher = config.hydra.launcher
    if not submits_to_slurm(config):
        return []
    def asks_gpus(key: str) -> bool:  # gres=nvme:1 beside gpus_per_node asks for another resource: no conflict
        return key != "gres" or "gpu" in str(launcher.get(key)).lower()

    return [(a, b) for a, b in SLURM_EXCLUSIVE
            if launcher.get(a) is not None and launcher.get(b) is not None and asks_gpus(a) and asks_gpus(b)]


class RunFolderCheck(Callback):
    """Before Hydra makes the run (or sweep) folder: one that cannot be made or written is one line, not the
    traceback of Hydra's own mkdir (which runs before saq's code)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_run_folder(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_run_folder(config, "hydra.sweep.dir")


def check_run_folder(config: DictConfig, key: str) -> None:
    """Exit 2 with one line when the folder at `key` (hydra.run.dir, hydra.sweep.dir) cannot be made or written."""
    try:
        folder = Path(str(OmegaConf.select(config, key)))
    except Exception:  # an interpolation only the running job resolves: Hydra's mkdir answers for it
        return
    problem = folder_write_problem(folder)
    if problem:
        print(f"error: {run_folder_error(folder, problem, key)}; nothing was run", file=sys.stderr)
        sys.exit(2)


class SweepReport(Callback):
    """Before a multirun: every job must compose. After it: the sweep's report, its main tables, the failed jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        missing = missing_slurm_commands(config)
        if missing:
            launcher = config.hydra.runtime.choices.get("hydra/launcher")
            verb = "are" if len(missing) > 1 else "is"
            print(f"error: hydra/launcher={launcher} submits to Slurm, but {' and '.join(missing)} {verb} not on PATH: "
                  "run the sweep on the cluster's login node, or here with hydra/launcher=joblib (parallel local "
                  "jobs) or hydra/launcher=submitit_local; nothing was run", file=sys.stderr)
            sys.exit(2)
        for a, b in slurm_conflicts(config):
            print(f"error: hydra.launcher.{a} and hydra.launcher.{b} are both set; Slurm takes one of them: add "
                  f"hydra.launcher.{a}=null (or {b}=null); nothing was run", file=sys.stderr)
            sys.exit(2)
        folders: list[tuple[list[str], Path | None]] = []
        jobs = composed_jobs(config, folders)
        problems = [(job, why) for job, why in jobs if isinstance(why, str)]
        if problems:
            for job, why in problems:
                print(f"error: job {' '.join(job)}: {why}", file=sys.stderr)
            print(f"error: {len(problems)} jobs of this sweep cannot run (they do not compose, their settings are "
                  "refused, or their checkpoint is missing or of another model); nothing was run", file=sys.stderr)
            sys.exit(2)
        for kind, granularities in recon_iters_no_job_reads(jobs):
            print(f"error: recon.iters.{kind} is read by no job of this sweep (their recon.granularity: "
                  f"{', '.join(granularities)}); nothing was run", file=sys.stderr)
            sys.exit(2)
        clashes = jobs_sharing_a_folder(folders)
        if clashes:
            first, second = clashes[0]
            only = [" ".join(o for o in job if o not in other) for job, other in ((first, second), (second, first))]
            if not any(only):  # seed=0,0: one job twice
                print(f"error: the job {' '.join(first)} is in this sweep twice (a value repeated in a swept list); "
                      "nothing was run", file=sys.stderr)
            else:
                print(f"error: the jobs with {only[0]} and with {only[1]} would share one job folder: job folder names "
                      "leave those keys out; sweep those values into separate hydra.sweep.dir folders, or name jobs "
                      "by number (hydra.sweep.subdir='${hydra.job.num}'); nothing was run", file=sys.stderr)
            sys.exit(2)
        # failure.json older than this marker belongs to an earlier sweep (file times: one clock, the file server's);
        # one marker per multirun, so a second multirun into the same folder does not move this one's start
        marker = Path(str(config.hydra.sweep.dir)) / f"{SWEEP_STARTED}.{uuid.uuid4().hex}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        atexit.register(marker.unlink, missing_ok=True)  # a sweep stopped by Ctrl-C never reaches on_multirun_end
        self.marker, self.ended = marker, False
        atexit.register(self.report_at_exit, config)  # runs before the marker's removal (last in, first out)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.ended = True
        if self.write_summary(config):
            sys.exit(1)  # after the report: the sweep's exit status says some job of this sweep failed

    def report_at_exit(self, config: DictConfig) -> None:
        """The report of what finished, for a sweep that ended without on_multirun_end: a launcher raises when a
        job's process is killed (joblib's TerminatedWorkerError, submitit's UncompletedJobError: out of memory, a
        Slurm time limit) or on Ctrl-C, and Hydra then never calls it. The killed jobs are listed as unfinished."""
        if getattr(self, "ended", True):
            return
        self.ended = True
        print("\nthe sweep ended before every job returned (a job's process was killed, or Ctrl-C); the report of "
              "what finished follows", file=sys.stderr, flush=True)
        try:
            self.write_summary(config)
        except KeyboardInterrupt:  # a second Ctrl-C: out now
            pass
        except Exception as exc:  # noqa: BLE001 - the process is ending anyway: one line, not a traceback
            print(f"warning: the sweep's report could not be written ({type(exc).__name__}: {exc})", file=sys.stderr)

    def write_summary(self, config: DictConfig) -> list[dict]:
        """Write the sweep's report and print its summary; returns this sweep's failed jobs."""
        from saq.report import build_report, print_summary, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        report = build_report(sweep_dir)
        written = write_report(report, sweep_dir)  # with no usable run too: an earlier report's tables go
        marker = getattr(self, "marker", None)
        since = marker.stat().st_mtime if marker is not None and marker.exists() else None
        failed_now = print_summary(report, written, since=since)
        if marker is not None:
            marker.unlink(missing_ok=True)
        sys.stdout.flush()
        return failed_now
