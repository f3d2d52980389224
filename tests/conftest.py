"""Shared fixtures: a small synthetic dataset on disk, mmdetection-style results pickles, the repo root, a random
ViT-B at a small input."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest

from tasks.synthetic import ensure_dataset

REPO = Path(__file__).resolve().parent.parent


def random_vit_b(image_size: int = 256, seed: int = 0):
    """SAM ViT-B's architecture (12 blocks 768 wide, global attention at 2/5/8/11, the same prompt encoder and
    decoder) with seeded random weights, at a smaller input: 256 px is a 16x16 token grid, which the 14-token windows
    still pad (to 28), and a forward takes a second instead of a minute at 1024 px. What quantize() wraps depends on
    the blocks, not on the input size; images of another size still go through the resize, padding and crop."""
    import dataclasses

    import torch

    from saq.sam.build import ARCHITECTURES, make_sam

    arch = dataclasses.replace(ARCHITECTURES["sam_vit_b"], image_size=image_size)
    assert arch.embedding_size % arch.window_size != 0, "the windows must still pad the token grid"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make_sam(arch)


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


def _made_run(synthetic_root, tmp_path_factory, name, *overrides):
    from saq import pipeline
    from tests.test_saved import run_config

    run = tmp_path_factory.mktemp(name) / "run"
    return run, pipeline.run(run_config(synthetic_root, *overrides), run)


@pytest.fixture(scope="module")
def w8a8_run(synthetic_root, tmp_path_factory):
    """(folder, record) of one saved W8A8 run on 1 image (tests.test_saved.run_config), made once per test module.
    Read it as it is; a test that runs into it, rewrites its files or analyses it copies it first (copy_run)."""
    return _made_run(synthetic_root, tmp_path_factory, "w8a8", "task.max_images=1")


@pytest.fixture(scope="module")
def w4a4_run(synthetic_root, tmp_path_factory):
    """(folder, record) of one saved W4A4 run on 1 image, made once per test module; copy it before changing it."""
    return _made_run(synthetic_root, tmp_path_factory, "w4a4", "quant=w4a4", "task.max_images=1")


def copy_run(made, target: Path) -> dict:
    """Copy a made run's folder (w8a8_run, w4a4_run) to `target`, as if the run had written there; its record."""
    import copy
    import shutil

    run, record = made
    shutil.copytree(run, target)
    return copy.deepcopy(record)


def flip_tensor_byte(path: Path) -> str:
    """Flip one byte inside the first tensor-data record of a torch zip file (what a bad copy does); its name."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len] ^= 0x40  # the record's first byte, past its local header
    path.write_bytes(bytes(data))
    return info.filename
