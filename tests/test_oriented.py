"""Oriented task: exact rotated IoU, DOTA mAP, rectangles from masks, DOTA reading and its errors, end to end."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from saq.errors import SaqError
from saq.sam.build import build_sam
from saq.sam.segmenter import Prediction, Segmenter
from tasks.oriented import (
    OrientedTask,
    RotatedDetection,
    average_precision,
    polygon_iou,
    read_dota_labels,
    rotated_boxes_of,
    rotated_map,
)
from tasks.prompts import DetectionsFile, JitteredBoxes
from tasks.synthetic import CATEGORIES, oriented_box

DATA = {"img_dir": "val/images", "ann_dir": "val/labelTxt"}
CALIB = {"img_dir": "train/images", "ann_dir": "train/labelTxt"}


def square(cx, cy, side, degrees=0.0):
    t = np.radians(degrees)
    half = side / 2
    corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return corners @ rot.T + [cx, cy]


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def iou(a, b):
    return float(polygon_iou(np.asarray(a)[None], np.asarray(b)[None])[0, 0])


def test_rotated_iou_of_known_polygon_pairs():
    assert iou(square(5, 5, 2), square(5, 5, 2)) == pytest.approx(1.0, abs=1e-12)
    assert iou(square(0, 0, 2), square(10, 0, 2)) == 0.0
    assert iou(square(0, 0, 4), square(0.5, 0.5, 2)) == pytest.approx(4 / 16, abs=1e-12)  # one inside the other
    assert iou(rect(0, 0, 2, 1), rect(1, 0, 3, 1)) == pytest.approx(1 / 3, abs=1e-12)
    # A square and itself turned 45 degrees: the overlap is a regular octagon, IoU exactly 1/sqrt(2).
    assert iou(square(3, 3, 2), square(3, 3, 2, 45)) == pytest.approx(1 / np.sqrt(2), abs=1e-12)
    # Rotating both by the same angle changes nothing.
    assert iou(square(3, 3, 2, 30), square(3, 3, 2, 75)) == pytest.approx(1 / np.sqrt(2), abs=1e-12)
    matrix = polygon_iou(np.stack([square(0, 0, 2), square(10, 0, 2)]), np.stack([square(10, 0, 2)] * 3))
    assert matrix.shape == (2, 3) and np.allclose(matrix, [[0, 0, 0], [1, 1, 1]])


def test_self_crossing_corner_order_is_read_as_its_convex_hull():
    bow_tie = np.array([[0, 0], [2, 2], [2, 0], [0, 2]], np.float64)
    assert iou(bow_tie, rect(0, 0, 2, 2)) == pytest.approx(1.0)


def gt_of(*objects):
    """ground truth of one image from (polygon, class, difficult) triples."""
    polys = np.stack([o[0] for o in objects]).astype(np.float64)
    return polys, np.array([o[1] for o in objects]), np.array([o[2] for o in objects], bool)


GT = {
    "a": gt_of((rect(0, 0, 10, 10), 0, False), (rect(20, 20, 30, 40), 1, False)),
    "b": gt_of((rect(5, 5, 15, 15), 0, False), (rect(40, 40, 60, 50), 1, True)),
}


def perfect(gt=GT, score=0.9):
    return [RotatedDetection(key, int(label), score, poly) for key, (polys, labels, _) in gt.items()
            for poly, label in zip(polys, labels)]


@pytest.mark.parametrize("method", ["voc07", "area"])
def test_map_is_one_for_perfect_detections(method):
    result = rotated_map(perfect(), GT, ["plane", "ship"], method)
    assert result["mAP50"] == pytest.approx(1.0)
    assert result["AP50_per_class"] == {"plane": pytest.approx(1.0), "ship": pytest.approx(1.0)}
    assert result["objects_per_class"] == {"plane": 2, "ship": 1}  # the difficult ship is not counted


@pytest.mark.parametrize("method", ["voc07", "area"])
def test_map_drops_with_a_false_positive(method):
    # A false positive ranked above both planes: precision 1/2 then 2/3 at full recall, so AP = 2/3 both ways.
    fp = RotatedDetection("a", 0, 0.95, rect(50, 50, 60, 60))
    assert rotated_map(perfect() + [fp], GT, ["plane", "ship"], method)["AP50_per_class"]["plane"] == \
        pytest.approx(2 / 3)
    # Ranked below every true positive it costs nothing.
    low = RotatedDetection("a", 0, 0.1, rect(50, 50, 60, 60))
    assert rotated_map(perfect() + [low], GT, ["plane", "ship"], method)["mAP50"] == pytest.approx(1.0)
    # A second detection of a matched object is a false positive: ranked TP, FP, TP.
    dup = RotatedDetection("a", 0, 0.95, rect(0, 0, 10, 10))
    expected = {"voc07": (6 + 5 * 2 / 3) / 11, "area": 0.5 + 0.5 * 2 / 3}[method]
    assert rotated_map(perfect() + [dup], GT, ["plane", "ship"], method)["AP50_per_class"]["plane"] == \
        pytest.approx(expected)
    # Overlap at IoU 0.5 exactly is not a match (DOTA needs IoU > 0.5).
    half = RotatedDetection("a", 0, 0.95, rect(0, 0, 10, 20))
    assert iou(half.polygon, rect(0, 0, 10, 10)) == pytest.approx(0.5)
    assert rotated_map(perfect() + [half], GT, ["plane", "ship"], method)["AP50_per_class"]["plane"] == \
        pytest.approx(2 / 3)


def test_voc07_and_area_ap_differ_as_defined():
    # Two objects; ranked TP, FP, TP: recall .5 .5 1, precision 1 .5 2/3.
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert average_precision(recall, precision, "voc07") == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert average_precision(recall, precision, "area") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # the devkit's thresholds: np.arange's 0.30000000000000004 is not reached by a recall of exactly 0.3
    assert average_precision(np.array([0.3]), np.array([1.0]), "voc07") == pytest.approx(3 / 11)
    with pytest.raises(SaqError, match="ap_method"):
        rotated_map([], GT, ["plane"], "coco")


def test_difficult_objects_are_ignored():
    ships = ["plane", "ship"]
    # `perfect` detects the difficult ship too, at the same score as the rest: no effect.
    assert rotated_map(perfect(), GT, ships)["AP50_per_class"]["ship"] == pytest.approx(1.0)
    # Missing the difficult ship costs nothing ...
    no_difficult = [d for d in perfect() if not (d.image == "b" and d.label == 1)]
    assert rotated_map(no_difficult, GT, ships)["AP50_per_class"]["ship"] == pytest.approx(1.0)
    # ... and a top-ranked detection of it is neither a true nor a false positive.
    on_difficult = RotatedDetection("b", 1, 0.99, rect(40, 40, 60, 50))
    assert rotated_map(no_difficult + [on_difficult], GT, ships)["AP50_per_class"]["ship"] == pytest.approx(1.0)
    # A class whose only objects are difficult has no AP and stays out of the mean.
    only_difficult = {"b": gt_of((rect(5, 5, 15, 15), 0, False), (rect(40, 40, 60, 50), 1, True))}
    result = rotated_map([RotatedDetection("b", 0, 0.9, rect(5, 5, 15, 15))], only_difficult, ships)
    assert result["AP50_per_class"]["ship"] is None and result["mAP50"] == pytest.approx(1.0)


def test_mmrotate_matches_each_quads_rotated_box_at_iou_at_or_above_the_threshold():
    """mmrotate's DOTAMetric (MMRotate-SAM's evaluation) turns each labelled quadrilateral into its minimum-area
    rotated box and matches at IoU >= 0.5; the DOTA devkit matches the quadrilateral itself at IoU > 0.5."""
    # IoU 0.5 exactly with a rectangle, which is its own rotated box: a match for mmrotate only
    gt = {"a": (np.stack([rect(0, 0, 10, 10)]), np.array([0]), np.array([False]))}
    half = [RotatedDetection("a", 0, 0.9, rect(0, 0, 10, 20))]
    assert rotated_map(half, gt, ["plane"])["mAP50"] == 0.0
    assert rotated_map(half, gt, ["plane"], protocol="mmrotate")["mAP50"] == pytest.approx(1.0)
    # a trapezoid, whose rotated box is its 20 x 10 bounding rectangle: a detection of its left 9 pixels overlaps
    # the trapezoid by 0.65 (a devkit match) and the rectangle by 0.45 (an mmrotate miss)
    trapezoid = np.array([[0, 0], [20, 0], [20, 10], [16, 10]], np.float64)
    assert np.allclose(np.sort(rotated_boxes_of(trapezoid[None])[0], 0), np.sort(rect(0, 0, 20, 10), 0), atol=1e-9)
    left = RotatedDetection("a", 0, 0.9, rect(11, 0, 20, 10))
    assert iou(left.polygon, trapezoid) > 0.6 and iou(left.polygon, rect(0, 0, 20, 10)) == pytest.approx(0.45)
    gt = {"a": (trapezoid[None], np.array([0]), np.array([False]))}
    assert rotated_map([left], gt, ["plane"])["mAP50"] == pytest.approx(1.0)
    assert rotated_map([left], gt, ["plane"], protocol="mmrotate")["mAP50"] == 0.0
    with pytest.raises(SaqError, match=r"^task\.protocol must be one of dota_devkit, mmrotate, got 'mmdet'"):
        rotated_map([left], gt, ["plane"], protocol="mmdet")


def test_the_protocol_reaches_the_evaluation_and_mmrotate_without_difficult_objects_is_said(tmp_path, capsys):
    data = dota_dataset(tmp_path, {"P1": "4 4 20 4 20 20 4 20 plane 0\n30 30 50 30 50 50 30 50 plane 1\n"})
    # the first plane's mask is 17 pixels wide where the box is 16: IoU 16/18 either way; the difficult plane's
    # mask is the left half of its box, IoU 0.5 exactly with the labelled square
    segmenter = MaskSegmenter({(4.0, 4.0, 20.0, 20.0): rect(4, 4, 21, 20), (30.0, 30.0, 50.0, 50.0): rect(30, 30, 40, 50)})
    devkit = OrientedTask(data, CALIB, difficult_above=100)
    assert "task.protocol" not in capsys.readouterr().out
    mmrotate = OrientedTask(data, CALIB, difficult_above=100, protocol="mmrotate")
    assert "task.protocol" not in capsys.readouterr().out
    assert devkit.evaluate(segmenter, progress=False)["mAP50"] < 1.0  # the half mask misses at IoU 0.5
    assert mmrotate.evaluate(segmenter, progress=False)["mAP50"] == pytest.approx(1.0)
    assert devkit.fingerprint() != mmrotate.fingerprint()
    assert "dota_devkit" not in devkit.fingerprint()  # the default's FP caches, made before the knob, still match
    OrientedTask(data, CALIB, protocol="mmrotate")
    assert "add task.difficult_above=100 for mmrotate's figures" in capsys.readouterr().out


def long_side_and_angle(corners):
    """(long side, short side, direction of the long side in degrees mod 180) of a rectangle's corners."""
    edges = np.roll(corners, -1, 0) - corners
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    i = int(np.argmax(lengths[:2]))
    return lengths[i], lengths[1 - i], np.degrees(np.arctan2(edges[i, 1], edges[i, 0])) % 180


