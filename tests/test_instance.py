"""Instance task: COCO reading, prompt sources, mask AP and errors on bad annotations."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from saq.errors import SaqError
from saq.sam.build import build_sam
from saq.sam.segmenter import Segmenter
from tasks.instance import InstanceTask, gt_boxes, load_coco, mask_ap
from tasks.prompts import BoxPrompts, DetectionsFile, GroundTruthBoxes, JitteredBoxes

DATA = {"ann_file": "annotations/instances_val.json", "img_dir": "val/images"}
CALIB = {"ann_file": "annotations/instances_train.json", "img_dir": "train/images"}


def task_for(root, prompts=None, max_images=None):
    return InstanceTask({"root": str(root), **DATA}, CALIB, prompts=prompts, max_images=max_images)


def results_from_masks(coco, shift: int = 0) -> list[dict]:
    out = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        m = np.roll(coco.annToMask(ann), shift, axis=1)
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "segmentation": rle,
                    "score": 1.0})
    return out


def test_paired_mask_iou_is_the_diagonal_of_the_matrix():
    from tasks.instance import mask_iou, paired_mask_iou

    rng = np.random.default_rng(0)
    pred, gt = rng.random((5, 9, 7)) > 0.5, rng.random((5, 9, 7)) > 0.6
    gt[4] = pred[4] = False  # both empty: 0, as the matrix gives
    np.testing.assert_allclose(paired_mask_iou(pred, gt), np.diag(mask_iou(pred, gt)), rtol=1e-6)


def test_ap_is_one_for_ground_truth_masks_and_lower_when_shifted(synthetic_root):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    ids = coco.getImgIds()
    results = results_from_masks(coco)
    before = json.dumps(results)
    perfect = mask_ap(coco, results, ids)
    assert perfect["mask_AP"] == pytest.approx(1.0)
    assert json.dumps(results) == before and mask_ap(coco, results, ids) == perfect  # its input left as given
    shifted = mask_ap(coco, results_from_masks(coco, shift=6), ids)
    assert shifted["mask_AP"] < 0.9 * perfect["mask_AP"]
    assert shifted["mask_AP50"] >= shifted["mask_AP75"]


def test_mask_ap_is_cocoevals_summary_and_scores_every_result_of_a_crowded_image(synthetic_root, tmp_path):
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    ids = coco.getImgIds()
    results = results_from_masks(coco, shift=3)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval's own summary, at its default maxDets
        ev = COCOeval(coco, coco.loadRes(results_from_masks(coco, shift=3)), iouType="segm")  # loadRes edits them
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert mask_ap(coco, results, ids) == {"mask_AP": ev.stats[0], "mask_AP50": ev.stats[1], "mask_AP75": ev.stats[2]}
    subset = [r for r in results_from_masks(coco) if r["image_id"] in ids[:2]]  # scored on the given images only
    assert mask_ap(coco, subset, ids[:2])["mask_AP"] == pytest.approx(1.0)
    assert mask_ap(coco, [r for r in results_from_masks(coco) if r["image_id"] in ids[:2]], ids)["mask_AP"] < 0.9
    # 120 objects of one class on one image (and no iscrowd field, as many converters write): their perfect masks
    # score 1.0 (COCOeval's default keeps the top 100 results per image and class: 0.83)
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [(i % 12) * 5, (i // 12) * 5, 4, 4], "area": 16,
             "segmentation": [[(i % 12) * 5, (i // 12) * 5, (i % 12) * 5 + 4, (i // 12) * 5, (i % 12) * 5 + 4,
                               (i // 12) * 5 + 4, (i % 12) * 5, (i // 12) * 5 + 4]]} for i in range(120)]
    path = tmp_path / "crowded.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64}],
                                "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    crowded = load_coco(path, "k")
    assert mask_ap(crowded, results_from_masks(crowded), [1]) == {"mask_AP": 1.0, "mask_AP50": 1.0, "mask_AP75": 1.0}
    # a detector's boxes are ranked as COCOeval (and mmdetection's segm mAP) does: its top 100 per image and class
    standard = mask_ap(crowded, results_from_masks(crowded), [1], every_result=False)
    assert standard["mask_AP"] == pytest.approx(0.83, abs=0.01) and standard["mask_AP"] < 1.0


def test_shipped_sam_tiny_segments_with_gt_boxes(synthetic_root):
    metrics = task_for(synthetic_root).evaluate(Segmenter(build_sam("sam_tiny")), progress=False)
    # prompts decoded two at a time: every mask still meets its own object and score
    assert task_for(synthetic_root).evaluate(Segmenter(build_sam("sam_tiny"), decode_batch_size=2),
                                             progress=False) == pytest.approx(metrics, abs=1e-6)
    assert metrics["images"] == 6 and metrics["prompts"] > 10
    # The shipped checkpoint (round 5) measures mIoU 0.873 and AP 0.836 on these 6 images (round 4: 0.875 and 0.825;
    # round 3: 0.861 and 0.815; the patch-16 round 1: 0.757 and 0.576); an untrained model is near 0.
    assert metrics["mIoU"] > 0.86
    assert metrics["mask_AP"] > 0.82


def test_detections_file_prompts(synthetic_root, tmp_path):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    dets = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                     "score": 0.9})
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                     "score": 0.01})  # below threshold: dropped
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    source = DetectionsFile(str(path), score_threshold=0.05, max_per_image=100)
    gt, _ = gt_boxes(coco, 1)
    got = source.for_image(1, gt, (256, 256))
    assert len(got) == len(gt)
    by_row = lambda boxes: boxes[np.lexsort(boxes.T[::-1])]  # noqa: E731  whole boxes in one order, not per column
    assert np.allclose(by_row(got.boxes), by_row(gt.boxes))
    assert (got.scores == np.float32(0.9)).all()
    assert sorted(got.labels.tolist()) == sorted(gt.labels.tolist())  # each box keeps its detector class
    capped = DetectionsFile(str(path), score_threshold=0.0, max_per_image=2).for_image(1, gt, (256, 256))
    assert len(capped) == 2 and (capped.scores == np.float32(0.9)).all()
    # by default the file as the detector's test settings left it: every box, low scores included, no cap
    every = DetectionsFile(str(path)).for_image(1, gt, (256, 256))
    assert len(every) == 2 * len(gt) and sorted(set(every.scores.tolist())) == [np.float32(0.01), np.float32(0.9)]
    metrics = task_for(synthetic_root, source, max_images=2).evaluate(
        Segmenter(build_sam("sam_tiny")), progress=False)
    assert metrics["prompts"] == sum(len(coco.getAnnIds(imgIds=i)) for i in (1, 2))
    # the detections are the ground-truth boxes with their classes: the same masks and AP as ground-truth prompts
    assert metrics["mask_AP"] == pytest.approx(task_for(synthetic_root, max_images=2).evaluate(
        Segmenter(build_sam("sam_tiny")), progress=False)["mask_AP"])

def test_a_detection_result_scores_the_detector_score_times_the_predicted_iou(synthetic_root, tmp_path, monkeypatch):
    import tasks.instance as instance

    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    anns = [a for a in coco.loadAnns(coco.getAnnIds()) if a["image_id"] in (1, 2)]
    detector = {tuple(a["bbox"]): 0.2 + 0.7 * k / len(anns) for k, a in enumerate(anns)}  # distinct scores

    def scored_results(score_of):
        path = tmp_path / f"dets{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                     "score": score_of(a)} for a in anns]))
        seen, how = [], []
        monkeypatch.setattr(instance, "mask_ap", lambda gt, results, ids, **kw: seen.extend(results)
                            or how.append(kw) or mask_ap(gt, results, ids, **kw))
        task_for(synthetic_root, DetectionsFile(str(path), score_threshold=0.05, max_per_image=100),
                 max_images=2).evaluate(Segmenter(build_sam("sam_tiny")), progress=False)
        assert how == [{"every_result": False}]  # a detector's boxes: COCOeval's standard top 100
        return {(r["image_id"], r["segmentation"]["counts"]): r for r in seen}

    predicted_iou = scored_results(lambda a: 1.0)  # a detector score of 1: the result's score is SAM's IoU alone
    scored = scored_results(lambda a: detector[tuple(a["bbox"])])
    assert len(scored) == len(anns) and scored.keys() == predicted_iou.keys()
    for key, r in scored.items():  # each mask's own detection: the box its mask's extent matches best
        own = [a for a in anns if a["image_id"] == r["image_id"]]
        extent = mask_utils.toBbox(r["segmentation"]).tolist()
        ious = mask_utils.iou([extent], [a["bbox"] for a in own], [0] * len(own))[0]
        assert sorted(ious)[-1] > 0.7 > sorted([0, *ious])[-2]  # an unambiguous pairing
        expected = np.float32(detector[tuple(own[int(np.argmax(ious))]["bbox"])])
        assert r["score"] / predicted_iou[key]["score"] == pytest.approx(expected, rel=1e-5)


def test_jittered_boxes_are_seeded_and_stay_in_the_image(synthetic_root):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    gt, _ = gt_boxes(coco, 2)
    a = JitteredBoxes(0.1, 20, seed=3).for_image(2, gt, (256, 256))
    b = JitteredBoxes(0.1, 20, seed=3).for_image(2, gt, (256, 256))
    c = JitteredBoxes(0.1, 20, seed=4).for_image(2, gt, (256, 256))
    assert np.array_equal(a.boxes, b.boxes) and not np.array_equal(a.boxes, c.boxes)
    assert not np.array_equal(a.boxes, gt.boxes)
    assert (a.boxes >= 0).all() and (a.boxes <= 256).all()
    assert (a.boxes[:, 2] >= a.boxes[:, 0]).all()
    # a wide image: x clipped to its width, y to its height (a swap would cut boxes at 100 px across)
    wide = JitteredBoxes(0.5, 200, seed=3).for_image(2, gt, (100, 400))
    assert wide.boxes[:, [0, 2]].max() > 100 and (wide.boxes[:, [0, 2]] <= 400).all()
    assert (wide.boxes[:, [1, 3]] <= 100).all()
    # each image has noise of its own (seeded by its key, not only by the seed)
    other = JitteredBoxes(0.1, 20, seed=3).for_image(7, gt, (256, 256))
    assert not np.array_equal(a.boxes, other.boxes)
    # the FP cache key of a setting does not depend on how its numbers were written (max_px=20 is the default 20.0)
    assert JitteredBoxes(0.1, 20, seed=3).fingerprint() == JitteredBoxes(0.1, 20.0, seed=3).fingerprint()
    assert JitteredBoxes(0.1, 20, seed=3).fingerprint() != JitteredBoxes(0.1, 21, seed=3).fingerprint()


def test_jittered_boxes_noise_scales_with_the_box_and_stops_at_the_cap():
    def noise(box, scale, max_px):
        gt = BoxPrompts(np.tile(np.float32(box), (4000, 1)), np.ones(4000, np.float32), np.ones(4000, np.int64))
        return JitteredBoxes(scale, max_px, seed=0).for_image(1, gt, (1000, 1000)).boxes - gt.boxes

    # a 20 x 40 box at 0.1: 2 px across, 4 px down (far from the image edges, so nothing is clipped)
    assert noise([400, 400, 420, 440], 0.1, 20).std(0) == pytest.approx([2, 4, 2, 4], rel=0.1)
    assert noise([300, 300, 500, 700], 0.1, 5).std(0) == pytest.approx([5, 5, 5, 5], rel=0.1)  # 20 / 40 px, capped
    assert not noise([400, 400, 420, 440], 0.0, 20).any()


def test_calibration_samples_come_from_the_calibration_split(synthetic_root):
    samples = task_for(synthetic_root).calibration_samples(3)
    assert len(samples) == 3 and all(s.boxes is not None and len(s.boxes) for s in samples)
    assert samples[0].image.shape == (256, 256, 3)
    with pytest.raises(SaqError, match=r"only 8 images with prompts \(gt\)"):
        task_for(synthetic_root).calibration_samples(50)


def test_a_calibration_split_without_any_prompt_says_so_not_to_lower_the_count(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    ann = root / CALIB["ann_file"]
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    with pytest.raises(SaqError, match=r"^calibration split .*instances_train\.json has no image with prompts \(gt\) "
                                       r"among its 8 images; calibration needs at least one \(are its objects "
                                       r"labelled\?\)$"):
        task_for(root).calibration_samples(2)


def test_calibration_uses_the_detections_on_the_calibration_images(synthetic_root, tmp_path, capsys):
    calib = load_coco(synthetic_root / CALIB["ann_file"], "k")
    order = list(calib.imgs)  # annotation-file order
    # one made-up detection per calibration image, a box that is no ground-truth box
    dets = [{"image_id": i, "category_id": calib.getCatIds()[0], "bbox": [10 + k, 20, 30, 40], "score": 0.9}
            for k, i in enumerate(order)]
    (tmp_path / "calib.json").write_text(json.dumps(dets))
    (tmp_path / "val.json").write_text("[]")
    source = DetectionsFile(str(tmp_path / "val.json"), calib_file=str(tmp_path / "calib.json"))
    task = task_for(synthetic_root, source)
    samples = task.calibration_samples(3)
    assert [s.image_id for s in samples] == order[:3]
    for k, sample in enumerate(samples):
        assert np.array_equal(sample.boxes, np.array([[10 + k, 20, 40 + k, 60]], np.float32))
    assert task.calibration_prompts == f"detections:{(tmp_path / 'calib.json').resolve()}"
    # without calib_file: ground-truth boxes, said in the log and in what the run records
    fallback = task_for(synthetic_root, DetectionsFile(str(tmp_path / "val.json")))
    gt_samples = fallback.calibration_samples(2)
    assert fallback.calibration_prompts == "gt (fallback: prompts.calib_file not set)"
    assert "prompts.calib_file is not set" in capsys.readouterr().out
    assert np.array_equal(gt_samples[0].boxes, gt_boxes(calib, order[0])[0].boxes)
    with pytest.raises(SaqError, match="calibration detections file not found"):
        DetectionsFile(str(tmp_path / "val.json"), calib_file=str(tmp_path / "missing.json"))
    # the evaluation's detections given as the calibration file: named as prompts.calib_file, for the calibration
    # images (the same path in both knobs would leave a user guessing which is wrong)
    val = load_coco(synthetic_root / DATA["ann_file"], "k")
    other_split = [{"image_id": max(val.imgs) + 1000, "category_id": calib.getCatIds()[0], "bbox": [1, 1, 5, 5],
                    "score": 0.9}]
    (tmp_path / "val_dets.json").write_text(json.dumps(other_split))
    wrong = task_for(synthetic_root, DetectionsFile(str(tmp_path / "val.json"),
                                                   calib_file=str(tmp_path / "val_dets.json")))
    with pytest.raises(SaqError, match=r"val_dets\.json \(prompts\.calib_file\) names none of the calibration "
                                       r"images \(it has \d+; the calibration images are keyed like \d+\)"):
        wrong.calibration_samples(2)


def test_official_calibration_order_swaps_images_0_and_8(tmp_path):
    from tasks.synthetic import ensure_dataset

    root = ensure_dataset(tmp_path / "ten", n_train=10, n_val=1, seed=0, progress=False)
    file_order = [s.image_id for s in task_for(root).calibration_samples(10)]
    assert file_order == list(load_coco(root / CALIB["ann_file"], "k").imgs)
    official = InstanceTask({"root": str(root), **DATA}, {**CALIB, "order": "official"})
    swapped = [s.image_id for s in official.calibration_samples(10)]
    assert swapped == [file_order[8], *file_order[1:8], file_order[0], file_order[9]]
    with pytest.raises(SaqError, match=r"task.calib.order=official swaps calibration images 0 and 8, so it needs "
                                       r"quant.calib_images >= 9 \(got 8\); use task.calib.order=file"):
        official.calibration_samples(8)
    # other callers of a few calibration images (the outlier planting) are served in file order, not refused
    assert [s.image_id for s in official.calibration_samples(4, "model.outliers.calib_images")] == file_order[:4]
    with pytest.raises(SaqError, match="task.calib.order='random' is unknown"):
        InstanceTask({"root": str(root), **DATA}, {**CALIB, "order": "random"})


def _ann(ann_id: int) -> str:
    return (f'{{"id": {ann_id}, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, '
            '"segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}')


@pytest.mark.parametrize("content,match", [
    ("not json", "not valid JSON"),
    ('{"images": []}', "not COCO instance format"),
    ('{"images": [], "annotations": [], "categories": []}', "lists no images"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] lacks one of id, file_name"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], "annotations": [{"id": 1}], '
     '"categories": []}', r"annotations\[0\] lacks"),
    *((f'{{"images": [{{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}}], "annotations": [{a}, {b}], '
       '"categories": [{"id": 1, "name": "x"}]}', match)
      for a, b, match in [
          (_ann(1), _ann(0), r"annotations\[1\] has id 0; ids must be unique integers >= 1"),  # 'unmatched'
          (_ann(1), _ann(1), r"annotations\[1\] has id 1, which an earlier annotation has; ids must be unique"),
          (_ann(1), _ann(2).replace('"area": 4, ', ""), r"annotations\[1\] lacks one of id, .*area"),
          # COCOeval ignores an object outside its area range and fails late on a string area
          (_ann(1), _ann(2).replace('"area": 4', '"area": -1'), r"annotation 2 has area -1; expected a number"),
          (_ann(1), _ann(2).replace('"area": 4', '"area": "4"'), r"annotation 2 has area '4'; expected a number"),
          # a truthy string would make the object a crowd region: no prompt, not scored
          (_ann(1), _ann(2).replace('"area": 4', '"area": 4, "iscrowd": "0"'),
           r"annotation 2 has iscrowd '0'; expected 0 or 1"),
          (_ann(1), _ann(2).replace("[0, 0, 2, 2]", "[0, 0, 2, 1" + "0" * 400 + "]"),
           r"annotation 2 has bbox .*it has a non-finite value"),
          (_ann(1), _ann(2).replace("[[0, 0, 2, 0,", "[[0, 0, 1" + "0" * 400 + ", 0,"),
           r"annotation 2 \(image 1\) has a bad segmentation: polygon")]),
    ('{"images": 5, "annotations": [], "categories": []}', r"'images' must be a list \(found int\)"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], "annotations": null, '
     '"categories": []}', r"'annotations' must be a list \(found NoneType\)"),
    ('{"images": [{"id": 1, "file_name": 123, "height": 4, "width": 4}], "annotations": [], "categories": []}',
     r"image 1 has file_name 123; expected the image's path"),
])
def test_malformed_annotations_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SaqError, match=match):
        load_coco(path, "task.data.ann_file")


def test_missing_annotation_file_and_bad_detections(tmp_path):
    with pytest.raises(SaqError, match="COCO annotation file not found"):
        load_coco(tmp_path / "none.json", "task.data.ann_file")
    with pytest.raises(SaqError, match="needs a file"):
        DetectionsFile(None)
    with pytest.raises(SaqError, match="prompts.file=123 invalid; expected the path"):  # hydra gives an int
        DetectionsFile(123)
    with pytest.raises(SaqError, match=r"prompts.calib_file=7 invalid; expected a path or null"):
        DetectionsFile(str(tmp_path), calib_file=7)
    bad = tmp_path / "d.json"
    bad.write_text('[{"image_id": 1, "bbox": [0, 0, 1]}]')
    with pytest.raises(SaqError, match="entry 0 is not a result"):
        DetectionsFile(str(bad))


def test_corrupt_image_is_named(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    (root / "val" / "images" / "000000.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(SaqError, match="cannot decode image .*000000.jpg"):
        task_for(root).evaluate(Segmenter(build_sam("sam_tiny")), progress=False)


def test_gt_prompt_source_is_identity(synthetic_root):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    gt, _ = gt_boxes(coco, 1)
    assert GroundTruthBoxes().for_image(1, gt, (256, 256)) is gt


def copy_with_annotations(synthetic_root, tmp_path, edit):
    """A copy of the fixture dataset whose val annotation json has been passed through edit(dict)."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    ann = root / DATA["ann_file"]
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return root


