"""Label-map semantic segmentation, Semantic-Segment-Anything style: SAM's masks vote on a coarse prior → mIoU."""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
)
from torchvision.ops import batched_nms
from tqdm import tqdm

from saq.errors import SaqError, check_bool, check_int, check_number, check_seed, is_int
from saq.sam.segmenter import PromptedImage, Segmenter
from tasks.base import (
    HeaderSizes,
    Task,
    check_class_names,
    files_digest,
    list_images,
    read_rgb,
    require_dir,
    split_paths,
)
from tasks.prompts import GroundTruthBoxes, PromptSource
from tasks.synthetic import evaluation_limit, is_synthetic_dataset

# segment_anything.SamAutomaticMaskGenerator's defaults (points_per_batch: ours decodes 16 per call).
AMG_DEFAULTS = {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
                "stability_score_offset": 1.0, "box_nms_thresh": 0.7, "points_per_batch": 16, "crop_n_layers": 0,
                "crop_overlap_ratio": 512 / 1500, "crop_n_points_downscale_factor": 1, "crop_nms_thresh": 0.7,
                "min_mask_region_area": 0}
# settings added on 2026-12-03, left out of the FP-cache fingerprint at their defaults (they give the masks of before)
AMG_ADDED = ("crop_n_layers", "crop_overlap_ratio", "crop_n_points_downscale_factor", "crop_nms_thresh",
             "min_mask_region_area")
# the thresholds generate_masks takes, as floats
AMG_THRESHOLDS = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh")
COARSE_DEFAULTS = {"dir": None, "downsample": 8, "blur_sigma": 1.0, "mislabel_fraction": 0.05, "seed": 0}
LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")  # "1": a two-class map saved as 1-bit


def read_label_map(path: Path, what: str) -> np.ndarray:
    """A single-channel PNG label map as H x W int64 (palette PNGs give their indices, as VOC/ADE tools expect)."""
    if not path.is_file():
        raise SaqError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise SaqError(f"{what} {path} has {img.mode} pixels; a label map must be single-channel "
                               "(8/16-bit grey or palette indices)")
            return np.asarray(img, dtype=np.int64)
    except (OSError, ValueError) as exc:  # strerror: the OS's reason alone (Permission denied), not the path again
        raise SaqError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def check_labels(labels: np.ndarray, num_classes: int, ignore_index: int | None, path: Path, zero_is_ignore: bool,
                 what: str = "label map") -> None:
    """Raise SaqError naming the file and the first value outside the class list (and not the ignore index; None:
    a map that may not hold one, as a coarse prediction)."""
    values = label_values(labels)
    low = 1 if zero_is_ignore else 0
    high = num_classes + low  # exclusive
    bad = values[((values < 0) | (values >= high)) & (values != (-1 if ignore_index is None else ignore_index))]
    if len(bad):
        hint = ""
        if not zero_is_ignore and bad[0] == num_classes:  # classes written 1..K
            hint = (" (is reduce_zero_label needed?)" if what == "label map" else
                    f" (a coarse prediction holds class indices 0..{num_classes - 1}: one written as 1..K, as "
                    "mmsegmentation's submission format does, needs 1 subtracted)")
        elif ignore_index is None:  # e.g. the dataset's ignore value 255 written where the segmenter had no class
            hint = f" (a {what} holds a class index at every pixel; it has no ignore value)"
        ignored = "" if ignore_index is None else f" and not the ignore index {ignore_index}"
        raise SaqError(f"{what} {path} holds value {int(bad[0])}, outside the {num_classes} classes "
                       f"({low}..{high - 1}){ignored}{hint}")


