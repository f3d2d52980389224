"""Semantic task: confusion-matrix mIoU, ignore index, label-map errors, the coarse prior, mask voting, AMG, end to end."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.amg import batched_mask_to_box
from torchvision.ops import box_iou

from saq.errors import SaqError
from saq.sam.build import build_sam
from saq.sam.segmenter import AutoMasks, Prediction, Segmenter, Timings, passes_iou
from tasks.base import read_rgb
from tasks.prompts import DetectionsFile, GroundTruthBoxes, JitteredBoxes
from tasks.semantic import (
    AMG_DEFAULTS,
    AMG_THRESHOLDS,
    SemanticTask,
    automatic_masks,
    class_iou,
    confusion_matrix,
    degraded_labels,
    generate_masks,
    mask_set_differences,
    mean_iou,
    point_grid,
    read_label_map,
    reference_masks,
    unpacked,
    vote_labels,
)
from tasks.synthetic import CATEGORIES

CLASSES = ["background", *CATEGORIES]
DATA = {"img_dir": "val/images", "label_dir": "val/labels"}
CALIB = {"img_dir": "train/images"}


def test_miou_from_a_hand_made_confusion_matrix():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = confusion_matrix(pred, gt, 4, 255)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    iou = class_iou(cm)
    assert iou[:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and np.isnan(iou[3])  # class 3: neither present nor predicted
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # A class predicted but absent from the ground truth scores 0 and counts.
    assert mean_iou(confusion_matrix(np.array([3, 1]), np.array([0, 1]), 4, 255)) == pytest.approx((0 + 1 + 0) / 3)


def test_ignore_index_is_left_out():
    gt = np.array([[0, 255, 255], [1, 1, 255]])
    a = np.array([[0, 0, 0], [1, 1, 0]])
    b = np.array([[0, 1, 1], [1, 1, 1]])  # differs only where the ground truth is ignored
    assert (confusion_matrix(a, gt, 2, 255) == confusion_matrix(b, gt, 2, 255)).all()
    assert confusion_matrix(a, gt, 2, 255).sum() == 3 and mean_iou(confusion_matrix(a, gt, 2, 255)) == 1.0


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def label_dataset(root, maps: dict, coarse: dict | None = None):
    """Images (grey) with label maps (None = no label map), and optional predicted maps under root/coarse."""
    (root / "val/labels").mkdir(parents=True, exist_ok=True)
    for stem, labels in maps.items():
        shape = (16, 16) if labels is None else np.shape(labels)
        save_png(root / "val/images" / f"{stem}.png", np.full((*shape, 3), 100))
        if labels is not None:
            save_png(root / "val/labels" / f"{stem}.png", labels)
    for stem, labels in (coarse or {}).items():
        save_png(root / "coarse" / f"{stem}.png", labels)
    return {"root": str(root), **DATA}


class RegionSegmenter:
    """Stands in for SAM: a point's three masks are the connected same-label region of the true label map under it."""

    mask_threshold = 0.0

    def __init__(self, label_maps: list[np.ndarray], decode_batch_size: int = 7):
        self.label_maps, self.decode_batch_size = label_maps, decode_batch_size
        self.timings, self.images = Timings(), 0

    def set_image(self, image):
        labels = self.label_maps[self.images]
        self.regions, offset = np.zeros(labels.shape, np.int64), 0
        for c in np.unique(labels):
            n, parts = cv2.connectedComponents((labels == c).astype(np.uint8), connectivity=4)
            self.regions[labels == c] = offset + parts[labels == c]
            offset += n
        self.images += 1
        self.timings.encoder_s += 1.0

    def predict_chunks(self, points, point_labels, multimask_output=True, return_logits=True):
        for start in range(0, len(points), self.decode_batch_size):
            chunk = points[start:start + self.decode_batch_size, 0]
            masks = np.stack([np.stack([self.regions == self.regions[int(y), int(x)]] * 3) for x, y in chunk])
            logits = torch.as_tensor(np.where(masks, 10.0, -10.0), dtype=torch.float32)
            self.timings.decoder_s += 0.5
            yield Prediction(logits, torch.full(logits.shape[:2], 0.95), logits[..., :4, :4])

    def predict_above_iou(self, points, point_labels, pred_iou_thresh, batch_size=None):
        """Segmenter.predict_above_iou's contract on top of predict_chunks (the fake keeps its own chunk size)."""
        for start, chunk in zip(range(0, len(points), self.decode_batch_size), self.predict_chunks(points, point_labels)):
            keep = passes_iou(chunk.iou_scores, pred_iou_thresh)
            prompt_index, output_index = keep.nonzero(as_tuple=True)
            yield AutoMasks(chunk.masks[keep], chunk.iou_scores[keep], prompt_index + start, output_index)