def write_detections(path, coco, image_ids, **override):
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9, **override}
            for a in coco.loadAnns(coco.getAnnIds(imgIds=image_ids))]
    path.write_text(json.dumps(dets))
    return DetectionsFile(str(path), score_threshold=0.05)


def test_detections_whose_category_ids_are_shifted_are_said(synthetic_root, tmp_path, capsys):
    # class indices 0..N-1 written as ids: with no box of class 0, every id is one the dataset defines, each wrong
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    ids = coco.getImgIds()[:6]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"] - 1, "bbox": a["bbox"], "score": 0.9}
            for a in coco.loadAnns(coco.getAnnIds(imgIds=ids)) if a["category_id"] > 1]
    # and, as a detector run at score_thr 0.05 leaves them, a low-score box of another class on every object: each
    # object votes with its best box (one vote per box let these spread the votes and hide the shift)
    cats = coco.getCatIds()
    junk = [{**d, "category_id": next(c for c in cats if c not in (d["category_id"], d["category_id"] + 1)),
             "score": 0.06} for d in dets]
    (tmp_path / "shifted.json").write_text(json.dumps(dets + junk))
    capsys.readouterr()
    task_for(synthetic_root, DetectionsFile(str(tmp_path / "shifted.json"), score_threshold=0.05), max_images=6)
    out = capsys.readouterr().out
    assert re.search(rf"detections file .*shifted\.json: of the {len(dets)} labelled objects its boxes cover \(IoU >= "
                     rf"0\.5\) on the evaluated images, the highest-scoring box carries the object's category_id on 0 "
                     rf"and on {len(dets)} the category 1 place before it in the annotation file; are its ids shifted",
                     out), out
    # the detector's own classes: nothing said
    task_for(synthetic_root, write_detections(tmp_path / "right.json", coco, ids), max_images=6)
    assert "shifted" not in capsys.readouterr().out