@pytest.mark.parametrize("angle", [0.0, 10.0, 17.5, 30.0, 45.0, 63.0, 90.0, 120.0, 160.0])
def test_rectangle_from_rasterised_rotated_mask(angle):
    length, width, cx, cy = 120.0, 50.0, 128.3, 127.6
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float64)
    t = np.radians(angle)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    mask = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
    mask[5:9, 5:9] = True  # a speck elsewhere: only the largest region counts (the generator's labels)
    long, short, direction = long_side_and_angle(oriented_box(mask, largest_region=True).astype(np.float64))
    # Pixel centres inside the rectangle span it to within one pixel (a diagonal step at worst).
    assert length - np.sqrt(2) <= long <= length + 1e-3
    assert width - np.sqrt(2) <= short <= width + 1e-3
    assert abs((direction - angle + 90) % 180 - 90) < 1.0
    centre = oriented_box(mask, largest_region=True).mean(0)
    assert np.allclose(centre, [cx, cy], atol=0.75)


def test_a_predicted_mask_in_pieces_gets_the_box_of_all_its_pixels():
    """As MMRotate-SAM (cv2.minAreaRect on every nonzero pixel): a mask split by a one-pixel gap keeps its extent;
    only the generator's labels of occluded objects take the largest piece."""
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:50] = True
    mask[:, 30] = False  # the left piece (20 columns) is larger than the right one (19)
    xs = oriented_box(mask)[:, 0]
    assert (xs.min(), xs.max()) == (10, 49)  # pixel centres of the first and last columns
    largest = oriented_box(mask, largest_region=True)[:, 0]
    assert (largest.min(), largest.max()) == (10, 29)
    for pieces in (True, False):
        with pytest.raises(ValueError, match="the mask is empty"):
            oriented_box(np.zeros((4, 4), bool), largest_region=pieces)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_dota_reader_skips_headers_and_reads_difficulty(tmp_path):
    f = write(tmp_path / "P0001.txt", "imagesource:GoogleEarth\ngsd:0.146\n"
              "1 2 11 2 11 12 1 12 plane 0\n\n20 20 40 20 40 30 20 30 large-vehicle 1\n5 5 9 5 9 9 5 9 ship\n")
    objs = read_dota_labels(f)
    assert objs.names == ["plane", "large-vehicle", "ship"]
    assert objs.difficult.tolist() == [False, True, False]
    assert objs.polygons.shape == (3, 4, 2) and objs.polygons[0, 2].tolist() == [11, 12]
    # patch splitters write 2 for objects cut at a patch border; mmrotate's DOTADataset ignores only difficulty above
    # its diff_thr (100 by default: none), the devkit every one above 0
    f = write(tmp_path / "P0002.txt", "1 2 11 2 11 12 1 12 plane 0\n20 20 40 20 40 30 20 30 ship 1\n"
              "5 5 9 5 9 9 5 9 ship 2\n")
    assert read_dota_labels(f).difficult.tolist() == [False, True, True]
    assert read_dota_labels(f, difficult_above=1).difficult.tolist() == [False, False, True]
    assert read_dota_labels(f, difficult_above=100).difficult.tolist() == [False, False, False]
    assert len(read_dota_labels(write(tmp_path / "empty.txt", "imagesource:x\ngsd:null\n"))) == 0


