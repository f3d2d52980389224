"""Records an evaluation of the shipped sam_tiny (a results.json of `python -m saq`) in the checkpoint's card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from saq.log import write_text_atomic
from saq.sam.build import TINY_CHECKPOINT

REPO = Path(__file__).resolve().parents[3]
# The shipped synthetic data's generator settings (the instance task's defaults): its val split is what the card's
# evaluation covers, every image of it.
SHIPPED_TASK = REPO / "conf" / "task" / "instance.yaml"


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; give the {what}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SystemExit(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         f"give the {what}") from None


def _same_root(root, card_root) -> bool:
    """The run's data.root is the card's: the same text (relative roots are the repository's), or the same folder."""
    if root is None or card_root is None:
        return False
    return Path(root) == Path(card_root) or Path(root).expanduser().resolve() == (REPO / card_root).resolve()


def check_evaluation(results: dict, results_path: Path, card: dict) -> None:
    """SystemExit (one line) unless `results` evaluated the shipped sam_tiny on all of the shipped synthetic val split
    that the card's data record names."""
    if not isinstance(results, dict):
        raise SystemExit(f"{results_path} is not a saq run record (a JSON {type(results).__name__}, not an object)")
    if results.get("model") != "sam_tiny":
        raise SystemExit(f"{results_path} is a run of {results.get('model')}, not sam_tiny")
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    task_cfg = config.get("task") if isinstance(config.get("task"), dict) else {}
    if model_cfg.get("checkpoint") or task_cfg.get("max_images"):
        # the card describes the shipped checkpoint on the whole val split, nothing else
        raise SystemExit(f"{results_path} evaluated another checkpoint or a subset (model.checkpoint / "
                         "task.max_images set); the card needs the shipped sam_tiny on all val images")
    if results.get("task") != "instance" or not isinstance(task_cfg.get("data"), dict) \
            or "ann_file" not in task_cfg["data"]:
        raise SystemExit(f"{results_path} is a run of task {results.get('task')!r}; the card records the instance "
                         "task (task=instance) on the synthetic val split")
    if results.get("prompts") != "gt":  # the card's box-prompt figures are for ground-truth boxes
        raise SystemExit(f"{results_path} prompted with {results.get('prompts')!r} boxes; the card records ground-truth "
                         "boxes (prompts=gt)")
    from saq.sam.build import checkpoint_digest

    if results.get("checkpoint_sha256") != checkpoint_digest("sam_tiny", None):  # e.g. a run before a retraining
        raise SystemExit(f"{results_path} evaluated other weights than today's shipped sam_tiny checkpoint (its "
                         "checkpoint_sha256 differs or is missing); evaluate it again: make tiny-card")
    metrics = results.get("metrics") if isinstance(results.get("metrics"), dict) else {}
    fp = metrics.get("fp")
    if not isinstance(fp, dict) or not fp:
        raise SystemExit(f"{results_path} has no FP metrics (metrics.fp); give the results.json of a finished run")
    data, card_data = task_cfg["data"], card.get("data") or {}
    wanted = {"root": card_data.get("root"), "ann_file": card_data.get("val_ann"),
              "img_dir": card_data.get("val_img_dir")}
    for key, value in wanted.items():
        same = _same_root(data.get(key), value) if key == "root" else data.get(key) == value
        if value is not None and not same:
            raise SystemExit(f"{results_path} evaluated task.data.{key}={data.get(key)}; the card's data is "
                             f"{value} (the shipped synthetic dataset's val split)")
    shipped = OmegaConf.to_container(OmegaConf.load(SHIPPED_TASK).generate)
    generate = task_cfg.get("generate") if isinstance(task_cfg.get("generate"), dict) else {}
    for key in ("n_val", "seed"):
        if generate.get(key) != shipped[key]:
            raise SystemExit(f"{results_path} ran with task.generate.{key}={generate.get(key)}; the shipped synthetic "
                             f"data has {key}={shipped[key]} (leave task.generate at its default)")
    if fp.get("images") != shipped["n_val"]:
        raise SystemExit(f"{results_path} evaluated {fp.get('images')} images (metrics.fp.images); the shipped "
                         f"synthetic val split has {shipped['n_val']}: the card needs all of them")


def record_evaluation(results_path: Path, card_path: Path | None = None) -> dict:
    card_path = Path(card_path or TINY_CHECKPOINT.with_suffix(".json"))
    results_path = Path(results_path)
    results = _read_json(results_path, "results.json of a python -m saq run of sam_tiny")
    card = _read_json(card_path, "sam_tiny card") if card_path.exists() else {}
    if not isinstance(card, dict):
        raise SystemExit(f"{card_path} is not a model card (a JSON {type(card).__name__}, not an object)")
    check_evaluation(results, results_path, card)
    card["evaluation"] = {
        "task": results["task"],
        "prompts": results.get("prompts"),
        "split": results["config"]["task"]["data"]["ann_file"],
        "metrics": results["metrics"]["fp"],
        "git_commit": results.get("git_commit"),
    }
    write_text_atomic(card_path, json.dumps(card, indent=1))
    return card


if __name__ == "__main__":
    # A maintenance utility with one positional path, not an experiment knob.
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m saq.sam.tiny.card outputs/<run>/results.json")
    print(json.dumps(record_evaluation(Path(sys.argv[1]))["evaluation"], indent=1))