def test_detections_must_name_the_datasets_images_and_categories(synthetic_root, tmp_path, capsys):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    by_stem = write_detections(tmp_path / "stems.json", coco, [1], image_id="000001")
    with pytest.raises(SaqError, match=r"\(prompts\.file\) names none of the evaluated images"):
        task_for(synthetic_root, by_stem)
    # A detector with contiguous labels 0..N-1 writes an id the dataset does not define (ours start at 1).
    contiguous = write_detections(tmp_path / "labels.json", coco, [1], category_id=0)
    with pytest.raises(SaqError, match="category_id 0, which the annotation file does not define"):
        task_for(synthetic_root, contiguous)
    # a string id among integer ones would never reach its image; ids the dataset lacks are named, not dropped silently
    write_detections(tmp_path / "mixed.json", coco, [1, 2])
    entries = json.loads((tmp_path / "mixed.json").read_text())
    (tmp_path / "mixed.json").write_text(json.dumps([{**d, "image_id": str(d["image_id"])} if d["image_id"] == 2
                                                     else d for d in entries]))
    with pytest.raises(SaqError, match=r"image_id '2' is a str; the task's images are keyed by integer ids"):
        task_for(synthetic_root, DetectionsFile(str(tmp_path / "mixed.json")))
    (tmp_path / "extra.json").write_text(json.dumps(entries + [{**entries[0], "image_id": 99999}]))
    task_for(synthetic_root, DetectionsFile(str(tmp_path / "extra.json")))
    assert "1 detections on 1 images the task does not have (first: 99999) are not used" in capsys.readouterr().out
    # images the detector found nothing on are said when evaluation starts (their objects are misses)
    task = task_for(synthetic_root, write_detections(tmp_path / "partial.json", coco, sorted(coco.imgs)[:2]),
                    max_images=3)
    capsys.readouterr()
    for _ in range(2):  # FP, then quantized: said once
        task.prompts.require_prompts(task.image_ids())
    assert capsys.readouterr().out == (f"detections file {tmp_path / 'partial.json'}: 1 of the 3 evaluated images "
                                       f"have no detection reaching prompts.score_threshold=0.05 (first: "
                                       f"{task.image_ids()[2]!r}); labelled objects on them count as missed\n")
    # a byte-order mark (some Windows editors write one) is not part of the JSON
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "extra.json").read_bytes())
    bom = DetectionsFile(str(tmp_path / "bom.json"))
    assert bom._by_image == DetectionsFile(str(tmp_path / "extra.json"))._by_image


