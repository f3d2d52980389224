"""The Task interface: calibration samples for quantization, and evaluation of a Segmenter into metrics."""

from __future__ import annotations

import hashlib
import io
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from saq.errors import SaqError
from saq.sam.segmenter import PromptedImage, Segmenter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class Task(ABC):
    """A dataset plus a metric. A task sees the model only through a Segmenter."""

    name: str = "task"
    calibration_prompts: str = "-"  # what prompted the calibration images (set by calibration_samples; results.json)

    @abstractmethod
    def calibration_samples(self, n: int, knob: str = "quant.calib_images") -> list[PromptedImage]:
        """The first n images of the calibration split with the prompts the task would give them (`knob`: the
        setting that asked for n, named when the split is too small)."""

    def check_calibration_split(self) -> None:
        """SaqError now when the calibration split's files are missing: a quantized run checks before the FP
        evaluation, which on real data takes long (an FP run never reads the split)."""

    @abstractmethod
    def evaluate(self, segmenter: Segmenter, progress: bool = True) -> dict:
        """Run the segmenter over the evaluation split; returns scalar metrics (fractions 0-1) and details."""

    def fingerprint(self) -> str:
        """What identifies this task's evaluation data and prompts (used to cache FP metrics)."""
        return self.name


def first_prompted(keys: list, n: int, sample_for, source, split, prompts: str, knob: str) -> list[PromptedImage]:
    """The calibration samples of the first n `keys` (in order) that get prompts: sample_for(key) is the key's
    PromptedImage, or None when its prompt source gives it none. None at all: the source says why (a detections
    file whose scores all fall below the threshold); fewer than n: a SaqError naming the split and `knob`."""
    samples = []
    for key in keys:
        if len(samples) == n:
            break
        sample = sample_for(key)
        if sample is not None:
            samples.append(sample)
    if not samples:
        source.require_prompts(keys, "calibration")
        # lowering the count cannot help: the split itself gives nothing to calibrate on
        raise SaqError(f"calibration split {split} has no image with prompts ({prompts}) among its {len(keys)} "
                       "images; calibration needs at least one (are its objects labelled?)")
    if len(samples) < n:
        raise SaqError(f"calibration split {split} has only {len(samples)} images with prompts ({prompts}), {n} "
                       f"requested (lower {knob})")
    return samples


def files_digest(paths: Iterable[Path]) -> str:
    """A short hash of each file's name, size and modification time: replacing any file in place changes it."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        st = path.stat() if path.is_file() else None
        digest.update(f"{path.resolve()}:{st and st.st_size}:{st and st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB, or raise SaqError naming the file."""
    path = Path(path)
    data = read_bytes(path, "image")
    if not data:
        raise SaqError(f"cannot decode image {path}: the file is empty")
    if _truncated_jpeg(data):  # OpenCV decodes some truncated files with only a warning, and refuses others
        raise SaqError(f"cannot decode image {path}: the JPEG file is truncated or corrupt (it does not decode to its "
                       "end-of-image marker)")
    # the stored pixel order, not the EXIF-rotated one: annotation sizes, masks and label maps (read by PIL)
    # describe the stored pixels, and a rotated square image would misalign with its masks without any error;
    # ANYDEPTH keeps 16-bit pixels as they are (IMREAD_COLOR alone scales them to 8 bits: a 12-bit image in a
    # 16-bit PNG would read nearly black), so they can be refused below
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None:  # OpenCV cannot turn some deep images (a float TIFF) into colour: their own pixels say why
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if bgr is None or bgr.dtype == np.uint8:
            raise SaqError(f"cannot decode image {path}: the file is corrupt or not an image")
    if bgr.dtype != np.uint8:
        raise SaqError(f"image {path} has {bgr.dtype} pixels; SAM takes 8 bits per channel: convert the image to "
                       "8-bit (scaling its value range to 0..255)")
    return np.ascontiguousarray(bgr[..., ::-1])


def read_bytes(path: Path, what: str) -> bytes:
    """A file's bytes, or SaqError naming it: missing, or unreadable with the OS's reason (e.g. Permission denied)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SaqError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise SaqError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _truncated_jpeg(data: bytes) -> bool:
    """Whether a JPEG file's bytes end before its image data does."""
    if data[:2] != b"\xff\xd8" or data[-2:] == b"\xff\xd9":  # not a JPEG, or one that ends with its end marker
        return False
    from PIL import Image  # bytes after the end marker are allowed: only a full decode tells them from truncation

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except OSError:
        return True
    return False


