"""Shared fixtures: a small synthetic dataset on disk, mmdetection-style results pickles, the repo root."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest

from tasks.synthetic import ensure_dataset

REPO = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """8 train and 6 val scenes in all three formats (COCO json, DOTA txt, label maps)."""
    return ensure_dataset(tmp_path_factory.mktemp("synthetic"), n_train=8, n_val=6, seed=0, progress=False)


@pytest.fixture
def mm_results():
    """write(path, entries, box_class=None): a results pickle as mmdetection writes it (see write_mm_results)."""
    return write_mm_results


def write_mm_results(path: Path, entries: list[dict], box_class: str | None = None) -> Path:
    """A results pickle as mmdetection 3.x's tools/test.py --out writes it (mmengine pickles with protocol 2).
    box_class ("mmrotate.structures.bbox.rotated_boxes.RotatedBoxes"): each entry's pred_instances.bboxes is wrapped
    in that class, defined for the dump only, as mmrotate's box objects are; reading must do without the module."""
    added = []
    if box_class:
        module_name, class_name = box_class.rsplit(".", 1)
        parts = module_name.split(".")
        for i in range(len(parts)):
            name = ".".join(parts[: i + 1])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        boxes_type = type(class_name, (), {"__module__": module_name,
                                           "__init__": lambda self, tensor: setattr(self, "tensor", tensor)})
        setattr(sys.modules[module_name], class_name, boxes_type)
        entries = [{**e, "pred_instances": {**e["pred_instances"],
                                            "bboxes": boxes_type(e["pred_instances"]["bboxes"])}} for e in entries]
    try:
        path.write_bytes(pickle.dumps(entries, protocol=2))
    finally:
        for name in added:
            del sys.modules[name]
    return path