def test_image_whose_size_disagrees_with_its_annotation_is_named(synthetic_root, tmp_path):
    import cv2
    from PIL import Image

    root = copy_with_annotations(synthetic_root, tmp_path, lambda data: None)
    cv2.imwrite(str(root / "val" / "images" / "000000.jpg"), np.zeros((300, 256, 3), np.uint8))
    # when the task is built (image headers), not when evaluation reaches the image
    with pytest.raises(SaqError, match=r"000000.jpg is 256x300 \(w x h\) but its annotation entry .* says 256x256$"):
        task_for(root)
    # a photo whose EXIF tag turns it: labelled upright, stored on its side; the message says why
    from tasks.base import check_image_size

    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((300, 256, 3), np.uint8)).save(photo, exif=exif)
    with pytest.raises(SaqError, match=r"is 256x300 \(w x h\) but its entry says 300x256; its EXIF orientation tag"):
        check_image_size(photo, (300, 256), (256, 300), "its entry")


def test_ap_without_ground_truth_objects_is_an_error_not_minus_one(synthetic_root):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    coco.dataset["annotations"] = []
    coco.createIndex()
    with pytest.raises(SaqError, match="no ground-truth objects"):
        mask_ap(coco, results_from_masks(load_coco(synthetic_root / DATA["ann_file"], "k")), coco.getImgIds())


def test_detection_on_an_image_without_objects_counts_as_iou_zero(synthetic_root, tmp_path):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    n1, n2 = len(coco.getAnnIds(imgIds=1)), len(coco.getAnnIds(imgIds=2))
    sam = Segmenter(build_sam("sam_tiny"))
    base = task_for(synthetic_root, write_detections(tmp_path / "d1.json", coco, [1]), max_images=2).evaluate(
        sam, progress=False)
    assert base["prompts"] == n1

    def drop_second_images_objects(data):
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]

    root = copy_with_annotations(synthetic_root, tmp_path, drop_second_images_objects)
    both = task_for(root, write_detections(tmp_path / "d2.json", coco, [1, 2]), max_images=2).evaluate(
        sam, progress=False)
    assert both["prompts"] == n1 + n2
    assert both["mIoU"] == pytest.approx(base["mIoU"] * n1 / (n1 + n2))


def _coco(anns: str = "", images: str | None = None, categories: str = '[{"id": 1, "name": "x"}]') -> str:
    images = images or '[{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}]'
    return f'{{"images": {images}, "annotations": [{anns}], "categories": {categories}}}'


def _ann_with(**fields) -> str:
    ann = json.loads(_ann(1))
    ann.update(fields)
    return json.dumps(ann)


@pytest.mark.parametrize("content,match", [
    (_coco(_ann_with(bbox=[0, 0, -2, 2])), r"annotation 1 has bbox \[0, 0, -2, 2\]: its width and height must be >= 0"),
    (_coco(_ann_with(bbox=[0, 0, float("nan"), 2])), r"annotation 1 has bbox \[0, 0, nan, 2\]: .*non-finite"),
    (_coco(_ann_with(bbox=[0, 0, 2])), r"annotation 1 has bbox \[0, 0, 2\]: it must be 4 numbers"),
    (_coco(_ann_with(bbox="0 0 2 2")), r"annotation 1 has bbox '0 0 2 2': it must be 4 numbers"),
    (_coco(_ann_with(category_id=7)), r"annotation 1 has category_id 7, which 'categories' does not define"),
    (_coco(_ann(1), categories="[]"), r"annotation 1 has category_id 1, which 'categories' does not define"),
    (_coco(categories="[]"), r"defines no categories"),
    (_coco(_ann_with(image_id=9)), r"annotation 1 has image_id 9, which no entry of 'images' has"),
    (_coco(images='[{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}, '
                  '{"id": 1, "file_name": "b.jpg", "height": 4, "width": 4}]'),
     r"images\[1\] has id 1; image ids must be unique integers"),
    (_coco(images='[{"id": "1", "file_name": "a.jpg", "height": 4, "width": 4}]'),
     r"images\[0\] has id '1'; image ids must be unique integers"),
    (_coco(_ann_with(segmentation="abc")), r"annotation 1 \(image 1\) has a bad segmentation: 'abc' is neither"),
    (_coco(_ann_with(segmentation=[0, 0, 2, 0, 2, 2])), r"annotation 1 \(image 1\) has a bad segmentation: polygon"),
    (_coco(_ann_with(segmentation=[[1, 2, 3]])), r"annotation 1 \(image 1\) has a bad segmentation: polygon '\[1, 2, 3\]'"),
    (_coco(_ann_with(segmentation=[])), r"annotation 1 \(image 1\) has a bad segmentation: an empty polygon list"),
    (_coco(_ann_with(segmentation={"size": [4, 4], "counts": "zzzz"})), r"RLE counts do not describe a 4x4"),
    (_coco(_ann_with(segmentation={"size": [4, 4], "counts": [3, 2]})), r"RLE counts do not describe a 4x4"),
    (_coco(_ann_with(segmentation={"size": [8, 8], "counts": [64]})), r"RLE size \[8, 8\] is not the image's .* \[4, 4\]"),
])
def test_annotation_fields_are_checked(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SaqError, match=r"annotation file .*bad\.json.*" + match):
        load_coco(path, "task.data.ann_file")
    good = tmp_path / "good.json"  # the same file, fixed, loads
    good.write_text(_coco(_ann_with(segmentation={"size": [4, 4], "counts": [5, 2, 9]})))
    assert len(load_coco(good, "k").anns) == 1


def test_what_real_coco_files_hold_still_loads(tmp_path, capsys):
    # train2017 has zero-height boxes with two-point polygons (annotation 918), and calibration files are read
    # for their boxes only, so a box-only annotation (segmentation []) is fine there
    path = tmp_path / "real.json"
    path.write_text(_coco(_ann_with(bbox=[1.5, 2.0, 1.03, 0.0], area=0.0, segmentation=[[1.5, 2.0, 2.53, 2.0]])))
    coco = load_coco(path, "task.data.ann_file")
    assert coco.anns[1]["bbox"][3] == 0.0
    assert capsys.readouterr().out == (f"{path}: 1 ground-truth box without width or height (annotation 1): kept as "
                                       "objects; prompts=gt prompts them as they are\n")
    assert coco.annToMask(coco.anns[1]).shape == (4, 4)  # pycocotools took 4 numbers for a box and failed
    path.write_text(_coco(_ann_with(segmentation=[])))
    assert len(load_coco(path, "task.calib.ann_file", scored=False).anns) == 1
    # a crowd region as COCO writes it (RLE counts as a list, a float area, a 12-digit id), and iscrowd as a JSON
    # boolean (some exporters write one; pycocotools reads int(iscrowd))
    crowd = {"id": 900100581904, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 6.0, "bbox": [0, 0, 3, 2],
             "segmentation": {"size": [4, 4], "counts": [0, 2, 2, 2, 2, 2, 6]}}
    path.write_text(_coco(f"{_ann_with(area=4.5, iscrowd=False)}, {json.dumps(crowd)}"))
    coco = load_coco(path, "task.data.ann_file")
    assert coco.annToMask(coco.anns[900100581904]).sum() == 6 and coco.anns[900100581904]["area"] == 6.0
    assert [a["id"] for a in gt_boxes(coco, 1)[1]] == [1]  # the crowd region prompts nothing