class HeaderSizes:
    """get(key) -> (height, width) of an image file, read from the file's header when first asked for (no pixels
    are decoded); None for a key it lacks or an image whose header cannot be read (reading the image later names
    its problem); SaqError for a file without read permission."""

    def __init__(self, paths: Iterable[tuple]):
        self.paths, self._sizes = dict(paths), {}

    def get(self, key) -> tuple[int, int] | None:
        if key not in self._sizes and key in self.paths:
            from PIL import Image

            try:
                with Image.open(self.paths[key]) as img:  # the stored pixels' size, as read_rgb decodes them
                    width, height = img.size
                self._sizes[key] = (height, width)
            except PermissionError as exc:  # reading the pixels would fail the same way, maybe hours later
                raise SaqError(f"cannot read {self.paths[key]}: {exc.strerror or exc}") from None
            except Exception:  # not an image, corrupt, or over PIL's pixel limit: no size known before reading
                self._sizes[key] = None
        return self._sizes.get(key)


def check_image_size(path: Path, size: tuple[int, int], expected: tuple[int, int], says: str) -> None:
    """SaqError unless an image's (height, width) is what `says` (e.g. "its annotation entry (id 7)") gives; a
    swapped size on a photo with an EXIF rotation tag is named as that (COCO tools read the stored pixels)."""
    if tuple(size) == tuple(expected):
        return
    hint = ""
    if tuple(size) == tuple(expected)[::-1]:
        from PIL import Image

        try:
            with Image.open(path) as img:
                rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
        except Exception:  # noqa: BLE001 - no readable header: no hint
            rotated = False
        if rotated:
            hint = ("; its EXIF orientation tag turns it by 90 degrees, which saq (like pycocotools) does not apply: "
                    "save the image with the rotation applied, or labels made on the stored pixels")
    raise SaqError(f"image {path} is {size[1]}x{size[0]} (w x h) but {says} says {expected[1]}x{expected[0]}{hint}")


def read_text(path: Path, what: str) -> str:
    """A text file's contents (without a leading byte-order mark), or SaqError naming the file when it cannot be
    read (with the OS's reason) or is not UTF-8."""
    try:
        # utf-8-sig: a BOM some Windows editors write would otherwise glue itself to the first image name or key
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SaqError(f"{what} {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})") from None
    except OSError as exc:  # a folder in the file's place, or one without read permission
        raise SaqError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def split_paths(node, paths: Sequence[str], key: str, optional: Mapping | None = None) -> dict:
    """A task's `data` or `calib` setting as a plain dict: each of `paths` a non-empty path, plus the `optional`
    keys (with their defaults); a missing, null or unknown key (one added with + is read by nothing) is SaqError."""
    optional = dict(optional or {})
    if not isinstance(node, Mapping):
        raise SaqError(f"{key} must be a mapping with {', '.join(paths)}, got {node!r}")
    unknown = sorted(set(node) - set(paths) - set(optional))
    if unknown:
        raise SaqError(f"{key}.{unknown[0]} is not a setting of {key}; expected one of {[*paths, *optional]}")
    for name in paths:
        value = node.get(name)
        if not isinstance(value, str) or not value.strip():
            raise SaqError(f"{key}.{name}={value!r} invalid; expected a path" + (" (relative to task.data.root)"
                                                                                  if name != "root" else ""))
    return {**optional, **{name: node[name] for name in node}}


def check_class_names(names: list[str], key: str) -> list[str]:
    """The names, or SaqError naming the first one given twice (a metric keyed by name would keep one of them)."""
    seen = set()
    for name in names:
        if name in seen:
            raise SaqError(f"{key} names {name!r} twice ({names}); each class needs its own name")
        seen.add(name)
    return names


def require_dir(path: str | Path, what: str, config_key: str) -> Path:
    path = Path(path)
    if path.is_file():
        raise SaqError(f"{what} folder {path} is a file (set {config_key} to a folder)")
    if not path.is_dir():
        raise SaqError(f"{what} folder not found: {path} (set {config_key})")
    return path


def require_file(path: str | Path, what: str, config_key: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise SaqError(f"{what} {path} is a folder (set {config_key} to a file)")
    if not path.is_file():
        raise SaqError(f"{what} not found: {path} (set {config_key})")
    return path


def list_images(img_dir: Path, config_key: str) -> list[tuple[str, Path]]:
    """(file stem, path) of every image in a folder, sorted by stem."""
    require_dir(img_dir, "image", config_key)
    try:
        entries = list(img_dir.iterdir())
    except OSError as exc:  # a folder without read permission
        raise SaqError(f"cannot list image folder {img_dir}: {exc.strerror or exc} (set {config_key})") from None
    # hidden files are no images: a Mac's copy leaves ._NAME.png (AppleDouble metadata) beside each NAME.png
    images = sorted((p.stem, p) for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    others = sorted(p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES
                    and not p.name.startswith(".") and p.is_file())
    if others:  # said, so that an image in another format does not leave the evaluation set silently
        print(f"{img_dir}: left out {len(others)} files that are not {'/'.join(IMAGE_SUFFIXES)} images "
              f"(first: {others[0]})")
    if not images:
        raise SaqError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {img_dir} (set {config_key})")
    for (a, _), (b, _) in itertools.pairwise(images):
        if a == b:
            raise SaqError(f"two images in {img_dir} share the name {a!r}; images are keyed by file stem")
    return images