@pytest.mark.parametrize("line", ["1 2 3 4 5 6 plane 0", "1 2 3 4 5 6 7 x plane 0", "1 2 3 4 5 6 7 8 plane hard",
                                  "1 2 3 4 5 6 7 nan plane 0", "1 2 3 4 5 6 7 8 plane 0 extra"])
def test_malformed_dota_line_names_file_and_line(tmp_path, line):
    f = write(tmp_path / "bad.txt", f"imagesource:x\n1 1 5 1 5 5 1 5 ship 0\n{line}\n")
    with pytest.raises(SaqError, match=r"bad\.txt, line 3: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class difficult'"):
        read_dota_labels(f)


def dota_dataset(root, labels: dict[str, str | None], size=64, split="val"):
    """A small DOTA folder: a grey image per stem, and its label file unless the text is None (split="train" for
    the calibration split, whose labelTxt folder is made only when a label is given)."""
    (root / f"{split}/images").mkdir(parents=True, exist_ok=True)
    if split == "val":
        (root / f"{split}/labelTxt").mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        cv2.imwrite(str(root / f"{split}/images" / f"{stem}.png"), np.full((size, size, 3), 128, np.uint8))
        if text is not None:
            write(root / f"{split}/labelTxt" / f"{stem}.txt", text)
    return {"root": str(root), **DATA}


def test_image_without_label_file_is_a_clear_error(tmp_path):
    data = dota_dataset(tmp_path, {"P1": "1 1 9 1 9 9 1 9 ship 0\n", "P2": None})
    with pytest.raises(SaqError, match=r"image .*P2\.png has no label file .*P2\.txt"):
        OrientedTask(data, CALIB)


def test_unknown_class_and_empty_dataset_are_clear_errors(tmp_path):
    data = dota_dataset(tmp_path / "a", {"P1": "1 1 9 1 9 9 1 9 ship 0\n"})
    with pytest.raises(SaqError, match=r"P1\.txt has class 'ship', not in task\.classes"):
        OrientedTask(data, CALIB, classes=["plane"])
    for classes in (5, "plane"):  # a count cannot name DOTA's classes; a string is not split into letters
        with pytest.raises(SaqError, match=rf"task\.classes must be a list of class names .* got {classes!r}"):
            OrientedTask(data, CALIB, classes=classes)
    data = dota_dataset(tmp_path / "b", {"P1": "gsd:1\n"})
    with pytest.raises(SaqError, match="hold no objects"):
        OrientedTask(data, CALIB)
    with pytest.raises(SaqError, match="hold only difficult objects \\(or none\\)"):  # named classes, empty files
        OrientedTask(data, CALIB, classes=["plane"])
    hard = dota_dataset(tmp_path / "c", {"P1": "1 1 9 1 9 9 1 9 plane 1\n", "P2": ""})
    with pytest.raises(SaqError, match=r"c/val/labelTxt hold only difficult objects .*difficult_above=0\)"):
        OrientedTask(hard, CALIB)  # mAP would read 0.0
    counted = OrientedTask(hard, CALIB, difficult_above=100)  # mmrotate's default: the object is scored
    assert counted.ground_truth("P1")[2].tolist() == [False]
    assert counted.fingerprint() != OrientedTask(hard, CALIB, difficult_above=1).fingerprint()  # other FP metrics
    with pytest.raises(SaqError, match=r"task\.difficult_above=-1"):
        OrientedTask(hard, CALIB, difficult_above=-1)
    with pytest.raises(SaqError, match="no images"):
        OrientedTask({"root": str(tmp_path / "b"), "img_dir": "val/labelTxt", "ann_dir": "val/labelTxt"}, CALIB)