def test_out_of_range_label_names_the_file_and_value(tmp_path):
    # found when the task is built, not when evaluation reaches the image after hours of mask generation
    data = label_dataset(tmp_path, {"a": np.zeros((8, 8)), "b": np.full((8, 8), 12)})
    with pytest.raises(SaqError, match=r"label map .*b\.png holds value 12, outside the 9 classes \(0\.\.8\)"):
        SemanticTask(data, CALIB, classes=CLASSES, coarse={"mislabel_fraction": 0}, amg={"points_per_side": 4})
    # only the evaluated images' maps are read: b is past task.max_images
    task = SemanticTask(data, CALIB, classes=CLASSES, max_images=1, amg={"points_per_side": 4})
    assert [stem for stem, _, _ in task.items] == ["a"]
    # ADE20K's 150 classes in 1..150 without reduce_zero_label: the message points at the option.
    data = label_dataset(tmp_path / "ade", {"x": np.full((8, 8), 150)})
    with pytest.raises(SaqError, match=r"x\.png holds value 150.*reduce_zero_label"):
        SemanticTask(data, CALIB, classes=150)
    assert SemanticTask(data, CALIB, classes=150, reduce_zero_label=True).num_classes == 150


def test_reduce_zero_label_and_ignore_index(tmp_path):
    raw = np.array([[0, 1, 150], [255, 2, 3]])
    data = label_dataset(tmp_path, {"x": raw})
    task = SemanticTask(data, CALIB, classes=150, reduce_zero_label=True)
    assert task.ground_truth(tmp_path / "val/labels/x.png", (2, 3)).tolist() == [[255, 0, 149], [255, 1, 2]]
    with pytest.raises(SaqError, match=re.escape("ignore_index 3 is one of the 9 classes' label values (0..8)")):
        SemanticTask(data, CALIB, classes=CLASSES, ignore_index=3)
    # raw 150 is class 149 under reduce_zero_label, and 0 its reduced class 0: neither may be ignored
    for ignored in (150, 0):
        with pytest.raises(SaqError, match=re.escape(f"ignore_index {ignored} is one of the 150 classes' label "
                                                     "values (0..150 with reduce_zero_label)")):
            SemanticTask(data, CALIB, classes=150, reduce_zero_label=True, ignore_index=ignored)
    data = label_dataset(tmp_path / "b", {"x": np.array([[0, 1, 150], [150, 2, 149]])})
    SemanticTask(data, CALIB, classes=150, reduce_zero_label=False, ignore_index=150)  # 0..149 only: 150 is free


