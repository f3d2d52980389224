"""DOTA-format oriented object detection: horizontal box prompts → one SAM mask each → rotated boxes → DOTA mAP@0.5."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
from tqdm import tqdm

from saq.errors import SaqError, check_choice, check_int
from saq.sam.segmenter import PromptedImage, Segmenter
from tasks.base import (
    HeaderSizes,
    Task,
    check_class_names,
    files_digest,
    first_prompted,
    list_images,
    read_rgb,
    read_text,
    require_dir,
    split_paths,
)
from tasks.prompts import BoxPrompts, GroundTruthBoxes, PromptSource, enclosing_boxes, outside_image
from tasks.synthetic import evaluation_limit, oriented_box

# DOTA-v1.x label files may open with these metadata lines.
HEADER_PREFIXES = ("imagesource:", "gsd:")
# voc07: 11-point interpolated AP (the DOTA devkit's and mmrotate's default); area: area under the PR curve.
AP_METHODS = ("voc07", "area")
# How a rotated box is ranked for AP: MMRotate-SAM (the pipeline PTQ4SAM's DOTA numbers come from) keeps the
# detector's score; ground-truth and jittered boxes all score 1, so there SAM's predicted IoU is what ranks them.
DETECTION_SCORES = ("auto", "detector", "detector_x_iou")
IOU_THRESHOLD = 0.5
# How detections meet objects: dota_devkit (dota_evaluation_task1.py) matches the labelled quadrilaterals at IoU > 0.5;
# mmrotate's DOTAMetric, which MMRotate-SAM evaluates with, first turns each quadrilateral into its minimum-area
# rotated box (the test pipeline's qbox -> rbox) and matches at IoU >= 0.5.
PROTOCOLS = ("dota_devkit", "mmrotate")


@dataclass
class DotaObjects:
    """The annotated objects of one image, in label-file order."""

    polygons: np.ndarray  # N x 4 x 2 float64, corners (x, y)
    names: list[str]
    difficult: np.ndarray  # N bool
    lines: list[int]  # each object's line in its label file, for messages

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class RotatedDetection:
    """One detection: an image key, a class index, a score and a 4-corner polygon."""

    image: str
    label: int
    score: float
    polygon: np.ndarray  # 4 x 2


def read_dota_labels(path: Path, difficult_above: int = 0) -> DotaObjects:
    """Parse a DOTA label file: 'x1 y1 x2 y2 x3 y3 x4 y4 class difficulty' lines, after optional header lines.

    An object is difficult (left out of mAP) when its difficulty is above `difficult_above`: 0 as the DOTA devkit
    (every flagged object), 100 as mmrotate's DOTADataset default diff_thr (none). The difficulty column may be
    missing (then 0); a malformed line raises SaqError naming the file and line.
    """
    polygons, names, difficult, linenos = [], [], [], []
    for lineno, raw in enumerate(read_text(path, "DOTA label file").splitlines(), 1):
        line = raw.strip()
        if not line or line.lower().startswith(HEADER_PREFIXES):
            continue
        parts = line.split()
        try:
            if len(parts) not in (9, 10):
                raise ValueError
            coords = [float(v) for v in parts[:8]]
            if not np.isfinite(coords).all():
                raise ValueError
            hard = int(parts[9]) if len(parts) == 10 else 0
        except ValueError:
            raise SaqError(f"DOTA label file {path}, line {lineno}: expected "
                           f"'x1 y1 x2 y2 x3 y3 x4 y4 class difficult', got {line!r}") from None
        if len(parts) == 9 and parts[8].lstrip("-").isdigit():  # the difficulty column, with the class missing
            raise SaqError(f"DOTA label file {path}, line {lineno}: no class name after the 8 coordinates, "
                           f"got {line!r}")
        polygons.append(np.asarray(coords, np.float64).reshape(4, 2))
        names.append(parts[8])
        difficult.append(hard > difficult_above)
        linenos.append(lineno)
    if polygons:
        # A polygon of zero area (corners on a line or repeated) can match nothing: a broken label, not an object.
        flat = shapely.area(_shapes(np.asarray(polygons))) <= 0
        if flat.any():
            i = int(np.argmax(flat))
            raise SaqError(f"DOTA label file {path}, line {linenos[i]}: the polygon "
                           f"{polygons[i].reshape(-1).tolist()} has zero area")
    return DotaObjects(np.asarray(polygons, np.float64).reshape(-1, 4, 2), names, np.asarray(difficult, bool), linenos)


def check_objects_inside(objs: DotaObjects, path: Path, image: Path, size: tuple[int, int] | None) -> None:
    """SaqError naming the label file and line of a polygon wholly outside its image of (height, width) (labels of
    another image or resolution); one partly outside stays (patch splitters cut objects at the patch border)."""
    if size is None or not len(objs):
        return
    outside = outside_image(enclosing_boxes(objs.polygons), size)
    if outside.any():
        i = int(np.argmax(outside))
        raise SaqError(f"DOTA label file {path}, line {objs.lines[i]}: the polygon {objs.polygons[i].reshape(-1).tolist()} "
                       f"lies wholly outside its image {image} ({size[1]}x{size[0]}); labels must be in the image's own "
                       "pixel coordinates")


def label_file(ann_dir: Path, stem: str, image: Path) -> Path:
    """The label file of an image; every image needs one (an empty file for an image with no objects)."""
    path = ann_dir / f"{stem}.txt"
    if not path.is_file():
        raise SaqError(f"image {image} has no label file {path} (DOTA needs one per image; write an empty file "
                       "for an image with no objects)")
    return path


def _shapes(polygons: np.ndarray) -> np.ndarray:
    """Shapely polygons; a self-crossing corner order (a 'bow tie', seen in DOTA labels) becomes its convex hull."""
    shapes = shapely.polygons(np.asarray(polygons, np.float64))
    bad = ~shapely.is_valid(shapes)
    if bad.any():
        shapes[bad] = shapely.convex_hull(shapes[bad])
    return shapes


def polygon_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact IoU matrix between N and M polygons given as N x K x 2 and M x K x 2 corner arrays."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    pa, pb = _shapes(a), _shapes(b)
    inter = shapely.area(shapely.intersection(pa[:, None], pb[None, :]))
    union = shapely.area(pa)[:, None] + shapely.area(pb)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str) -> float:
    """AP from a PR curve: VOC07 11-point interpolation or the area under the interpolated curve."""
    if method == "voc07":
        # The DOTA devkit's and mmrotate's thresholds, float error included (np.arange gives 0.30000000000000004,
        # so a recall of exactly 0.3 misses that point), so our AP matches theirs digit for digit.
        return float(sum(precision[recall >= t].max(initial=0.0) for t in np.arange(0.0, 1.1, 0.1)) / 11.0)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def rotated_boxes_of(polygons: np.ndarray) -> np.ndarray:
    """Each quadrilateral's minimum-area rotated rectangle as 4 corners (mmrotate's qbox -> rbox, cv2.minAreaRect
    of the 4 corners). A quadrilateral that is a rectangle already stays as labelled: its float32 round trip would
    move an IoU of exactly 0.5 below the threshold."""
    boxes = []
    for quad in np.asarray(polygons, np.float64):
        edges = np.roll(quad, -1, 0) - quad
        lengths = np.hypot(edges[:, 0], edges[:, 1])
        right_angles = np.abs(np.sum(edges * np.roll(edges, -1, 0), 1)) <= 1e-9 * np.maximum(
            lengths * np.roll(lengths, -1), 1e-12)
        boxes.append(quad if right_angles.all() else cv2.boxPoints(cv2.minAreaRect(quad.astype(np.float32))))
    return np.stack(boxes).astype(np.float64) if boxes else np.zeros((0, 4, 2))


def rotated_map(detections: Sequence[RotatedDetection], ground_truth: dict[str, tuple[np.ndarray, np.ndarray,
                np.ndarray]], classes: Sequence[str], ap_method: str = "voc07",
                iou_threshold: float = IOU_THRESHOLD, protocol: str = "dota_devkit") -> dict:
    """DOTA Task-1 mAP with exact polygon IoU, as the DOTA devkit or mmrotate's DOTAMetric computes it (PROTOCOLS).

    ground_truth: image key -> (polygons N x 4 x 2, class indices N, difficult N). Detections are taken by
    descending score; one whose best-overlapping object (IoU above the threshold; at it too with mmrotate) is
    difficult counts neither as a true nor a false positive, and difficult objects are not counted in recall.
    Classes without a non-difficult object get AP None and are left out of the mean (as mmdetection/mmrotate do).
    """
    check_choice(ap_method, "task.ap_method", AP_METHODS)
    check_choice(protocol, "task.protocol", PROTOCOLS)
    if protocol == "mmrotate":
        ground_truth = {key: (rotated_boxes_of(polys), labels, hard) for key, (polys, labels, hard)
                        in ground_truth.items()}
    # the devkit needs IoU > threshold, mmrotate IoU >= threshold
    misses = np.less_equal if protocol == "dota_devkit" else np.less
    per_class, gt_counts = {}, {}
    for c, name in enumerate(classes):
        gts = {key: (polys[labels == c], difficult[labels == c]) for key, (polys, labels, difficult)
               in ground_truth.items()}
        npos = int(sum((~hard).sum() for _, hard in gts.values()))
        gt_counts[name] = npos
        dets = [d for d in detections if d.label == c]
        if npos == 0:
            per_class[name] = None
            continue
        order = np.argsort([-d.score for d in dets], kind="stable")
        # IoUs of each detection with the objects of its image, computed per image in one call.
        by_image: dict[str, list[int]] = {}
        for i in order:
            by_image.setdefault(dets[i].image, []).append(int(i))
        overlaps = {}
        for key, idx in by_image.items():
            polys = gts[key][0] if key in gts else np.zeros((0, 4, 2))
            ious = polygon_iou(np.stack([dets[i].polygon for i in idx]), polys)
            overlaps.update({i: row for i, row in zip(idx, ious)})
        taken = {key: np.zeros(len(hard), bool) for key, (_, hard) in gts.items()}
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for rank, i in enumerate(order):
            ious = overlaps[int(i)]
            if ious.size == 0 or misses(ious.max(), iou_threshold):
                fp[rank] = 1
                continue
            best = int(ious.argmax())
            key = dets[i].image
            if gts[key][1][best]:
                continue  # matched a difficult object: ignored
            if taken[key][best]:
                fp[rank] = 1
            else:
                tp[rank] = taken[key][best] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[name] = average_precision(recall, precision, ap_method)
    aps = [ap for ap in per_class.values() if ap is not None]
    return {"mAP50": float(np.mean(aps)) if aps else 0.0, "AP50_per_class": per_class, "objects_per_class": gt_counts}


def detection_score(score: str, prompts: PromptSource) -> str:
    """task.score resolved for the prompt source: auto is the detector's score for detections (MMRotate-SAM's
    ranking) and detector score × SAM's predicted IoU for ground-truth or jittered boxes (every score 1)."""
    check_choice(score, "task.score", DETECTION_SCORES)
    if score == "auto":
        return "detector_x_iou" if prompts.from_ground_truth else "detector"
    if score == "detector" and prompts.from_ground_truth:
        raise SaqError("task.score=detector ranks boxes by their detector score, but ground-truth and jittered "
                       "prompts all score 1 (their ranking would be arbitrary); use task.score=auto or "
                       "detector_x_iou, or prompts=detections")
    return score