def test_an_unreadable_image_folder_or_label_file_is_named_with_the_os_reason(tmp_path, monkeypatch):
    from pathlib import Path

    data = dota_dataset(tmp_path, {"P1": "1 1 9 1 9 9 1 9 ship 0\n", "P2": ""})
    (tmp_path / "val/labelTxt/P2.txt").unlink()
    (tmp_path / "val/labelTxt/P2.txt").mkdir()  # a folder in the label file's place (as root can make it too)
    with pytest.raises(SaqError, match=r"^image .*P2\.png has no label file .*P2\.txt"):
        OrientedTask(data, CALIB)
    (tmp_path / "val/labelTxt/P2.txt").rmdir()
    write(tmp_path / "val/labelTxt/P2.txt", "")
    listed = Path.iterdir

    def denied(self):  # a folder without read permission (root lists anything: simulated)
        if self.name == "images":
            raise PermissionError(13, "Permission denied", str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(SaqError, match=r"^cannot list image folder .*val/images: Permission denied \(set "
                                       r"task\.data\.root / task\.data\.img_dir\)$"):
        OrientedTask(data, CALIB)
    monkeypatch.undo()
    read = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self.name == "P1.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(SaqError, match=r"^cannot read DOTA label file .*P1\.txt: Permission denied$"):
        OrientedTask(data, CALIB)


def test_repeated_class_names_are_refused(tmp_path):
    # class_index would send both to the last index, and AP50_per_class keep one entry
    data = dota_dataset(tmp_path, {"P1": "1 1 9 1 9 9 1 9 plane 0\n"})
    with pytest.raises(SaqError, match=r"^task\.classes names 'plane' twice \(\['plane', 'ship', 'plane'\]\)"):
        OrientedTask(data, CALIB, classes=["plane", "ship", "plane"])


GENERATE = {"n_train": 1, "n_val": 1, "seed": 0, "progress": False}


@pytest.mark.parametrize("settings,match", [({"ap_method": "coco"}, r"task\.ap_method must be one of"),
                                            ({"classes": ["plane", "plane"]}, "names 'plane' twice"),
                                            ({"classes": "plane"}, "task.classes must be a list"),
                                            ({"difficult_above": -1}, r"task\.difficult_above=-1"),
                                            ({"protocol": "mmrotate1"},
                                             r"^task\.protocol must be one of dota_devkit, mmrotate, got 'mmrotate1'")])
def test_bad_settings_are_named_before_the_synthetic_set_is_generated(tmp_path, settings, match):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(SaqError, match=match):
        OrientedTask({"root": str(root), **DATA}, CALIB, generate=GENERATE, **settings)
    assert not any(root.iterdir())  # generation takes minutes at full size: a typo must not wait for it


def test_a_polygon_wholly_outside_its_image_is_refused_when_the_task_is_built(tmp_path):
    # labels of another image or resolution; one partly outside stays (patch splitters cut objects at the border)
    partly = "50 50 80 50 80 80 50 80 plane 0\n"
    off = "500 500 540 500 540 540 500 540 plane 0\n"
    data = dota_dataset(tmp_path / "a", {"P1": "1 1 9 1 9 9 1 9 ship 0\n", "P2": f"gsd:1\n{partly}{off}"})
    with pytest.raises(SaqError, match=r"^DOTA label file .*P2\.txt, line 3: the polygon \[500\.0, 500\.0, 540\.0, "
                                       r".*\] lies wholly outside its image .*P2\.png \(64x64\)"):
        OrientedTask(data, CALIB)
    (tmp_path / "a/val/labelTxt/P2.txt").write_text(partly)
    task = OrientedTask(data, CALIB)
    assert task.ground_truth("P2")[0].boxes.tolist() == [[50, 50, 80, 80]]
    # a calibration image's labels are checked as its image is read
    dota_dataset(tmp_path / "a", {"C1": off}, split="train")
    with pytest.raises(SaqError, match=r"C1\.txt, line 1: the polygon .* lies wholly outside its image .*C1\.png"):
        task.calibration_samples(1)


def test_calibration_detections_of_classes_not_evaluated_are_kept(tmp_path):
    """With task.classes=null the classes are those labelled in the evaluated images; the calibration images'
    detector boxes prompt whatever their class (calibration scores nothing)."""
    data = dota_dataset(tmp_path, {"P1": "1 1 9 1 9 9 1 9 plane 0\n"})
    dota_dataset(tmp_path, {"C1": "20 20 40 20 40 40 20 40 ship 0\n", "C2": ""}, split="train")
    evaluated = write(tmp_path / "val_dets/Task1_plane.txt", "P1 0.9 1 1 9 1 9 9 1 9\n")
    calib = write(tmp_path / "train_dets/Task1_ship.txt", "C1 0.8 20 20 40 20 40 40 20 40\n"
                                                          "C2 0.7 2 2 12 2 12 12 2 12\n")
    source = DetectionsFile(str(evaluated.parent), calib_file=str(calib.parent))
    task = OrientedTask(data, CALIB, prompts=source)
    assert task.classes == ["plane"]
    samples = task.calibration_samples(2)
    assert [s.image_id for s in samples] == ["C1", "C2"]
    assert [s.boxes.tolist() for s in samples] == [[[20, 20, 40, 40]], [[2, 2, 12, 12]]]


def test_calibration_on_a_detectors_boxes_needs_no_label_files(tmp_path):
    data = dota_dataset(tmp_path, {"P1": "1 1 9 1 9 9 1 9 plane 0\n"})
    dota_dataset(tmp_path, {"C1": None}, split="train")  # no train/labelTxt at all
    evaluated = write(tmp_path / "val_dets/Task1_plane.txt", "P1 0.9 1 1 9 1 9 9 1 9\n")
    calib = write(tmp_path / "train_dets/Task1_plane.txt", "C1 0.8 20 20 40 20 40 40 20 40\n")
    task = OrientedTask(data, CALIB, prompts=DetectionsFile(str(evaluated.parent), calib_file=str(calib.parent)))
    task.check_calibration_split()
    assert task.calibration_samples(1)[0].boxes.tolist() == [[20, 20, 40, 40]]
    # ground-truth calibration still needs them, found before the FP evaluation
    for prompts in (None, DetectionsFile(str(evaluated.parent))):  # the latter: no calib_file, so ground truth
        with pytest.raises(SaqError, match=r"calibration DOTA label folder not found: .*train/labelTxt"):
            OrientedTask(data, CALIB, prompts=prompts).check_calibration_split()
    (tmp_path / "train/labelTxt").mkdir()
    with pytest.raises(SaqError, match=r"image .*C1\.png has no label file .*C1\.txt"):
        OrientedTask(data, CALIB).calibration_samples(1)


def test_detections_all_of_classes_left_out_are_named_as_such(tmp_path):
    # the threshold let the ship through; blaming it ("reaches prompts.score_threshold=0.0") would mislead
    data = dota_dataset(tmp_path, {"P1": "1 1 9 1 9 9 1 9 plane 0\n", "P2": ""})
    write(tmp_path / "dets/Task1_ship.txt", "P1 0.9 1 1 9 1 9 9 1 9\nP2 0.5 1 1 9 1 9 9 1 9\n")
    write(tmp_path / "dets/Task1_car.txt", "P2 0.6 1 1 9 1 9 9 1 9\n")
    task = OrientedTask(data, CALIB, prompts=DetectionsFile(str(tmp_path / "dets")))
    with pytest.raises(SaqError, match=r"dets: the 3 detections on the 2 evaluated images that reach "
                                       r"prompts\.score_threshold=0\.0 are all of classes with no labelled object in "
                                       r"the evaluated images, so left out: \['car', 'ship'\] \(task\.classes=null"):
        task.evaluate(None, progress=False)
    # below the threshold, the threshold is what is named
    task = OrientedTask(data, CALIB, prompts=DetectionsFile(str(tmp_path / "dets"), score_threshold=0.95))
    with pytest.raises(SaqError, match=r"no detection on the 2 evaluated images reaches prompts\.score_threshold=0\.95 "
                                       r"\(the highest score is 0\.9\)"):
        task.evaluate(None, progress=False)


class MaskSegmenter:
    """Stands in for SAM: the mask of a box prompt is the filled rotated polygon it was drawn from; prompts come
    back `chunk` at a time, as Segmenter's decode batches."""

    def __init__(self, polygons_by_box: dict, iou: float = 0.8, chunk: int = 1000, iou_by_box: dict | None = None):
        self.polygons_by_box, self.iou, self.chunk, self.iou_by_box = polygons_by_box, iou, chunk, iou_by_box or {}

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_chunks(self, boxes, multimask_output=False):
        masks = []
        for box in boxes:
            m = np.zeros(self.shape, np.uint8)
            poly = self.polygons_by_box.get(tuple(np.round(box, 1)))
            if poly is not None:
                cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
            masks.append(m.astype(bool))
        masks = torch.as_tensor(np.stack(masks))[:, None]
        ious = torch.tensor([[self.iou_by_box.get(tuple(np.round(box, 1)), self.iou)] for box in boxes])
        for start in range(0, len(masks), self.chunk):
            part = masks[start:start + self.chunk]
            yield Prediction(part, ious[start:start + self.chunk], torch.zeros(len(part), 1, 4, 4))


def test_prompts_decoded_in_several_chunks_keep_their_class_and_object(tmp_path):
    # five objects of two classes, decoded two at a time: each mask must meet its own class and polygon
    # (classes not in a period of the chunk size: an index within the chunk would read another object's class)
    shapes = [(square(12, 12, 10), "plane"), (square(40, 14, 12, 30), "ship"), (square(14, 44, 14, 10), "ship"),
              (square(46, 46, 10), "plane"), (rect(26, 28, 34, 36), "plane")]
    text = "".join(" ".join(f"{v:.1f}" for v in poly.reshape(-1)) + f" {name} 0\n" for poly, name in shapes)
    task = OrientedTask(dota_dataset(tmp_path, {"P1": text}), CALIB)
    boxes, polygons, _ = task.ground_truth("P1")
    # the third object's mask is drawn from the first one's polygon: the wrong place, so one miss in class ship
    drawn = [polygons[0] if k == 2 else polygons[k] for k in range(5)]
    segmenter = MaskSegmenter({tuple(np.round(b, 1)): p for b, p in zip(boxes.boxes, drawn)}, chunk=2)
    metrics = task.evaluate(segmenter, progress=False)
    assert metrics["AP50_per_class"] == {"plane": pytest.approx(1.0), "ship": pytest.approx(6 / 11)}
    fitted = [float(polygon_iou(oriented_box(m)[None].astype(np.float64), polygons[k:k + 1])[0, 0])
              for k, m in enumerate(np.stack([cv2.fillPoly(np.zeros((64, 64), np.uint8),
                                                           [np.round(p).astype(np.int32)], 1) for p in drawn]))]
    assert metrics["rbox_mIoU"] == pytest.approx(np.mean(fitted)) and fitted[2] == 0.0 and min(
        fitted[:2] + fitted[3:]) > 0.5


def test_a_detection_whose_best_object_is_taken_is_a_false_positive(method="voc07"):
    """The DOTA devkit matches each detection to its single best-overlapping object; when that one is taken it is a
    false positive, even if another object overlaps it enough (COCO-style matching would take that one)."""
    gt = {"a": (np.stack([rect(0, 0, 10, 10), rect(2, 0, 12, 10)]), np.array([0, 0]), np.array([False, False]))}
    dets = [RotatedDetection("a", 0, 0.9, rect(0, 0, 10, 10)), RotatedDetection("a", 0, 0.8, rect(0.5, 0, 10.5, 10))]
    assert rotated_map(dets, gt, ["plane"], method)["mAP50"] == pytest.approx(6 / 11)  # recall 0.5 at precision 1


def test_evaluate_with_perfect_masks_and_an_image_without_objects(tmp_path):
    diamond = square(32, 32, 30, 45)
    lines = " ".join(f"{v:.1f}" for v in diamond.reshape(-1))
    data = dota_dataset(tmp_path, {"P1": f"gsd:1\n{lines} plane 0\n8 8 20 8 20 14 8 14 ship 1\n", "P2": ""})
    task = OrientedTask(data, CALIB)
    boxes, _, _ = task.ground_truth("P1")
    segmenter = MaskSegmenter({tuple(np.round(boxes.boxes[0], 1)): diamond})  # the ship's mask comes out empty
    metrics = task.evaluate(segmenter, progress=False)
    assert metrics["mAP50"] == pytest.approx(1.0) and metrics["AP50_per_class"]["ship"] is None
    assert metrics["images"] == 2 and metrics["prompts"] == 2 and metrics["empty_masks"] == 1
    assert 0.45 < metrics["rbox_mIoU"] < 0.5  # the diamond's box fits (about 0.95) and the empty mask scores 0
    # a detector's box pairs with no object: no rbox_mIoU (a 0.0 there would read as a broken model)
    x0, y0, x1, y1 = boxes.boxes[0]
    dets = write(tmp_path / "dets" / "Task1_plane.txt", f"P1 0.9 {x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1}\n")
    detected = OrientedTask(data, CALIB, prompts=DetectionsFile(str(dets.parent)), classes=["plane", "ship"])
    det_metrics = detected.evaluate(segmenter, progress=False)
    assert det_metrics["AP50_per_class"]["plane"] == pytest.approx(1.0) and "rbox_mIoU" not in det_metrics


def test_an_empty_mask_is_a_false_positive_at_its_score_as_mmrotate_sam_counts_it(tmp_path):
    """SAM returning nothing for a detector's box leaves a zero box with the detector's score (MMRotate-SAM's
    minAreaRect of no points), not a detection that vanishes and so stops costing precision."""
    data = dota_dataset(tmp_path, {"P1": "gsd:1\n4 4 20 4 20 20 4 20 plane 0\n30 30 50 30 50 50 30 50 plane 0\n"})
    dets = write(tmp_path / "dets" / "Task1_plane.txt",
                 "P1 0.8 4 4 20 4 20 20 4 20\nP1 0.9 30 30 50 30 50 50 30 50\n")
    task = OrientedTask(data, CALIB, prompts=DetectionsFile(str(dets.parent)), classes=["plane"])
    segmenter = MaskSegmenter({(4.0, 4.0, 20.0, 20.0): rect(4, 4, 20, 20)})  # the second plane's mask is empty
    metrics = task.evaluate(segmenter, progress=False)
    # the empty one ranks first (0.9) as a false positive, then the first plane: recall 0.5 at precision 0.5
    assert metrics["empty_masks"] == 1 and metrics["mAP50"] == pytest.approx(6 * 0.5 / 11)


def test_detections_rank_by_the_detector_score_as_mmrotate_sam_unless_told_otherwise(tmp_path):
    plane = rect(8, 8, 28, 20)
    data = dota_dataset(tmp_path, {"P1": " ".join(f"{v:.1f}" for v in plane.reshape(-1)) + " plane 0\n"})
    # the detector is surer of a box on nothing (a false positive) than of the plane's; SAM's IoU says the opposite
    dets = write(tmp_path / "dets" / "Task1_plane.txt", "P1 0.9 40 40 56 40 56 56 40 56\n"
                                                        "P1 0.6 8 8 28 8 28 20 8 20\n")
    segmenter = MaskSegmenter({(8.0, 8.0, 28.0, 20.0): plane, (40.0, 40.0, 56.0, 56.0): rect(40, 40, 56, 56)},
                              iou_by_box={(40.0, 40.0, 56.0, 56.0): 0.3, (8.0, 8.0, 28.0, 20.0): 0.9})
    auto = OrientedTask(data, CALIB, prompts=DetectionsFile(str(dets.parent)))
    assert auto.score == "detector"
    assert auto.evaluate(segmenter, progress=False)["mAP50"] == pytest.approx(0.5)  # recall 1 at precision 1/2
    product = OrientedTask(data, CALIB, prompts=DetectionsFile(str(dets.parent)), score="detector_x_iou")
    assert product.evaluate(segmenter, progress=False)["mAP50"] == pytest.approx(1.0)  # 0.54 before 0.27
    assert product.fingerprint() != auto.fingerprint()  # FP metrics of one are not the other's
    # ground-truth boxes all score 1: SAM's IoU ranks them, and ranking by the detector alone is refused
    assert OrientedTask(data, CALIB).score == "detector_x_iou"
    with pytest.raises(SaqError, match=r"^task\.score=detector ranks boxes by their detector score, but "):
        OrientedTask(data, CALIB, score="detector")
    with pytest.raises(SaqError, match=r"^task\.score must be one of auto, detector, detector_x_iou, got 'iou'"):
        OrientedTask(data, CALIB, prompts=DetectionsFile(str(dets.parent)), score="iou")


def test_dota_result_files_as_prompts(tmp_path, synthetic_root):
    folder = tmp_path / "results"
    write(folder / "Task1_disk.txt", "000001 0.9 10 10 30 12 28 40 8 38\n000001 0.01 0 0 5 0 5 5 0 5\n")
    write(folder / "Task1_star.txt", "000001 0.8 50 50 60 50 60 60 50 60\n000000 0.7 1 2 3 2 3 4 1 4\n")
    source = DetectionsFile(str(folder), score_threshold=0.05)
    task = OrientedTask({"root": str(synthetic_root), **DATA}, CALIB, prompts=source, classes=CATEGORIES)
    got = source.for_image("000001", None, (256, 256))
    assert got.boxes.tolist() == [[8, 10, 30, 40], [50, 50, 60, 60]]
    assert [task.classes[i] for i in got.labels] == ["disk", "star"]
    assert got.scores.tolist() == pytest.approx([0.9, 0.8])
    # the FP cache key covers every result file of the folder: rewriting one changes it
    before = task.fingerprint()
    write(folder / "Task1_star.txt", "000001 0.8 50 50 61 50 61 60 50 60\n000000 0.7 1 2 3 2 3 4 1 4\n")
    assert task.fingerprint() != before


def test_dota_result_json_form_and_errors(tmp_path, synthetic_root):
    data = {"root": str(synthetic_root), **DATA}
    js = write(tmp_path / "dets.json", json.dumps([
        {"image_id": "000002", "category_id": "ring", "poly": [1, 2, 9, 2, 9, 7, 1, 7], "score": 0.5},
        {"image_id": "000002", "category_id": "disk", "bbox": [3, 4, 10, 20], "score": 0.6}]))
    source = DetectionsFile(str(js))
    task = OrientedTask(data, CALIB, prompts=source, classes=CATEGORIES)
    got = source.for_image("000002", None, (256, 256))
    assert got.boxes.tolist() == [[3, 4, 13, 24], [1, 2, 9, 7]]
    assert [task.classes[i] for i in got.labels] == ["disk", "ring"]

    bad_line = write(tmp_path / "bad/Task1_disk.txt", "000001 0.9 10 10 30 12\n")
    with pytest.raises(SaqError, match=r"Task1_disk\.txt, line 1: expected 'image_stem score x1 y1"):
        DetectionsFile(str(bad_line.parent))
    unknown = write(tmp_path / "unknown/Task1_zeppelin.txt", "000001 0.9 10 10 30 12 28 40 8 38\n")
    with pytest.raises(SaqError, match="unknown class 'zeppelin'"):
        OrientedTask(data, CALIB, prompts=DetectionsFile(str(unknown.parent)), classes=CATEGORIES)
    elsewhere = write(tmp_path / "other/Task1_disk.txt", "P0001__1024__0___0 0.9 10 10 30 12 28 40 8 38\n")
    with pytest.raises(SaqError, match=r"\(prompts\.file\) names none of the evaluated images"):
        OrientedTask(data, CALIB, prompts=DetectionsFile(str(elsewhere.parent)))
    coco_ids = write(tmp_path / "coco.json", json.dumps([{"image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4],
                                                          "score": 0.9}]))
    with pytest.raises(SaqError, match=r"\(prompts\.file\) names none of the evaluated images"):
        OrientedTask(data, CALIB, prompts=DetectionsFile(str(coco_ids)))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SaqError, match="no DOTA result files"):
        DetectionsFile(str(tmp_path / "empty_dir"))