def test_missing_label_map_and_bad_label_files_are_clear_errors(tmp_path):
    data = label_dataset(tmp_path / "a", {"a": np.zeros((8, 8)), "b": None})
    with pytest.raises(SaqError, match=r"image .*b\.png has no label map .*labels/b\.png"):
        SemanticTask(data, CALIB, classes=CLASSES)
    data = label_dataset(tmp_path / "b", {"a": np.zeros((8, 8))})
    task = SemanticTask(data, CALIB, classes=CLASSES, amg={"points_per_side": 4})
    save_png(tmp_path / "b/val/labels/a.png", np.zeros((8, 8, 3)))  # an RGB "label map"
    with pytest.raises(SaqError, match=r"label map .*b/val/labels/a\.png has RGB pixels; a label map must be "
                                       "single-channel"):  # found when the task is built
        SemanticTask(data, CALIB, classes=CLASSES, amg={"points_per_side": 4})
    with pytest.raises(SaqError, match=r"a\.png has RGB pixels"):  # and by a task built before the file changed
        task.evaluate(RegionSegmenter([np.zeros((8, 8), np.int64)]), progress=False)
    save_png(tmp_path / "b/val/labels/a.png", np.zeros((4, 8)))
    with pytest.raises(SaqError, match=r"a\.png is 8x4, its image is 8x8"):
        task.evaluate(RegionSegmenter([np.zeros((8, 8), np.int64)]), progress=False)
    with pytest.raises(SaqError, match=r"a\.png is 8x4, its image is 8x8"):  # found when the task is built
        SemanticTask(data, CALIB, classes=CLASSES, amg={"points_per_side": 4})
    save_png(tmp_path / "b/val/labels/a.png", np.zeros((8, 8)))
    with pytest.raises(SaqError, match="task.classes must be a list"):
        SemanticTask(data, CALIB)
    with pytest.raises(SaqError, match=r"^task\.classes=0 invalid; expected a class count >= 1 or a list of class "
                                       r"names$"):
        SemanticTask(data, CALIB, classes=0)
    with pytest.raises(SaqError, match="unknown setting task.amg.points"):
        SemanticTask(data, CALIB, classes=CLASSES, amg={"points": 3})
    for amg, match in (({"crop_n_layers": -1}, r"^task\.amg\.crop_n_layers=-1 invalid; expected an integer >= 0$"),
                       ({"crop_overlap_ratio": 1.0}, r"^task\.amg\.crop_overlap_ratio"),
                       ({"min_mask_region_area": 2.5}, r"^task\.amg\.min_mask_region_area=2\.5 invalid"),
                       ({"points_per_side": 4, "crop_n_layers": 2, "crop_n_points_downscale_factor": 4},
                        r"^task\.amg\.crop_n_layers=2 with crop_n_points_downscale_factor=4 leaves the last layer's "
                        r"crops no point of task\.amg\.points_per_side=4; use fewer layers or a smaller factor$")):
        with pytest.raises(SaqError, match=match):
            SemanticTask(data, CALIB, classes=CLASSES, amg=amg)
    # a folder where the label map should be is no label map
    (tmp_path / "b/val/labels/a.png").unlink()
    (tmp_path / "b/val/labels/a.png").mkdir()
    with pytest.raises(SaqError, match=r"image .*a\.png has no label map .*labels/a\.png"):
        SemanticTask(data, CALIB, classes=CLASSES)



@pytest.mark.parametrize("settings,match", [
    # a threshold no predicted IoU reaches keeps no mask: mIoU would equal the coarse prior's without a word
    ({"amg": {"pred_iou_thresh": 88}}, r"task\.amg\.pred_iou_thresh=88 invalid; expected a finite number in \[0, 1\]"),
    ({"amg": {"stability_score_thresh": 1.5}}, r"task\.amg\.stability_score_thresh=1\.5 invalid"),
    ({"amg": {"pred_iou_thresh": "high"}}, r"task\.amg\.pred_iou_thresh='high' invalid"),
    ({"amg": {"points_per_side": 16.7}}, r"task\.amg\.points_per_side=16\.7 invalid; expected an integer >= 1"),
    ({"amg": {"points_per_side": "abc"}}, r"task\.amg\.points_per_side='abc' invalid"),
    ({"coarse": {"blur_sigma": -3}}, r"task\.coarse\.blur_sigma=-3 invalid; expected a finite number >= 0"),
    ({"coarse": {"downsample": "x"}}, r"task\.coarse\.downsample='x' invalid"),
    ({"coarse": {"mislabel_fraction": 1}}, r"mislabel_fraction=1 invalid; expected a finite number in \[0, 1\)"),
    ({"reduce_zero_label": "false"}, r"task\.reduce_zero_label=.false. invalid; expected true or false"),  # truthy
    ({"ignore_index": "255"}, r"task\.ignore_index='255' invalid; expected an integer"),
    ({"ignore_index": None}, r"task\.ignore_index=None invalid; expected an integer"),
    ({"classes": 3.0}, r"task\.classes must be a list of class names .* got 3\.0"),
    ({"classes": "plane"}, r"task\.classes must be a list of class names .* got 'plane'"),
    # IoU_per_class, keyed by name, would lose one of them
    ({"classes": ["a", "a", "b"]}, r"^task\.classes names 'a' twice \(\['a', 'a', 'b'\]\); each class needs its own"),
    ({"ignore_index": 3}, r"task\.ignore_index 3 is one of the 9 classes' label values"),
    ({"coarse": {"seed": -1}}, r"task\.coarse\.seed=-1 invalid"),
    ({"amg": {"points": 3}}, r"unknown setting task\.amg\.points"),
    # task.coarse=<folder> instead of task.coarse.dir=<folder>: was read letter by letter ('unknown setting task.coarse./')
    ({"coarse": "/data/preds"}, r"^task\.coarse='/data/preds' invalid; expected a mapping of \[.*\] \(the folder of "
                                r"predicted label maps goes in task\.coarse\.dir\)$"),
    ({"amg": 32}, r"^task\.amg=32 invalid; expected a mapping of \['box_nms_thresh'"),  # was TypeError: not iterable
    ({"coarse": {"dir": 5}}, r"^task\.coarse\.dir=5 invalid; expected the path of a folder"),  # was TypeError in Path
    ({"coarse": {"dir": True}}, r"^task\.coarse\.dir=True invalid"),
])
def test_bad_semantic_settings_are_named_before_any_work(tmp_path, settings, match):
    data = label_dataset(tmp_path / "data", {"a": np.zeros((8, 8))})
    with pytest.raises(SaqError, match=match):
        SemanticTask(data, CALIB, **{"classes": CLASSES, **settings})
    # before the synthetic set is generated too (minutes at full size)
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(SaqError, match=match):
        SemanticTask({"root": str(root), **DATA}, CALIB, generate={"n_train": 1, "n_val": 1, "seed": 0, "progress": False},
                     **{"classes": CLASSES, **settings})
    assert not any(root.iterdir())


