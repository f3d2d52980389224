"""The procedural dataset: deterministic, and readable in its three formats."""

from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from tasks.synthetic import CATEGORIES, CLI_KNOBS, ensure_dataset, render_scene


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


def test_every_object_agrees_across_the_three_formats(synthetic_root):
    """Object by object: the COCO category, the DOTA class name and the label-map value name the same class, and
    the DOTA polygon holds the object's largest visible piece."""
    from shapely import Point, Polygon

    coco = COCO(str(synthetic_root / "annotations" / "instances_val.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for image_id, stem in ((1, "000000"), (2, "000001")):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        dota = [ln.split() for ln in (synthetic_root / "val" / "labelTxt" / f"{stem}.txt").read_text().splitlines()[2:]]
        label = cv2.imread(str(synthetic_root / "val" / "labels" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert len(anns) == len(dota) > 0
        for ann, obj in zip(anns, dota):
            mask = coco.annToMask(ann).astype(bool)
            assert names[ann["category_id"]] == obj[8]
            assert (label[mask] == CATEGORIES.index(obj[8]) + 1).all()
            polygon = Polygon(np.asarray(obj[:8], float).reshape(4, 2)).buffer(0.06)  # corners written to 0.1 px
            _, pieces, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            ys, xs = np.nonzero(pieces == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))
            assert all(polygon.contains(Point(x, y)) for x, y in zip(xs, ys))  # its pixel centres, every one


def test_ensure_dataset_reuses_a_larger_set(synthetic_root):
    before = (synthetic_root / "meta.json").stat().st_mtime_ns
    ensure_dataset(synthetic_root, n_train=4, n_val=3, seed=0, progress=False)
    assert (synthetic_root / "meta.json").stat().st_mtime_ns == before
    assert json.loads((synthetic_root / "meta.json").read_text())["n_val"] == 6


def test_tasks_on_a_larger_set_evaluate_the_n_val_scenes_generate_asks_for(synthetic_root):
    from tasks.instance import InstanceTask
    from tasks.oriented import OrientedTask
    from tasks.semantic import SemanticTask

    root = str(synthetic_root)  # 6 val scenes; n_val=3 reuses them, and its scenes are the first 3
    generate = {"n_train": 4, "n_val": 3, "seed": 0, "progress": False}
    data = {"root": root, "ann_file": "annotations/instances_val.json", "img_dir": "val/images"}
    calib = {"ann_file": "annotations/instances_train.json", "img_dir": "train/images"}
    assert InstanceTask(data, calib, generate=generate).image_ids() == [1, 2, 3]
    assert len(InstanceTask(data, calib).image_ids()) == 6  # real data (no generate): every image
    assert InstanceTask(data, calib, generate=generate, max_images=2).image_ids() == [1, 2]
    oriented = OrientedTask({"root": root, "img_dir": "val/images", "ann_dir": "val/labelTxt"},
                            {"img_dir": "train/images", "ann_dir": "train/labelTxt"}, generate=generate)
    assert [stem for stem, _ in oriented.images] == ["000000", "000001", "000002"]
    semantic = SemanticTask({"root": root, "img_dir": "val/images", "label_dir": "val/labels"},
                            {"img_dir": "train/images"}, classes=len(CATEGORIES) + 1, generate=generate)
    assert [stem for stem, *_ in semantic.items] == ["000000", "000001", "000002"]
    from saq.errors import SaqError

    for bad, message in (({"n_val": 0}, "task.generate.n_val=0 invalid; expected an integer >= 1"),
                         ({"n_val": -5}, "task.generate.n_val=-5 invalid"),
                         ({"seed": -1}, "task.generate.seed=-1 invalid"),
                         ({"n_tain": 3}, "task.generate.n_tain is not a generation setting")):
        with pytest.raises(SaqError, match=re.escape(message)):
            InstanceTask(data, calib, generate={**generate, **bad})
    for word in ("none", False):  # read letter by letter it named a setting 'e'; false was taken for null
        with pytest.raises(SaqError, match=re.escape(f"task.generate={word!r} invalid; expected null (real data: "
                                                     "nothing is generated) or the generation settings")):
            InstanceTask(data, calib, generate=word)


def test_generation_refuses_a_folder_that_holds_other_data(tmp_path):
    from saq.errors import SaqError
    from tasks.instance import InstanceTask

    real = tmp_path / "coco"
    (real / "annotations").mkdir(parents=True)
    (real / "annotations" / "instances_val2017.json").write_text("{}")
    data = {"root": str(real), "ann_file": "annotations/instances_val2017.json", "img_dir": "val2017"}
    with pytest.raises(SaqError, match=r"coco is not empty and holds no synthetic dataset .*task.generate=null"):
        InstanceTask(data, {"ann_file": "annotations/instances_train2017.json", "img_dir": "train2017"},
                     generate={"n_train": 1, "n_val": 1, "seed": 0})
    assert sorted(p.name for p in real.rglob("*")) == ["annotations", "instances_val2017.json"]
    # an empty folder is fine
    assert (ensure_dataset(tmp_path / "empty", 1, 1, 0, progress=False) / "meta.json").is_file()


def test_regenerating_with_other_parameters_leaves_no_old_scene(tmp_path):
    from saq.errors import SaqError

    root = ensure_dataset(tmp_path / "d", n_train=3, n_val=3, seed=0, progress=False)
    # a complete set of another seed is refused: a run reading it would get other images under its annotations
    with pytest.raises(SaqError, match=r"holds the synthetic dataset of seed 0; task.generate.seed=5 would replace "
                                       r"it under every run that uses it: generate seed 5 into another folder "
                                       r"\(task.data.root=.*d_seed5\), or delete"):
        ensure_dataset(root, n_train=2, n_val=1, seed=5, progress=False)
    # the command line (python -m tasks.synthetic) names its own flags
    with pytest.raises(SaqError, match=r"; --seed=5 would replace it .* \(--out=.*d_seed5\)"):
        ensure_dataset(root, n_train=2, n_val=1, seed=5, progress=False, knobs=CLI_KNOBS)
    assert json.loads((root / "meta.json").read_text())["seed"] == 0
    # an interrupted generation (or another generator version) is replaced, old scenes and all
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    ensure_dataset(root, n_train=2, n_val=1, seed=5, progress=False)
    for split, n in (("train", 2), ("val", 1)):
        for sub in ("images", "labelTxt", "labels"):
            assert len(list((root / split / sub).iterdir())) == n, (split, sub)
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert len(coco["images"]) == n and coco["info"]["seed"] == 5
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["seed"], meta["n_train"], meta["n_val"], meta["complete"]) == (5, 2, 1, True)
    assert np.array_equal(cv2.imread(str(root / "val/labels/000000.png"), cv2.IMREAD_UNCHANGED),
                          render_scene(5, "val", 0).label_map())
    # a file the generator did not write is never deleted
    (root / "train" / "images" / "mine.jpg").write_bytes(b"x")
    (root / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(SaqError, match=r"mine\.jpg was not written by the generator"):
        ensure_dataset(root, n_train=1, n_val=1, seed=6, progress=False)
    assert (root / "train" / "images" / "mine.jpg").is_file()


def test_more_val_scenes_keep_the_larger_train_split_of_the_same_seed(tmp_path):
    root = ensure_dataset(tmp_path / "d", n_train=4, n_val=1, seed=0, progress=False)
    scenes = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png", ".txt"))
    written = {p: p.stat().st_mtime_ns for p in scenes}
    for p in scenes:  # so that a rewrite of the same bytes would show
        os.utime(p, ns=(1, 1))
    ensure_dataset(root, n_train=2, n_val=3, seed=0, progress=False)  # needs more val: grown, train kept at 4
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["n_train"], meta["n_val"], meta["complete"]) == (4, 3, True)
    assert len(list((root / "train" / "images").iterdir())) == 4 and len(list((root / "val" / "images").iterdir())) == 3
    # the scenes already there are left alone (a run may be reading them); the new ones are the seed's own
    assert written and all(p.stat().st_mtime_ns == 1 for p in written)
    assert np.array_equal(cv2.imread(str(root / "val/labels/000002.png"), cv2.IMREAD_UNCHANGED),
                          render_scene(0, "val", 2).label_map())
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["000000.jpg", "000001.jpg", "000002.jpg"]



def test_an_interrupted_growth_leaves_the_smaller_set_in_use(tmp_path, monkeypatch):
    import tasks.synthetic as synthetic

    root = ensure_dataset(tmp_path / "d", n_train=2, n_val=1, seed=0, progress=False)
    before = json.loads((root / "meta.json").read_text())
    write_split = synthetic.write_split

    def killed(root, split, n, seed, progress=True, keep_first=0):
        write_split(root, split, n - 1, seed, progress, keep_first)  # part of the new scenes, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_split", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(root, n_train=2, n_val=4, seed=0, progress=False)
    # what runs read meanwhile, and afterwards, is still the complete smaller set
    assert json.loads((root / "meta.json").read_text()) == before
    assert ensure_dataset(root, n_train=2, n_val=1, seed=0, progress=False) == root
    assert (root / "val" / "images" / "000000.jpg").is_file() and (root / "train" / "images" / "000001.jpg").is_file()
    monkeypatch.undo()
    ensure_dataset(root, n_train=2, n_val=4, seed=0, progress=False)  # grown on the next try
    assert json.loads((root / "meta.json").read_text())["n_val"] == 4
    assert len(list((root / "val" / "images").iterdir())) == 4


def test_generation_waits_for_a_parallel_one_and_then_reuses_it(tmp_path, monkeypatch):
    import fcntl
    import threading

    from tasks.synthetic import ensure_dataset, generation_lock

    root = tmp_path / "fresh"
    done, blocked = threading.Event(), threading.Event()
    flock = fcntl.flock

    def noting_a_wait(handle, operation):  # a blocking request that finds the lock held says so, then waits
        if operation == fcntl.LOCK_EX:
            try:
                return flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                blocked.set()
        return flock(handle, operation)

    with open(generation_lock(root), "a") as held:  # another sweep job is generating here
        flock(held, fcntl.LOCK_EX)
        monkeypatch.setattr(fcntl, "flock", noting_a_wait)
        worker = threading.Thread(target=lambda: (ensure_dataset(root, 2, 1, 0, progress=False), done.set()))
        worker.start()
        # it waits on the lock instead of generating into the same folder (no clock: the wait itself is observed)
        assert blocked.wait(120) and not done.is_set() and not root.exists()
    worker.join(120)
    assert done.is_set() and json.loads((root / "meta.json").read_text())["complete"] is True
    # a complete dataset is used without the lock, so data on a read-only mount (no lock file possible) works
    generation_lock(root).unlink()
    assert ensure_dataset(root, 2, 1, 0, progress=False) == root and not generation_lock(root).exists()


def test_an_image_that_cannot_be_written_is_an_error_not_a_complete_set(tmp_path, monkeypatch):
    import cv2

    from saq.errors import SaqError
    from tasks.synthetic import ensure_dataset

    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)  # as on a full disk: no exception
    with pytest.raises(SaqError, match=r"cannot write scene 000000 into .*train; check free space"):
        ensure_dataset(tmp_path / "full", 1, 1, 0, progress=False)
    assert json.loads((tmp_path / "full" / "meta.json").read_text())["complete"] is False


def test_the_generator_command_refuses_empty_splits(tmp_path, capsys):
    from tasks.synthetic import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "d"), "--n-train", "0", "--n-val", "1"])
    assert "--n-train and --n-val must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_generator_command_names_its_own_flags_for_an_out_it_cannot_generate_into(tmp_path, capsys):
    from tasks.synthetic import main

    def refused(out) -> str:
        with pytest.raises(SystemExit):
            main(["--out", str(out), "--n-train", "1", "--n-val", "1"])
        return capsys.readouterr().err

    (tmp_path / "a_file").write_text("")
    assert refused(tmp_path / "a_file") == (f"error: --out={tmp_path / 'a_file'} is a file; --out needs a folder (a new "
                                            "or empty one, or one holding a synthetic dataset)\n")
    # task.generate is the main command's knob: the generator only generates, so it is no way out here
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.txt").write_text("")
    assert refused(tmp_path / "real") == (f"error: {tmp_path / 'real'} is not empty and holds no synthetic dataset "
                                          "(meta.json): refusing to generate into it (use a new or empty folder)\n")
    (tmp_path / "real" / "meta.json").write_text("{}")
    assert refused(tmp_path / "real") == (f"error: {tmp_path / 'real' / 'meta.json'} is not a synthetic dataset's "
                                          f"meta.json; refusing to generate into {tmp_path / 'real'} (use another "
                                          "folder)\n")