@pytest.mark.parametrize("override,match", [
    ({"score": float("nan")}, r"entry 0 \(image 1, bbox .*, score nan\): the score must be in \[0, 1\]"),
    ({"score": -0.5}, r"entry 0 .*score -0\.5\): the score must be in \[0, 1\]"),
    ({"score": 3.0}, r"entry 0 .*score 3\.0\): the score must be in \[0, 1\]"),
    ({"bbox": [0, 0, -4, 5]}, r"entry 0 \(image 1, bbox \[0, 0, -4, 5\].*\): the box needs width and height > 0"),
    ({"bbox": [0, 0, float("inf"), 5]}, r"entry 0 \(image 1, bbox \[0, 0, inf, 5\].*\): the box has a non-finite"),
    ({"bbox": "1234"}, r"entry 0 is not a result"),
    ({"bbox": [50, 50, 20, 10, 0.3]}, r"entry 0 has a rotated bbox \[50, 50, 20, 10, 0.3\] \(cx, cy, w, h, angle: "
                                    r"mmrotate.s DOTAMetric json.*its Task1 txt files"),
    # int()/float() would have taken these: image 1.7 read as image 1, true as 1, strings as numbers
    ({"image_id": 1.7}, r"entry 0 has image_id 1\.7; expected an integer"),
    ({"image_id": True}, r"entry 0 has image_id True; expected an integer"),
    ({"category_id": 2.9}, r"entry 0 has category_id 2\.9; expected an integer"),
    ({"score": True}, r"entry 0 is not a result"),
    ({"bbox": ["0", "0", "5", "5"]}, r"entry 0 is not a result"),
    ({"bbox": [0, 0, 10**400, 5]}, r"entry 0 is not a result"),
])
def test_bad_detection_scores_and_boxes_name_the_entry(synthetic_root, tmp_path, override, match):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    with pytest.raises(SaqError, match=r"detections file .*d\.json: " + match):
        write_detections(tmp_path / "d.json", coco, [1], **override)


def test_detections_that_prompt_nothing_are_an_error(synthetic_root, tmp_path):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    for bad in (1.5, "abc"):
        with pytest.raises(SaqError, match=rf"prompts.score_threshold={bad!r} invalid; expected a finite number in "
                                           r"\[0, 1\]"):
            DetectionsFile(str(write_detections(tmp_path / "d.json", coco, [1]).path), score_threshold=bad)
    with pytest.raises(SaqError, match=r"prompts.max_per_image=2.5 invalid; expected an integer >= 1"):
        DetectionsFile(str(write_detections(tmp_path / "d.json", coco, [1]).path), max_per_image=2.5)
    low = write_detections(tmp_path / "low.json", coco, [1, 2], score=0.01)
    with pytest.raises(SaqError, match=r"low\.json: no detection on the 6 evaluated images reaches "
                                       r"prompts.score_threshold=0.05 \(the highest score is 0.01\)"):
        task_for(synthetic_root, low).evaluate(None, progress=False)  # refused before any inference
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SaqError, match=r"empty\.json: no detection on the 1 evaluated images .*the file has none"):
        task_for(synthetic_root, DetectionsFile(str(tmp_path / "empty.json")), max_images=1).evaluate(None)
    # the calibration file too: all below the threshold is said as such, not as "too few images"
    train = load_coco(synthetic_root / CALIB["ann_file"], "k")
    low_calib = write_detections(tmp_path / "low_calib.json", train, list(train.imgs), score=0.01).path
    with pytest.raises(SaqError, match=r"low_calib\.json: no detection on the 8 calibration images reaches "
                                       r"prompts.score_threshold=0.05 \(the highest score is 0.01\)"):
        task_for(synthetic_root, DetectionsFile(str(low.path), 0.05, calib_file=str(low_calib))).calibration_samples(2)
    # detections only on images that are not evaluated
    on_third = write_detections(tmp_path / "third.json", coco, [3])
    with pytest.raises(SaqError, match="no detection on the 2 evaluated images"):
        task_for(synthetic_root, on_third, max_images=2).evaluate(None)


def test_truncated_jpeg_is_named(synthetic_root, tmp_path):
    from tasks.base import read_rgb

    whole = (synthetic_root / "val" / "images" / "000001.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:2000])
    with pytest.raises(SaqError, match=r"cannot decode image .*cut\.jpg: the JPEG file is truncated"):
        read_rgb(tmp_path / "cut.jpg")
    (tmp_path / "padded.jpg").write_bytes(whole + b"\0\0trailer")  # bytes after the end marker are allowed
    assert np.array_equal(read_rgb(tmp_path / "padded.jpg"), read_rgb(synthetic_root / "val/images/000001.jpg"))


def test_exif_orientation_is_not_applied(tmp_path):
    from PIL import Image

    from tasks.base import read_rgb

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    image = read_rgb(tmp_path / "rotated.jpg")
    # annotation sizes, masks and label maps describe the stored pixels, not the displayed ones
    assert image.shape == (20, 40, 3)
    assert image[:, :10].mean() > 200 and image[:, 20:].mean() < 50


def test_integer_ids_written_as_floats_are_read_as_integers(synthetic_root, tmp_path):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    as_ints = write_detections(tmp_path / "ints.json", coco, [1])
    entries = json.loads((tmp_path / "ints.json").read_text())
    (tmp_path / "floats.json").write_text(json.dumps([{**d, "image_id": float(d["image_id"]),
                                                       "category_id": float(d["category_id"])} for d in entries]))
    as_floats = DetectionsFile(str(tmp_path / "floats.json"))  # labels passed through float arrays: 1.0, not 1.7
    assert as_floats._by_image == as_ints._by_image
    assert all(type(d[5]) is int for d in as_floats._by_image[1]) and list(as_floats._by_image) == [1]


@pytest.mark.parametrize("text, match", [
    ('{"image_id": 1}', "must be a JSON list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.9} {"a": 1}]', "Expecting ',' delimiter"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.9},', "Expecting value"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.9}] x', "Extra data"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.9}', "Expecting ',' delimiter"),
])
def test_a_detections_file_is_read_entry_by_entry_and_bad_json_is_named(tmp_path, text, match):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(SaqError, match=rf"detections file .*d\.json .*{match}"):
        DetectionsFile(str(path))


def test_only_the_detections_a_run_can_use_are_kept(tmp_path):
    entries = [{"image_id": 1, "category_id": 1, "bbox": [i, i, 4, 4], "score": s}
               for i, s in enumerate([0.2, 0.01, 0.9, 0.5, 0.9, 0.7])]
    path = tmp_path / "d.json"
    path.write_text("\n [ \r\n" + ",\n\t".join(json.dumps(e) for e in entries) + "\n ] \n")  # any JSON whitespace
    source = DetectionsFile(str(path), score_threshold=0.1, max_per_image=3)
    kept = source._by_image[1]
    # above the threshold, best first (the two 0.9s in file order); capped when handed out (after bind)
    assert [(d[0], d[4]) for d in kept] == [(2.0, 0.9), (4.0, 0.9), (5.0, 0.7), (3.0, 0.5), (0.0, 0.2)]
    got = source.for_image(1, BoxPrompts.empty(), (100, 100))
    assert got.boxes[:, 0].tolist() == [2.0, 4.0, 5.0] and got.scores.tolist() == pytest.approx([0.9, 0.9, 0.7])


def test_a_detection_off_its_image_is_refused_when_the_task_is_built_not_mid_evaluation(synthetic_root, tmp_path):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    last = sorted(coco.getImgIds())[-1]  # the last image evaluated: reached only after every other one
    height, width = coco.imgs[last]["height"], coco.imgs[last]["width"]
    dets = json.loads(write_detections(tmp_path / "d.json", coco, [1]).path.read_text())
    dets.append({"image_id": last, "category_id": dets[0]["category_id"], "bbox": [width + 10, 5, 20, 20],
                 "score": 0.9})  # a detector run at twice the resolution
    (tmp_path / "d.json").write_text(json.dumps(dets))
    with pytest.raises(SaqError, match=rf"image {last} has box .* wholly outside the {width}x{height} image"):
        task_for(synthetic_root, DetectionsFile(str(tmp_path / "d.json")))


def test_boxes_written_as_corners_in_a_coco_results_file_are_said(synthetic_root, tmp_path, capsys):
    """[x1, y1, x2, y2] read as [x, y, w, h] runs past the image on every box in its right or bottom half: said,
    since the AP it gives is merely low."""
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    good = write_detections(tmp_path / "xywh.json", coco, [1])
    task_for(synthetic_root, good)
    assert "run past their image" not in capsys.readouterr().out  # ground-truth boxes stay inside
    dets = json.loads(good.path.read_text())
    for det in dets:
        x, y, w, h = det["bbox"]
        det["bbox"] = [x, y, x + w, y + h]
    (tmp_path / "xyxy.json").write_text(json.dumps(dets))
    task_for(synthetic_root, DetectionsFile(str(tmp_path / "xyxy.json")))
    assert "boxes run past their image's right or bottom edge; a detector's boxes stay inside: is the file in " \
           "another box format (COCO results are [x, y, width, height])" in capsys.readouterr().out


def mm_entries(coco, image_ids, score=0.9):
    """mmdetection 3.x results for these images: their ground-truth boxes (xyxy), labels as the detector's class
    indices (the annotation file's category order), plus one box below the score threshold each."""
    import torch

    order = coco.getCatIds()
    entries = []
    for image_id in image_ids:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)] + [[1, 1, 9, 9]]
        entries.append({"img_id": image_id, "img_path": f"/data/val/{image_id:06d}.png", "ori_shape": (256, 256),
                        "pred_instances": {"bboxes": torch.tensor(boxes, dtype=torch.float32),
                                           "scores": torch.tensor([score] * len(anns) + [0.01]),
                                           "labels": torch.tensor([order.index(a["category_id"]) for a in anns] + [0]),
                                           "masks": [{"size": [256, 256], "counts": b"PPYo1"}] * (len(anns) + 1)}})
    return entries