def test_box_prompt_sources_are_refused(tmp_path, synthetic_root):
    data = {"root": str(synthetic_root), **DATA}
    # The default ground-truth source is accepted (and unused): the prompts are the point grid.
    assert SemanticTask(data, CALIB, classes=CLASSES, prompts=GroundTruthBoxes()).prompts.name == "grid32"
    with pytest.raises(SaqError, match="task=semantic prompts SAM with its own point grid.*prompts=jittered"):
        SemanticTask(data, CALIB, classes=CLASSES, prompts=JitteredBoxes())
    dets = tmp_path / "dets.json"
    dets.write_text('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 1}]')
    with pytest.raises(SaqError, match="prompts=detections cannot be used"):
        SemanticTask(data, CALIB, classes=CLASSES, prompts=DetectionsFile(str(dets)))


def test_degraded_prior_is_seeded_and_degraded(synthetic_root):
    gt = np.asarray(Image.open(synthetic_root / "val/labels/000000.png"), np.int64)
    make = lambda seed, **kw: degraded_labels(gt, 9, 255, np.random.default_rng(seed), **kw)
    assert (make(0) == make(0)).all() and not (make(0) == make(1)).all()
    clean = mean_iou(confusion_matrix(make(0, mislabel_fraction=0.0), gt, 9, 255))
    noisy = mean_iou(confusion_matrix(make(0, mislabel_fraction=0.3), gt, 9, 255))
    assert noisy < clean and 0.5 < clean < 0.97  # coarse boundaries cost something, mislabelled blobs more
    assert set(np.unique(make(0))) <= set(range(9))


def test_vote_labels_majority_per_mask_largest_first():
    coarse = np.array([[1, 1, 2, 0], [1, 2, 2, 0], [1, 1, 1, 0]])
    big = np.zeros((3, 4), bool)
    big[:, :3] = True  # label 1 wins 6 to 3
    small = np.zeros((3, 4), bool)
    small[0:2, 1:3] = True  # label 2 wins 3 to 1, painted over the big one
    packed = np.packbits(np.stack([small, big]).reshape(2, -1), axis=1)
    refined = vote_labels(coarse, packed, np.array([small.sum(), big.sum()]), 3)
    assert refined.tolist() == [[1, 2, 2, 0], [1, 2, 2, 0], [1, 1, 1, 0]]  # column 3 is in no mask: coarse kept


def test_generate_masks_filters_dedups_and_does_not_depend_on_chunking():
    labels = np.zeros((20, 20), np.int64)
    labels[2:8, 2:8] = 1
    labels[10:18, 5:15] = 2
    points = np.array([[4, 4], [5, 5], [12, 12], [1, 19]], np.float32)

    results = []
    for batch in (1, 3, 64):
        seg = RegionSegmenter([labels], decode_batch_size=batch)
        seg.set_image(None)
        found = generate_masks(seg, points, pred_iou_thresh=0.9, stability_score_thresh=0.95,
                               stability_score_offset=1.0, box_nms_thresh=0.7)
        results.append((found.packed.tolist(), sorted(found.areas.tolist()), found.shape))
    assert results[0] == results[1] == results[2]
    # Four points, three regions, 12 candidate masks: NMS keeps one per region (two points share a square).
    assert results[0][1] == sorted([36, 80, 400 - 36 - 80]) and results[0][2] == (20, 20)
    seg = RegionSegmenter([labels])
    seg.set_image(None)
    none = generate_masks(seg, points, pred_iou_thresh=0.96, stability_score_thresh=0.95,
                          stability_score_offset=1.0, box_nms_thresh=0.7)
    assert len(none[1]) == 0  # every predicted IoU (0.95) is below the threshold


