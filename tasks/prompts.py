"""Where box prompts come from: ground truth, jittered ground truth, or a detector's results (COCO json, DOTA txt or
an mmdetection / mmrotate results pickle)."""

from __future__ import annotations

import difflib
import io
import json
import os
import pickle
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from saq.errors import SaqError, check_int, check_number, check_seed, is_int, is_number
from tasks.base import files_digest, read_text


@dataclass
class BoxPrompts:
    """Boxes for one image (xyxy, original pixels) with a score and a category id each."""

    boxes: np.ndarray  # N x 4 float32
    scores: np.ndarray  # N float32
    labels: np.ndarray  # N int64 (dataset category ids)

    @staticmethod
    def empty() -> BoxPrompts:
        return BoxPrompts(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.boxes)


class PromptSource(ABC):
    """Gives the box prompts of an image, from its key (COCO image id or file stem) and ground truth."""

    name: str = "prompts"
    from_ground_truth = False  # True when prompt i belongs to ground-truth object i

    @abstractmethod
    def for_image(self, key, gt: BoxPrompts, image_size: tuple[int, int]) -> BoxPrompts:
        ...

    def bind(self, image_keys: Iterable, category_names: Sequence[str] | None = None,
             category_ids: Collection[int] | None = None, drop_unknown: bool = False,
             image_sizes=None, keep_unknown: bool = False) -> None:
        """Called by a task before for_image: its image keys, and what its labels may be.

        category_names: class names when labels are class indices (names are mapped to indices);
        category_ids: the dataset's numeric category ids when labels are those ids, in annotation-file order (a
        {id: name} mapping names them: a results pickle's class indices are mapped through it); drop_unknown: leave out
        detections of other classes (the task inferred its classes from the evaluated images) instead of refusing;
        keep_unknown: keep them, numbered after category_names (calibration, which prompts with boxes only);
        image_sizes: .get(key) -> (height, width) or None, where the task knows sizes before reading images (COCO's
        annotation file, DOTA's image headers); a key without one is checked when its image is read.
        Ground-truth sources need none of it; a detections file checks that it names the task's images and classes.
        """

    def require_prompts(self, image_keys: Sequence, which: str = "evaluated") -> None:
        """Raise SaqError when none of these images (the ones a task evaluates, or `which` others) gets a prompt."""

    def fingerprint(self) -> str:
        return self.name

    @property
    def calibration_uses_ground_truth(self) -> bool:
        """Whether calibration_source() prompts from the calibration split's labels (a task then needs them); known
        without reading any file."""
        return self.from_ground_truth

    def calibration_source(self) -> tuple[PromptSource, str]:
        """The source that prompts the calibration images (paper.md §2.3: the evaluation's own prompt source), and
        how results.json names it."""
        return self, self.name


class GroundTruthBoxes(PromptSource):
    """The ground-truth boxes, score 1."""

    name = "gt"
    from_ground_truth = True

    def for_image(self, key, gt: BoxPrompts, image_size: tuple[int, int]) -> BoxPrompts:
        return gt


class JitteredBoxes(PromptSource):
    """Ground-truth boxes with seeded Gaussian noise (std = scale x box side, capped): a stand-in for a detector."""

    name = "jittered"
    from_ground_truth = True

    def __init__(self, scale: float = 0.1, max_px: float = 20.0, seed: int = 0):
        for key, value in (("scale", scale), ("max_px", max_px)):
            check_number(value, f"prompts.{key}", 0)
        self.scale, self.max_px, self.seed = scale, max_px, check_seed(seed, "prompts.seed")

    def for_image(self, key, gt: BoxPrompts, image_size: tuple[int, int]) -> BoxPrompts:
        # Seeded per image, so results do not depend on evaluation order.
        rng = np.random.default_rng([self.seed, zlib.crc32(str(key).encode())])
        b = gt.boxes.astype(np.float64)
        side = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]] * 2, 1)
        noisy = b + rng.normal(size=b.shape) * np.minimum(side * self.scale, self.max_px)
        h, w = image_size
        noisy[:, [0, 2]] = noisy[:, [0, 2]].clip(0, w)
        noisy[:, [1, 3]] = noisy[:, [1, 3]].clip(0, h)
        x0, x1 = np.minimum(noisy[:, 0], noisy[:, 2]), np.maximum(noisy[:, 0], noisy[:, 2])
        y0, y1 = np.minimum(noisy[:, 1], noisy[:, 3]), np.maximum(noisy[:, 1], noisy[:, 3])
        return BoxPrompts(np.stack([x0, y0, x1, y1], 1).astype(np.float32), gt.scores, gt.labels)

    def fingerprint(self) -> str:
        return f"jittered-{float(self.scale)}-{float(self.max_px)}-{self.seed}"  # max_px=20 is the default 20.0