def shuffled_categories(data):
    """The annotation file's categories listed in another order, with ids that have gaps (ids 10, 20, ... 80, listed
    last first): file order is then neither id order nor label + 1."""
    for ann in data["annotations"]:
        ann["category_id"] *= 10
    data["categories"] = [{**c, "id": c["id"] * 10} for c in reversed(data["categories"])]


def test_mmdetection_results_pickle_gives_the_same_prompts_as_its_json(synthetic_root, tmp_path, mm_results, capsys):
    import torch

    root = copy_with_annotations(synthetic_root, tmp_path, shuffled_categories)
    coco = load_coco(root / DATA["ann_file"], "k")
    assert coco.getCatIds() == [80, 70, 60, 50, 40, 30, 20, 10]
    from_pickle = DetectionsFile(str(mm_results(tmp_path / "results.pkl", mm_entries(coco, [1, 2]))), 0.05)
    from_json = write_detections(tmp_path / "dets.json", coco, [1, 2])
    task_for(root, from_pickle), task_for(root, from_json)  # binding maps the class indices
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    assert f"class index i is the i-th of the annotation file's categories, in file order: 0 → 80 ({names[80]}), " \
           f"1 → 70 ({names[70]})" in capsys.readouterr().out
    for image_id in (1, 2):
        got, want = from_pickle.for_image(image_id, None, (256, 256)), from_json.for_image(image_id, None, (256, 256))
        order = lambda p: np.lexsort(p.boxes.T[::-1])  # noqa: E731
        assert np.allclose(got.boxes[order(got)], want.boxes[order(want)], atol=1e-4)
        assert got.labels[order(got)].tolist() == want.labels[order(want)].tolist()  # dataset category ids
        assert len(got) == len(coco.getAnnIds(imgIds=image_id))  # the 0.01 box is below the threshold
    assert from_pickle.fingerprint() != from_json.fingerprint()
    # a detector of some of the classes: index i is the i-th of those in file order, whatever order they are named
    # in (mmdetection's CocoDataset: coco.get_cat_ids(cat_names=classes))
    some = [names[20], names[60], names[40]]  # file order: 60, 40, 20
    entries = mm_entries(coco, [1])
    labels = entries[0]["pred_instances"]["labels"]
    labels[:] = torch.arange(len(labels)) % 3
    subset = DetectionsFile(str(mm_results(tmp_path / "some.pkl", entries)), score_threshold=0, class_names=some)
    task_for(root, subset)
    # kept best first: the 0.9 boxes in file order, then the 0.01 one (the last)
    assert subset.for_image(1, None, (256, 256)).labels.tolist() == [[60, 40, 20][i % 3] for i in range(len(labels))]
    with pytest.raises(SaqError, match=r"prompts.class_names \(for .*some.pkl\) has 'zeppelin', which the task's "
                                       "annotation file does not name"):
        task_for(root, DetectionsFile(str(tmp_path / "some.pkl"), class_names=[names[20], names[60], "zeppelin"]))


def mm2x_results(coco, image_ids, masks_from=None) -> list:
    """mmdetection 2.x results for these images, in this order: per image a list per class (the annotation file's
    category order) of N x 5 arrays (x1, y1, x2, y2, score), their ground-truth boxes at 0.9 plus a 0.01 box; from
    image index masks_from on, a mask detector's (boxes, masks) tuple."""
    order = coco.getCatIds()
    results = []
    for n, image_id in enumerate(image_ids):
        per_class = [np.zeros((0, 5), np.float32) for _ in order]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            x, y, w, h = ann["bbox"]
            label = order.index(ann["category_id"])
            per_class[label] = np.concatenate([per_class[label], np.float32([[x, y, x + w, y + h, 0.9]])])
        per_class[0] = np.concatenate([per_class[0], np.float32([[1, 1, 9, 9, 0.01]])])
        masks = [[{"size": [256, 256], "counts": b"PPYo1"}] * len(a) for a in per_class]
        results.append((per_class, masks) if masks_from is not None and n >= masks_from else per_class)
    return results