def test_soft_masks_fail_the_stability_filter():
    labels = np.zeros((12, 12), np.int64)
    labels[3:9, 3:9] = 1

    class Soft(RegionSegmenter):
        def predict_chunks(self, points, point_labels, multimask_output=True, return_logits=True):
            for chunk in super().predict_chunks(points, point_labels):
                yield Prediction(chunk.masks / 20.0, chunk.iou_scores, chunk.low_res_logits)  # logits +-0.5

    seg = Soft([labels])
    seg.set_image(None)
    args = {"pred_iou_thresh": 0.5, "stability_score_offset": 1.0, "box_nms_thresh": 0.7}
    assert len(generate_masks(seg, np.array([[5, 5]], np.float32), stability_score_thresh=0.95, **args)[1]) == 0
    assert len(generate_masks(seg, np.array([[5, 5]], np.float32), stability_score_thresh=0.0, **args)[1]) == 1


def test_sam_masks_lift_the_coarse_prior_and_time_is_split(synthetic_root):
    data = {"root": str(synthetic_root), **DATA}
    task = SemanticTask(data, CALIB, classes=CLASSES, max_images=3, amg={"points_per_side": 16})
    maps = [np.asarray(Image.open(label), np.int64) for _, _, label in task.items]
    metrics = task.evaluate(RegionSegmenter(maps), progress=False)
    assert metrics["mIoU"] > metrics["coarse_mIoU"] + 0.05  # perfect regions vote the blobs and boundaries away
    assert metrics["encoder_s"] == 3.0 and metrics["decoder_s"] == pytest.approx(0.5 * 3 * np.ceil(256 / 7))
    assert metrics["images"] == 3 and metrics["prompts"] == 3 * 256
    # each class's IoU under its own name, counted here from the pixels: the prior's maps, and the masks' vote
    # (a class neither labelled nor predicted is None)
    amg = {key: float(task.amg[key]) for key in AMG_THRESHOLDS}
    segmenter = RegionSegmenter(maps)
    inter, union = {"coarse": np.zeros(9), "refined": np.zeros(9)}, {"coarse": np.zeros(9), "refined": np.zeros(9)}
    for (stem, _, _), gt in zip(task.items, maps):
        coarse = task.coarse_labels(stem, gt)
        segmenter.set_image(None)
        found = generate_masks(segmenter, point_grid(16, *gt.shape), **amg)
        for name, pred in (("coarse", coarse), ("refined", vote_labels(coarse, found.packed, found.areas, 9))):
            for c in range(9):
                inter[name][c] += ((pred == c) & (gt == c)).sum()
                union[name][c] += ((pred == c) | (gt == c)).sum()
    for name, key in (("coarse", "coarse_IoU_per_class"), ("refined", "IoU_per_class")):
        expected = {c: None if union[name][i] == 0 else pytest.approx(inter[name][i] / union[name][i])
                    for i, c in enumerate(CLASSES)}
        assert metrics[key] == expected


def test_real_data_without_a_coarse_folder_is_warned_of_the_label_stand_in(tmp_path, synthetic_root, capsys):
    # the degraded-label prior is the synthetic set's stand-in: on real data it would score labels against themselves
    data = label_dataset(tmp_path, {"a": np.zeros((8, 8), np.int64)})
    SemanticTask(data, CALIB, classes=CLASSES)
    assert "warning: task.coarse.dir=null: the coarse prior is " in capsys.readouterr().err
    SemanticTask({"root": str(synthetic_root), "img_dir": "val/images", "label_dir": "val/labels"}, CALIB,
                 classes=CLASSES, max_images=1)
    assert "task.coarse.dir" not in capsys.readouterr().err  # saq's synthetic set: the stand-in is the documented one