def test_classes_inferred_from_labels_leave_out_a_detectors_other_classes(tmp_path, synthetic_root, capsys):
    # With task.classes unset the classes are those labelled in the evaluated images; a detector's result file for
    # a class absent there has nothing to be scored against, so it is left out (and said so), not refused.
    folder = tmp_path / "results"
    write(folder / "Task1_disk.txt", "000001 0.9 10 10 30 12 28 40 8 38\n")
    write(folder / "Task1_zeppelin.txt", "000001 0.8 50 50 60 50 60 60 50 60\n")
    source = DetectionsFile(str(folder))
    task = OrientedTask({"root": str(synthetic_root), **DATA}, CALIB, prompts=source)
    assert "zeppelin" not in task.classes
    got = source.for_image("000001", None, (256, 256))
    assert [task.classes[i] for i in got.labels] == ["disk"]
    out = capsys.readouterr().out
    assert "left out 1 detections" in out and "looks like" not in out  # zeppelin is no misspelt label class
    # a class spelled otherwise than the labels is named beside the label class it leaves without detections
    (folder / "Task1_zeppelin.txt").unlink()
    write(folder / "Task1_Triangle.txt", "000001 0.8 50 50 60 50 60 60 50 60\n")
    OrientedTask({"root": str(synthetic_root), **DATA}, CALIB, prompts=DetectionsFile(str(folder)))
    assert "'Triangle' looks like the label class 'triangle', which gets no detection (class names must be " \
           "spelled as the label files write them" in capsys.readouterr().out


