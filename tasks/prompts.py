"""Where box prompts come from: ground truth, jittered ground truth, or a detector's results file."""

from __future__ import annotations

import json
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saq.errors import SaqError


@dataclass
class BoxPrompts:
    """Boxes for one image (xyxy, original pixels) with a score and a category id each."""

    boxes: np.ndarray  # N x 4 float32
    scores: np.ndarray  # N float32
    labels: np.ndarray  # N int64 (dataset category ids)

    @staticmethod
    def empty() -> "BoxPrompts":
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

    def fingerprint(self) -> str:
        return self.name


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
        if scale < 0 or max_px < 0:
            raise SaqError(f"prompts.scale and prompts.max_px must be >= 0, got {scale}, {max_px}")
        self.scale, self.max_px, self.seed = scale, max_px, seed

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
        return f"jittered-{self.scale}-{self.max_px}-{self.seed}"


class DetectionsFile(PromptSource):
    """A detector's results: COCO results-format json (what mmdetection and most detectors write).

    Each entry: {"image_id", "category_id", "bbox": [x, y, w, h], "score"}. Keeps detections with
    score >= score_threshold, at most max_per_image per image, highest scores first.
    """

    name = "detections"

    def __init__(self, file: str | None, score_threshold: float = 0.05, max_per_image: int = 100):
        if not file:
            raise SaqError("prompts=detections needs a file: set prompts.file=/path/to/detections.json")
        path = Path(file)
        if not path.is_file():
            raise SaqError(f"detections file not found: {path} (set prompts.file)")
        if max_per_image < 1:
            raise SaqError(f"prompts.max_per_image must be >= 1, got {max_per_image}")
        self.path, self.score_threshold, self.max_per_image = path, score_threshold, max_per_image
        self._by_image = self._read(path)

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            entries = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SaqError(f"detections file {path} is not valid JSON: {exc}") from None
        if not isinstance(entries, list):
            raise SaqError(f"detections file {path} must be a JSON list of COCO results "
                           "({image_id, category_id, bbox: [x, y, w, h], score})")
        by_image: dict = {}
        for i, det in enumerate(entries):
            try:
                x, y, w, h = (float(v) for v in det["bbox"])
                item = (int(det["image_id"]), x, y, x + w, y + h, float(det["score"]), int(det["category_id"]))
            except (KeyError, TypeError, ValueError):
                raise SaqError(f"detections file {path}: entry {i} is not a COCO result "
                               "({image_id, category_id, bbox: [x, y, w, h], score})") from None
            by_image.setdefault(item[0], []).append(item[1:])
        return by_image

    def for_image(self, key, gt: BoxPrompts, image_size: tuple[int, int]) -> BoxPrompts:
        dets = [d for d in self._by_image.get(key, []) if d[4] >= self.score_threshold]
        dets.sort(key=lambda d: -d[4])
        dets = dets[: self.max_per_image]
        if not dets:
            return BoxPrompts.empty()
        arr = np.asarray(dets, np.float64)
        return BoxPrompts(arr[:, :4].astype(np.float32), arr[:, 4].astype(np.float32), arr[:, 5].astype(np.int64))

    def fingerprint(self) -> str:
        stat = self.path.stat()
        return f"detections-{self.path.resolve()}-{stat.st_size}-{stat.st_mtime_ns}-{self.score_threshold}-" \
               f"{self.max_per_image}"