def test_coarse_predictions_from_a_folder(tmp_path):
    gt = np.zeros((8, 8), np.int64)
    gt[2:6, 2:6] = 1
    # a quarter-size prediction, left half bg and right half 'other': scaled up by nearest neighbour, it keeps its
    # two classes (linear interpolation would put 'box', the value between them, along the seam)
    data = label_dataset(tmp_path, {"a": gt}, coarse={"a": np.array([[0, 2], [0, 2]])})
    task = SemanticTask(data, CALIB, classes=["bg", "box", "other"], coarse={"dir": str(tmp_path / "coarse")},
                        amg={"points_per_side": 4})
    metrics = task.evaluate(RegionSegmenter([gt]), progress=False)
    # bg: 48 true pixels, 32 predicted (the left half), 24 of them right; box never predicted; other never true
    assert metrics["coarse_IoU_per_class"] == {"bg": pytest.approx(24 / 56), "box": 0.0, "other": 0.0}
    save_png(tmp_path / "coarse/a.png", np.full((8, 8), 3))
    settings = {"classes": ["bg", "box", "other"], "coarse": {"dir": str(tmp_path / "coarse")}}
    with pytest.raises(SaqError, match=r"coarse prediction .*coarse/a\.png holds value 3, outside the 3 classes "
                                       r"\(0\.\.2\) \(a coarse prediction holds class indices 0\.\.2: one written as "
                                       r"1\.\.K"):
        SemanticTask(data, CALIB, **settings)  # found when the task is built, before any mask generation
    with pytest.raises(SaqError, match=r"coarse/a\.png holds value 3"):  # a task built before the file changed
        task.evaluate(RegionSegmenter([gt]), progress=False)
    # the dataset's ignore value in a coarse map: not an ignore index there (was "not the ignore index -1")
    save_png(tmp_path / "coarse/a.png", np.full((8, 8), 255))
    with pytest.raises(SaqError, match=r"coarse/a\.png holds value 255, outside the 3 classes \(0\.\.2\) \(a coarse "
                                       r"prediction holds a class index at every pixel; it has no ignore value\)$"):
        SemanticTask(data, CALIB, **settings)
    save_png(tmp_path / "coarse/a.png", np.full((8, 8, 3), 1))
    with pytest.raises(SaqError, match=r"coarse prediction .*coarse/a\.png has RGB pixels; a label map must be "
                                       "single-channel"):
        SemanticTask(data, CALIB, **settings)
    save_png(tmp_path / "coarse/a.png", np.ones((8, 4)))  # transposed-like: another aspect ratio, not a scaling
    with pytest.raises(SaqError, match=r"coarse/a\.png is 4x8 \(w x h\), its image is 8x8: another aspect ratio"):
        task.evaluate(RegionSegmenter([gt]), progress=False)
    with pytest.raises(SaqError, match="coarse prediction folder not found"):
        SemanticTask(data, CALIB, classes=["bg", "box"], coarse={"dir": str(tmp_path / "nope")})
    # classes written 1..K (mmsegmentation's submission format) where no map holds K: every value is a class, each
    # the wrong one; the agreement with the labels shows it
    save_png(tmp_path / "coarse/a.png", gt + 1)
    with pytest.raises(SaqError, match=r"the coarse predictions in .*coarse agree with the label maps on 0% of the "
                                       r"labelled pixels as written and on 100% with 1 subtracted: they hold classes "
                                       r"1\.\.K .*; write class indices 0\.\.2$"):
        SemanticTask(data, CALIB, **settings)
    save_png(tmp_path / "coarse/a.png", gt)
    SemanticTask(data, CALIB, **settings)  # the same prediction as class indices
    (tmp_path / "coarse/a.png").unlink()  # found before any inference, not at that image
    with pytest.raises(SaqError, match=r"image .*a\.png has no coarse prediction .*coarse/a\.png"):
        SemanticTask(data, CALIB, classes=["bg", "box"], coarse={"dir": str(tmp_path / "coarse")})


@pytest.mark.parametrize(("image", "shape", "scaled"), [((64, 64), (64, 60), False), ((64, 64), (16, 16), True),
                                                       ((66, 64), (17, 16), True)])  # 66 / 4 rounded up
def test_a_coarse_prediction_must_be_a_scaled_copy_of_its_image(tmp_path, image, shape, scaled):
    """One scale for both sides, within a pixel of rounding: 64x60 for a 64x64 image is cropped or padded, and
    stretching it would move every boundary (a 10% aspect tolerance let it through)."""
    gt = np.zeros(image, np.int64)
    data = label_dataset(tmp_path, {"a": gt}, coarse={"a": np.zeros(shape)})
    settings = {"classes": ["bg", "box"], "coarse": {"dir": str(tmp_path / "coarse")}, "amg": {"points_per_side": 4}}
    if scaled:
        assert SemanticTask(data, CALIB, **settings).coarse_labels("a", gt).shape == image
    else:  # found from the file headers when the task is built, not when evaluation reaches the image
        with pytest.raises(SaqError, match=r"coarse prediction .*coarse/a\.png is 60x64 \(w x h\), its image is "
                                           r"64x64: another aspect"):
            SemanticTask(data, CALIB, **settings)


