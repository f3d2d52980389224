"""Run records: results.json in the run directory (always, first) and the same to Weights & Biases (optional)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

RESULTS_FILE = "results.json"
_PACKAGES = ("torch", "torchvision", "segment-anything", "hydra-core", "omegaconf", "numpy", "pycocotools", "wandb")


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


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_results(run_dir: Path, record: dict) -> Path:
    """Write results.json; the shape scripts rely on is record['metrics']['fp' | 'quantized'][name]."""
    path = Path(run_dir) / RESULTS_FILE
    write_json_atomic(path, record)
    return path


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value


def log_to_wandb(logger_cfg: dict, record: dict, run_dir: Path) -> str | None:
    """Send the run's config and metrics to W&B. Any failure is a warning: results.json is already on disk."""
    if not logger_cfg or logger_cfg.get("name") in (None, "none") or logger_cfg.get("mode") == "disabled":
        return None
    try:
        import wandb

        os.environ.setdefault("WANDB_INIT_TIMEOUT", str(logger_cfg.get("init_timeout_s", 30)))
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=logger_cfg.get("project", "saq"),
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            tags=list(logger_cfg.get("tags") or []),
            mode=logger_cfg.get("mode", "offline"),
            dir=str(run_dir),
            name=record.get("run_name"),
            config=record.get("config"),
            reinit=True,
        )
        flat: dict = {}
        _flatten("", record.get("metrics", {}), flat)
        run.summary.update(flat)
        run.summary["wall_time_s"] = record.get("wall_time_s")
        url = getattr(run, "url", None)
        run.finish()
        return url or str(run_dir / "wandb")
    except Exception as exc:  # a logging backend must never cost the user their results
        warnings.warn(f"W&B logging failed ({type(exc).__name__}: {exc}); results are in {run_dir / RESULTS_FILE}",
                      stacklevel=2)
        print(f"warning: W&B logging failed: {exc}", file=sys.stderr)
        return None