def label_values(labels: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a label map (counted, not sorted, where they fit: every evaluated map is checked
    when the task is built, and np.unique sorts every pixel, ten times slower)."""
    if labels.size and 0 <= labels.min() and labels.max() < 1 << 16:
        return np.flatnonzero(np.bincount(labels.ravel()))
    return np.unique(labels)


def reduce_zero_label(labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """ADE20K convention (as mmsegmentation): 0 ('other') becomes ignored, every class shifts down by one."""
    out = labels - 1
    out[(labels == 0) | (labels == ignore_index)] = ignore_index
    return out


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """K x K pixel counts, rows ground truth, columns prediction; ignored pixels are left out."""
    valid = gt != ignore_index
    idx = gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_iou(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU from a confusion matrix; NaN for a class neither present nor predicted."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)


def iou_by_class(cm: np.ndarray, classes: Sequence[str]) -> dict:
    """Per-class IoU by name; None for a class neither present nor predicted."""
    return {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, class_iou(cm))}


def mean_iou(cm: np.ndarray) -> float:
    iou = class_iou(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def degraded_labels(gt: np.ndarray, num_classes: int, ignore_index: int, rng: np.random.Generator,
                    downsample: int = 8, blur_sigma: float = 1.0, mislabel_fraction: float = 0.1) -> np.ndarray:
    """A stand-in for a semantic segmenter's output, made from the ground truth (the synthetic default's prior).

    The label map is area-averaged down `downsample`x, blurred (sigma in low-resolution cells), and
    `mislabel_fraction` of the low-resolution cells, in smooth blobs, get a random class; it then comes back to
    full size through bilinear interpolation of the class scores, so boundaries are coarse and soft.
    """
    h, w = gt.shape
    sh, sw = max(1, round(h / downsample)), max(1, round(w / downsample))
    classes = [c for c in np.unique(gt) if c != ignore_index]
    if not classes:
        return np.zeros_like(gt)
    scores = np.stack([cv2.resize((gt == c).astype(np.float32), (sw, sh), interpolation=cv2.INTER_AREA)
                       for c in classes])
    if blur_sigma > 0:
        scores = np.stack([cv2.GaussianBlur(s, (0, 0), blur_sigma) for s in scores])
    low = np.asarray(classes)[scores.argmax(0)]
    if mislabel_fraction > 0:
        # Blobs a few cells across: noise on a 4x coarser grid, upsampled smoothly, top fraction kept.
        noise = rng.random((max(1, sh // 4), max(1, sw // 4))).astype(np.float32)
        field = cv2.resize(noise, (sw, sh), interpolation=cv2.INTER_CUBIC)
        blobs = (field > np.quantile(field, 1 - mislabel_fraction)).astype(np.uint8)
        n, components = cv2.connectedComponents(blobs, connectivity=4)
        wrong = rng.integers(0, num_classes, max(n, 1))
        low = np.where(components > 0, wrong[components], low)
    present = np.unique(low)
    up = np.stack([cv2.resize((low == c).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
                   for c in present])
    return present[up.argmax(0)].astype(np.int64)


def point_grid(points_per_side: int, height: int, width: int) -> np.ndarray:
    """segment_anything's automatic-mask point grid in pixel coordinates: N x 2 (x, y)."""
    return build_point_grid(points_per_side) * np.array([[width, height]])  # float64, as segment_anything keeps it


class AutoMaskSet(NamedTuple):
    """The masks automatic mask generation keeps, best score first."""

    packed: np.ndarray  # K x ceil(H*W/8) uint8: np.packbits of each flattened mask
    areas: np.ndarray  # K pixel counts
    shape: tuple | None  # (H, W); None when no point was decoded
    scores: np.ndarray  # K predicted IoUs
    boxes: np.ndarray | None = None  # K x 4 XYXY boxes in the image (generate_masks; None from the reference)


def no_masks(shape: tuple | None) -> AutoMaskSet:
    """An empty set of masks of images of that shape."""
    return AutoMaskSet(np.zeros((0, 0), np.uint8), np.zeros(0, np.int64), shape, np.zeros(0, np.float32),
                       np.zeros((0, 4), np.float32))


def unpacked(masks: AutoMaskSet) -> np.ndarray:
    """K x H x W bool masks of a set."""
    h, w = masks.shape
    return np.unpackbits(masks.packed, axis=1, count=h * w).reshape(-1, h, w).astype(bool)


