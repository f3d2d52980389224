"""Records an evaluation of the shipped sam_tiny (a results.json of `python -m saq`) in the checkpoint's card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from saq.sam.build import TINY_CHECKPOINT


def record_evaluation(results_path: Path, card_path: Path | None = None) -> dict:
    card_path = card_path or TINY_CHECKPOINT.with_suffix(".json")
    results = json.loads(Path(results_path).read_text())
    if results.get("model") != "sam_tiny":
        raise SystemExit(f"{results_path} is a run of {results.get('model')}, not sam_tiny")
    config = results.get("config") or {}
    if (config.get("model") or {}).get("checkpoint") or (config.get("task") or {}).get("max_images"):
        # the card describes the shipped checkpoint on the whole val split, nothing else
        raise SystemExit(f"{results_path} evaluated another checkpoint or a subset (model.checkpoint / "
                         "task.max_images set); the card needs the shipped sam_tiny on all val images")
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card["evaluation"] = {
        "task": results["task"],
        "prompts": results["prompts"],
        "split": results["config"]["task"]["data"]["ann_file"],
        "metrics": results["metrics"]["fp"],
        "git_commit": results.get("git_commit"),
    }
    card_path.write_text(json.dumps(card, indent=1))
    return card


if __name__ == "__main__":
    # A maintenance utility with one positional path, not an experiment knob.
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m saq.sam.tiny.card outputs/<run>/results.json")
    print(json.dumps(record_evaluation(Path(sys.argv[1]))["evaluation"], indent=1))