def test_the_per_image_cap_counts_only_the_classes_the_task_keeps(tmp_path, synthetic_root, capsys):
    # Three zeppelin boxes outscore the disk boxes; with a cap of 2 taken before the zeppelins are left out, image
    # 000001 would keep no prompt at all.
    folder = tmp_path / "results"
    write(folder / "Task1_zeppelin.txt", "".join(f"000001 0.9 {50 + k} 50 60 50 60 60 50 60\n" for k in range(3)))
    write(folder / "Task1_disk.txt", "".join(f"000001 {0.5 - k / 10} {10 + k} 10 30 12 28 40 8 38\n"
                                             for k in range(3)))
    source = DetectionsFile(str(folder), max_per_image=2)
    task = OrientedTask({"root": str(synthetic_root), **DATA}, CALIB, prompts=source)
    got = source.for_image("000001", None, (256, 256))
    assert [task.classes[i] for i in got.labels] == ["disk", "disk"]
    assert got.scores.tolist() == pytest.approx([0.5, 0.4])  # the best two
    assert "1 of the dataset's images (evaluated or not) have more than prompts.max_per_image=2 detections" \
        in capsys.readouterr().out


def test_calibration_samples_are_enclosing_boxes(synthetic_root):
    task = OrientedTask({"root": str(synthetic_root), **DATA}, CALIB, max_images=2)
    samples = task.calibration_samples(3)
    assert len(samples) == 3 and all(s.boxes.shape[1] == 4 and s.num_prompts > 0 for s in samples)
    assert [s.image_id for s in samples] == ["000000", "000001", "000002"]
    objs = read_dota_labels(synthetic_root / "train/labelTxt/000000.txt")
    assert np.allclose(samples[0].boxes[:, :2], objs.polygons.min(1))
    with pytest.raises(SaqError, match=r"has only 8 images with prompts \(gt\), 50 requested"):
        task.calibration_samples(50)