class DetectionsFile(PromptSource):
    """A detector's results as box prompts: a results json, or DOTA results (a folder of Task1_<class>.txt).

    json (COCO results format, what mmdetection writes): a list of {"image_id", "category_id", "bbox": [x, y, w, h],
    "score"}. For DOTA-style data image_id may be the image's file stem (a string), category_id a class name, and
    "poly": [x1, y1, ..., x4, y4] may stand in for bbox.
    DOTA (what the DOTA devkit and mmrotate write for Task 1): one file per class, Task1_<class>.txt, lines
    "image_stem score x1 y1 x2 y2 x3 y3 x4 y4"; file may be that folder or one such file.
    pkl (what mmdetection 3.x / mmrotate 1.x `tools/test.py --out results.pkl` writes): one entry per image with
    img_id and pred_instances {bboxes, scores, labels}; boxes xyxy, rotated (cx, cy, w, h, angle in radians) or
    quadrilaterals. Its labels are the detector's class indices: class_names lists the detector's classes in that
    order (needed for DOTA-style tasks); without it a COCO task takes index i as the annotation file's i-th category,
    as mmdetection's CocoDataset numbers them. An mmdetection 2.x pickle names no image: entry i (a list of per-class
    N x 5 arrays, or a (that list, masks) tuple) is the annotation file's i-th image; COCO tasks only.
    A polygon's or rotated box's enclosing horizontal box is the prompt. Keeps detections with score >=
    score_threshold, at most max_per_image per image (None: no cap), highest scores first. The defaults keep the file
    as the detector's own test settings left it (the paper prompts SAM with every box the detector returned).
    """

    name = "detections"

    def __init__(self, file: str | None, score_threshold: float = 0.0, max_per_image: int | None = None,
                 calib_file: str | None = None, class_names: Sequence[str] | None = None, progress: bool = True):
        if not file:
            raise SaqError("prompts=detections needs a file: set prompts.file=/path/to/detections.json "
                           "(or a folder of DOTA Task1_<class>.txt files)")
        if not isinstance(file, (str, os.PathLike)):  # prompts.file=123 reaches here as an int
            raise SaqError(f"prompts.file={file!r} invalid; expected the path of a detections file or folder")
        path = Path(file)
        if not path.exists():
            raise SaqError(f"detections file not found: {path} (set prompts.file)")
        check_int(max_per_image, "prompts.max_per_image", allow_none=True)
        # detector scores are in [0, 1]: a threshold outside keeps all or none
        check_number(score_threshold, "prompts.score_threshold", 0, 1)  # detector scores are in [0, 1]
        # a float: score_threshold=0 and the default 0.0 are one setting (cache keys, messages)
        self.path, self.score_threshold, self.max_per_image = path, float(score_threshold), max_per_image
        self._bare_said: set[tuple] = set()  # evaluated image sets already said to have images without detections
        self.role = ("prompts.file", "evaluated")  # the knob that names this file and the images it is for
        if calib_file is not None and not isinstance(calib_file, (str, os.PathLike)):
            raise SaqError(f"prompts.calib_file={calib_file!r} invalid; expected a path or null")
        if calib_file and not Path(calib_file).exists():
            raise SaqError(f"calibration detections file not found: {calib_file} (set prompts.calib_file to the "
                           "detector's results on the calibration images, or null to calibrate on ground-truth boxes)")
        self.calib_file = calib_file
        is_pickle = _is_pickle(path)
        calib_pickle = bool(calib_file) and _is_pickle(Path(calib_file))
        if class_names is not None:
            if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names \
                    or not all(isinstance(c, str) and c for c in class_names):
                raise SaqError(f"prompts.class_names={class_names!r} invalid; expected the detector's class names in "
                               "its label order (e.g. [plane, ship]) or null")
            if not (is_pickle or calib_pickle):
                raise SaqError(f"prompts.class_names is for .pkl results (their labels are class indices); {path} "
                               "names its classes itself: set prompts.class_names=null")
            class_names = [str(c) for c in class_names]
        self.class_names, self.progress = class_names, progress
        self._label_indices = False  # True while labels are a pickle's class indices, not mapped to the task's yet
        self._positions: int | None = None  # an mmdetection 2.x pickle's entry count while keyed by position
        self._detector_classes: int | None = None  # an mmdetection 2.x pickle's class count (3.x's do not say)
        self._dropped: dict = {}  # image key -> {class name: detections bind left out as of a class the task lacks}
        if path.is_dir() or path.suffix.lower() == ".txt":
            self._by_image = self._read_dota(path)
        elif is_pickle:
            self._by_image = self._read_pickle(path)
        else:
            self._by_image = self._read(path)
        self._named_labels = any(isinstance(d[5], str) for dets in self._by_image.values() for d in dets)

    def _read(self, path: Path) -> dict:
        by_image: dict = {}
        flat = 0
        for i, det in enumerate(_json_list(path, self.progress)):
            try:
                if not isinstance(det.get("bbox", det.get("poly")), list):
                    raise TypeError
                # numbers as JSON numbers, ids as integers or names: float()/int() would take "5", true or 1.7
                if not all(is_number(v) for v in [*det.get("bbox", det.get("poly")), det["score"]]):
                    raise TypeError
                if "bbox" in det and len(det["bbox"]) == 5:  # mmrotate 1.x DOTAMetric's json: rotated, class indices
                    raise SaqError(f"detections file {path}: entry {i} has a rotated bbox {det['bbox']} (cx, cy, w, "
                                   "h, angle: mmrotate's DOTAMetric json, whose category_id is a class index); give "
                                   "prompts.file mmrotate's results .pkl (tools/test.py --out), which names the split "
                                   "patches, or its Task1 txt files (DOTAMetric format_only=True), written per patch "
                                   "for split patches and with merge_patches=True for whole images")
                if "bbox" in det:
                    x, y, w, h = (float(v) for v in det["bbox"])
                    box, given = (x, y, x + w, y + h), f"bbox {det['bbox']}"
                else:
                    box, given = _enclosing_box([float(v) for v in det["poly"]]), f"poly {det['poly']}"
                # COCO ids are numbers; DOTA images are keyed by their file stem, kept as a string.
                key, label = _result_id(det["image_id"]), _result_id(det["category_id"])
                for field, value in (("image_id", key), ("category_id", label)):
                    if value is None:
                        raise SaqError(f"detections file {path}: entry {i} has {field} {det[field]!r}; expected an "
                                       "integer (or a name: DOTA's file stems and class names)")
                item = (*box, float(det["score"]), label)
            except (AttributeError, KeyError, TypeError, ValueError, OverflowError):  # Overflow: a 400-digit int
                raise SaqError(f"detections file {path}: entry {i} is not a result "
                               "({image_id, category_id, bbox: [x, y, w, h] or poly: [x1, y1, ..., x4, y4], "
                               "score})") from None
            problem = detection_problem(box, item[4])
            if problem == FLAT:
                flat += 1
                continue
            if problem:
                raise SaqError(f"detections file {path}: entry {i} (image {key!r}, {given}, score {item[4]}): "
                               f"{problem}")
            by_image.setdefault(key, []).append(item)
        _say_flat(path, flat)
        return self._keep_usable(by_image)

    def _read_dota(self, path: Path) -> dict:
        files = sorted(path.glob("Task1_*.txt")) if path.is_dir() else [path]
        if not files:
            raise SaqError(f"detections folder {path} holds no DOTA result files (Task1_<class>.txt)")
        by_image: dict = {}
        flat = 0
        for file in files:
            if not file.name.startswith("Task1_"):
                raise SaqError(f"DOTA result file {file} must be named Task1_<class>.txt")
            category = file.stem[len("Task1_"):]
            for lineno, line in enumerate(read_text(file, "DOTA result file").splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    if len(parts) != 10:
                        raise ValueError
                    score, coords = float(parts[1]), [float(v) for v in parts[2:]]
                    if not np.isfinite([score, *coords]).all():
                        raise ValueError
                except ValueError:
                    raise SaqError(f"DOTA result file {file}, line {lineno}: expected "
                                   f"'image_stem score x1 y1 x2 y2 x3 y3 x4 y4', got {line.strip()!r}") from None
                box = _enclosing_box(coords)
                problem = detection_problem(box, score)
                if problem == FLAT:
                    flat += 1
                    continue
                if problem:
                    raise SaqError(f"DOTA result file {file}, line {lineno}: {problem}, got {line.strip()!r}")
                by_image.setdefault(parts[0], []).append((*box, score, category))
        _say_flat(path, flat)
        return self._keep_usable(by_image)

    def _read_pickle(self, path: Path) -> dict:
        results = _load_results_pickle(path, self.progress)
        if not isinstance(results, list) or not results:
            raise SaqError(f"detections file {path} must hold a non-empty list of per-image results, as mmdetection's "
                           f"tools/test.py --out writes (it holds {type(results).__name__})")
        if not isinstance(results[0], (Mapping, _PickledObject)):  # 2.x: per-class arrays in dataset order, no ids
            return self._read_pickle_2x(path, results)
        by_image: dict = {}
        flat = 0
        with _reading_bar(path, len(results), self.progress, unit="entries", what="checking") as bar:
            for i, entry in enumerate(results):
                key, detections, skipped = self._pickle_entry(f"detections file {path}: entry {i}", entry)
                if detections:
                    by_image.setdefault(key, []).extend(detections)
                flat += skipped
                bar.update()
        _say_flat(path, flat)
        self._label_indices = True  # mapped when a task binds the source: to its class names or category ids
        return self._keep_usable(by_image)

    def _read_pickle_2x(self, path: Path, results: list) -> dict:
        """mmdetection 2.x results: per image, in the dataset's order and without ids, a list per class of N x 5
        arrays (x1, y1, x2, y2, score), or a (that list, masks) tuple from a mask detector. Keyed by position here;
        bind keys them by the annotation file's image order, which is mmdetection 2.x's CocoDataset order."""
        by_image: dict = {}
        flat = 0
        shape = ("; mmdetection 2.x writes per image a list with an N x 5 array (x1, y1, x2, y2, score) per class, "
                 "or a (that list, masks) tuple")
        classes = None  # the detector's class count: one array per class in every entry
        for i, entry in enumerate(results):
            where = f"detections file {path}: entry {i}"
            per_class = entry[0] if isinstance(entry, tuple) and entry else entry
            if not isinstance(per_class, list) or not per_class:
                found = "an empty list" if isinstance(per_class, list) else type(entry).__name__
                raise SaqError(f"{where} is {found}, not a list of "
                               f"per-class arrays{shape} (or, from mmdetection 3.x, a dict per image with img_id and "
                               "pred_instances)")
            if classes is None:
                classes = len(per_class)
                if self.class_names is not None and len(self.class_names) != classes:
                    raise SaqError(f"detections file {path} is of a detector of {classes} classes (mmdetection 2.x "
                                   f"writes one array per class); prompts.class_names lists {len(self.class_names)}")
            elif len(per_class) != classes:
                raise SaqError(f"{where} has arrays for {len(per_class)} classes, entry 0 for {classes}; "
                               "mmdetection 2.x writes one per class of its detector in every entry")
            detections = []
            for label, value in enumerate(per_class):
                rows = _array(value, f"{where}, class {label}")
                if rows.ndim == 2 and rows.shape[1] == 6:  # mmrotate 0.x: (cx, cy, w, h, angle, score)
                    raise SaqError(f"{where} holds rotated boxes (N x 6, mmrotate 0.x), whose image order is the "
                                   "order its label files were listed in; write DOTA Task1 files instead "
                                   "(tools/test.py --format-only --eval-options submission_dir=DIR, then "
                                   "prompts.file=DIR)")
                if rows.size and (rows.ndim != 2 or rows.shape[1] != 5):
                    raise SaqError(f"{where}, class {label} has an array of shape {list(rows.shape)}{shape}")
                if self.class_names is not None and len(rows) and label >= len(self.class_names):
                    raise SaqError(f"{where} has boxes of class {label}; prompts.class_names lists "
                                   f"{len(self.class_names)} classes ({self.class_names})")
                for row in rows.reshape(-1, 5).tolist():
                    box, score = tuple(row[:4]), row[4]
                    problem = detection_problem(box, score)
                    if problem == FLAT:
                        flat += 1
                        continue
                    if problem:
                        raise SaqError(f"{where} (box {[round(v, 2) for v in box]}, score {score}): {problem}")
                    detections.append((*box, float(score), label))
            if detections:  # an image the detector found nothing on has no key, as in the other formats
                by_image[i] = detections
        _say_flat(path, flat)
        self._label_indices = True  # mapped when a task binds the source, as for 3.x pickles
        self._positions, self._detector_classes = len(results), classes
        return self._keep_usable(by_image)

    def _key_by_position(self, keys: list) -> None:
        """An mmdetection 2.x pickle's entries keyed by the task's images: entry i is the annotation file's i-th
        image (CocoDataset lists every image of its annotation file in test mode, in the file's order)."""
        knob, split = self.role
        if not all(isinstance(key, int) for key in keys):  # DOTA: images keyed by file stem, listed in glob order
            raise SaqError(f"detections file {self.path} ({knob}) holds mmdetection 2.x results, which name no image "
                           "(entry i is the dataset's i-th), and this task's images are files with no order the "
                           "detector's could be matched to; write DOTA Task1 files instead (tools/test.py "
                           "--format-only --eval-options submission_dir=DIR, then prompts.file=DIR)")
        if self._positions != len(keys):
            raise SaqError(f"detections file {self.path} ({knob}) holds mmdetection 2.x results for "
                           f"{self._positions} images, which name no image (entry i is the dataset's i-th), and the "
                           f"{split} annotation file has {len(keys)}: it must be the detector's results on that very "
                           "file (or write COCO json, which names them: tools/test.py --format-only --eval-options "
                           "jsonfile_prefix=dets, then prompts.file=dets.bbox.json)")
        self._by_image = {keys[i]: dets for i, dets in self._by_image.items()}
        self._best_score = {keys[i]: score for i, score in self._best_score.items()}
        self._positions = None
        print(f"detections file {self.path}: mmdetection 2.x results name no image; entry i is the {split} "
              f"annotation file's i-th image, in file order (entry 0 → image {keys[0]})")

    def _pickle_entry(self, where: str, entry) -> tuple:
        """One image's results in a pickle: (its key, [(x1, y1, x2, y2, score, class index)], boxes left out as flat)."""
        preds = _field(entry, "pred_instances")
        if preds is None:
            raise SaqError(f"{where} has no pred_instances (expected a dict per image with img_id and "
                           "pred_instances {bboxes, scores, labels})")
        key = _result_id(_plain(_field(entry, "img_id")))
        if key is None and isinstance(_field(entry, "img_path"), str):
            key = Path(_field(entry, "img_path")).stem  # DOTA patches are keyed by file stem
        if key is None:
            raise SaqError(f"{where} has neither an integer or string img_id nor an img_path")
        for name in ("bboxes", "scores", "labels"):  # a field under another name is said as that, not as None
            if _field(preds, name) is None:
                fields = sorted(map(str, preds)) if isinstance(preds, Mapping) else sorted(
                    str(k).lstrip("_") for k in getattr(preds, "__dict__", {}))
                raise SaqError(f"{where}: pred_instances has no {name} (it has {', '.join(fields) or 'none'}"
                               "); expected bboxes, scores and labels as mmdetection 3.x writes them")
        boxes, scores, labels = (_array(_field(preds, name), f"{where}: pred_instances.{name}")
                                 for name in ("bboxes", "scores", "labels"))
        if boxes.ndim != 2 or boxes.shape[1] not in (4, 5, 8) or scores.ndim != 1 or labels.ndim != 1 \
                or not len(scores) == len(labels) == len(boxes):
            raise SaqError(f"{where} has bboxes of shape {list(boxes.shape)} with scores of shape "
                           f"{list(scores.shape)} and labels of shape {list(labels.shape)}; expected N x 4 (x1, y1, "
                           "x2, y2), N x 5 (cx, cy, w, h, angle) or N x 8 (quadrilaterals), N scores and N labels")
        if len(labels) and (not np.isfinite(labels).all() or (labels != np.round(labels)).any() or labels.min() < 0):
            raise SaqError(f"{where}: labels must be class indices (integers >= 0), got {labels[:5].tolist()}")
        detections, flat = [], 0
        for box, score, label in zip(horizontal_boxes(boxes), scores.tolist(), labels.astype(np.int64).tolist()):
            problem = detection_problem(box, score)
            if problem == FLAT:
                flat += 1
                continue
            if problem:
                raise SaqError(f"{where} (image {key!r}, box {[round(v, 2) for v in box]}, score {score}): {problem}")
            if self.class_names is not None and label >= len(self.class_names):
                raise SaqError(f"{where} (image {key!r}) has label {label}; prompts.class_names lists "
                               f"{len(self.class_names)} classes ({self.class_names})")
            detections.append((*box, float(score), label))
        return key, detections, flat

    def _keep_usable(self, by_image: dict) -> dict:
        """Each image's detections at or above the score threshold, highest first (ties in file order); for_image
        takes the first max_per_image of what bind leaves. The best score of each image is kept apart, for
        require_prompts' message."""
        self._best_score = {key: max(d[4] for d in dets) for key, dets in by_image.items()}
        kept = {}
        repeated, first = 0, None
        for key, dets in by_image.items():
            usable = sorted((d for d in dets if d[4] >= self.score_threshold), key=lambda d: -d[4])
            kept[key] = usable
            extra = len(kept[key]) - len(set(kept[key]))
            repeated, first = repeated + extra, first if first is not None or not extra else key
        if repeated:  # a detector never repeats a box exactly: results written twice make every box a false positive
            print(f"detections file {self.path}: {repeated} detections repeat another exactly (same image, box, score "
                  f"and class; first on image {first!r}); they are kept as given: is the file two result files "
                  "joined?")
        return kept

    def bind(self, image_keys: Iterable, category_names: Sequence[str] | None = None,
             category_ids: Collection[int] | None = None, drop_unknown: bool = False,
             image_sizes=None, keep_unknown: bool = False) -> None:
        image_keys = list(image_keys)  # in the annotation file's order: an mmdetection 2.x pickle's key
        if self._positions is not None:
            self._key_by_position(image_keys)
        keys = set(image_keys)
        past = total = 0
        for key, dets in self._by_image.items():  # before any inference: a box off its image is a wrong file
            size = image_sizes.get(key) if image_sizes is not None and dets else None
            if size is not None:
                boxes = np.asarray([d[:4] for d in dets], np.float64)
                self._check_inside(key, boxes, size)
                past += int(((boxes[:, 2] > size[1] + 1) | (boxes[:, 3] > size[0] + 1)).sum())
                total += len(boxes)
        if total and past > 0.1 * total:  # detectors clip their boxes to the image; [x1, y1, x2, y2] read as x, y,
            # w, h runs past it on every box in the right or bottom half
            print(f"detections file {self.path}: {past} of {total} boxes run past their image's right or bottom "
                  "edge; a detector's boxes stay inside: is the file in another box format (COCO results are "
                  "[x, y, width, height]) or for images of another size?")
        if self._by_image and keys and not keys & set(self._by_image):
            knob, split = self.role
            raise SaqError(f"detections file {self.path} ({knob}) names none of the {split} images "
                           f"(it has {next(iter(self._by_image))!r}; the {split} images are keyed like "
                           f"{next(iter(keys))!r})")
        key_types = {type(key) for key in keys}
        odd = [key for key in self._by_image if type(key) not in key_types]
        if keys and odd:  # e.g. "2" among integer ids: its detections would never reach image 2
            wanted = "integer ids" if int in key_types else "file stems (strings)"
            raise SaqError(f"detections file {self.path}: image_id {odd[0]!r} is a {type(odd[0]).__name__}; the "
                           f"task's images are keyed by {wanted}, like {next(iter(keys))!r}")
        unknown = [key for key in self._by_image if key not in keys]
        if keys and unknown:
            print(f"detections file {self.path}: {sum(len(self._by_image[k]) for k in unknown)} detections on "
                  f"{len(unknown)} images the task does not have (first: {unknown[0]!r}) are not used")
        if self._label_indices:
            self._map_label_indices(category_ids)
        if category_ids is not None:
            known = set(category_ids)
            for key, dets in self._by_image.items():
                for det in dets:
                    if not isinstance(det[5], str) and det[5] not in known:
                        # A detector trained with contiguous labels (0..N-1) writes ids the dataset does not define.
                        raise SaqError(f"detections file {self.path}: image {key!r} has category_id {det[5]}, which "
                                       f"the annotation file does not define (its ids: {sorted(known)[:12]}"
                                       f"{' ...' if len(known) > 12 else ''})")
        if category_names is not None:
            self._bind_names(category_names, drop_unknown, keep_unknown)
        cap = self.max_per_image
        capped = [key for key in keys if cap is not None and len(self._by_image.get(key, ())) > cap]
        if capped:  # after unknown classes are left out: their boxes take no image's places
            print(f"detections file {self.path}: {len(capped)} of the dataset's images (evaluated or not) have more "
                  f"than prompts.max_per_image="
                  f"{self.max_per_image} detections at or above the threshold (first: {capped[0]!r}, "
                  f"{len(self._by_image[capped[0]])}); each keeps its {self.max_per_image} best")

    def _bind_names(self, category_names: Sequence[str], drop_unknown: bool, keep_unknown: bool = False) -> None:
        """Class names as the task's label indices; unknown classes refused, left out with drop_unknown (counted per
        image, for require_prompts' message), or numbered after the task's with keep_unknown."""
        index = {name: i for i, name in enumerate(category_names)}
        dropped: dict[str, int] = {}
        for key, dets in self._by_image.items():
            kept = []
            for det in dets:
                label = det[5]
                if not isinstance(label, str):
                    raise SaqError(f"detections file {self.path}: image {key!r} has category_id {label}; this task "
                                   f"needs class names (one of {list(category_names)})")
                if keep_unknown:
                    index.setdefault(label, len(index))
                if label in index:
                    kept.append((*det[:5], index[label]))
                elif drop_unknown:
                    dropped[label] = dropped.get(label, 0) + 1
                    on_image = self._dropped.setdefault(key, {})
                    on_image[label] = on_image.get(label, 0) + 1
                else:
                    raise SaqError(f"detections file {self.path}: image {key!r} has unknown class {label!r}; "
                                   f"expected one of {list(category_names)}")
            dets[:] = kept
        if dropped:
            detected = {det[5] for dets in self._by_image.values() for det in dets}
            undetected = [name for name, i in index.items() if i not in detected and i < len(category_names)]
            # a detector class spelled otherwise than the labels ('Plane', 'planee') is one the task never scores:
            # said beside the label class that then gets no detection
            alike = {name: difflib.get_close_matches(name.lower(), [u.lower() for u in undetected], n=1, cutoff=0.75)
                     for name in sorted(dropped)}
            alike = {name: next(u for u in undetected if u.lower() == match[0]) for name, match in alike.items()
                     if match}
            print(f"detections file {self.path}: left out {sum(dropped.values())} detections of classes with no "
                  f"labelled object in the evaluated images: {sorted(dropped)}"
                  + ("".join(f"; {name!r} looks like the label class {label!r}, which gets no detection" for
                             name, label in alike.items())
                     + " (class names must be spelled as the label files write them: prompts.class_names for a "
                       "pickle, the Task1_<class>.txt names of a result folder)" if alike else ""))
        self._named_labels = False

    def _map_label_indices(self, category_ids: Collection[int] | Mapping[int, str] | None) -> None:
        """A pickle's class indices as what the task's labels are. Class names (DOTA): the detector's classes,
        prompts.class_names. Category ids (COCO), as mmdetection's CocoDataset numbers them: index i is the i-th
        category of the annotation file, in file order, among those the detector has (prompts.class_names, by name;
        null: all of them)."""
        if category_ids is None:  # the task's classes are names: which index is which only the detector knows
            if self.class_names is None:
                raise SaqError(f"detections file {self.path} labels its boxes by class index; set prompts.class_names "
                               "to the detector's classes in its label order (mmrotate's DOTA v1.0: [plane, "
                               "baseball-diamond, bridge, ground-track-field, small-vehicle, large-vehicle, ship, "
                               "tennis-court, basketball-court, storage-tank, soccer-ball-field, roundabout, harbor, "
                               "swimming-pool, helicopter])")
            targets, what = list(self.class_names), "prompts.class_names"
        else:
            names = dict(category_ids) if isinstance(category_ids, Mapping) else dict.fromkeys(category_ids)
            targets, what = list(names), "the annotation file's categories"
            if self.class_names is not None:  # mmdet: coco.get_cat_ids(cat_names=classes), in the file's order
                missing = [c for c in self.class_names if c not in names.values()]
                if missing:
                    listed = [n for n in names.values() if n is not None]
                    raise SaqError(f"prompts.class_names (for {self.path}) has {missing[0]!r}, which the task's "
                                   "annotation file does not name " + (f"(its categories: {listed[:8]}"
                                   f"{' ...' if len(listed) > 8 else ''})" if listed else "(its categories have no "
                                   "names)"))
                targets = [i for i in targets if names[i] in self.class_names]
                what = "the annotation file's categories named in prompts.class_names"
            shown = ", ".join(f"{i} → {cat}" + (f" ({names[cat]})" if names[cat] else "")
                              for i, cat in enumerate(targets[:4]))
            print(f"detections file {self.path}: class index i is the i-th of {what}, in file order: {shown}"
                  f"{' ...' if len(targets) > 4 else ''}")
        if self._detector_classes is not None and self._detector_classes != len(targets):  # known for 2.x files
            raise SaqError(f"detections file {self.path} is of a detector of {self._detector_classes} classes "
                           f"(mmdetection 2.x writes one array per class) and there are {len(targets)} of {what}: "
                           "set prompts.class_names to the detector's classes in its order")
        for key, dets in self._by_image.items():  # every label checked before any is changed
            for det in dets:
                if det[5] >= len(targets):
                    raise SaqError(f"detections file {self.path}: image {key!r} has label {det[5]}, but there are "
                                   f"{len(targets)} of {what} (label i is the i-th)")
        for dets in self._by_image.values():
            dets[:] = [(*det[:5], targets[det[5]]) for det in dets]
        self._label_indices = False
        self._named_labels = category_ids is None

    def for_image(self, key, gt: BoxPrompts, image_size: tuple[int, int]) -> BoxPrompts:
        if self._label_indices:
            raise SaqError(f"detections file {self.path} was not bound to a task (its labels are class indices)")
        if self._named_labels:
            raise SaqError(f"detections file {self.path} names classes by name; this task needs numeric "
                           "category_id values")
        # above the threshold, highest first (_keep_usable); capped here, after bind left out unknown classes
        dets = self._by_image.get(key, [])[: self.max_per_image]
        if not dets:
            return BoxPrompts.empty()
        arr = np.asarray(dets, np.float64)
        self._check_inside(key, arr[:, :4], image_size)
        return BoxPrompts(arr[:, :4].astype(np.float32), arr[:, 4].astype(np.float32), arr[:, 5].astype(np.int64))

    def _check_inside(self, key, boxes: np.ndarray, image_size: tuple[int, int]) -> None:
        h, w = image_size
        outside = outside_image(boxes, image_size)
        if outside.any():  # a detector run at another resolution, or on other images under the same ids
            box = [round(float(v), 1) for v in boxes[int(np.argmax(outside))]]
            raise SaqError(f"detections file {self.path}: image {key!r} has box {box} (x1, y1, x2, y2), wholly "
                           f"outside the {w}x{h} image; detections must be in the image's own pixel coordinates")

    def require_prompts(self, image_keys: Sequence, which: str = "evaluated") -> None:
        if not any(self._by_image.get(key) for key in image_keys):
            dropped: dict[str, int] = {}
            for key in image_keys:
                for name, count in self._dropped.get(key, {}).items():
                    dropped[name] = dropped.get(name, 0) + count
            if dropped:  # the threshold let them through: blaming it would send the user the wrong way
                raise SaqError(f"detections file {self.path}: the {sum(dropped.values())} detections on the "
                               f"{len(image_keys)} {which} images that reach prompts.score_threshold="
                               f"{self.score_threshold} are all of classes with no labelled object in the evaluated "
                               f"images, so left out: {sorted(dropped)} (task.classes=null takes the classes from "
                               "the label files; name the classes to score in task.classes)")
            scores = [self._best_score[key] for key in image_keys if key in self._best_score]
            found = f"the highest score is {max(scores):.3g}" if scores else "the file has none for them"
            raise SaqError(f"detections file {self.path}: no detection on the {len(image_keys)} {which} images "
                           f"reaches prompts.score_threshold={self.score_threshold} ({found})")
        bare = [key for key in image_keys if not self._by_image.get(key)]
        # a detector may find nothing on an image; said once (a run evaluates FP, quantized, deployed), as it costs
        # recall
        if bare and which == "evaluated" and tuple(image_keys) not in self._bare_said:
            self._bare_said.add(tuple(image_keys))
            print(f"detections file {self.path}: {len(bare)} of the {len(image_keys)} evaluated images have no "
                  f"detection reaching prompts.score_threshold={self.score_threshold} (first: {bare[0]!r}); labelled "
                  "objects on them count as missed")  # the source does not know which images have objects

    @property
    def calibration_uses_ground_truth(self) -> bool:
        return not self.calib_file

    def calibration_source(self) -> tuple[PromptSource, str]:
        if not self.calib_file:
            print("calibration prompts: ground-truth boxes (prompts.calib_file is not set; set it to the detector's "
                  "results on the calibration images to calibrate as the paper does)")
            return GroundTruthBoxes(), "gt (fallback: prompts.calib_file not set)"
        source = DetectionsFile(self.calib_file, self.score_threshold, self.max_per_image,
                                class_names=self.class_names if _is_pickle(Path(self.calib_file)) else None,
                                progress=self.progress)
        source.role = ("prompts.calib_file", "calibration")
        return source, f"detections:{Path(self.calib_file).resolve()}"

    def fingerprint(self) -> str:
        # A folder's fingerprint covers every result file in it.
        files = sorted(self.path.glob("Task1_*.txt")) if self.path.is_dir() else [self.path]
        names = f"-{self.class_names}" if self.class_names is not None else ""
        return (f"detections-{self.path.resolve()}-{files_digest(files)}-{self.score_threshold}-{self.max_per_image}"
                f"{names}")


PICKLE_SUFFIXES = (".pkl", ".pickle")


def _is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES and not path.is_dir()


class _PickledObject:
    """Stands in for a class of the OpenMMLab stack (mmdet's box types, mmengine's data elements) in a results
    pickle, so it loads without mmdet or mmrotate installed: its attributes are kept, nothing of it runs."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict, slots)
            state = {k: v for part in state if isinstance(part, dict) for k, v in part.items()}
        # data only: a dunder key (e.g. __setstate__) would make a later BUILD call what the file names
        self.__dict__.update({k: v for k, v in (state.items() if isinstance(state, dict) else ())
                              if isinstance(k, str) and not k.startswith("__")})


class _ResultsUnpickler(pickle.Unpickler):
    """Loads a results pickle with only what such a file holds: builtins data, numpy arrays, torch tensors and
    stand-ins for OpenMMLab classes; any other global (code a pickle could run) is refused by name."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        import torch

        module = {"__builtin__": "builtins"}.get(module, module)  # Python 2 names, which protocol 2 writes
        if module.split(".")[0] in ("mmdet", "mmrotate", "mmengine", "mmcv"):
            return _PickledObject
        if "." in name:  # protocol 4 looks dotted names up attribute by attribute; the pairs below are plain names,
            raise self._refused(module, name)  # so this only keeps a later, looser rule from reaching further
        if (module, name) == ("torch.storage", "_load_from_bytes"):  # a tensor's storage: tensors only
            return self._load_storage
        allowed = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"), ("torch", "Size"),
                   ("collections", "OrderedDict"), ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
                   ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                   ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "bytes"),
                   ("builtins", "bytearray")}
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)  # _rebuild_tensor_v3's
        if (module, name) in allowed or dtype:
            return super().find_class(module, name)
        raise self._refused(module, name)

    def _refused(self, module: str, name: str) -> SaqError:
        return SaqError(f"detections file {self.path} holds a {module}.{name}, which a detector's results do not; "
                        "saq loads only mmdetection / mmrotate results pickles (tensors, arrays, lists and dicts)")

    def _load_storage(self, data: bytes):
        import torch

        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's own text leads with advice to drop weights_only: skip it
            why = next((line.strip() for line in str(exc).splitlines() if "nsupported" in line), "unreadable")
            raise SaqError(f"detections file {self.path} holds a tensor storage that is not plain tensor data "
                           f"({why[:100]}); saq loads only mmdetection / mmrotate results pickles") from None