class OrientedTask(Task):
    """Horizontal box prompts (ground-truth enclosing boxes, jittered, or detections) → single-mask SAM outputs →
    minimum-area rotated rectangles of each mask's pixels (as MMRotate-SAM does) → DOTA mAP@0.5.

    Images are keyed by file stem. Every image needs a label file (empty for no objects); label files without an
    image are ignored. A mask that comes out empty stays a detection with a zero box (counted in `empty_masks`).
    """

    name = "oriented"

    def __init__(self, data: dict, calib: dict, prompts: PromptSource | None = None, max_images: int | None = None,
                 generate: dict | None = None, classes: Sequence[str] | None = None, ap_method: str = "voc07",
                 difficult_above: int = 0, score: str = "auto", protocol: str = "dota_devkit"):
        data = split_paths(data, ("root", "img_dir", "ann_dir"), "task.data")
        calib = split_paths(calib, ("img_dir", "ann_dir"), "task.calib")
        self.root = Path(data["root"])
        self.difficult_above = check_int(difficult_above, "task.difficult_above", 0)
        check_choice(ap_method, "task.ap_method", AP_METHODS)
        self.protocol = check_choice(protocol, "task.protocol", PROTOCOLS)
        if protocol == "mmrotate" and self.difficult_above == 0:
            print("task.protocol=mmrotate matches as mmrotate's DOTAMetric, but task.difficult_above=0 leaves "
                  "difficult objects out as the DOTA devkit does; mmrotate's DOTADataset counts them (diff_thr=100): "
                  "add task.difficult_above=100 for mmrotate's figures")
        prompts = prompts or GroundTruthBoxes()
        self.score = detection_score(score, prompts)
        if classes is not None:
            # names as the label files write them; a count (as task=semantic takes) cannot say which names
            if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
                raise SaqError(f"task.classes must be a list of class names as the DOTA label files write them "
                               f"(e.g. [plane, ship]) or null to take them from the files, got {classes!r}")
            classes = check_class_names([str(c) for c in classes], "task.classes")
        # after every plain setting is checked: it may generate the synthetic dataset, which takes minutes
        max_images = evaluation_limit(self.root, generate, max_images)
        self.img_dir, self.ann_dir = self.root / data["img_dir"], self.root / data["ann_dir"]
        self.calib_img_dir, self.calib_ann_dir = self.root / calib["img_dir"], self.root / calib["ann_dir"]
        self.max_images, self.ap_method = max_images, ap_method
        all_images = list_images(self.img_dir, "task.data.root / task.data.img_dir")
        require_dir(self.ann_dir, "DOTA label (labelTxt)", "task.data.root / task.data.ann_dir")
        self.images = all_images[:max_images] if max_images else all_images
        self.label_files = [label_file(self.ann_dir, stem, path) for stem, path in self.images]
        self.objects = {stem: read_dota_labels(f, self.difficult_above)
                        for (stem, _), f in zip(self.images, self.label_files)}
        sizes = HeaderSizes(all_images)  # before any inference, as detections are checked (bind, below)
        for (stem, path), f in zip(self.images, self.label_files):
            check_objects_inside(self.objects[stem], f, path, sizes.get(stem))
        found = sorted({n for objs in self.objects.values() for n in objs.names})
        if classes is None:
            self.classes = found
        else:
            self.classes = classes
            known = set(self.classes)
            for (stem, _), f in zip(self.images, self.label_files):
                unknown = [n for n in self.objects[stem].names if n not in known]
                if unknown:
                    raise SaqError(f"DOTA label file {f} has class {unknown[0]!r}, not in task.classes "
                                   f"{self.classes}")
        if not self.classes:
            raise SaqError(f"the label files in {self.ann_dir} hold no objects; nothing to evaluate")
        if not any((~objs.difficult).any() for objs in self.objects.values()):  # DOTA's mAP scores none
            raise SaqError(f"the label files in {self.ann_dir} hold only difficult objects (or none), which DOTA's "
                           f"mAP does not count (task.difficult_above={self.difficult_above}); nothing to evaluate")
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.prompts = prompts
        # Classes inferred from the evaluated labels: a detector's other classes have no objects here to score.
        self.prompts.bind([stem for stem, _ in all_images], self.classes, drop_unknown=classes is None,
                          image_sizes=sizes)

    def ground_truth(self, stem: str) -> tuple[BoxPrompts, np.ndarray, np.ndarray]:
        """An image's enclosing boxes as prompts (score 1, class index), with its polygons and difficult flags."""
        objs = self.objects[stem]
        labels = np.asarray([self.class_index[n] for n in objs.names], np.int64)
        boxes = BoxPrompts(enclosing_boxes(objs.polygons), np.ones(len(objs), np.float32), labels)
        return boxes, objs.polygons, objs.difficult

    def fingerprint(self) -> str:
        digest = files_digest([*self.label_files, *(path for _, path in self.images)])
        return f"oriented|{self.ann_dir.resolve()}|{digest}|{self.max_images}|{self.classes}|" \
               f"{self.ap_method}|{self.difficult_above}|{self.score}|{self.prompts.fingerprint()}" + \
               ("" if self.protocol == "dota_devkit" else f"|{self.protocol}")  # FP caches of before stay valid

    def check_calibration_split(self) -> None:
        if self.prompts.calibration_uses_ground_truth:  # a detector's boxes (prompts.calib_file) need no labels
            require_dir(self.calib_ann_dir, "calibration DOTA label", "task.calib.ann_dir")
        require_dir(self.calib_img_dir, "calibration image", "task.calib.img_dir")

    def calibration_samples(self, n: int, knob: str = "quant.calib_images") -> list[PromptedImage]:
        """First n images of the calibration split (by file stem) that get prompts from the run's prompt source
        (a detections source uses prompts.calib_file, and then the split needs no label files; else the objects'
        enclosing boxes)."""
        images = list_images(self.calib_img_dir, "task.calib.img_dir")
        source, self.calibration_prompts = self.prompts.calibration_source()
        if source.from_ground_truth:
            require_dir(self.calib_ann_dir, "calibration DOTA label", "task.calib.ann_dir")
        # every class kept: calibration prompts with boxes only, and the evaluated images' classes (task.classes=null)
        # need not be the calibration images'
        source.bind([stem for stem, _ in images], self.classes, image_sizes=HeaderSizes(images), keep_unknown=True)
        paths = dict(images)

        def sample_for(stem: str) -> PromptedImage | None:
            image = read_rgb(paths[stem])
            gt = BoxPrompts.empty()
            if source.from_ground_truth:
                path = label_file(self.calib_ann_dir, stem, paths[stem])
                objs = read_dota_labels(path, self.difficult_above)
                check_objects_inside(objs, path, paths[stem], image.shape[:2])
                gt = BoxPrompts(enclosing_boxes(objs.polygons), np.ones(len(objs), np.float32),
                                np.zeros(len(objs), np.int64))
            prompts = source.for_image(stem, gt, image.shape[:2])
            return PromptedImage(image, boxes=prompts.boxes, image_id=stem) if len(prompts) else None

        return first_prompted(list(paths), n, sample_for, source, self.calib_img_dir, self.calibration_prompts, knob)

    def evaluate(self, segmenter: Segmenter, progress: bool = True) -> dict:
        detections, ground_truth, box_ious = [], {}, []
        n_prompts = empty = 0
        self.prompts.require_prompts([stem for stem, _ in self.images])
        for stem, path in tqdm(self.images, desc="oriented eval", disable=not progress, leave=False):
            gt, polygons, difficult = self.ground_truth(stem)
            ground_truth[stem] = (polygons, gt.labels, difficult)
            image = read_rgb(path)
            prompts = self.prompts.for_image(stem, gt, image.shape[:2])
            if not len(prompts):
                continue
            segmenter.set_image(image)
            offset = 0
            for chunk in segmenter.predict_chunks(boxes=prompts.boxes):
                masks = chunk.masks[:, 0].cpu().numpy()
                iou_scores = chunk.iou_scores[:, 0].float().cpu().numpy()
                for j, mask in enumerate(masks):
                    k = offset + j
                    # an empty mask stays a detection, with a zero box at the origin: MMRotate-SAM's boxes from
                    # masks (cv2.minAreaRect of no points) keep it at its score as a false positive; dropping it
                    # would rank a model that loses objects above one that outlines them badly
                    empty += not mask.any()
                    corners = oriented_box(mask).astype(np.float64) if mask.any() else np.zeros((4, 2))
                    score = prompts.scores[k] * (iou_scores[j] if self.score == "detector_x_iou" else 1.0)
                    detections.append(RotatedDetection(stem, int(prompts.labels[k]), float(score), corners))
                    if self.prompts.from_ground_truth:
                        box_ious.append(float(polygon_iou(corners[None], polygons[k:k + 1])[0, 0]))
                offset += len(masks)
            n_prompts += len(prompts)
        metrics = rotated_map(detections, ground_truth, self.classes, self.ap_method, protocol=self.protocol)
        # Prompted object's rotated box vs its own polygon: a quantization-sensitive signal beside mAP.
        # Only ground-truth prompts pair a mask with its object; other prompt sources leave the metric out.
        if self.prompts.from_ground_truth:
            metrics["rbox_mIoU"] = float(np.mean(box_ious)) if box_ious else 0.0
        metrics["images"] = len(self.images)
        metrics["prompts"] = n_prompts
        metrics["empty_masks"] = empty
        return metrics
