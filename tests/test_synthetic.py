"""The procedural dataset: deterministic, and readable in its three formats."""

from __future__ import annotations

import json

import cv2
import numpy as np
from pycocotools.coco import COCO

from tasks.synthetic import CATEGORIES, ensure_dataset, render_scene


def test_scenes_are_deterministic_and_seed_dependent():
    a, b = render_scene(0, "train", 5), render_scene(0, "train", 5)
    assert np.array_equal(a.image, b.image)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    c = render_scene(1, "train", 5)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, render_scene(0, "val", 5).image)


def test_visible_masks_are_disjoint_and_match_the_label_map():
    s = render_scene(0, "val", 0)
    stacked = np.stack(s.masks).astype(int).sum(0)
    assert stacked.max() <= 1, "occlusion: each pixel belongs to at most one instance"
    labels = s.label_map()
    for mask, cat in zip(s.masks, s.categories):
        assert (labels[mask] == cat + 1).all()
    assert (labels[stacked == 0] == 0).all()


def test_formats_load(synthetic_root):
    coco = COCO(str(synthetic_root / "annotations" / "instances_val.json"))
    assert len(coco.getImgIds()) == 6
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert coco.annToMask(ann).sum() == ann["area"]
    # The json's masks equal a fresh render of the same scene.
    scene = render_scene(0, "val", 0)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=1))
    assert len(anns) == len(scene.masks)
    assert np.array_equal(coco.annToMask(anns[0]).astype(bool), scene.masks[0])
    lines = (synthetic_root / "val" / "labelTxt" / "000000.txt").read_text().splitlines()
    objects = [ln.split() for ln in lines[2:]]
    assert len(objects) == len(scene.masks)
    assert all(len(o) == 10 and o[8] in CATEGORIES and o[9] in "01" for o in objects)
    label = cv2.imread(str(synthetic_root / "val" / "labels" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(label, scene.label_map())


def test_ensure_dataset_reuses_a_larger_set(synthetic_root):
    before = (synthetic_root / "meta.json").stat().st_mtime_ns
    ensure_dataset(synthetic_root, n_train=4, n_val=3, seed=0, progress=False)
    assert (synthetic_root / "meta.json").stat().st_mtime_ns == before
    assert json.loads((synthetic_root / "meta.json").read_text())["n_val"] == 6