LARGE_RESULTS_FILE = 32 << 20  # bytes


def _reading_bar(path: Path, size: int, progress: bool, unit: str = "B", what: str = "reading") -> tqdm:
    """A progress bar for reading a detections file (size in bytes, or entries with unit="entries"); shown only for
    large files (600k COCO results, 50 MB of json, take 10 s here; a detector's results on a whole training set
    several times that)."""
    large = path.stat().st_size >= LARGE_RESULTS_FILE
    return tqdm(total=size, unit=unit, unit_scale=unit == "B", desc=f"{what} {path.name}", leave=False,
                disable=not progress or not large)


class _CountingReader:
    """A binary file whose reads advance a progress bar (pickle reads through read, readline and readinto)."""

    def __init__(self, file, bar: tqdm):
        self.file, self.bar = file, bar

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        self.bar.update(len(data))
        return data

    def readline(self) -> bytes:
        data = self.file.readline()
        self.bar.update(len(data))
        return data

    def readinto(self, buffer) -> int:
        n = self.file.readinto(buffer)
        self.bar.update(n or 0)
        return n

    def peek(self, n: int = 0) -> bytes:  # with it the C unpickler reads ahead in blocks, not once per opcode
        return self.file.peek(n)


def _load_results_pickle(path: Path, progress: bool = True):
    try:
        with open(path, "rb") as f, _reading_bar(path, path.stat().st_size, progress) as bar:
            return _ResultsUnpickler(f if bar.disable else _CountingReader(f, bar), path).load()
    except SaqError:
        raise
    except OSError as exc:
        raise SaqError(f"detections file {path} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # a truncated or foreign file fails inside pickle in many ways
        raise SaqError(f"detections file {path} is not a readable results pickle ({type(exc).__name__}: "
                       f"{str(exc)[:120]})") from None


def _field(item, name: str):
    """A field of a results entry: a dict key, or an attribute of a stand-in object (mmengine keeps some under a
    leading underscore, e.g. _pred_instances)."""
    if isinstance(item, Mapping):
        return item.get(name, item.get(f"_{name}"))
    if isinstance(item, _PickledObject):
        return item.__dict__.get(name, item.__dict__.get(f"_{name}"))
    return None


def _plain(value):
    """A 0-d tensor or numpy number as a Python number; anything else unchanged."""
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and value.ndim == 0:
        return value.item()
    return value


def _array(value, what: str) -> np.ndarray:
    """A tensor, array or mmdet box object (its .tensor) as a float64 numpy array."""
    import torch

    if isinstance(value, _PickledObject):
        value = _field(value, "tensor")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().to(torch.float64).numpy()  # via float64: bfloat16 has no numpy type
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.number):
        raise SaqError(f"{what} is {type(value).__name__}; expected a tensor or array of numbers")
    return value.astype(np.float64)