def test_generating_into_a_new_root_is_said_and_a_mistyped_real_data_path_is_refused(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from saq.errors import SaqError
    from tasks.instance import InstanceTask
    from tasks.synthetic import DEFAULT_ROOT
    from tests.conftest import REPO

    generate = {"n_train": 1, "n_val": 1, "seed": 0, "progress": False}
    calib = {"ann_file": "annotations/instances_train.json", "img_dir": "train/images"}

    def task(root):
        return InstanceTask({"root": str(root), "ann_file": "annotations/instances_val.json", "img_dir": "val/images"},
                            calib, generate=generate)

    # a typo above the last part of a path to real data (/data/coco -> /dta/coco): refused, nothing made
    with pytest.raises(SaqError, match=r"^task\.data\.root=.*dta/coco does not exist, nor does its folder .*dta: "
                                       r"refusing .*\(set task\.generate=null for real data, or fix the path to "
                                       r"the data\)$"):
        task(tmp_path / "dta" / "coco")
    assert not (tmp_path / "dta").exists()
    # a new root in an existing folder is generated, and the run says so (a typo in the last part shows here)
    task(tmp_path / "coko")
    assert f"task.data.root={tmp_path / 'coko'} does not exist: generating the synthetic dataset into " \
           f"{(tmp_path / 'coko').resolve()} (real data needs task.generate=null)" in capsys.readouterr().out
    task(tmp_path / "coko")  # found there the next time: nothing to say
    assert "generating" not in capsys.readouterr().out
    # the default root on a fresh clone, where the git-ignored data/ does not exist yet, is generated
    configured = {OmegaConf.load(f).data.root for f in (REPO / "conf" / "task").glob("*.yaml")}
    assert configured == {str(DEFAULT_ROOT)}
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")  # a working directory without data/
    task(DEFAULT_ROOT)
    assert (tmp_path / "clone" / DEFAULT_ROOT / "meta.json").is_file()
    assert f"task.data.root={DEFAULT_ROOT} does not exist: generating the synthetic dataset into " \
           f"{(tmp_path / 'clone' / DEFAULT_ROOT).resolve()}" in capsys.readouterr().out