def test_one_bit_label_maps_are_read(tmp_path):
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 1
    path = tmp_path / "a.png"
    Image.fromarray(gt * 255).convert("1").save(path)
    assert Image.open(path).mode == "1"
    assert np.array_equal(read_label_map(path, "label map"), gt)


def test_shipped_sam_tiny_end_to_end(synthetic_root):
    data = {"root": str(synthetic_root), **DATA}
    amg = {"points_per_side": 8, "pred_iou_thresh": 0.7, "stability_score_thresh": 0.9}
    task = SemanticTask(data, CALIB, classes=CLASSES, max_images=2, amg=amg)
    segmenter = Segmenter(build_sam("sam_tiny"), decode_batch_size=24)  # 64 points: three chunks, the last short
    metrics = task.evaluate(segmenter, progress=False)
    assert metrics["images"] == 2 and metrics["prompts"] == 128
    # SSA's crop layer: the 8 x 8 grid on the image and a 4 x 4 grid on each of its four crops, encoded on their own
    cropped = SemanticTask(data, CALIB, classes=CLASSES, max_images=1,
                           amg={**amg, "crop_n_layers": 1, "crop_n_points_downscale_factor": 2})
    crop_metrics = cropped.evaluate(Segmenter(build_sam("sam_tiny")), progress=False)
    assert crop_metrics["prompts"] == 64 + 4 * 16 and crop_metrics["masks_per_image"] > 0
    plain = SemanticTask(data, CALIB, classes=CLASSES, max_images=1, amg=amg).fingerprint()
    assert cropped.fingerprint() != plain
    assert "crop_n_layers" not in plain  # settings added since at their defaults: earlier FP caches still match
    assert metrics["encoder_s"] > 0 and metrics["decoder_s"] > 0
    cm = sum(confusion_matrix(task.coarse_labels(stem, task.ground_truth(label, (256, 256))),
                              task.ground_truth(label, (256, 256)), 9, 255) for stem, _, label in task.items)
    assert metrics["coarse_mIoU"] == pytest.approx(mean_iou(cm))
    assert metrics["masks_per_image"] >= 2  # masks survive the filters: the metric below is SAM's doing
    assert metrics["mIoU"] >= metrics["coarse_mIoU"]  # the kept masks refine the coarse prior
    # Unfiltered, the grid yields many distinct masks: non-empty, and no two boxes overlapping beyond the NMS IoU.
    segmenter.set_image(read_rgb(task.items[0][1]))
    packed, areas, shape = generate_masks(segmenter, point_grid(8, 256, 256), 0.0, 0.0, 1.0, 0.7)[:3]
    assert shape == (256, 256) and len(areas) >= 5 and (areas > 0).all()
    masks = torch.as_tensor(np.unpackbits(packed, axis=1, count=256 * 256).reshape(-1, 256, 256).astype(bool))
    assert (masks.flatten(1).sum(1).numpy() == areas).all()
    boxes = batched_mask_to_box(masks).float()
    assert (box_iou(boxes, boxes).fill_diagonal_(0) <= 0.7 + 1e-6).all()
    samples = task.calibration_samples(2)
    assert samples[0].points.shape == (64, 1, 2) and samples[0].point_labels.shape == (64, 1)
    assert samples[0].image_id == "000000" and samples[0].num_prompts == 64