def horizontal_boxes(boxes: np.ndarray) -> list[tuple[float, float, float, float]]:
    """The horizontal xyxy boxes enclosing N x 4 (xyxy), N x 5 (cx, cy, w, h, angle in radians, any of mmrotate's
    angle conventions) or N x 8 (quadrilateral) boxes."""
    if boxes.shape[1] == 4:
        return [tuple(b) for b in boxes.tolist()]
    if boxes.shape[1] == 5:
        cx, cy, w, h, angle = boxes.T
        cos, sin = np.abs(np.cos(angle)), np.abs(np.sin(angle))
        half_x, half_y = (w * cos + h * sin) / 2, (w * sin + h * cos) / 2
        return [tuple(b) for b in np.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], 1).tolist()]
    return [tuple(b) for b in enclosing_boxes(boxes.reshape(len(boxes), 4, 2)).tolist()]  # as json polygons


def _json_list(path: Path, progress: bool = True) -> Iterator:
    """The entries of a JSON list file one at a time: a detector's results on a whole training set (millions of
    entries) are never all decoded at once."""
    text = read_text(path, "detections file")
    with _reading_bar(path, len(text), progress) as bar:  # counts characters (bytes for ASCII json)
        yield from _json_entries(path, text, bar)


def _json_entries(path: Path, text: str, bar: tqdm) -> Iterator:
    decoder, blank = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    at = blank.match(text).end()
    if not text.startswith("[", at):
        raise SaqError(f"detections file {path} must be a JSON list of COCO results "
                       "({image_id, category_id, bbox: [x, y, w, h], score})")
    at = blank.match(text, at + 1).end()
    first = True
    try:
        while not text.startswith("]", at):
            if not first:
                if not text.startswith(",", at):
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
                at = blank.match(text, at + 1).end()
            entry, end = decoder.raw_decode(text, at)
            yield entry
            if not bar.disable:
                bar.update(end - at)
            at, first = blank.match(text, end).end(), False
        if blank.match(text, at + 1).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, at + 1)
    except json.JSONDecodeError as exc:
        raise SaqError(f"detections file {path} is not valid JSON: {exc}") from None