@torch.no_grad()
def generate_masks(segmenter: Segmenter, points: np.ndarray, pred_iou_thresh: float, stability_score_thresh: float,
                   stability_score_offset: float, box_nms_thresh: float, points_per_batch: int | None = None,
                   crop_box: Sequence[int] | None = None, image_size: tuple[int, int] | None = None) -> AutoMaskSet:
    """SamAutomaticMaskGenerator's masks of one crop (the image set on the segmenter), keeping the same masks.

    Each point gives three masks (multimask output); masks are filtered by predicted IoU, then by stability score,
    then box NMS. The IoU filter runs inside the segmenter before any mask is upscaled (segment_anything upscales
    all of them first), points_per_batch prompts per decoder call. The masks that pass the filters are kept
    bit-packed on the CPU (H*W/8 bytes each), so memory is bounded by the point count, not by the logits. With a
    crop_box (x0, y0, x1, y1) of an image of image_size (H, W), masks touching the crop's edges inside the image are
    dropped and the rest placed in the whole image. Returns the NMS survivors (packed, best score first), their
    areas, (H, W), their predicted IoUs and boxes.
    """
    packed, boxes, scores, areas = [], [], [], []
    shape = None
    foreground = np.ones((len(points), 1), np.int64)
    for chunk in segmenter.predict_above_iou(points[:, None], foreground, pred_iou_thresh, points_per_batch):
        logits, iou = chunk.logits, chunk.iou_scores.float()
        shape = tuple(logits.shape[-2:]) if crop_box is None else tuple(image_size)
        if stability_score_thresh > 0 and len(logits):
            keep = calculate_stability_score(logits, segmenter.mask_threshold, stability_score_offset) \
                >= stability_score_thresh
            logits, iou = logits[keep], iou[keep]
        masks = logits > segmenter.mask_threshold
        area = masks.flatten(1).sum(1)
        masks, iou, area = masks[area > 0], iou[area > 0], area[area > 0]
        box = batched_mask_to_box(masks)
        if crop_box is not None and len(masks):
            inside = ~is_box_near_crop_edge(box, list(crop_box), [0, 0, image_size[1], image_size[0]])
            masks, iou, area, box = masks[inside], iou[inside], area[inside], box[inside]
            masks, box = uncrop_masks(masks, list(crop_box), *image_size), uncrop_boxes_xyxy(box, list(crop_box))
        if not len(masks):
            continue
        boxes.append(box.float().cpu())
        scores.append(iou.cpu())
        areas.append(area.cpu())
        packed.append(np.packbits(masks.flatten(1).cpu().numpy(), axis=1))
    if shape is None or not boxes:
        return no_masks(shape)
    boxes, scores, area = torch.cat(boxes), torch.cat(scores), torch.cat(areas)
    keep = batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.int64), box_nms_thresh).numpy()
    return AutoMaskSet(np.concatenate(packed)[keep], area.numpy()[keep], shape, scores.numpy()[keep],
                       boxes.numpy()[keep])


def automatic_masks(segmenter: Segmenter, image: np.ndarray, amg: dict) -> AutoMaskSet:
    """SamAutomaticMaskGenerator.generate's masks of an image with the task.amg settings: the point grid on the whole
    image and, with crop_n_layers, on layer i's (2^i)^2 overlapping crops (points_per_side shrunk by
    crop_n_points_downscale_factor^i), each crop encoded on its own; masks cut by a crop's edge are dropped and
    duplicates across crops removed by NMS that keeps the smaller crop's; then, with min_mask_region_area, islands
    and holes smaller than it are removed (a mask that changed loses to one that did not in a last NMS)."""
    height, width = image.shape[:2]
    crops, layers = generate_crop_boxes((height, width), amg["crop_n_layers"], amg["crop_overlap_ratio"])
    thresholds = {key: float(amg[key]) for key in AMG_THRESHOLDS}
    sets, crop_areas = [], []
    for crop, layer in zip(crops, layers):
        x0, y0, x1, y1 = crop
        segmenter.set_image(image[y0:y1, x0:x1])
        side = int(amg["points_per_side"] / amg["crop_n_points_downscale_factor"] ** layer)
        found = generate_masks(segmenter, point_grid(side, y1 - y0, x1 - x0), **thresholds,
                               points_per_batch=int(amg["points_per_batch"]),
                               crop_box=None if len(crops) == 1 else crop, image_size=(height, width))
        sets.append(found)
        crop_areas.append(np.full(len(found.areas), (x1 - x0) * (y1 - y0), np.int64))
    found = sets[0] if len(sets) == 1 else join_mask_sets(sets, (height, width))
    if len(crops) > 1 and len(found.areas):
        # one NMS over every crop's masks, the smaller crop's first (segment_anything scores them 1 / crop area)
        smaller_first = 1 / torch.as_tensor(np.concatenate(crop_areas))  # float32, as segment_anything's
        keep = batched_nms(torch.as_tensor(found.boxes), smaller_first, torch.zeros(len(found.areas), dtype=torch.int64),
                           float(amg["crop_nms_thresh"])).numpy()
        found = AutoMaskSet(found.packed[keep], found.areas[keep], found.shape, found.scores[keep], found.boxes[keep])
    if amg["min_mask_region_area"] > 0 and len(found.areas):
        found = remove_small_mask_regions(found, int(amg["min_mask_region_area"]),
                                          max(float(amg["box_nms_thresh"]), float(amg["crop_nms_thresh"])))
    return found


def join_mask_sets(sets: Sequence[AutoMaskSet], shape: tuple[int, int]) -> AutoMaskSet:
    """The masks of several crops' sets (each placed in the whole image), in order."""
    kept = [s for s in sets if len(s.areas)]
    if not kept:
        return no_masks(shape)
    return AutoMaskSet(np.concatenate([s.packed for s in kept]), np.concatenate([s.areas for s in kept]), shape,
                       np.concatenate([s.scores for s in kept]), np.concatenate([s.boxes for s in kept]))