def test_shipped_sam_tiny_end_to_end(synthetic_root):
    data = {"root": str(synthetic_root), **DATA}
    segmenter = Segmenter(build_sam("sam_tiny"), decode_batch_size=3)
    task = OrientedTask(data, CALIB, max_images=4, classes=[*CATEGORIES, "zeppelin"])  # one class with no object
    metrics = task.evaluate(segmenter, progress=False)
    assert metrics["images"] == 4 and metrics["prompts"] >= 8
    assert metrics["mAP50"] > 0.5 and metrics["rbox_mIoU"] > 0.6
    # counted from the label files here: each class's count under its own name, and no AP where nothing is scored
    counts = dict.fromkeys(task.classes, 0)
    for stem, _ in task.images:
        objs = read_dota_labels(synthetic_root / DATA["ann_dir"] / f"{stem}.txt")
        for name, hard in zip(objs.names, objs.difficult):
            counts[name] += not hard
    assert metrics["objects_per_class"] == counts and counts["zeppelin"] == 0
    per_class = metrics["AP50_per_class"]
    assert [name for name, ap in per_class.items() if ap is None] == [c for c, n in counts.items() if n == 0]
    assert metrics["mAP50"] == pytest.approx(np.mean([ap for ap in per_class.values() if ap is not None]))
    jittered = OrientedTask(data, CALIB, prompts=JitteredBoxes(0.1, 20, seed=0), max_images=4)
    assert jittered.fingerprint() != OrientedTask(data, CALIB, max_images=4).fingerprint()
    jittered_metrics = jittered.evaluate(segmenter, progress=False)
    # the masks still find most objects from noisy boxes; the boxes differ, so do the rotated boxes
    assert jittered_metrics["mAP50"] > 0.5 and jittered_metrics["rbox_mIoU"] > 0.5
    assert jittered_metrics["rbox_mIoU"] != metrics["rbox_mIoU"]


def test_non_utf8_label_and_result_files_are_named(tmp_path):
    label = tmp_path / "P1.txt"
    label.write_bytes(b"1 1 9 1 9 9 1 9 sh\xe9p 0\n" * 50)
    with pytest.raises(SaqError, match=r"^DOTA label file .*P1\.txt is not UTF-8 text \(byte 18 is 0xe9\)$"):
        read_dota_labels(label)
    result = tmp_path / "res" / "Task1_ship.txt"
    result.parent.mkdir()
    result.write_bytes(b"P1 0.9 1 1 9 1 9 9 1 9\n\xff\n")
    with pytest.raises(SaqError, match=r"^DOTA result file .*Task1_ship\.txt is not UTF-8 text"):
        DetectionsFile(str(result.parent))


@pytest.mark.parametrize("line,match", [
    ("1 2 30 2 30 40 1 40 0", r"line 2: no class name after the 8 coordinates, got '1 2 30 2 30 40 1 40 0'"),
    ("1 2 30 2 30 2 1 2 plane 0", r"line 2: the polygon \[1\.0, 2\.0, 30\.0, 2\.0, .*\] has zero area"),
    ("5 5 5 5 5 5 5 5 plane", r"line 2: the polygon .* has zero area"),
])
def test_dota_line_without_class_or_area_is_an_error(tmp_path, line, match):
    f = write(tmp_path / "bad.txt", f"1 1 5 1 5 5 1 5 ship 0\n{line}\n")
    with pytest.raises(SaqError, match=r"DOTA label file .*bad\.txt, " + match):
        read_dota_labels(f)


@pytest.mark.parametrize("line,match", [
    ("P1 1.5 1 1 9 1 9 9 1 9", "the score must be in"),
    ("P1 -0.1 1 1 9 1 9 9 1 9", "the score must be in"),
])
def test_bad_dota_result_lines_are_errors(tmp_path, line, match):
    f = write(tmp_path / "Task1_ship.txt", f"P1 0.5 1 1 9 1 9 9 1 9\n{line}\n")
    with pytest.raises(SaqError, match=r"Task1_ship\.txt, line 2: " + match):
        DetectionsFile(str(f))


def test_flat_detections_are_left_out_and_boxes_outside_the_image_refused(tmp_path, capsys):
    # a box clipped to a line at the image edge has nothing to prompt: left out, counted, the rest of the file kept
    f = write(tmp_path / "Task1_ship.txt", "P1 0.5 1 1 9 1 9 9 1 9\nP1 0.9 1 1 1 1 1 9 1 9\n")
    source = DetectionsFile(str(f))
    assert "left out 1 detections without width or height" in capsys.readouterr().out
    source.bind(["P1"], ["ship"], drop_unknown=False)
    assert source.for_image("P1", None, (64, 64)).boxes.tolist() == [[1, 1, 9, 9]]
    js = write(tmp_path / "dets.json", json.dumps([
        {"image_id": "P1", "category_id": "ship", "bbox": [10, 10, 0, 5], "score": 0.9},
        {"image_id": "P1", "category_id": "ship", "bbox": [100, 10, 20, 5], "score": 0.8}]))
    source = DetectionsFile(str(js))
    assert "left out 1 detections without width or height" in capsys.readouterr().out
    source.bind(["P1"], ["ship"], drop_unknown=False)
    with pytest.raises(SaqError, match=r"image 'P1' has box \[100\.0, 10\.0, 120\.0, 15\.0\] \(x1, y1, x2, y2\), "
                                       r"wholly outside the 64x64 image"):  # detections at another resolution
        source.for_image("P1", None, (64, 64))
    assert len(source.for_image("P1", None, (128, 128))) == 1


