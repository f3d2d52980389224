"""COCO-format instance segmentation: box prompts → one SAM mask each → mask AP (pycocotools) and prompt mIoU."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from saq.errors import SaqError, is_finite_number, is_int, is_number
from saq.sam.segmenter import PromptedImage, Segmenter
from tasks.base import (
    HeaderSizes,
    Task,
    check_image_size,
    files_digest,
    first_prompted,
    read_rgb,
    read_text,
    require_dir,
    require_file,
    split_paths,
)
from tasks.prompts import BoxPrompts, DetectionsFile, GroundTruthBoxes, PromptSource, outside_image
from tasks.synthetic import evaluation_limit


def load_coco(ann_path: Path, config_key: str, scored: bool = True) -> COCO:
    """Load a COCO annotation file, or raise SaqError saying what is wrong with it. scored: COCOeval will score
    against it, so every annotation needs an `area` and a box in its image (calibration files only give prompts:
    a box wholly off its image is left out, said in one line)."""
    require_file(ann_path, "COCO annotation file", config_key)
    try:
        data = json.loads(read_text(ann_path, "annotation file"))
    except json.JSONDecodeError as exc:
        raise SaqError(f"annotation file {ann_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise SaqError(f"annotation file {ann_path} is not COCO instance format "
                       "(needs 'images', 'annotations' and 'categories')")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise SaqError(f"annotation file {ann_path}: '{key}' must be a list (found {type(data[key]).__name__})")
    if not data["images"]:
        raise SaqError(f"annotation file {ann_path} lists no images")
    images = {}  # id -> (height, width)
    for i, info in enumerate(data["images"]):
        if not isinstance(info, dict) or not all(k in info for k in ("id", "file_name", "height", "width")):
            raise SaqError(f"annotation file {ann_path}: images[{i}] lacks one of id, file_name, height, width")
        if not is_int(info["id"]) or info["id"] in images:
            raise SaqError(f"annotation file {ann_path}: images[{i}] has id {info['id']!r}; image ids must be "
                           "unique integers")
        if not isinstance(info["file_name"], str) or not info["file_name"]:
            raise SaqError(f"annotation file {ann_path}: image {info['id']} has file_name {info['file_name']!r}; "
                           "expected the image's path under task.data.img_dir")
        if not (is_int(info["height"]) and is_int(info["width"]) and info["height"] > 0 and info["width"] > 0):
            raise SaqError(f"annotation file {ann_path}: image {info['id']} has height {info['height']!r} and width "
                           f"{info['width']!r}; they must be integers > 0")
        images[info["id"]] = (info["height"], info["width"])
    categories = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not is_int(cat.get("id")) or cat["id"] in categories:
            raise SaqError(f"annotation file {ann_path}: categories[{i}] needs an id, an integer unique among "
                           "the categories")
        categories.add(cat["id"])
    seen_ids, off_image, flat, past = set(), [], [], []
    for i, ann in enumerate(data["annotations"]):
        # a calibration file is read for its boxes only (box-only files, as detector training lists, are fine)
        needed = ("id", "image_id", "category_id", "bbox", *(("segmentation", "area") if scored else ()))
        if not isinstance(ann, dict) or not all(k in ann for k in needed):
            raise SaqError(f"annotation file {ann_path}: annotations[{i}] lacks one of {', '.join(needed)}")
        # COCOeval reads an object id of 0 as 'unmatched' and its index keeps one object per id: either would
        # score correct masks as misses without a word
        ann_id = ann["id"]
        if not is_int(ann_id) or ann_id < 1 or ann_id in seen_ids:
            again = ", which an earlier annotation has" if ann_id in seen_ids else ""
            raise SaqError(f"annotation file {ann_path}: annotations[{i}] has id {ann_id!r}{again}; ids must be "
                           "unique integers >= 1")
        seen_ids.add(ann_id)
        where = f"annotation file {ann_path}: annotation {ann_id}"
        if not is_int(ann["image_id"]) or ann["image_id"] not in images:
            raise SaqError(f"{where} has image_id {ann['image_id']!r}, which no entry of 'images' has")
        if not is_int(ann["category_id"]) or ann["category_id"] not in categories:
            raise SaqError(f"{where} has category_id {ann['category_id']!r}, which 'categories' does not define")
        # COCOeval skips a crowd region's matches and the object itself: a truthy string would hide it silently
        if not (isinstance(ann.get("iscrowd", 0), int) and ann.get("iscrowd", 0) in (0, 1)):  # 0/1 or false/true
            raise SaqError(f"{where} has iscrowd {ann['iscrowd']!r}; expected 0 or 1")
        ann.setdefault("iscrowd", 0)  # many converters leave it out; COCOeval reads it for every object
        # COCOeval ignores objects whose area lies outside [0, 1e10] (its 'all' range): they would drop out of AP
        if scored and not (is_finite_number(ann["area"]) and 0 <= ann["area"] <= 1e10):
            raise SaqError(f"{where} has area {ann['area']!r}; expected a number from 0 to 1e10 (the mask's "
                           "pixel count)")
        bbox = ann["bbox"]
        numbers = isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)
        # zero width or height is allowed: COCO train2017 itself holds such boxes (e.g. annotation 918)
        problem = ("it must be 4 numbers [x, y, w, h]" if not numbers
                   else "it has a non-finite value" if not all(is_finite_number(v) for v in bbox)
                   else "its width and height must be >= 0" if bbox[2] < 0 or bbox[3] < 0 else None)
        if problem:
            raise SaqError(f"{where} has bbox {bbox!r}: {problem}")
        if scored and (bbox[2] == 0 or bbox[3] == 0) and not ann["iscrowd"]:
            flat.append(ann_id)
        size = images[ann["image_id"]]
        if _box_outside(bbox, size) and not scored:  # a calibration prompt with no pixel: left out, said below
            off_image.append(ann_id)
            continue
        if _box_outside(bbox, size):  # labels of another image or resolution: a prompt with no pixel to segment
            raise SaqError(f"{where} has bbox {bbox!r} (x, y, w, h), wholly outside its image {ann['image_id']} "
                           f"({size[1]}x{size[0]}); boxes must be in the image's own pixel coordinates")
        # COCO boxes enclose their masks: one running past the image (beyond rounding) is labels of another size or
        # box format ([x1, y1, x2, y2] read as x, y, w, h); SAM would be prompted with the box as given
        if bbox[0] < -1 or bbox[1] < -1 or bbox[0] + bbox[2] > size[1] + 1 or bbox[1] + bbox[3] > size[0] + 1:
            past.append(ann_id)
        # masks are decoded only from files that are scored (calibration files give box prompts only)
        problem = _segmentation_problem(ann["segmentation"], size) if scored else None
        if problem:
            raise SaqError(f"{where} (image {ann['image_id']}) has a bad segmentation: {problem}")
        if scored and isinstance(ann["segmentation"], list):
            # pycocotools reads a polygon of 4 numbers as a box [x, y, w, h] and fails on it; repeating its last
            # point keeps the same (empty) polygon in a form it decodes
            ann["segmentation"] = [p + p[-2:] if len(p) == 4 else p for p in ann["segmentation"]]
    if not categories:
        raise SaqError(f"annotation file {ann_path} defines no categories")
    if off_image:  # one stray box in a large training list need not stop the run; a scored file refuses it above
        dropped = set(off_image)
        data["annotations"] = [a for a in data["annotations"] if a["id"] not in dropped]
        print(f"{ann_path}: left out {len(off_image)} calibration boxes wholly outside their images (annotation "
              f"{off_image[0]}{' and others' if len(off_image) > 1 else ''}); boxes must be in the image's own pixels")
    if past:
        many = len(past) > 1
        print(f"{ann_path}: {len(past)} ground-truth box{'es run' if many else ' runs'} past {'their' if many else 'its'} "
              f"image's edge (annotation {past[0]}{' and others' if many else ''}); COCO boxes enclose the "
              "object's mask inside the image: is the file in [x1, y1, x2, y2] rather than [x, y, width, height], or "
              "for images of another size? Kept as given")
    if flat:  # kept (COCO val/train hold a few), but a box prompt without area segments little: said, not silent
        print(f"{ann_path}: {len(flat)} ground-truth box{'es' if len(flat) > 1 else ''} without width or height "
              f"(annotation {flat[0]}{' and others' if len(flat) > 1 else ''}): kept as objects; prompts=gt prompts them "
              "as they are")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _box_outside(bbox: list, size: tuple[int, int]) -> bool:
    """Whether a COCO [x, y, w, h] box lies wholly outside an image of (height, width). A box without width or height
    (COCO itself holds some) is outside only when it does not touch the image either."""
    x, y, w, h = bbox
    if w > 0 and h > 0:
        return bool(outside_image(np.asarray([[x, y, x + w, y + h]], np.float64), size)[0])
    return x > size[1] or y > size[0] or x + w < 0 or y + h < 0


def _segmentation_problem(seg, size: tuple[int, int]) -> str | None:
    """Why a COCO segmentation (polygons, or RLE of the image's size) cannot be decoded, or None."""
    if isinstance(seg, list):
        if not seg:
            return "an empty polygon list"
        for poly in seg:
            # two-point polygons occur in real COCO files; pycocotools decodes them
            if not (isinstance(poly, list) and len(poly) >= 4 and len(poly) % 2 == 0
                    and all(is_finite_number(v) for v in poly)):
                return (f"polygon {str(poly)[:40]!r} is not a list of x, y numbers (at least 2 points); "
                        "expected [[x1, y1, x2, y2, x3, y3, ...], ...] or RLE {size, counts}")
        return None
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        return f"{str(seg)[:40]!r} is neither polygons [[x1, y1, ...], ...] nor RLE {{size, counts}}"
    if not isinstance(seg["size"], list) or seg["size"] != list(size):
        return f"RLE size {seg['size']!r} is not the image's [height, width] {list(size)}"
    try:
        counts = _rle_counts(seg["counts"]) if isinstance(seg["counts"], str) else seg["counts"]
        ok = isinstance(counts, list) and all(is_int(c) and c >= 0 for c in counts) \
            and sum(counts) == size[0] * size[1]
    except IndexError:
        ok = False
    return None if ok else f"RLE counts do not describe a {size[0]}x{size[1]} mask"


def _rle_counts(text: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' rleFrString, which does not check them)."""
    counts, p = [], 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


def categories_in_file_order(coco: COCO) -> dict[int, str | None]:
    """{category id: name} in annotation-file order (the order mmdetection numbers a detector's classes in)."""
    return {cat["id"]: cat.get("name") for cat in coco.dataset.get("categories", [])}


def shifted_categories_line(coco: COCO, source: PromptSource, image_ids: list[int]) -> str | None:
    """What to say when a detections file's classes look shifted against the annotations, or None. The best box on
    each labelled object (IoU >= 0.5, highest score) should mostly carry that object's category; when most carry the category
    a fixed number of places away in the file's list instead (a detector's class indices 0..N-1 written as ids 1..N),
    every one is a false positive to mask AP, and nothing else would say so."""
    order = {cid: i for i, cid in enumerate(categories_in_file_order(coco))}
    offsets: Counter = Counter()
    for image_id in image_ids:
        gt, _ = gt_boxes(coco, image_id)
        info = coco.imgs[image_id]
        dets = source.for_image(image_id, gt, (info["height"], info["width"]))
        if not len(dets) or not len(gt):
            continue
        xywh = [np.concatenate([b.boxes[:, :2], b.boxes[:, 2:] - b.boxes[:, :2]], 1).astype(np.float64)
                for b in (dets, gt)]
        iou = np.asarray(mask_utils.iou(xywh[0], xywh[1], [0] * len(gt))).reshape(len(dets), len(gt))
        # one vote per labelled object, its highest-scoring box: the low-score boxes of other classes a detector
        # leaves on every object (score_thr 0.05) would spread the votes and hide the shift
        voter: dict[int, int] = {}
        for d, g in enumerate(iou.argmax(1)):
            if iou[d, g] >= 0.5 and (g not in voter or dets.scores[d] > dets.scores[voter[g]]):
                voter[int(g)] = d
        for g, d in voter.items():
            offsets[order[int(dets.labels[d])] - order[int(gt.labels[g])]] += 1
    matched = sum(offsets.values())
    shift, most = max(((k, v) for k, v in offsets.items() if k), key=lambda kv: kv[1], default=(0, 0))
    if matched < 10 or offsets[0] >= matched / 2 or most <= matched / 2:
        return None
    return (f"of the {matched} labelled objects its boxes cover (IoU >= 0.5) on the evaluated images, the "
            f"highest-scoring box carries the object's category_id on {offsets[0]} and on {most} the category "
            f"{abs(shift)} place{'s' if abs(shift) > 1 else ''} "
            f"{'after' if shift > 0 else 'before'} it in the annotation file; are its ids shifted (a detector's class "
            "indices 0..N-1 written as category ids)? Mask AP counts such boxes as wrong")


def image_sizes(coco: COCO) -> dict[int, tuple[int, int]]:
    """{image id: (height, width)} from the annotation file (load_coco checked both)."""
    return {image_id: (info["height"], info["width"]) for image_id, info in coco.imgs.items()}


def gt_boxes(coco: COCO, image_id: int) -> tuple[BoxPrompts, list[dict]]:
    """Ground-truth xyxy boxes of an image's non-crowd annotations, with those annotations."""
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
    if not anns:
        return BoxPrompts.empty(), []
    xywh = np.asarray([a["bbox"] for a in anns], np.float32)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    return BoxPrompts(boxes, np.ones(len(anns), np.float32), np.asarray([a["category_id"] for a in anns])), anns


def read_annotated_image(coco: COCO, image_id: int, img_dir: Path,
                         config_key: str = "task.data.root / task.data.img_dir") -> np.ndarray:
    """An image as RGB, checked against the size its annotation entry gives (masks are decoded at that size).
    config_key: the setting that places img_dir, named when the image is missing."""
    info = coco.loadImgs(image_id)[0]
    path = img_dir / info["file_name"]
    if not path.is_file():
        raise missing_image(path, image_id, config_key)
    image = read_rgb(path)
    check_image_size(path, image.shape[:2], (info["height"], info["width"]), f"its annotation entry (id {image_id})")
    return image


def missing_image(path: Path, image_id: int, config_key: str) -> SaqError:
    return SaqError(f"image not found: {path} (annotation entry id {image_id}; the images must be under {config_key})")


def mask_ap(coco_gt: COCO, results: list[dict], image_ids: list[int], every_result: bool = True) -> dict:
    """COCO mask AP, AP50, AP75 (fractions) over the given images, area 'all'. every_result: every result an image
    has per category is scored (prompts from ground-truth objects: COCOeval's top 100 would count an image's
    101st prompted object of a class as a miss); False: COCOeval's standard 100 per image and category (a detector's
    boxes, as mmdetection's segm mAP ranks them)."""
    if not any(not a.get("iscrowd", 0) for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids))):
        # COCOeval would report its -1 sentinel: AP is undefined without ground-truth objects.
        raise SaqError(f"the {len(image_ids)} evaluated images have no ground-truth objects, so mask AP is "
                       "undefined (check the annotation file or task.max_images)")
    if not results:
        return {"mask_AP": 0.0, "mask_AP50": 0.0, "mask_AP75": 0.0}
    per_image_class = Counter((r["image_id"], r["category_id"]) for r in results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes adds fields to the dicts it is given
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.imgIds = image_ids
        ev.params.maxDets = [1, 10, max(100, *per_image_class.values()) if every_result else 100]
        ev.evaluate()
        ev.accumulate()
    # what COCOeval.summarize() prints as AP, AP50, AP75, at the largest maxDets (its stats assume exactly 100)
    precision = ev.eval["precision"][:, :, :, ev.params.areaRngLbl.index("all"), -1]  # T x R x K

    def ap(thresholds) -> float:
        values = precision[thresholds]
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    iou_thresholds = ev.params.iouThrs
    return {"mask_AP": ap(slice(None)), "mask_AP50": ap(np.isclose(iou_thresholds, 0.5)),
            "mask_AP75": ap(np.isclose(iou_thresholds, 0.75))}


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU matrix between N predicted and M ground-truth boolean masks (same H x W)."""
    p = pred.reshape(len(pred), -1).astype(np.float32)
    g = gt.reshape(len(gt), -1).astype(np.float32)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None] - inter
    return inter / np.maximum(union, 1)


def paired_mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of each predicted mask with the ground-truth mask at the same index (N each, same H x W)."""
    p, g = pred.reshape(len(pred), -1), gt.reshape(len(gt), -1)
    inter = (p & g).sum(1)
    return inter / np.maximum(p.sum(1) + g.sum(1) - inter, 1)


CALIB_ORDERS = ("file", "official")  # official: file order with images 0 and 8 swapped, as the paper's code does


class InstanceTask(Task):
    """Box prompts (ground truth, jittered, or detections) → single-mask SAM outputs → COCO mask AP."""

    name = "instance"

    def __init__(self, data: dict, calib: dict, prompts: PromptSource | None = None, max_images: int | None = None,
                 generate: dict | None = None):
        data = split_paths(data, ("root", "ann_file", "img_dir"), "task.data")
        calib = split_paths(calib, ("ann_file", "img_dir"), "task.calib", optional={"order": "file"})
        self.root = Path(data["root"])
        max_images = evaluation_limit(self.root, generate, max_images)
        self.ann_path = self.root / data["ann_file"]
        self.img_dir = self.root / data["img_dir"]
        self.calib_ann_path = self.root / calib["ann_file"]
        self.calib_img_dir = self.root / calib["img_dir"]
        self.calib_order = calib["order"]
        if self.calib_order not in CALIB_ORDERS:
            raise SaqError(f"task.calib.order={self.calib_order!r} is unknown; expected one of {list(CALIB_ORDERS)}")
        self.prompts = prompts or GroundTruthBoxes()
        self.max_images = max_images
        self.coco = load_coco(self.ann_path, "task.data.root / task.data.ann_file")
        self._require_objects()
        require_dir(self.img_dir, "image", "task.data.root / task.data.img_dir")
        # sizes from the image headers now, not when evaluation reaches an image hours into a run
        paths = {i: self.img_dir / self.coco.imgs[i]["file_name"] for i in self.image_ids()}
        headers = HeaderSizes(paths.items())
        for image_id, path in paths.items():
            info, size = self.coco.imgs[image_id], headers.get(image_id)
            if size is None and not path.is_file():  # found now, not when evaluation reaches it
                raise missing_image(path, image_id, "task.data.root / task.data.img_dir")
            if size is not None:
                check_image_size(path, size, (info["height"], info["width"]), f"its annotation entry (id {image_id})")
        self.prompts.bind(self.coco.getImgIds(), category_ids=categories_in_file_order(self.coco),
                          image_sizes=image_sizes(self.coco))
        if isinstance(self.prompts, DetectionsFile):
            line = shifted_categories_line(self.coco, self.prompts, self.image_ids())
            if line:
                print(f"detections file {self.prompts.path}: {line}")

    def _require_objects(self) -> None:
        """SaqError now when the evaluated images hold no (non-crowd) object: mask AP would be undefined, found only
        after the whole evaluation."""
        ids = self.image_ids()
        if not any(not a.get("iscrowd", 0) for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=ids))):
            limit = f" (the first by id: task.max_images={self.max_images})" if self.max_images else ""
            raise SaqError(f"annotation file {self.ann_path} has no objects (crowd regions aside) on the {len(ids)} "
                           f"evaluated images{limit}, so mask AP is undefined; nothing to evaluate")

    def image_ids(self) -> list[int]:
        ids = sorted(self.coco.getImgIds())
        return ids[: self.max_images] if self.max_images else ids

    def fingerprint(self) -> str:
        images = [self.img_dir / self.coco.imgs[i]["file_name"] for i in self.image_ids()]
        return (f"instance|{self.ann_path.resolve()}|{files_digest([self.ann_path, *images])}|{self.max_images}|"
                f"{self.prompts.fingerprint()}")

    def check_calibration_split(self) -> None:
        require_file(self.calib_ann_path, "COCO calibration annotation file", "task.calib.ann_file")
        require_dir(self.calib_img_dir, "calibration image", "task.calib.img_dir")

    def calibration_samples(self, n: int, knob: str = "quant.calib_images") -> list[PromptedImage]:
        """The first n calibration images (annotation-file order) that get prompts from the run's prompt source
        (a detections source uses prompts.calib_file, else ground truth); task.calib.order=official then swaps
        images 0 and 8 as the paper's code does (so BIG and PCC see the 9th)."""
        coco = load_coco(self.calib_ann_path, "task.calib.ann_file", scored=False)
        source, self.calibration_prompts = self.prompts.calibration_source()
        image_ids = list(coco.imgs)  # insertion order = the order of the annotation file's "images" list
        source.bind(image_ids, category_ids=categories_in_file_order(coco), image_sizes=image_sizes(coco))

        def sample_for(image_id) -> PromptedImage | None:
            gt, _ = gt_boxes(coco, image_id)
            info = coco.imgs[image_id]
            prompts = source.for_image(image_id, gt, (info["height"], info["width"]))
            return PromptedImage(read_annotated_image(coco, image_id, self.calib_img_dir, "task.calib.img_dir"),
                                 boxes=prompts.boxes, image_id=image_id) if len(prompts) else None

        samples = first_prompted(image_ids, n, sample_for, source, self.calib_ann_path, self.calibration_prompts, knob)
        if self.calib_order == "official":
            if n >= 9:
                samples[0], samples[8] = samples[8], samples[0]
            elif knob == "quant.calib_images":  # the swap would silently do nothing to the calibration set
                raise SaqError(f"task.calib.order=official swaps calibration images 0 and 8, so it needs "
                               f"{knob} >= 9 (got {n}); use task.calib.order=file")
        return samples

    def evaluate(self, segmenter: Segmenter, progress: bool = True) -> dict:
        results, prompt_ious = [], []
        ids = self.image_ids()
        self.prompts.require_prompts(ids)
        for image_id in tqdm(ids, desc="instance eval", disable=not progress, leave=False):
            image = read_annotated_image(self.coco, image_id, self.img_dir)
            gt, anns = gt_boxes(self.coco, image_id)
            prompts = self.prompts.for_image(image_id, gt, image.shape[:2])
            if not len(prompts):
                continue
            segmenter.set_image(image)
            gt_masks = np.stack([self.coco.annToMask(a).astype(bool) for a in anns]) if anns else None
            offset = 0
            for chunk in segmenter.predict_chunks(boxes=prompts.boxes):
                masks = chunk.masks[:, 0].cpu().numpy()
                iou_scores = chunk.iou_scores[:, 0].cpu().numpy()
                for j, m in enumerate(masks):
                    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    k = offset + j
                    results.append({"image_id": image_id, "category_id": int(prompts.labels[k]),
                                    "segmentation": rle, "score": float(prompts.scores[k] * iou_scores[j])})
                if gt_masks is None:  # a detection on an image without objects matches nothing
                    prompt_ious.extend(np.zeros(len(masks)))
                else:
                    if self.prompts.from_ground_truth:  # each prompt's own object: pairs, not the whole matrix
                        prompt_ious.extend(paired_mask_iou(masks, gt_masks[offset:offset + len(masks)]))
                    else:
                        prompt_ious.extend(mask_iou(masks, gt_masks).max(1))
                offset += len(masks)
        metrics = mask_ap(self.coco, results, ids, every_result=self.prompts.from_ground_truth)
        metrics["mIoU"] = float(np.mean(prompt_ious)) if prompt_ious else 0.0
        metrics["images"] = len(ids)
        metrics["prompts"] = len(results)
        return metrics