def remove_small_mask_regions(found: AutoMaskSet, min_area: int, nms_thresh: float) -> AutoMaskSet:
    """SamAutomaticMaskGenerator.postprocess_small_regions on a mask set: holes, then islands, smaller than min_area
    filled / removed; NMS on the new boxes prefers masks left unchanged."""
    masks, unchanged = [], []
    for mask in unpacked(found):
        mask, holes = remove_small_regions(mask, min_area, mode="holes")
        mask, islands = remove_small_regions(mask, min_area, mode="islands")
        masks.append(mask)
        unchanged.append(float(not (holes or islands)))
    masks = np.stack(masks)
    boxes = batched_mask_to_box(torch.as_tensor(masks)).float()
    keep = batched_nms(boxes, torch.as_tensor(unchanged), torch.zeros(len(masks), dtype=torch.int64),
                       nms_thresh).numpy()
    masks = masks[keep]
    return AutoMaskSet(np.packbits(masks.reshape(len(masks), -1), axis=1), masks.reshape(len(masks), -1).sum(1),
                       found.shape, found.scores[keep], boxes.numpy()[keep])


def vote_labels(coarse: np.ndarray, packed: np.ndarray, areas: np.ndarray, num_classes: int) -> np.ndarray:
    """Each mask takes the majority coarse label inside it; pixels in no mask keep the coarse label.

    Masks are painted largest first, so a smaller mask (a part, or an object on a larger region) wins where
    they overlap.
    """
    h, w = coarse.shape
    refined = coarse.copy()
    for i in np.argsort(-areas, kind="stable"):
        mask = np.unpackbits(packed[i], count=h * w).reshape(h, w).astype(bool)
        refined[mask] = np.bincount(coarse[mask], minlength=num_classes).argmax()
    return refined


def check_label_size(path: Path, size: tuple[int, int] | None, image_size: tuple[int, int] | None) -> None:
    """SaqError unless a label map's (height, width) is its image's (either unknown: nothing to compare)."""
    if size is not None and image_size is not None and tuple(size) != tuple(image_size):
        raise SaqError(f"label map {path} is {size[1]}x{size[0]}, its image is {image_size[1]}x{image_size[0]}")


def check_coarse_size(path: Path | None, size: tuple[int, int] | None, image_size: tuple[int, int] | None) -> None:
    """SaqError unless a coarse prediction's (height, width) is its image's at one scale (either unknown: nothing to
    compare). A prediction at another resolution (SegFormer writes 1/4) is scaled up; one of another shape
    (transposed, cropped) would be stretched into a wrong map."""
    if size is None or image_size is None or tuple(size) == tuple(image_size):
        return
    # one scale for both sides, each off by at most a pixel of rounding (a 1/4 map of 683 px is 171)
    (h, w), (ih, iw) = size, image_size
    sy, sx = ih / h, iw / w
    if abs(w * sy - iw) > max(sy, 1.0) or abs(h * sx - ih) > max(sx, 1.0):
        raise SaqError(f"coarse prediction {path} is {w}x{h} (w x h), its image is {iw}x{ih}: another aspect ratio, "
                       "so not a scaled prediction of it")


def grid_points(amg: dict, height: int, width: int) -> int:
    """How many points automatic_masks prompts an image of that size with (every crop's grid)."""
    _, layers = generate_crop_boxes((height, width), amg["crop_n_layers"], amg["crop_overlap_ratio"])
    return sum(int(amg["points_per_side"] / amg["crop_n_points_downscale_factor"] ** layer) ** 2 for layer in layers)


