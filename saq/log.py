"""Run-folder files: results.json (first) and W&B, run.log, the folder lock, set-aside and whole-file writes.

results.json is written before anything optional (W&B, figures), so a failing backend never costs the results; an
earlier run's files are renamed, never overwritten; every file is written through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from saq.errors import SaqError, is_finite_number, is_number

RESULTS_FILE = "results.json"
# what a run's numbers can depend on (image decoding and resizing, polygon IoU, label maps included): recorded in
# results.json and part of the FP cache key
_PACKAGES = ("torch", "torchvision", "segment-anything", "hydra-core", "omegaconf", "numpy", "pycocotools", "wandb",
             "opencv-python-headless", "shapely", "pillow")


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' when the tree has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def shown_path(path: Path) -> Path:
    """A path as printed for the user: relative to the working folder when it lies inside it (outputs/...), which is
    how the README and the command line name runs; absolute otherwise."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        return path


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def folder_write_problem(folder: Path) -> str | None:
    """Why files could not be written into `folder` (made first where missing), or None; asked without leaving
    anything behind, so a run refused for another reason leaves no empty folder."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:  # the nearest part that exists decides
        if existing.is_symlink():  # a link to nothing: mkdir would fail on it
            return f"{existing} is a link to {os.readlink(existing)}, which does not exist"
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    # os.access also answers for root: a read-only mount is refused to every user
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return mkdir_problem(existing)


def mkdir_problem(existing: Path) -> str | None:
    """Why a folder cannot be made in the existing folder `existing` (a file system that refuses new folders, as
    /proc does, although os.access says yes): a probe folder of its own name is made and removed there, so no name
    another run may be making is touched."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".saq-probe-", dir=existing))
    except OSError as exc:
        return f"no folder can be made in {existing}: {exc.strerror or exc}"
    return None


def run_folder_error(folder: Path, reason: str, key: str) -> SaqError:
    """The line for a run or sweep folder that cannot be made or written; key: the knob that places it."""
    return SaqError(f"cannot write the run folder {folder} ({reason}); set {key}=<a writable folder>")