def test_mmdetection_2x_results_pickle_is_keyed_by_the_annotation_files_image_order(synthetic_root, tmp_path, capsys):
    import pickle

    def shuffled(data):  # images listed neither by id nor by file name, categories as for the 3.x test
        shuffled_categories(data)
        data["images"] = data["images"][1::2] + data["images"][::2]

    root = copy_with_annotations(synthetic_root, tmp_path, shuffled)
    coco = load_coco(root / DATA["ann_file"], "k")
    ids = coco.getImgIds()  # the file's order, mmdetection 2.x CocoDataset's
    assert ids != sorted(ids)
    path = tmp_path / "v2.pkl"
    results = mm2x_results(coco, ids, masks_from=len(ids) // 2)
    results[2] = [np.zeros((0, 5), np.float32) for _ in coco.getCatIds()]  # the detector found nothing there
    path.write_bytes(pickle.dumps(results, protocol=2))
    from_pickle, from_json = DetectionsFile(str(path), 0.05), write_detections(tmp_path / "dets.json", coco, ids)
    capsys.readouterr()
    task_for(root, from_pickle), task_for(root, from_json)
    out = capsys.readouterr().out
    assert f"v2.pkl: mmdetection 2.x results name no image; entry i is the evaluated annotation file's i-th image, " \
           f"in file order (entry 0 → image {ids[0]})" in out
    assert "class index i is the i-th of the annotation file's categories, in file order: 0 → 80" in out
    for image_id in (ids[0], ids[1], ids[-1]):  # a box-only entry and a mask detector's
        got, want = from_pickle.for_image(image_id, None, (256, 256)), from_json.for_image(image_id, None, (256, 256))
        order = lambda p: np.lexsort(p.boxes.T[::-1])  # noqa: E731
        assert len(got) == len(coco.getAnnIds(imgIds=image_id)) > 0  # the 0.01 box is below the threshold
        assert np.allclose(got.boxes[order(got)], want.boxes[order(want)], atol=1e-4)
        assert got.labels[order(got)].tolist() == want.labels[order(want)].tolist()  # dataset category ids
    assert len(from_pickle.for_image(ids[2], None, (256, 256))) == 0
    # a detector of other classes than the file's: its class count is in the file, one array per class
    path.write_bytes(pickle.dumps([entry[:2] for entry in mm2x_results(coco, ids)], protocol=2))
    with pytest.raises(SaqError, match=r"v2\.pkl is of a detector of 2 classes \(mmdetection 2\.x writes one array per "
                                       r"class\) and there are 8 of the annotation file's categories: set "
                                       r"prompts\.class_names"):
        task_for(root, DetectionsFile(str(path), 0.05))
    with pytest.raises(SaqError, match=r"is of a detector of 2 classes .*; prompts\.class_names lists 3"):
        DetectionsFile(str(path), class_names=["a", "b", "c"])
    path.write_bytes(pickle.dumps([mm2x_results(coco, ids)[0], mm2x_results(coco, ids)[1][:7]], protocol=2))
    with pytest.raises(SaqError, match=r"entry 1 has arrays for 7 classes, entry 0 for 8"):
        DetectionsFile(str(path))
    # results on another annotation file (one image fewer) cannot be matched to these images
    path.write_bytes(pickle.dumps(mm2x_results(coco, ids[:-1]), protocol=2))
    with pytest.raises(SaqError, match=rf"v2\.pkl \(prompts\.file\) holds mmdetection 2\.x results for {len(ids) - 1} "
                                       rf"images, .* and the evaluated annotation file has {len(ids)}: it must be the "
                                       r"detector's results on that very file"):
        task_for(root, DetectionsFile(str(path), 0.05))
    # DOTA images are files, which mmrotate 0.x lists in no order these could be matched to
    path.write_bytes(pickle.dumps(mm2x_results(coco, ids[:2]), protocol=2))
    with pytest.raises(SaqError, match=r"holds mmdetection 2\.x results, which name no image .* write DOTA Task1 files"):
        DetectionsFile(str(path), class_names=["a"] * 8).bind(["P0001", "P0002"], ["a"] * 8)
    # mmrotate 0.x's rotated boxes (cx, cy, w, h, angle, score)
    path.write_bytes(pickle.dumps([[np.float32([[50, 50, 20, 10, 0.3, 0.9]])]], protocol=2))
    with pytest.raises(SaqError, match=r"entry 0 holds rotated boxes \(N x 6, mmrotate 0\.x\)"):
        DetectionsFile(str(path))


def test_a_results_pickle_never_runs_code_and_bad_ones_are_named(synthetic_root, tmp_path, mm_results):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([{"img_id": 1, "x": Payload()}], protocol=2))
    with pytest.raises(SaqError, match=r"holds a posix\.system, which a detector's results do not"):
        DetectionsFile(str(tmp_path / "evil.pkl"))
    assert not marker.exists()
    # neither 3.x's dicts nor 2.x's per-class lists
    (tmp_path / "odd.pkl").write_bytes(pickle.dumps([np.zeros((2, 5), np.float32)], protocol=2))
    with pytest.raises(SaqError, match=r"odd\.pkl: entry 0 is ndarray, not a list of per-class arrays; mmdetection "
                                       r"2\.x writes per image a list with an N x 5 array"):
        DetectionsFile(str(tmp_path / "odd.pkl"))
    # the same payload inside a tensor's storage bytes, which a plain tensor pickle hands to torch
    import torch.storage

    class EvilStorage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(Payload(), protocol=2),)

    (tmp_path / "storage.pkl").write_bytes(pickle.dumps([{"img_id": 1, "x": EvilStorage()}], protocol=2))
    with pytest.raises(SaqError, match=r"holds a tensor storage that is not plain tensor data \(Trying to load "
                                       r"unsupported GLOBAL posix\.system"):
        DetectionsFile(str(tmp_path / "storage.pkl"))
    assert not marker.exists()
    # protocol 4 looks a dotted name up attribute by attribute: torch + "_refs._isStorage" is not torch's dtype
    short = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731  SHORT_BINUNICODE
    (tmp_path / "dotted.pkl").write_bytes(b"\x80\x04" + short("torch") + short("_refs._isStorage") + b"\x93.")
    with pytest.raises(SaqError, match=r"holds a torch\._refs\._isStorage"):
        DetectionsFile(str(tmp_path / "dotted.pkl"))
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    good = mm_results(tmp_path / "good.pkl", mm_entries(coco, [1]))
    (tmp_path / "cut.pkl").write_bytes(good.read_bytes()[:200])
    with pytest.raises(SaqError, match="cut.pkl is not a readable results pickle"):
        DetectionsFile(str(tmp_path / "cut.pkl"))
    entries = mm_entries(coco, [1])
    entries[0]["pred_instances"]["labels"][0] = 8  # the annotation file defines 8 categories: indices 0-7
    with pytest.raises(SaqError, match="has label 8, but there are 8 of the annotation file's categories"):
        task_for(synthetic_root, DetectionsFile(str(mm_results(tmp_path / "label.pkl", entries))))
    entries = mm_entries(coco, [1])
    del entries[0]["pred_instances"]["scores"]
    with pytest.raises(SaqError, match=r"entry 0: pred_instances has no scores \(it has bboxes, labels, masks\); "
                                       r"expected bboxes, scores and labels as mmdetection 3\.x writes them$"):
        DetectionsFile(str(mm_results(tmp_path / "noscores.pkl", entries)))
    entries[0]["pred_instances"]["scores"] = "high"
    with pytest.raises(SaqError, match=r"entry 0: pred_instances\.scores is str; expected a tensor or array"):
        DetectionsFile(str(mm_results(tmp_path / "strscores.pkl", entries)))
    # only a pickle's labels are indices: names for a json or txt file are refused, unless the calibration's is one
    write_detections(tmp_path / "d.json", coco, [1])
    DetectionsFile(str(tmp_path / "d.json"), calib_file=str(good), class_names=["disk"])
    with pytest.raises(SaqError, match="prompts.class_names is for .pkl results"):
        DetectionsFile(str(tmp_path / "d.json"), class_names=["disk"])
    with pytest.raises(SaqError, match=r"prompts.class_names='disk' invalid"):
        DetectionsFile(str(good), class_names="disk")


def test_detections_repeated_exactly_are_named(synthetic_root, tmp_path, capsys):
    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    write_detections(tmp_path / "once.json", coco, [1, 2])
    assert "repeat another exactly" not in capsys.readouterr().out
    entries = json.loads((tmp_path / "once.json").read_text())
    (tmp_path / "twice.json").write_text(json.dumps(entries + entries))  # two result files joined
    twice = DetectionsFile(str(tmp_path / "twice.json"))
    assert f"{len(entries)} detections repeat another exactly (same image, box, score and class; first on image 1)" \
        in capsys.readouterr().out
    assert len(twice.for_image(1, None, (256, 256))) == 2 * len(coco.getAnnIds(imgIds=1))  # kept as given


def test_reading_a_large_detections_file_shows_its_progress(synthetic_root, tmp_path, mm_results, capsys,
                                                            monkeypatch):
    import tasks.prompts

    coco = load_coco(synthetic_root / DATA["ann_file"], "k")
    write_detections(tmp_path / "d.json", coco, [1, 2])
    pkl = mm_results(tmp_path / "d.pkl", mm_entries(coco, [1, 2]))
    DetectionsFile(str(tmp_path / "d.json")), DetectionsFile(str(pkl))
    assert "reading d." not in capsys.readouterr().err  # small files read at once: no bar
    monkeypatch.setattr(tasks.prompts, "LARGE_RESULTS_FILE", 0)  # as if they were large
    for path in (tmp_path / "d.json", pkl):
        bars = DetectionsFile(str(path))
        shown = capsys.readouterr().err
        assert f"reading {path.name}" in shown
        assert (f"checking {path.name}" in shown) == (path == pkl)  # a pickle's entries are checked after loading
        quiet = DetectionsFile(str(path), progress=False)  # progress=false: the run's bars are off
        assert "reading" not in capsys.readouterr().err and quiet._by_image == bars._by_image