def _result_id(value):
    """A detection's image or category id as the dataset keys it: a string, an int, or an int written as a float
    (1.0, from labels passed through float arrays); None for anything else (1.7, true)."""
    if isinstance(value, str) or is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _flat(box: Sequence[float]) -> bool:
    """A finite box without width or height: a detector's box clipped to a line at the image edge."""
    return bool(np.isfinite(box).all() and box[2] >= box[0] and box[3] >= box[1]
                and (box[2] == box[0] or box[3] == box[1]))


FLAT = "flat"  # detection_problem's answer for a box to leave out (and count), not refuse


def detection_problem(box: Sequence[float], score: float) -> str | None:
    """None for a usable detection, FLAT for a box without width or height (a detector's box clipped to a line at
    the image edge: left out), else why the entry cannot be a detection."""
    return FLAT if _flat(box) else box_problem(box) or score_problem(score)


def _say_flat(path: Path, count: int) -> None:
    if count:
        print(f"detections file {path}: left out {count} detections without width or height (nothing to prompt)")


def box_problem(box: Sequence[float]) -> str | None:
    """Why an xyxy box cannot be a prompt or an object (a non-finite value, no width or height), or None."""
    if not np.isfinite(box).all():
        return "the box has a non-finite value"
    if box[2] <= box[0] or box[3] <= box[1]:
        return "the box needs width and height > 0"
    return None


def score_problem(score: float) -> str | None:
    """Why a detection score is not a detector's confidence (a finite number in [0, 1]), or None."""
    return None if 0 <= score <= 1 else "the score must be in [0, 1]"


def outside_image(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Which N x 4 xyxy boxes lie wholly outside an image of (height, width): no pixel of it to prompt or find."""
    h, w = image_size
    return (boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)


def enclosing_boxes(polygons: np.ndarray) -> np.ndarray:
    """Horizontal xyxy boxes enclosing N x K x 2 polygons."""
    if not len(polygons):
        return np.zeros((0, 4), np.float32)
    return np.concatenate([polygons.min(1), polygons.max(1)], 1).astype(np.float32)


def _enclosing_box(coords: list[float]) -> tuple[float, float, float, float]:
    """The horizontal xyxy box enclosing a flat polygon [x1, y1, x2, y2, ...]."""
    if len(coords) < 4 or len(coords) % 2:
        raise ValueError("a polygon needs an even number of coordinates")
    return tuple(enclosing_boxes(np.asarray(coords, np.float64).reshape(1, -1, 2))[0].tolist())