def os_reason(exc: OSError) -> str:
    """An OSError as 'reason: file' (its own text where it has no strerror)."""
    if not exc.strerror:
        return str(exc)
    return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write the whole file to; renamed over `path` when the block ends, removed
    when it fails (a full disk or a kill leaves no half file and no stray temporary one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: parallel jobs, on one host or several, may write the same file (the FP cache, a recon
    # checkpoint shared by two sweep jobs)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_aside_stamp() -> str:
    """The time stamp set-aside names carry; files set aside together take one (a second ticking over must not part
    them)."""
    return time.strftime("%Y%m%d-%H%M%S")


def set_aside(path: Path, why: str, stamp: str | None = None) -> Path:
    """Rename a results file or folder we are about to replace, so no earlier result is ever lost (`stamp`: the time
    stamp of files set aside together, default now)."""
    stamp = stamp or set_aside_stamp()
    target = path.with_name(f"{path.name}.{stamp}.{why}")
    n = 1
    while target.exists():  # two in one second
        target, n = path.with_name(f"{path.name}.{stamp}-{n}.{why}"), n + 1
    path.replace(target)
    return target


RUN_LOG = "run.log"
HYDRA_RECORD_DIR = ".hydra"  # a run's composed config, Hydra config and overrides (where Hydra itself keeps them)
# a new run's record while its folder still holds an earlier run's results.json: the earlier record stays with those
# results until write_results replaces both (a run refused or failing on the way leaves them matching)
PENDING_RECORD_DIR = ".hydra.pending"


def hydra_record_dir(run_dir: Path) -> Path:
    """Where a run that passed its checks writes its Hydra record: .hydra, or .hydra.pending beside an earlier run's
    results.json (put in place once those go aside: place_pending_record). A pending record left by a run that
    wrote no results (refused or killed; its run.log keeps what it said) is removed first, so that it is never
    taken for this run's."""
    run_dir = Path(run_dir)
    pending = run_dir / PENDING_RECORD_DIR
    if pending.is_dir():
        shutil.rmtree(pending)
    return pending if (run_dir / RESULTS_FILE).exists() else run_dir / HYDRA_RECORD_DIR


def discard_pending_record(run_dir: Path) -> None:
    """A run that failed before its results replaced an earlier run's: its pending record goes, so the folder holds
    the earlier results with their own record only (its run.log keeps what the failed run said)."""
    shutil.rmtree(Path(run_dir) / PENDING_RECORD_DIR, ignore_errors=True)


def place_pending_record(run_dir: Path) -> None:
    """Once the earlier run's results.json went aside (with its .hydra): this run's pending record becomes .hydra.
    A record the OS refuses to move is a warning: the results it would go with are written."""
    pending, record = Path(run_dir) / PENDING_RECORD_DIR, Path(run_dir) / HYDRA_RECORD_DIR
    if not pending.exists():
        return
    try:
        if record.exists():  # left without the results it went with: aside, not lost
            set_aside(record, "previous")
        pending.replace(record)
    except OSError as exc:
        print(f"warning: cannot move this run's record {pending} to {record} ({os_reason(exc)})", file=sys.stderr)


class _TeeStream:
    """A text stream that also appends to the run log; progress-bar redraws (carriage returns) stay on screen only."""

    def __init__(self, stream, log, keep_redraws: bool):
        self._stream, self._log, self._keep_redraws = stream, log, keep_redraws

    def write(self, text: str) -> int:
        if text and (self._keep_redraws or "\r" not in text):  # print() sends its newline as a write of its own
            self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno ... of the real stream (tqdm asks)
        return getattr(self._stream, name)


@contextmanager
def tee_run_log(path: Path, command: str = ""):
    """Everything a run prints (stdout, and stderr's lines without progress bars) also goes to `path`, appended
    under a dated header, so the run folder keeps what the run said."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}".rstrip() + "\n")
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _TeeStream(out, log, True), _TeeStream(err, log, False)
        try:
            yield path
        except Exception:  # a crash: the log keeps its traceback too (the caller's handler prints it to the screen)
            log.write(traceback.format_exc())
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = out, err


SENSITIVITY_FILE = "sensitivity.json"  # saq.sensitivity's rows for a run, beside its results.json
SAVED_DIR = "quantized_model"  # a run's saved quantized model (saq.saved), inside its run directory
DEPLOY_DIR = "deployed"  # its int8 ONNX Runtime deployment (saq.deploy)
WANDB_DIR = "wandb"  # W&B's own folder in a run directory (wandb.init(dir=run_dir)): offline runs wait there for sync


def set_aside_run(run_dir: Path, why: str, keep: Sequence[str] = ()) -> Path:
    """Set an earlier run's results.json aside with what belongs to it: its figures (this run's would replace only
    some, and W&B uploads every PNG in the folder), a sensitivity analysis of it, its Hydra record, its W&B folder
    (`wandb sync .../wandb/offline-run-*` would upload the replaced run beside the new one, under the same name),
    and its saved model and deployment unless named in `keep` (the run replacing it wrote or read them). Returns
    results.json's new path."""
    run_dir = Path(run_dir)
    folders = [run_dir / name for name in (SAVED_DIR, DEPLOY_DIR) if name not in keep]
    stamp = set_aside_stamp()  # one for all
    for path in [*run_figures(run_dir), run_dir / SENSITIVITY_FILE, run_dir / HYDRA_RECORD_DIR, run_dir / WANDB_DIR,
                 *folders]:
        if path.exists():
            set_aside(path, why, stamp)
    return set_aside(run_dir / RESULTS_FILE, why, stamp)


def outputs_of(record: dict, run_dir: Path) -> list[str]:
    """Which of the run folder's model folders a run record made or used: its saved (or loaded) model when that is
    the one in run_dir, its deployment when it deployed."""
    own = []
    saved = record.get("quantized_model")
    if saved and Path(saved).resolve() in (Path(run_dir).resolve(), (Path(run_dir) / SAVED_DIR).resolve()):
        own.append(SAVED_DIR)
    deployed = (record.get("metrics") or {}).get("deployed")
    if isinstance(deployed, dict) and "error" not in deployed:
        own.append(DEPLOY_DIR)
    return own


RUN_LOCK = ".saq.lock"


class RunDirHeld(SaqError):
    """Another process holds the run folder (claim_run_dir); `folder` is that folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        super().__init__(f"another saq process is writing into {folder}; give this one its own folder "
                         "(hydra.run.dir=...), or wait for it to finish")


@contextmanager
def file_lock(path: Path, wait: bool = True, shared: bool = False) -> Iterator[bool]:
    """An OS lock (flock) on `path` for the block, released when it ends or the process dies. Yields True when held;
    False when the file cannot be made or the file system has no locks (the block then runs unguarded). With
    wait=False a lock another process holds raises BlockingIOError at once. shared: a reader's lock, which other
    readers share and an exclusive holder excludes."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError:  # a read-only folder: nothing can be written there for a lock to protect
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:  # held elsewhere (wait=False); an OSError too, so named before the next line
            raise
        except OSError:  # some network mounts have no locks
            yield False
            return
        yield True


def folder_in_use(run_dir: Path) -> bool:
    """Whether some process holds run_dir's run lock now (claim_run_dir), asked without creating anything."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / RUN_LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the probe's own shared lock
    return False


ANALYSIS_LOCK = ".saq.analysis.lock"


@contextmanager
def analyse_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold a run folder for a tool that reads its saved model and writes its own files beside it (saq.sensitivity):
    a shared hold of the run lock keeps runs from writing there while quant.load runs may still read the model, and
    the analysis lock keeps a second analysis from writing the same files. RunDirHeld when either is taken."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(Path(run_dir) / RUN_LOCK, wait=False, shared=True))
            stack.enter_context(file_lock(Path(run_dir) / ANALYSIS_LOCK, wait=False))
        except BlockingIOError:
            raise RunDirHeld(run_dir) from None
        yield


@contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process: a second run into it (two runs started in the same second share
    Hydra's outputs/<date>/<time> folder) stops with one line instead of renaming this run's model and results.
    An OS lock, so a killed run never leaves the folder held."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(Path(run_dir) / RUN_LOCK, wait=False))
        except BlockingIOError:
            raise RunDirHeld(run_dir) from None
        yield


def write_results(run_dir: Path, record: dict) -> Path:
    """Write results.json (an earlier run's in the same folder is kept, renamed); the shape scripts rely on is
    record['metrics']['fp' | 'quantized'][name]."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        if path.exists():
            kept = set_aside_run(run_dir, "previous", keep=outputs_of(record, run_dir))
            print(f"{path} held an earlier run; kept as {kept}")
        write_json_atomic(path, record)
    except OSError as exc:
        raise SaqError(f"cannot write {path} ({exc.strerror or exc}); the run's metrics are printed above") from None
    place_pending_record(run_dir)
    return path


def _has_number(metrics) -> bool:
    return isinstance(metrics, dict) and any(is_number(v) for v in metrics.values())


def record_problem(record) -> str | None:
    """Why a parsed results.json is not a finished saq run record (report and resume skip it), or None when it is."""
    if not isinstance(record, dict):
        return "not a saq run record (not a JSON object)"
    missing = [k for k in ("model", "task", "quant", "metrics", "config") if k not in record]
    if missing:
        return f"not a saq run record (missing {', '.join(missing)})"
    metrics, config = record["metrics"], record["config"]
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        return "not a saq run record (metrics or config is not an object)"
    if not isinstance(record.get("recon") or {}, dict):
        return "not a saq run record (recon is not an object)"
    threads = record.get("threads_used")
    if threads is not None and not (is_finite_number(threads) and float(threads).is_integer()):  # cells count them
        return f"not a saq run record (threads_used is {threads!r}, not a whole number)"
    for part, values in metrics.items():  # json reads a 400-digit integer, which no table or float can hold
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if is_number(value) and not isinstance(value, float) and not is_finite_number(value):
                return f"metrics.{part}.{key} is an integer beyond float range"
    if not _has_number(metrics.get("fp")):
        return "partial run: no FP metrics"
    if record["quant"] != "fp" and not _has_number(metrics.get("quantized")):
        return "partial run: no quantized metrics"
    return deploy_failure(record)


def deploy_failure(record: dict) -> str | None:
    """Why a deploy=true run has no deployed metrics (its int8 evaluation failed after the quantized one), or None."""
    metrics, config = record.get("metrics") or {}, record.get("config") or {}
    # FP runs deploy nothing (refused now; runs of 2026-11-29..12-01 with deploy=true simply ran FP)
    if record.get("quant") == "fp" or config.get("deploy") is not True or _has_number(metrics.get("deployed")):
        return None
    error = metrics["deployed"].get("error") if isinstance(metrics.get("deployed"), dict) else None
    return f"partial run: deploy=true without deployed metrics{f' ({error})' if error else ''}"


def flatten(tree, sep: str = ".", prefix: str = "") -> dict[str, object]:
    """The leaves of nested dicts under their joined keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for k, v in tree.items():
        out.update(flatten(v, sep, f"{prefix}{sep}{k}" if prefix else str(k)))
    return out


# conf/method's presets; a custom run whose clipping is named like one is labelled apart from it
METHOD_PRESETS = ("minmax", "ptq4sam_s", "saq_sam_star", "qdrop", "ptq4sam_l", "saq_sam")
CUSTOM_SUFFIX = " (custom)"


def method_preset(config: dict) -> str | None:
    """The paper-row preset a run was composed with (method=..., conf/method), or None for a custom run."""
    method = config.get("method")
    if isinstance(method, dict):
        method = method.get("name")
    return str(method) if method and method != "custom" else None


def method_label(config: dict) -> str:
    """A run's method as a table row names it: the method preset, else the clipping (+ reconstruction when on)."""
    if method_preset(config):
        return method_preset(config)
    clip = config.get("clip")
    label = str(clip.get("name", "?")) if isinstance(clip, dict) else "?"
    recon = config.get("recon")
    if isinstance(recon, dict) and recon.get("name") not in (None, "none"):
        label += f"+{recon['name']}"
    if label in METHOD_PRESETS:  # clip=minmax alone keeps BIG and AGQ on: not the minmax preset's row
        label += CUSTOM_SUFFIX
    return label


PAPER_COMPAT_SUFFIX = " (paper-compat eval)"  # label of learned runs evaluated as the official code does (§7)


def paper_compat_evaluation(record: dict) -> bool:
    """Whether the run evaluated in the official code's mode (linear inputs left dropping), not fully quantized."""
    return str((record.get("recon") or {}).get("eval_mode", "")).startswith("paper_compat")


PART_BITS_KEYS = tuple(f"quant.{part}.{key}" for part in ("encoder", "decoder") for key in ("enabled", "w_bits", "a_bits"))


def bits_label(config: dict) -> str:
    """w<W>a<A> from the bit-widths actually set (so quant.w_bits=5 on w4a4 is not labelled w4a4), or 'fp'; a part
    kept FP or at its own widths says so (w4a4 (decoder fp), w4a4 (encoder w8a4)): another column of a table."""
    quant = config.get("quant") if isinstance(config.get("quant"), dict) else {}
    if quant.get("name", "fp") == "fp":
        return "fp"
    w_bits, a_bits = quant.get("w_bits"), quant.get("a_bits")
    if not (isinstance(w_bits, int) and isinstance(a_bits, int)):
        return str(quant.get("name"))
    parts = []
    for part in ("encoder", "decoder"):
        spec = quant.get(part) if isinstance(quant.get(part), dict) else {}
        own = (spec.get("w_bits") or w_bits, spec.get("a_bits") or a_bits)  # null: the top-level width
        if spec.get("enabled") is False:
            parts.append(f"{part} fp")
        elif own != (w_bits, a_bits):
            parts.append(f"{part} w{own[0]}a{own[1]}")
    return f"w{w_bits}a{a_bits}" + (f" ({', '.join(parts)})" if parts else "")


def labelled_config(record: dict) -> dict:
    """The config a run is labelled by: its own, except that a quant.load run takes the method, clipping,
    reconstruction and calibration data of the run that produced the model it loaded (its recon keeps this run's
    paper_eval_compat)."""
    config = dict(record.get("config") or {})
    loaded = record.get("loaded_model")
    if not isinstance(loaded, dict):
        return config
    if loaded.get("method") is not None:
        config["method"] = loaded["method"]
    if isinstance(loaded.get("clip"), dict):
        config["clip"] = loaded["clip"]
    if isinstance(loaded.get("recon"), dict):
        own = config.get("recon") if isinstance(config.get("recon"), dict) else {}
        config["recon"] = {**loaded["recon"], "paper_eval_compat": bool(own.get("paper_eval_compat", False))}
    calib = {k: loaded[k] for k in ("calib_images", "calib_decode_batch") if loaded.get(k) is not None}
    if calib and isinstance(config.get("quant"), dict):  # the calibration data that made the model
        config["quant"] = {**config["quant"], **calib}
    if isinstance(loaded.get("task_calib"), dict) and isinstance(config.get("task"), dict):
        config["task"] = {**config["task"], "calib": loaded["task_calib"]}
    return config


def wandb_run_options(logger_cfg: dict, record: dict, sweep_group: str | None = None,
                      job_overrides: str | None = None) -> dict:
    """wandb.init's arguments: group = the sweep, job_type = the method, tags model/bits/method/task, the resolved
    config; a sweep job's name ends with its overrides (a theta sweep's runs differ in nothing else the name says)."""
    config = record.get("config") or {}
    labels = labelled_config(record)
    bits = bits_label(config)
    method = "fp" if bits == "fp" else method_label(labels)
    own = logger_cfg.get("tags")
    own = [] if own is None else [own] if isinstance(own, (str, int, float)) else own  # logger.tags=baseline: one tag
    tags = [*map(str, own),
            f"model:{record.get('model')}", f"bits:{bits}", f"method:{method}", f"task:{record.get('task')}"]
    name = record.get("run_name") if method == "fp" else f"{record.get('run_name')}-{method}"
    job_type = method
    if paper_compat_evaluation(record):  # half the linear inputs unquantized: never grouped with the full runs
        tags.append("eval:paper_compat")
        name, job_type = f"{name}-paper_compat", method + PAPER_COMPAT_SUFFIX
    if job_overrides:
        name = f"{name} ({job_overrides})"[:128]  # W&B shows the start of long names only
    return {
        "project": str(logger_cfg.get("project") or "saq"),  # names Hydra read as numbers (group=2024) as text
        "entity": None if logger_cfg.get("entity") is None else str(logger_cfg["entity"]),
        "group": str(logger_cfg["group"]) if logger_cfg.get("group") not in (None, "") else sweep_group,
        "job_type": job_type,
        "tags": [t[:64] for t in tags],  # W&B's limit per tag
        "mode": logger_cfg.get("mode", "offline"),
        "name": name,
        # dotted keys (quant.w_bits): a W&B sweep agent merges its parameters (quant: w6a6, the group choice) into
        # the config and would replace a nested quant: {...} with that name
        "config": flatten(config, "."),
    }


def run_figures(run_dir: Path) -> list[Path]:
    """PNG figures a run wrote in its directory: at its top, where every figure of a run is drawn. Nothing below
    it (W&B's own files, a dataset or another run's folder inside a run folder given as hydra.run.dir=.), which a
    rerun would otherwise set aside and W&B upload."""
    return sorted(p for p in Path(run_dir).glob("*.png") if p.is_file())


def _multirun_job() -> tuple[str | None, str | None]:
    """When this process runs a Hydra multirun job: the sweep directory (the default W&B group) and the job's
    overrides as its folder names them (clip.theta=0.3,quant=w4a4: what tells the sweep's runs apart); else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            hydra_cfg = HydraConfig.get()
            return str(hydra_cfg.sweep.dir), str(hydra_cfg.job.override_dirname or "") or None
    except Exception:  # outside Hydra (scripts, tests)
        return None, None
    return None, None


def log_to_wandb(logger_cfg: dict, record: dict, run_dir: Path) -> str | None:
    """Send the run's config, metrics and figures to W&B. Any failure is a warning: results.json is already on disk."""
    if not logger_cfg or logger_cfg.get("name") in (None, "none") or logger_cfg.get("mode") == "disabled":
        return None
    run = None
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # one run per job: a multirun in one process (basic launcher) finishes the previous job's run first; the
        # timeout as a setting of this run (an environment variable set by the first job would hold for every job)
        run = wandb.init(dir=str(run_dir), reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout_s", 30))),
                         **wandb_run_options(logger_cfg, record, *_multirun_job()))
        run.summary.update({k: v for k, v in flatten(record.get("metrics", {}), "/").items() if is_number(v)})
        run.summary["wall_time_s"] = record.get("wall_time_s")
        figures = {f"figures/{p.stem}": wandb.Image(str(p)) for p in run_figures(run_dir)}
        if figures:
            run.log(figures)
        points = (record.get("clipping") or {}).get("points") or []
        if points:  # a point search's ranges (clip=pcc), one row per searched quantizer (its curve stays in the file)
            columns = [c for c in points[0] if not isinstance(points[0][c], list)]
            run.log({"clipping/ranges": wandb.Table(columns=columns, data=[[p.get(c) for c in columns] for p in points])})
        url = getattr(run, "url", None)
        sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
        if deploy_failure(record):  # the run raises after this: W&B shows it failed
            run.finish(exit_code=1)
        else:
            run.finish()
        if url:
            print(f"W&B: {url}")
            return url
        # offline (the default): say where the run went and how to upload it
        where = sync_dir or str(run_dir / WANDB_DIR)
        print(f"W&B: offline run in {where} (upload: wandb sync {where})")
        return where
    except Exception as exc:  # a logging backend must never cost the user their results
        print(f"warning: W&B logging failed ({type(exc).__name__}: {exc}); results are in {run_dir / RESULTS_FILE}",
              file=sys.stderr)
        if run is not None:  # closed as failed, not left for the next job's init (or the exit hook) to end as normal
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)
        return None