class PointGrid:
    """The prompts of the semantic task: segment_anything's regular point grid, one foreground point each."""

    def __init__(self, points_per_side: int):
        self.points_per_side = points_per_side
        self.name = f"grid{points_per_side}"

    def points(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """N x 1 x 2 points and N x 1 labels (all foreground), in pixels of an image of that size."""
        pts = point_grid(self.points_per_side, height, width)[:, None]
        return pts, np.ones(pts.shape[:2], np.int64)

    def fingerprint(self) -> str:
        return self.name


class SemanticTask(Task):
    """Point-grid automatic masks from SAM + a coarse semantic prior (majority vote per mask) → mIoU.

    Label maps are PNGs named like their image (`<stem>.png`), class indices 0..K-1 (1..K with reduce_zero_label,
    where 0 is ignored as in ADE20K) and an ignore index. The coarse prior is a folder of predicted label maps
    (class indices 0..K-1, `<stem>.png`, resized to the image by nearest neighbour when their size differs) or,
    with coarse.dir null, a seeded degraded ground truth (see degraded_labels): a controlled stand-in for a
    SegFormer-like segmenter, so the metric shows what SAM's masks add. Metrics: mIoU of the SAM-refined labels,
    coarse_mIoU of the prior alone, per-class IoU, and the encoder/decoder time split.
    """

    name = "semantic"

    def __init__(self, data: dict, calib: dict, prompts: PromptSource | None = None, max_images: int | None = None,
                 generate: dict | None = None, classes: Sequence[str] | int | None = None, ignore_index: int = 255,
                 reduce_zero_label: bool = False, coarse: dict | None = None, amg: dict | None = None,
                 progress: bool = True):
        if prompts is not None and not isinstance(prompts, GroundTruthBoxes):
            raise SaqError(f"task=semantic prompts SAM with its own point grid (task.amg.points_per_side); "
                           f"prompts={getattr(prompts, 'name', type(prompts).__name__)} cannot be used with it: "
                           "use prompts=gt (the default)")
        data = split_paths(data, ("root", "img_dir", "label_dir"), "task.data")
        calib = split_paths(calib, ("img_dir",), "task.calib")
        self.root = Path(data["root"])
        self.img_dir, self.label_dir = self.root / data["img_dir"], self.root / data["label_dir"]
        self.calib_img_dir = self.root / calib["img_dir"]
        if is_int(classes):
            if classes < 1:  # said as given, not as the empty list it would make
                raise SaqError(f"task.classes={classes} invalid; expected a class count >= 1 or a list of class names")
            classes = [f"class_{i}" for i in range(classes)]
        if not classes or isinstance(classes, str) or not isinstance(classes, Sequence):
            raise SaqError(f"task.classes must be a list of class names (index order) or a class count, "
                           f"got {classes!r}")
        self.classes = check_class_names([str(c) for c in classes], "task.classes")
        self.num_classes = len(self.classes)
        # a string "false" would be truthy and shift every class by one
        check_bool(reduce_zero_label, "task.reduce_zero_label")
        check_int(ignore_index, "task.ignore_index", minimum=None)
        # with reduce_zero_label the label maps hold classes as 1..K and the metric sees them as 0..K-1: an ignore
        # index in either range would silently drop a class
        top = self.num_classes + reduce_zero_label
        if 0 <= ignore_index < top:
            raise SaqError(f"task.ignore_index {ignore_index} is one of the {self.num_classes} classes' label values "
                           f"(0..{top - 1}{' with reduce_zero_label' if reduce_zero_label else ''}); use a value "
                           "outside them (255 is usual)")
        self.ignore_index, self.reduce_zero_label = ignore_index, bool(reduce_zero_label)
        self.amg = self._settings(amg, AMG_DEFAULTS, "task.amg")
        check_int(self.amg["points_per_side"], "task.amg.points_per_side")
        check_int(self.amg["points_per_batch"], "task.amg.points_per_batch")
        check_int(self.amg["crop_n_layers"], "task.amg.crop_n_layers", minimum=0)
        check_int(self.amg["crop_n_points_downscale_factor"], "task.amg.crop_n_points_downscale_factor")
        check_int(self.amg["min_mask_region_area"], "task.amg.min_mask_region_area", minimum=0)
        # thresholds outside these ranges keep no mask (or all), and mIoU would quietly equal the coarse prior's
        for key, low, high in (("pred_iou_thresh", 0, 1), ("stability_score_thresh", 0, 1),
                               ("box_nms_thresh", 0, 1), ("stability_score_offset", 0, None),
                               ("crop_nms_thresh", 0, 1)):
            check_number(self.amg[key], f"task.amg.{key}", low, high)
        check_number(self.amg["crop_overlap_ratio"], "task.amg.crop_overlap_ratio", 0, 1, open_max=True)
        last = self.amg["points_per_side"] // self.amg["crop_n_points_downscale_factor"] ** self.amg["crop_n_layers"]
        if last < 1:  # segment_anything would build an empty grid there and find nothing in those crops
            raise SaqError(f"task.amg.crop_n_layers={self.amg['crop_n_layers']} with "
                           f"crop_n_points_downscale_factor={self.amg['crop_n_points_downscale_factor']} leaves "
                           f"the last layer's crops no point of task.amg.points_per_side="
                           f"{self.amg['points_per_side']}; use fewer layers or a smaller factor")
        self.grid = PointGrid(self.amg["points_per_side"])
        self.prompts = self.grid  # what the run records as this task's prompts
        self.coarse = self._settings(coarse, COARSE_DEFAULTS, "task.coarse")
        check_seed(self.coarse["seed"], "task.coarse.seed")
        if self.coarse["dir"] is not None and not (isinstance(self.coarse["dir"], str) and self.coarse["dir"].strip()):
            raise SaqError(f"task.coarse.dir={self.coarse['dir']!r} invalid; expected the path of a folder of "
                           "predicted label maps, or null for the synthetic set's stand-in")
        if self.coarse["dir"]:
            self.coarse_dir = require_dir(self.coarse["dir"], "coarse prediction", "task.coarse.dir")
        else:
            self.coarse_dir = None
            check_int(self.coarse["downsample"], "task.coarse.downsample")
            check_number(self.coarse["blur_sigma"], "task.coarse.blur_sigma", 0, None)
            # 1 would leave no correct label
            check_number(self.coarse["mislabel_fraction"], "task.coarse.mislabel_fraction", 0, 1, open_max=True)
        # after every plain setting is checked: it may generate the synthetic dataset, which takes minutes
        self.max_images = max_images = evaluation_limit(self.root, generate, max_images)
        # after generation, which makes the root a synthetic set
        if self.coarse_dir is None and not is_synthetic_dataset(self.root):
            # the stand-in would score real data against its own labels
            print(f"warning: task.coarse.dir=null: the coarse prior is {self.label_dir}'s own labels, degraded "
                  "(the synthetic set's stand-in for a coarse segmenter), so mIoU is not comparable with a real "
                  "segmenter's; give task.coarse.dir, a folder of its predicted label maps <stem>.png",
                  file=sys.stderr)
        require_dir(self.label_dir, "label map", "task.data.root / task.data.label_dir")
        images = list_images(self.img_dir, "task.data.root / task.data.img_dir")
        images = images[:max_images] if max_images else images
        self.items = []  # (stem, image, label map), checked up front so a missing one fails before any inference
        image_sizes = HeaderSizes(images)  # and a label map of another size (sizes from the file headers)
        label_sizes = HeaderSizes((stem, self.label_dir / f"{stem}.png") for stem, _ in images)
        coarse_sizes = HeaderSizes(() if self.coarse_dir is None else
                                   ((stem, self.coarse_dir / f"{stem}.png") for stem, _ in images))
        for stem, path in images:
            label_path = self.label_dir / f"{stem}.png"
            if not label_path.is_file():
                raise SaqError(f"image {path} has no label map {label_path} (label maps are <image stem>.png "
                               "in task.data.label_dir)")
            check_label_size(label_path, label_sizes.get(stem), image_sizes.get(stem))
            self.items.append((stem, path, label_path))
            coarse_path = None if self.coarse_dir is None else self.coarse_dir / f"{stem}.png"
            if coarse_path is not None and not coarse_path.is_file():
                raise SaqError(f"image {path} has no coarse prediction {coarse_path} (coarse predictions are "
                               "<image stem>.png in task.coarse.dir)")
            check_coarse_size(coarse_path, coarse_sizes.get(stem), image_sizes.get(stem) or label_sizes.get(stem))
        self._check_label_files(progress)

    @staticmethod
    def _settings(given: dict | None, defaults: dict, key: str) -> dict:
        if given is not None and not isinstance(given, Mapping):
            hint = " (the folder of predicted label maps goes in task.coarse.dir)" if key == "task.coarse" else ""
            raise SaqError(f"{key}={given!r} invalid; expected a mapping of {sorted(defaults)}{hint}")
        unknown = sorted(set(given or {}) - set(defaults))
        if unknown:
            raise SaqError(f"unknown setting {key}.{unknown[0]}; expected one of {sorted(defaults)}")
        return {**defaults, **(given or {})}

    def _check_label_files(self, progress: bool) -> None:
        """SaqError now, not when evaluation reaches the image hours into automatic mask generation: every evaluated
        label map (and coarse prediction) is read and checked (single-channel, values in the classes or the ignore
        index), and the maps must hold some pixel that is not ignored."""
        scored = False
        agree = agree_shifted = labelled = 0  # coarse predictions against the labels, as written and less 1
        for stem, _, label_path in tqdm(self.items, desc="checking label maps", leave=False, disable=not progress):
            gt = self.ground_truth(label_path, None)
            valid = gt != self.ignore_index
            scored = scored or bool(valid.any())
            if self.coarse_dir is not None:
                pred, truth = self.coarse_labels(stem, gt)[valid], gt[valid]
                agree += int((pred == truth).sum())
                agree_shifted += int((pred - 1 == truth).sum())
                labelled += int(valid.sum())
        if not scored:
            raise self._all_ignored()
        # classes written 1..K pass the value check whenever no map holds K (a rare class, a few images): every
        # class is then its neighbour, which only the agreement with the labels shows
        if labelled and agree_shifted > max(2 * agree, labelled // 4):
            raise SaqError(f"the coarse predictions in {self.coarse_dir} agree with the label maps on "
                           f"{agree / labelled:.0%} of the labelled pixels as written and on "
                           f"{agree_shifted / labelled:.0%} with 1 subtracted: they hold classes 1..K (as "
                           "mmsegmentation's submission format writes them); write class indices 0.."
                           f"{self.num_classes - 1}")

    def _all_ignored(self) -> SaqError:
        """The error for label maps whose pixels are all ignored (every class IoU undefined, mIoU read as 0)."""
        return SaqError(f"the label maps of the {len(self.items)} evaluated images are all ignore_index "
                        f"{self.ignore_index}{' or 0 (reduce_zero_label)' if self.reduce_zero_label else ''}, so mIoU "
                        f"is undefined (check {self.label_dir} and task.max_images)")

    def ground_truth(self, path: Path, shape: tuple[int, int] | None) -> np.ndarray:
        """The label map as class indices 0..K-1 with ignore_index, checked against the image (shape None: not
        compared) and the classes."""
        labels = read_label_map(path, "label map")
        check_label_size(path, labels.shape, shape)
        check_labels(labels, self.num_classes, self.ignore_index, path, self.reduce_zero_label)
        return reduce_zero_label(labels, self.ignore_index) if self.reduce_zero_label else labels

    def coarse_labels(self, stem: str, gt: np.ndarray) -> np.ndarray:
        """The coarse semantic prediction of an image: from coarse.dir, or the seeded degraded ground truth."""
        if self.coarse_dir is None:
            rng = np.random.default_rng([int(self.coarse["seed"]), zlib.crc32(stem.encode())])
            return degraded_labels(gt, self.num_classes, self.ignore_index, rng, int(self.coarse["downsample"]),
                                   float(self.coarse["blur_sigma"]), float(self.coarse["mislabel_fraction"]))
        path, pred = self._coarse_prediction(stem)
        if pred.shape != gt.shape:
            check_coarse_size(path, pred.shape, gt.shape)
            pred = cv2.resize(pred.astype(np.uint16), gt.shape[::-1], interpolation=cv2.INTER_NEAREST)
        return pred.astype(np.int64)

    def _coarse_prediction(self, stem: str) -> tuple[Path, np.ndarray]:
        """An image's file in coarse.dir and its class indices, checked against the classes (at its own size)."""
        path = self.coarse_dir / f"{stem}.png"
        pred = read_label_map(path, "coarse prediction")
        check_labels(pred, self.num_classes, None, path, zero_is_ignore=False, what="coarse prediction")
        return path, pred

    def fingerprint(self) -> str:
        files = [path for _, path, _ in self.items] + [label for _, _, label in self.items]
        if self.coarse_dir is not None:
            files += [self.coarse_dir / f"{stem}.png" for stem, _, _ in self.items]
        # settings added since FP caches were made count only when set otherwise: a cache of the same masks stays valid
        amg = {k: v for k, v in self.amg.items() if k not in AMG_ADDED or v != AMG_DEFAULTS[k]}
        settings = {**amg, **self.coarse, "ignore": self.ignore_index, "reduce": self.reduce_zero_label}
        return f"semantic|{self.label_dir.resolve()}|{files_digest(files)}|{self.max_images}|{self.classes}|" \
               f"{sorted(settings.items())}"

    def check_calibration_split(self) -> None:
        require_dir(self.calib_img_dir, "calibration image", "task.calib.img_dir")

    def calibration_samples(self, n: int, knob: str = "quant.calib_images") -> list[PromptedImage]:
        """First n images (by file stem) of the calibration split, each with the point grid as its prompts."""
        images = list_images(self.calib_img_dir, "task.calib.img_dir")
        if len(images) < n:
            raise SaqError(f"calibration split {self.calib_img_dir} has only {len(images)} images, {n} requested "
                           f"(lower {knob})")
        self.calibration_prompts = f"point grid ({self.grid.name})"
        samples = []
        for stem, path in images[:n]:
            image = read_rgb(path)
            points, labels = self.grid.points(*image.shape[:2])
            samples.append(PromptedImage(image, points=points, point_labels=labels, image_id=stem))
        return samples

    def evaluate(self, segmenter: Segmenter, progress: bool = True) -> dict:
        k = self.num_classes
        cm_refined, cm_coarse = np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)
        encoder0, decoder0 = segmenter.timings.encoder_s, segmenter.timings.decoder_s
        filter_s = vote_s = 0.0
        n_masks = n_prompts = 0
        for stem, path, label_path in tqdm(self.items, desc="semantic eval", disable=not progress, leave=False):
            image = read_rgb(path)
            gt = self.ground_truth(label_path, image.shape[:2])
            coarse = self.coarse_labels(stem, gt)
            start, sam_s = time.perf_counter(), segmenter.timings.encoder_s + segmenter.timings.decoder_s
            found = automatic_masks(segmenter, image, self.amg)
            # Filtering, NMS and packing only: the encoder's and decoder's own times are in segmenter.timings.
            filter_s += time.perf_counter() - start - (segmenter.timings.encoder_s + segmenter.timings.decoder_s - sam_s)
            start = time.perf_counter()
            refined = vote_labels(coarse, found.packed, found.areas, k)
            vote_s += time.perf_counter() - start
            cm_refined += confusion_matrix(refined, gt, k, self.ignore_index)
            cm_coarse += confusion_matrix(coarse, gt, k, self.ignore_index)
            n_masks += len(found.areas)
            n_prompts += grid_points(self.amg, *image.shape[:2])
        if not cm_refined.sum():  # checked when the task was built; a label map replaced since is caught here
            raise self._all_ignored()
        total = int(cm_refined.sum())
        return {
            "mIoU": mean_iou(cm_refined),
            "coarse_mIoU": mean_iou(cm_coarse),
            "aAcc": float(np.trace(cm_refined) / total),
            "coarse_aAcc": float(np.trace(cm_coarse) / total),
            "encoder_s": segmenter.timings.encoder_s - encoder0,
            "decoder_s": segmenter.timings.decoder_s - decoder0,
            "filter_s": filter_s,
            "vote_s": vote_s,
            "masks_per_image": n_masks / max(len(self.items), 1),
            "images": len(self.items),
            "prompts": n_prompts,
            "IoU_per_class": iou_by_class(cm_refined, self.classes),
            "coarse_IoU_per_class": iou_by_class(cm_coarse, self.classes),
        }


def reference_masks(segmenter: Segmenter, image: np.ndarray, points_per_side: int, pred_iou_thresh: float,
                    stability_score_thresh: float, stability_score_offset: float, box_nms_thresh: float,
                    points_per_batch: int = 64, **crops) -> AutoMaskSet:
    """segment_anything.SamAutomaticMaskGenerator's masks for the image (same settings; crops: its crop and
    small-region settings), as an AutoMaskSet: the reference generate_masks and automatic_masks must match. It runs
    the segmenter's SAM directly, image encoder included."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(
        segmenter.sam, points_per_side=points_per_side, points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh, **crops)
    records = generator.generate(image)
    shape = tuple(image.shape[:2])
    if not records:
        return AutoMaskSet(np.zeros((0, 0), np.uint8), np.zeros(0, np.int64), shape, np.zeros(0, np.float32))
    masks = np.stack([r["segmentation"] for r in records]).reshape(len(records), -1)
    return AutoMaskSet(np.packbits(masks, axis=1), np.array([r["area"] for r in records], np.int64), shape,
                       np.array([r["predicted_iou"] for r in records], np.float32))


def mask_set_differences(ours: AutoMaskSet, reference: AutoMaskSet, score_atol: float = 1e-5) -> list[str]:
    """Why two kept-mask sets differ (empty when they hold the same masks, areas, boxes, and scores within score_atol).

    Masks are matched by their exact pixels, so the order of the two sets does not matter.
    """
    if len(ours.areas) != len(reference.areas):
        return [f"{len(ours.areas)} masks against {len(reference.areas)}"]
    problems = []
    by_pixels = {row.tobytes(): i for i, row in enumerate(reference.packed)}
    h, w = reference.shape
    for i, row in enumerate(ours.packed):
        j = by_pixels.get(row.tobytes())
        if j is None:
            problems.append(f"mask {i} (area {ours.areas[i]}) has no identical mask in the reference")
            continue
        if ours.areas[i] != reference.areas[j]:
            problems.append(f"mask {i}: area {ours.areas[i]} against {reference.areas[j]}")
        if abs(float(ours.scores[i]) - float(reference.scores[j])) > score_atol:
            problems.append(f"mask {i}: predicted IoU {ours.scores[i]:.7f} against {reference.scores[j]:.7f}")
    if not problems and len(ours.areas):  # identical pixels give identical boxes; check the box code path too
        unpack = lambda s: torch.as_tensor(np.unpackbits(s.packed, axis=1, count=h * w).reshape(-1, h, w) > 0)  # noqa: E731
        order = [by_pixels[row.tobytes()] for row in ours.packed]
        if not torch.equal(batched_mask_to_box(unpack(ours)), batched_mask_to_box(unpack(reference))[order]):
            problems.append("boxes differ")
    return problems