def test_result_folder_of_empty_files_is_an_error(tmp_path):
    data = dota_dataset(tmp_path, {"P1": "1 1 9 1 9 9 1 9 ship 0\n"})
    write(tmp_path / "res" / "Task1_ship.txt", "")
    write(tmp_path / "res" / "Task1_plane.txt", "\n")
    task = OrientedTask(data, CALIB, prompts=DetectionsFile(str(tmp_path / "res")))
    with pytest.raises(SaqError, match=r"res: no detection on the 1 evaluated images reaches prompts.score_threshold"):
        task.evaluate(None, progress=False)


def test_files_that_are_no_images_are_named_and_a_bom_is_not_part_of_a_name(tmp_path, capsys):
    data = dota_dataset(tmp_path, {"P1": "\ufeff1 1 9 1 9 9 1 9 ship 0\n"})
    (tmp_path / "val/images/P2.gif").write_bytes(b"GIF89a")  # a format the loader does not read
    (tmp_path / "val/images/._P1.png").write_bytes(b"\x00\x05\x16\x07")  # a Mac copy's metadata: no image
    task = OrientedTask(data, CALIB)
    assert "val/images: left out 1 files that are not .png/.jpg" in capsys.readouterr().out
    assert [stem for stem, _ in task.images] == ["P1"] and task.classes == ["ship"]
    # a result file saved with a byte-order mark keys its first line by the real stem
    (tmp_path / "dets").mkdir()
    (tmp_path / "dets/Task1_ship.txt").write_bytes("\ufeffP1 0.9 1 1 9 1 9 9 1 9\n".encode())
    assert list(DetectionsFile(str(tmp_path / "dets"))._by_image) == ["P1"]


def test_mmrotate_results_pickle_as_prompts(tmp_path, synthetic_root, mm_results):
    """mmrotate 1.x writes rotated boxes (cx, cy, w, h, angle in radians) as its RotatedBoxes objects and labels as
    class indices; a DOTA task needs the detector's class order to name them."""
    data = {"root": str(synthetic_root), **DATA}
    rotated = {"img_id": "000001", "pred_instances": {
        "bboxes": torch.tensor([[40.0, 50.0, 20.0, 10.0, np.pi / 2], [100.0, 100.0, 10.0, 10.0, np.pi / 4]]),
        "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([3, 0])}}
    quads = {"img_path": "/dota/val/images/000002.png", "pred_instances": {  # no img_id: keyed by the file stem
        "bboxes": torch.tensor([[1.0, 2.0, 9.0, 2.0, 9.0, 7.0, 1.0, 7.0]]), "scores": torch.tensor([0.7]),
        "labels": torch.tensor([6])}}
    nothing = {"img_id": "000003", "pred_instances": {  # numpy arrays, no detection on this image
        "bboxes": np.zeros((0, 5), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64)}}
    path = mm_results(tmp_path / "rotated.pkl", [rotated, quads, nothing],
                      box_class="mmrotate.structures.bbox.rotated_boxes.RotatedBoxes")
    assert "mmrotate" not in __import__("sys").modules
    detector_order = list(reversed(CATEGORIES))  # the detector's class order is not the task's
    source = DetectionsFile(str(path), class_names=detector_order)
    task = OrientedTask(data, CALIB, prompts=source, classes=CATEGORIES)
    got = source.for_image("000001", None, (256, 256))
    half = 5 * np.sqrt(2)  # a 10 x 10 square turned 45 degrees
    assert np.allclose(got.boxes, [[35, 40, 45, 60], [100 - half, 100 - half, 100 + half, 100 + half]], atol=1e-4)
    assert [task.classes[i] for i in got.labels] == [detector_order[3], detector_order[0]]
    second = source.for_image("000002", None, (256, 256))
    assert second.boxes.tolist() == [[1, 2, 9, 7]] and [task.classes[i] for i in second.labels] == [detector_order[6]]
    assert len(source.for_image("000003", None, (256, 256))) == 0
    # without the detector's class order the indices cannot be named: refused when the task is built
    with pytest.raises(SaqError, match="labels its boxes by class index; set prompts.class_names"):
        OrientedTask(data, CALIB, prompts=DetectionsFile(str(path)), classes=CATEGORIES)
    # the calibration images' results (prompts.calib_file) are read with the same class order
    calibration, _ = DetectionsFile(str(path), class_names=detector_order, calib_file=str(path)).calibration_source()
    calibration.bind(["000001"], CATEGORIES, drop_unknown=True)
    assert [CATEGORIES[i] for i in calibration.for_image("000001", None, (256, 256)).labels] == \
        [detector_order[3], detector_order[0]]
    with pytest.raises(SaqError, match=r"entry 0 \(image .000001.\) has label 3; prompts.class_names lists 3 "
                                       r"classes \(\[.disk., .rectangle., .triangle.\]\)"):
        DetectionsFile(str(path), class_names=["disk", "rectangle", "triangle"])


def test_a_detection_off_its_image_is_refused_when_the_task_is_built(tmp_path, synthetic_root):
    """Image sizes come from the image files' headers, so a wrong detections file stops the run before any
    calibration or evaluation; an image whose header cannot be read is checked when it is read, as before."""
    import shutil

    from tasks.base import HeaderSizes

    data = {"root": str(synthetic_root), **DATA}
    images = {p.stem: p for p in (synthetic_root / DATA["img_dir"]).iterdir()}
    stems = sorted(images)
    last = stems[-1]  # reached only after every other image is evaluated
    off = write(tmp_path / "off" / "Task1_disk.txt", f"{stems[0]} 0.9 10 10 30 12 28 40 8 38\n"
                                                     f"{last} 0.9 300 10 320 10 320 30 300 30\n")
    with pytest.raises(SaqError, match=rf"image '{last}' has box \[300.0, 10.0, 320.0, 30.0\] .* wholly outside "
                                       r"the 256x256 image"):
        OrientedTask(data, CALIB, prompts=DetectionsFile(str(off.parent)), classes=CATEGORIES)
    sizes = HeaderSizes({"a": images[last], "b": tmp_path / "off.png"})
    (tmp_path / "off.png").write_bytes(b"not an image")
    assert sizes.get("a") == (256, 256) and sizes.get("b") is None and sizes.get("c") is None
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    (copy / DATA["img_dir"] / images[last].name).write_bytes(b"corrupt")
    # a corrupt image is no reason to refuse the detections: its own read names it
    OrientedTask({"root": str(copy), **DATA}, CALIB, prompts=DetectionsFile(str(off.parent)), classes=CATEGORIES)