def test_a_missing_image_is_named_when_the_task_is_built_and_calibration_needs_only_boxes(synthetic_root, tmp_path):
    root = copy_with_annotations(synthetic_root, tmp_path, lambda data: None)
    coco = load_coco(root / DATA["ann_file"], "k")
    missing = root / DATA["img_dir"] / coco.imgs[sorted(coco.imgs)[2]]["file_name"]
    missing.unlink()
    with pytest.raises(SaqError, match=rf"^image not found: {re.escape(str(missing))} \(annotation entry id "):
        task_for(root)  # before any evaluation, not when it reaches the image
    task_for(root, max_images=2)  # an image that is not evaluated may be missing
    # a calibration file is read for its boxes: one without segmentations (a detector's training list) is fine
    calib = json.loads((root / CALIB["ann_file"]).read_text())
    for ann in calib["annotations"]:
        del ann["segmentation"], ann["area"]
    (root / CALIB["ann_file"]).write_text(json.dumps(calib))
    assert task_for(root, max_images=2).calibration_samples(2)[0].num_prompts > 0
    # a missing calibration image names the calibration split's setting
    calib_missing = root / CALIB["img_dir"] / calib["images"][0]["file_name"]
    calib_missing.unlink()
    with pytest.raises(SaqError, match=rf"^image not found: {re.escape(str(calib_missing))} \(annotation entry id "
                                       rf"{calib['images'][0]['id']}; the images must be under task\.calib\.img_dir\)$"):
        task_for(root, max_images=2).calibration_samples(2)
    # an annotation path that is a folder, an image folder that is a file: said as such
    with pytest.raises(SaqError, match=r"^COCO annotation file .*annotations is a folder \(set k to a file\)$"):
        load_coco(root / "annotations", "k")
    from tasks.base import require_dir
    with pytest.raises(SaqError, match=r"^image folder .*instances_val\.json is a file \(set k to a folder\)$"):
        require_dir(root / DATA["ann_file"], "image", "k")


def test_evaluated_images_without_objects_are_refused_when_the_task_is_built(synthetic_root, tmp_path):
    # mask AP is undefined without objects: said now, not after every image has been segmented
    root = copy_with_annotations(synthetic_root, tmp_path, lambda data: data.update(annotations=[]))
    with pytest.raises(SaqError, match=r"^annotation file .*instances_val\.json has no objects \(crowd regions "
                                       r"aside\) on the 6 evaluated images, so mask AP is undefined"):
        task_for(root)

    def crowds_and_an_empty_first_image(data):  # crowd regions are not scored, nor prompted
        for ann in data["annotations"]:
            ann["iscrowd"] = int(ann["image_id"] != 3)
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]

    root = copy_with_annotations(synthetic_root, tmp_path / "b", crowds_and_an_empty_first_image)
    with pytest.raises(SaqError, match=r"on the 2 evaluated images \(the first by id: task\.max_images=2\)"):
        task_for(root, max_images=2)  # only the evaluated images count
    assert task_for(root, max_images=3).image_ids() == [1, 2, 3]  # image 3 has an object


def test_a_ground_truth_box_off_its_image_is_refused(tmp_path, capsys):
    path = tmp_path / "a.json"
    # labels of another image or resolution; as DOTA polygons, a box only partly inside stays (cut at a border)
    for bbox in ([4, 0, 2, 2], [0, -3, 2, 3], [-2.5, 1, 2.5, 1], [5, 5, 0, 0]):
        path.write_text(_coco(_ann_with(id=7, bbox=bbox)))
        with pytest.raises(SaqError, match=rf"^annotation file .*a\.json: annotation 7 has bbox "
                                           rf"{re.escape(str(bbox))} \(x, y, w, h\), wholly outside its image 1 "
                                           r"\(4x4\); boxes must be in the image's own pixel coordinates$"):
            load_coco(path, "task.data.ann_file")
    capsys.readouterr()
    for bbox in ([3, 3, 5, 5], [-1, -1, 2, 2], [4, 0, 0, 2], [0, 0, 0, 0]):  # partly inside, or a flat box on it
        path.write_text(_coco(_ann_with(bbox=bbox)))
        assert load_coco(path, "task.data.ann_file").anns[1]["bbox"] == bbox
        # a box running past its image (beyond a pixel of rounding) is kept, and said: COCO boxes enclose masks
        said = "1 ground-truth box runs past its image's edge (annotation 1)" in capsys.readouterr().out
        assert said == (bbox == [3, 3, 5, 5]), bbox
    # calibration files give box prompts only: a stray box off its image is left out, said, and the others stay
    path.write_text(_coco(",".join([_ann_with(id=3, bbox=[9, 0, 2, 2]), _ann_with(id=4, bbox=[1, 1, 2, 2]),
                                    _ann_with(id=5, bbox=[0, 9, 1, 1])])))
    assert sorted(load_coco(path, "task.calib.ann_file", scored=False).anns) == [4]
    assert (f"{path}: left out 2 calibration boxes wholly outside their images (annotation 3 and others); boxes "
            "must be in the image's own pixels") in capsys.readouterr().out


def test_an_unreadable_file_is_named_with_the_os_reason(tmp_path, monkeypatch):
    from pathlib import Path

    from tasks.base import read_rgb, read_text

    # a folder in a file's place: the same error path as a permission problem, and it works as root too
    (tmp_path / "a.json").mkdir()
    with pytest.raises(SaqError, match=r"^cannot read annotation file .*a\.json: Is a directory$"):
        read_text(tmp_path / "a.json", "annotation file")
    (tmp_path / "b.jpg").mkdir()
    with pytest.raises(SaqError, match=r"^cannot read image .*b\.jpg: Is a directory$"):
        read_rgb(tmp_path / "b.jpg")
    with pytest.raises(SaqError, match=r"^image not found: .*c\.jpg$"):
        read_rgb(tmp_path / "c.jpg")
    # an image without read permission is said as that, not as a corrupt file (root reads anything: simulated)
    (tmp_path / "d.png").write_bytes(b"")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(SaqError, match=r"^cannot read image .*d\.png: Permission denied$"):
        read_rgb(tmp_path / "d.png")
    # found from the image headers when the task is built, not when evaluation reaches the image
    import PIL.Image

    from tasks.base import HeaderSizes

    monkeypatch.setattr(PIL.Image, "open", denied)
    with pytest.raises(SaqError, match=r"^cannot read .*d\.png: Permission denied$"):
        HeaderSizes([("d", tmp_path / "d.png")]).get("d")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_is_named(tmp_path, synthetic_root):
    from tasks.base import read_rgb

    image = tmp_path / "a.jpg"
    image.write_bytes((synthetic_root / "val/images/000000.jpg").read_bytes())
    ann = tmp_path / "a.json"
    ann.write_text(_coco())
    for path in (image, ann):
        path.chmod(0)
    try:
        with pytest.raises(SaqError, match=r"^cannot read image .*a\.jpg: Permission denied$"):
            read_rgb(image)
        with pytest.raises(SaqError, match=r"^cannot read annotation file .*a\.json: Permission denied$"):
            load_coco(ann, "task.data.ann_file")
        root = copy_with_annotations(synthetic_root, tmp_path, lambda data: None)
        (root / "val/images/000002.jpg").chmod(0)
        with pytest.raises(SaqError, match=r"^cannot read .*000002\.jpg: Permission denied$"):
            task_for(root)  # when the task is built
    finally:
        for path in (image, ann, tmp_path / "copy/val/images/000002.jpg"):
            if path.exists():
                path.chmod(0o644)


def test_grey_rgba_and_palette_images_read_as_rgb_and_deep_ones_are_refused(tmp_path):
    from PIL import Image

    from tasks.base import read_rgb

    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0], rgb[:3, :, 1], rgb[..., 2] = 200, 90, np.arange(5) * 40
    grey = rgb[..., 2]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "grey.png"), np.dstack([grey] * 3))
    Image.fromarray(np.dstack([rgb, np.full((6, 5), 7, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), rgb)  # the colour, alpha dropped
    Image.fromarray(rgb).quantize(colors=16).save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(read_rgb(tmp_path / "palette.png"), rgb)  # the palette's colours, not indices
    # a 12-bit image in a 16-bit PNG: scaled down to 8 bits it would read nearly black, so it is refused by name
    deep = (np.arange(30).reshape(6, 5) * 100).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    with pytest.raises(SaqError, match=r"^image .*deep\.png has uint16 pixels; SAM takes 8 bits per channel: "
                                       r"convert the image to 8-bit"):
        read_rgb(tmp_path / "deep.png")
    Image.fromarray(deep.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(SaqError, match=r"^image .*float\.tif has float32 pixels"):
        read_rgb(tmp_path / "float.tif")