def test_fast_amg_keeps_exactly_segment_anythings_masks(synthetic_root):
    sam = build_sam("sam_tiny")
    image = read_rgb(sorted((synthetic_root / "val/images").iterdir())[0])
    thresholds = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.9, "stability_score_offset": 1.0,
                  "box_nms_thresh": 0.7}
    reference = reference_masks(Segmenter(sam), image, 8, **thresholds)
    assert len(reference.areas) >= 3  # the comparison has something to compare
    for batch in (5, 16):  # a short last chunk, and the task's default
        segmenter = Segmenter(sam)
        segmenter.set_image(image)
        ours = generate_masks(segmenter, point_grid(8, 256, 256), **thresholds, points_per_batch=batch)
        assert mask_set_differences(ours, reference) == []
    # an image whose sides do not scale exactly to the input: the grid stays float64 up to the prompt encoder, as
    # segment_anything keeps it (a float32 copy moves coordinates by an ulp, and logits with them)
    import cv2

    wide = cv2.resize(image, (500, 375), interpolation=cv2.INTER_LINEAR)
    segmenter = Segmenter(sam)
    segmenter.set_image(wide)
    wide_ours = generate_masks(segmenter, point_grid(16, 375, 500), **thresholds, points_per_batch=16)
    wide_reference = reference_masks(Segmenter(sam), wide, 16, **thresholds)
    assert len(wide_reference.areas) >= 3 and mask_set_differences(wide_ours, wide_reference) == []
    # the comparison itself can fail: one mask changed by a pixel, one score moved
    changed = ours.packed.copy()
    changed[0, 0] ^= 1
    assert mask_set_differences(ours._replace(packed=changed), reference)
    assert mask_set_differences(ours._replace(scores=ours.scores + 1e-4), reference)
    assert mask_set_differences(ours._replace(areas=ours.areas[1:], packed=ours.packed[1:]), reference)


def test_crop_layers_and_small_region_removal_keep_exactly_segment_anythings_masks(synthetic_root):
    """SSA's generator settings (a crop layer with a coarser grid, small regions removed) give the masks
    SamAutomaticMaskGenerator gives, on a wide image whose crops are not square."""
    sam = build_sam("sam_tiny")
    image = cv2.resize(read_rgb(sorted((synthetic_root / "val/images").iterdir())[1]), (320, 256))
    # the two NMS thresholds differ, so passing one for the other would show
    amg = {**AMG_DEFAULTS, "points_per_side": 8, "pred_iou_thresh": 0.7, "stability_score_thresh": 0.9,
           "box_nms_thresh": 0.8, "crop_n_layers": 1, "crop_n_points_downscale_factor": 2, "min_mask_region_area": 40,
           "crop_nms_thresh": 0.5, "crop_overlap_ratio": 0.2}
    crops = {key: amg[key] for key in ("crop_n_layers", "crop_n_points_downscale_factor", "min_mask_region_area",
                                       "crop_nms_thresh", "crop_overlap_ratio")}
    thresholds = {key: amg[key] for key in AMG_THRESHOLDS}
    reference = reference_masks(Segmenter(sam), image, 8, **thresholds, **crops)
    ours = automatic_masks(Segmenter(sam), image, amg)
    assert len(reference.areas) >= 3 and mask_set_differences(ours, reference) == []
    # each setting changes the masks here, so the comparison covers it
    whole = automatic_masks(Segmenter(sam), image, {**amg, "crop_n_layers": 0, "min_mask_region_area": 0})
    assert mask_set_differences(automatic_masks(Segmenter(sam), image, {**amg, "min_mask_region_area": 0}), whole)
    assert mask_set_differences(automatic_masks(Segmenter(sam), image, {**amg, "crop_n_layers": 0}), whole)
    for key, other in (("crop_nms_thresh", 0.8), ("crop_overlap_ratio", 512 / 1500)):
        assert mask_set_differences(automatic_masks(Segmenter(sam), image, {**amg, key: other}), ours), key
    # boxes come along in image coordinates
    assert np.array_equal(ours.boxes, batched_mask_to_box(torch.as_tensor(unpacked(ours))).float().numpy())


@pytest.mark.parametrize("reduce", [False, True])
def test_label_maps_that_are_all_ignored_are_an_error(tmp_path, reduce):
    fill = 0 if reduce else 255
    scored = np.full((8, 8), 255)
    scored[0, 0] = 1
    data = label_dataset(tmp_path, {"a": np.full((8, 8), fill), "b": np.full((8, 8), 255), "c": scored})
    settings = {"classes": CLASSES, "coarse": {"mislabel_fraction": 0}, "amg": {"points_per_side": 2},
                "reduce_zero_label": reduce}
    # found when the task is built (every evaluated map is read then), not after the whole evaluation
    with pytest.raises(SaqError, match=r"^the label maps of the 2 evaluated images are all ignore_index 255.*"
                                       r"mIoU is undefined \(check .*val/labels and task.max_images\)$"):
        SemanticTask(data, CALIB, max_images=2, **settings)
    assert len(SemanticTask(data, CALIB, **settings).items) == 3  # c holds a scored pixel
