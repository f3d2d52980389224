"""Procedural scenes (shapes with textures, clutter and occlusion) written as COCO json, DOTA txt and label-map PNGs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from saq.errors import SEED_LIMIT, SaqError, check_int, check_seed, is_int
from saq.log import file_lock, write_json_atomic, write_text_atomic

# Bump when rendering changes: cached datasets are keyed on it.
GENERATOR_VERSION = 2

CATEGORIES = ("disk", "rectangle", "triangle", "star", "hexagon", "cross", "ring", "crescent")
IMAGE_SIZE = 256
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

# Objects whose visible part is smaller than this are not annotated (they stay in the image as clutter).
MIN_VISIBLE_PIXELS = 150
# DOTA-style difficulty: heavily occluded or small objects.
DIFFICULT_VISIBLE_FRACTION = 0.5
DIFFICULT_AREA = 300
# task.data.root as conf/task/*.yaml set it, relative to the working directory: its data/ is git-ignored, so a fresh
# clone lacks it and generation makes it (any other root's parent must exist, see check_new_root)
DEFAULT_ROOT = Path("data/synthetic")


@dataclass(frozen=True)
class Knobs:
    """How a caller's user sets what generation is given: the seed, the root, and the setting that reads real data
    instead (None where there is none), so that every refusal names the knobs the user typed."""

    seed: str
    root: str
    real_data: str | None = None

    def instead(self, way_out: str) -> str:
        """The way out of a refusal, after the real-data setting where the caller has one."""
        return f"set {self.real_data} for real data, or {way_out}" if self.real_data else way_out


RUN_KNOBS = Knobs("task.generate.seed", "task.data.root", "task.generate=null")  # the main command's config keys
CLI_KNOBS = Knobs("--seed", "--out")  # python -m tasks.synthetic: it only generates


@dataclass
class Scene:
    """One rendered image with its instances (visible masks, in paint order)."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    masks: list[np.ndarray]  # each H x W bool, the visible part
    categories: list[int]  # 0-based index into CATEGORIES
    difficult: list[bool]

    def label_map(self) -> np.ndarray:
        """Semantic label map: 0 background, 1..K categories."""
        labels = np.zeros(self.image.shape[:2], np.uint8)
        for mask, cat in zip(self.masks, self.categories):
            labels[mask] = cat + 1
        return labels


def _regular_polygon(n: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], 1) * radius


def _shape_mask(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """Full (unoccluded) mask of one object at a random pose."""
    canvas = np.zeros((size, size), np.uint8)
    radius = rng.uniform(24, 64)
    cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    def fill(points: np.ndarray, value: int = 1) -> None:
        pts = (points @ rot.T + [cx, cy]).round().astype(np.int32)
        cv2.fillPoly(canvas, [pts], value)

    if category == "disk":
        cv2.circle(canvas, (int(cx), int(cy)), int(radius * 0.8), 1, -1)
    elif category == "rectangle":
        w, h = radius, radius * rng.uniform(0.35, 0.7)
        fill(np.array([[-w, -h], [w, -h], [w, h], [-w, h]]))
    elif category == "triangle":
        fill(_regular_polygon(3, radius, 0.0) * [1.0, rng.uniform(0.7, 1.0)])
    elif category == "star":
        outer = _regular_polygon(5, radius, 0.0)
        inner = _regular_polygon(5, radius * 0.45, np.pi / 5)
        fill(np.stack([outer, inner], 1).reshape(-1, 2))
    elif category == "hexagon":
        fill(_regular_polygon(6, radius * 0.85, 0.0))
    elif category == "cross":
        arm = radius * 0.3
        fill(np.array([[-radius, -arm], [radius, -arm], [radius, arm], [-radius, arm]]))
        fill(np.array([[-arm, -radius], [arm, -radius], [arm, radius], [-arm, radius]]))
    elif category == "ring":
        axes = (int(radius * 0.85), int(radius * rng.uniform(0.6, 0.85)))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, np.degrees(theta), 0, 360, 1, -1)
        inner = (max(1, int(axes[0] * 0.5)), max(1, int(axes[1] * 0.5)))
        cv2.ellipse(canvas, (int(cx), int(cy)), inner, np.degrees(theta), 0, 360, 0, -1)
    elif category == "crescent":
        r = int(radius * 0.8)
        cv2.circle(canvas, (int(cx), int(cy)), r, 1, -1)
        off = np.array([np.cos(theta), np.sin(theta)]) * r * 0.55
        cv2.circle(canvas, (int(cx + off[0]), int(cy + off[1])), int(r * 0.85), 0, -1)
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return canvas.astype(bool)


_GRID = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-size texture: solid, stripes, checker or mottled noise, in two random colours."""
    c1 = rng.integers(20, 236, 3).astype(np.float32)
    c2 = np.clip(c1 + rng.normal(0, 70, 3), 0, 255).astype(np.float32)
    yy, xx = _GRID[0, :size, :size], _GRID[1, :size, :size]
    kind = rng.integers(4)
    if kind == 0:
        weight = np.zeros((size, size), np.float32)
    elif kind == 1:
        a = rng.uniform(0, np.pi)
        period = rng.uniform(4, 12)
        weight = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        cell = int(rng.integers(4, 10))
        weight = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:
        small = rng.random((size // 16, size // 16)).astype(np.float32)
        weight = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return c1 + weight[..., None] * (c2 - c1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient plus low-frequency noise plus clutter (lines and blobs that are not objects)."""
    c1, c2 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    t = _GRID[int(rng.integers(2)), :size, :size] / size
    img = c1 + t[..., None] * (c2 - c1)
    noise = cv2.resize(rng.normal(0, 25, (8, 8, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = img + noise
    for _ in range(int(rng.integers(2, 7))):
        p1, p2 = rng.integers(0, size, (2, 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), color, int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(2, 8))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(2, 6, 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    return img


def render_scene(seed: int, split: str, index: int, size: int = IMAGE_SIZE) -> Scene:
    """Render scene `index` of `split`; the same (seed, split, index) always gives the same scene."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    if size > IMAGE_SIZE:
        raise ValueError(f"size {size} is larger than the generator's maximum {IMAGE_SIZE}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, GENERATOR_VERSION])
    img = _background(rng, size)
    n_objects = int(rng.integers(2, 7))
    owner = np.full((size, size), -1, np.int16)
    full_masks, cats = [], []
    for _ in range(n_objects):
        cat = int(rng.integers(len(CATEGORIES)))
        mask = _shape_mask(rng, CATEGORIES[cat], size)
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        tex = _texture(rng, size)
        img[mask] = tex[mask]
        owner[mask] = len(full_masks)
        full_masks.append(mask)
        cats.append(cat)
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    img = img + rng.normal(0, 4, img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)

    masks, categories, difficult = [], [], []
    for i, (full, cat) in enumerate(zip(full_masks, cats)):
        visible = owner == i
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS:
            continue
        masks.append(visible)
        categories.append(cat)
        difficult.append(area / full.sum() < DIFFICULT_VISIBLE_FRACTION or area < DIFFICULT_AREA)
    return Scene(image, masks, categories, difficult)


def oriented_box(mask: np.ndarray, largest_region: bool = False) -> np.ndarray:
    """The minimum-area rotated rectangle of a mask's pixels (cv2.minAreaRect on their indices, i.e. through pixel
    centres, as MMRotate-SAM fits predicted masks), as 4 corner points (x, y); with largest_region, of its largest
    8-connected region only (how the generator labels an occluded object)."""
    if largest_region:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if n <= 1:
            raise ValueError("oriented_box: the mask is empty")
        ys, xs = np.nonzero(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))
    else:
        ys, xs = np.nonzero(mask)
        if not len(xs):
            raise ValueError("oriented_box: the mask is empty")
    rect = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
    return cv2.boxPoints(rect)


def _coco_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_split(root: Path, split: str, n: int, seed: int, progress: bool = True, keep_first: int = 0) -> None:
    """Render n scenes and write them in the three formats under root/<split>/ and root/annotations/ (the
    annotation file replaced whole). The first keep_first scenes, written by a complete generation of the same
    seed, are not written again (a scene depends only on seed, split and index; a run may be reading it)."""
    from tqdm import tqdm

    img_dir, dota_dir, label_dir = (root / split / d for d in ("images", "labelTxt", "labels"))
    for d in (img_dir, dota_dir, label_dir, root / "annotations"):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for idx in tqdm(range(n), desc=f"synthetic {split}", disable=not progress, leave=False):
        scene = render_scene(seed, split, idx)
        name = f"{idx:06d}"
        h, w = scene.image.shape[:2]
        # cv2.imwrite reports a failure (a full disk, no permission) by returning False, not by raising
        if idx >= keep_first and not (
                cv2.imwrite(str(img_dir / f"{name}.jpg"), scene.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                and cv2.imwrite(str(label_dir / f"{name}.png"), scene.label_map())):
            raise SaqError(f"cannot write scene {name} into {root / split}; check free space and permissions")
        images.append({"id": idx + 1, "file_name": f"{name}.jpg", "height": h, "width": w})
        dota_lines = ["imagesource:saq-synthetic", "gsd:null"]
        for mask, cat, diff in zip(scene.masks, scene.categories, scene.difficult):
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": idx + 1,
                    "category_id": cat + 1,
                    "segmentation": _coco_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                    "iscrowd": 0,
                }
            )
            corners = " ".join(f"{v:.1f}" for v in oriented_box(mask, largest_region=True).reshape(-1))
            dota_lines.append(f"{corners} {CATEGORIES[cat]} {int(diff)}")
        if idx >= keep_first:
            (dota_dir / f"{name}.txt").write_text("\n".join(dota_lines) + "\n")
    coco = {
        "info": {"description": f"saq synthetic {split}", "seed": seed, "generator_version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CATEGORIES)],
    }
    write_text_atomic(root / "annotations" / f"instances_{split}.json", json.dumps(coco))  # read whole or not at all


# What write_split writes into each split folder (name pattern: 6-digit index): the only files regeneration deletes.
SPLIT_FILES = {"images": ".jpg", "labelTxt": ".txt", "labels": ".png"}


def _generated_files(root: Path) -> list[Path]:
    """The files an earlier generation wrote under root (meta.json aside), or SaqError naming a file it did not."""
    files = [root / "annotations" / f"instances_{split}.json" for split in ("train", "val")]
    for split in ("train", "val"):
        for sub, suffix in SPLIT_FILES.items():
            folder = root / split / sub
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                if not (path.is_file() and path.suffix == suffix and len(path.stem) == 6 and path.stem.isdigit()):
                    raise SaqError(f"cannot regenerate the synthetic dataset in {root}: {path} was not written by "
                                   "the generator (move it away, or use another folder)")
                files.append(path)
    return [f for f in files if f.is_file()]


def generation_lock(root: Path) -> Path:
    """The lock file beside root that one generation at a time holds (beside it: root may not exist yet)."""
    return root.parent / f".{root.name}.generate.lock"


def evaluation_limit(root: Path, generate: dict | None, max_images: int | None) -> int | None:
    """How many validation images a task evaluates: task.max_images (checked), and with task.generate the dataset is
    made if missing and the count capped at its n_val. A larger synthetic set already there is reused, and its first
    n_val validation images are the scenes that n_val asks for, so they are what the run evaluates."""
    check_int(max_images, "task.max_images", allow_none=True)
    if generate is not None and not hasattr(generate, "keys"):  # 'none' or false would be read letter by letter
        raise SaqError(f"task.generate={generate!r} invalid; expected null (real data: nothing is generated) or the "
                       "generation settings n_train, n_val, seed")
    if not generate:
        return max_images
    unknown = sorted(set(generate) - {"n_train", "n_val", "seed", "progress"})
    if unknown:
        raise SaqError(f"task.generate.{unknown[0]} is not a generation setting; expected n_train, n_val, seed")
    for key in ("n_train", "n_val"):
        check_int(generate.get(key), f"task.generate.{key}")
    check_seed(generate.get("seed"), "task.generate.seed")
    check_new_root(root)
    ensure_dataset(root, **generate)
    return generate["n_val"] if max_images is None else min(max_images, generate["n_val"])


def check_new_root(root: Path, knobs: Knobs = RUN_KNOBS) -> None:
    """Say so when task.generate is about to make the synthetic dataset in a root that does not exist (a mistyped
    path to real data would otherwise give synthetic results without a word), and refuse one whose parent folder is
    missing too (a path to real data mistyped above its last part), except under the default root's data/.
    knobs: how the caller names the root (a run's config keys, or a script's own)."""
    root = Path(root)
    if root.exists():
        return
    if not root.parent.is_dir() and root.parent.resolve() != DEFAULT_ROOT.parent.resolve():
        raise SaqError(f"{knobs.root}={root} does not exist, nor does its folder {root.parent}: refusing to generate "
                       f"the synthetic dataset there ({knobs.instead('fix the path to the data')})")
    print(f"{knobs.root}={root} does not exist: generating the synthetic dataset into {root.resolve()}"
          + (f" (real data needs {knobs.real_data})" if knobs.real_data else ""))


def ensure_dataset(root: str | Path, n_train: int, n_val: int, seed: int, progress: bool = True,
                   knobs: Knobs = RUN_KNOBS) -> Path:
    """Generate the dataset under root unless a complete one with the same parameters is already there.

    root must be missing, empty, or hold a synthetic dataset (its meta.json): a smaller one of the same seed grows
    (its scenes are left as they are), a complete one of another seed is refused (runs may be reading it), one of
    another generator version or an interrupted generation is replaced (only the files the generator writes are
    deleted); any other non-empty folder is refused, so a real dataset is never written into. Parallel sweep jobs on
    a fresh root take turns (a file lock): the first generates, the others then find its complete dataset.
    knobs: how the caller names the seed and the root (a run's config keys, or a command line's flags).
    """
    root = Path(root)
    meta = {"generator_version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed,
            "categories": list(CATEGORIES)}
    if _holds_dataset(root, meta, knobs):  # the common case, without a lock: a read-only copy of the data works too
        return root
    _refuse_other_data(root, knobs)
    with file_lock(generation_lock(root)) as held:
        if not held and not (root.parent.is_dir() and os.access(root.parent, os.W_OK)):
            raise SaqError(f"cannot generate the synthetic dataset into {root}: its folder cannot be written "
                           f"({knobs.instead(f'give a writable {knobs.root}')})")
        if _holds_dataset(root, meta, knobs):  # a parallel job made it while this one waited
            return root
        old = _complete_meta(root)
        if old is not None and old.get("seed") != seed and _same_generator(old, meta):
            # replacing it would change the scenes under any run reading them now, and under earlier results
            raise SaqError(f"{root} holds the synthetic dataset of seed {old.get('seed')}; {knobs.seed}={seed} "
                           f"would replace it under every run that uses it: generate seed {seed} into another "
                           f"folder ({knobs.root}={root}_seed{seed}), or delete {root} first")
        return _generate_locked(root, _grown(root, meta), progress, knobs)


def _read_meta(root: Path) -> dict | None:
    """root's meta.json as a dict, or None when it is missing, unreadable or not a JSON object."""
    try:
        meta = json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _complete_meta(root: Path) -> dict | None:
    """The meta.json of a complete synthetic dataset in root, else None."""
    old = _read_meta(root)
    return old if old is not None and old.get("complete", True) else None


def _same_generator(old: dict, meta: dict) -> bool:
    """Whether a dataset's meta was written by this generator version with these categories."""
    return all(old.get(k) == meta[k] for k in ("generator_version", "categories"))


def _grown(root: Path, meta: dict) -> dict:
    """meta with each split at least as large as the scenes of the same seed already there: a run that needs more
    val scenes must not shrink the train split another run (or a training round) made larger."""
    old = _read_meta(root)
    if old is None or not _same_generator(old, meta) or old.get("seed") != meta["seed"]:
        return meta
    return {**meta, **{k: max(meta[k], old[k]) for k in ("n_train", "n_val") if is_int(old.get(k))}}


def is_synthetic_dataset(root: Path) -> bool:
    """Whether root holds a dataset this module generated (its meta.json names a generator version)."""
    meta = _read_meta(root)
    return meta is not None and "generator_version" in meta


def _holds_dataset(root: Path, meta: dict, knobs: Knobs) -> bool:
    """Whether root holds a complete synthetic dataset that covers `meta` (SaqError when its meta.json is not ours)."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        old = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    except OSError as exc:  # no read permission: which dataset is there cannot be told
        raise SaqError(f"cannot read {meta_path}: {exc.strerror or exc}") from None
    if not isinstance(old, dict) or "generator_version" not in old:
        raise SaqError(f"{meta_path} is not a synthetic dataset's meta.json; refusing to generate into {root} "
                       f"({knobs.instead('use another folder')})")
    same = all(old.get(k) == meta[k] for k in ("generator_version", "seed", "categories"))
    # Scenes depend only on (seed, split, index): a larger set already holds the smaller one's scenes.
    # complete is false while a generation is under way (files of an interrupted one are not reused).
    return bool(same and old.get("complete", True) and old.get("n_train", 0) >= meta["n_train"]
                and old.get("n_val", 0) >= meta["n_val"])


def _refuse_other_data(root: Path, knobs: Knobs) -> None:
    """SaqError when root is a file or a non-empty folder without a synthetic dataset's meta.json (real data)."""
    if root.exists() and not root.is_dir():
        raise SaqError(f"{knobs.root}={root} is a file; {knobs.root} needs a folder (a new or empty one, or one "
                       "holding a synthetic dataset)")
    if not (root / "meta.json").is_file() and root.exists() and any(root.iterdir()):
        raise SaqError(f"{root} is not empty and holds no synthetic dataset (meta.json): refusing to generate "
                       f"into it ({knobs.instead('use a new or empty folder')})")


def _generate_locked(root: Path, meta: dict, progress: bool, knobs: Knobs) -> Path:
    n_train, n_val, seed = meta["n_train"], meta["n_val"], meta["seed"]
    meta_path = root / "meta.json"
    old = _complete_meta(root)
    # More scenes of the same seed: the ones its meta.json counts stay as they are (runs may be reading them), and
    # the meta.json stays true of them until the larger set is complete.
    growing = old is not None and _same_generator(old, meta) and old.get("seed") == seed
    if growing:  # no meta.json change until the end: an interrupted growth leaves the smaller set as it was
        pass
    elif meta_path.is_file():  # another generator version, or an interrupted generation: replaced
        stale = _generated_files(root)
        write_json_atomic(meta_path, {**meta, "complete": False})
        for path in stale:  # else a smaller or reseeded set would leave the old scenes beside the new ones
            path.unlink()
    else:
        _refuse_other_data(root, knobs)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(meta_path, {**meta, "complete": False})
    for split, n in (("train", n_train), ("val", n_val)):
        kept = old.get(f"n_{split}") if growing and is_int(old.get(f"n_{split}")) else 0
        if n > kept:  # a split already as large is left alone, its annotation file too
            write_split(root, split, n, seed, progress, keep_first=kept)
    write_json_atomic(meta_path, {**meta, "complete": True})  # readers without the lock see whole files only
    return root


def main(argv: list[str] | None = None) -> int:
    # A data-generation utility, not an experiment: its flags are not experiment knobs.
    parser = argparse.ArgumentParser(prog="python -m tasks.synthetic", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_val < 1:  # as task.generate: an empty split has nothing to calibrate or score
        parser.error("--n-train and --n-val must be >= 1")
    if not 0 <= args.seed < SEED_LIMIT:
        parser.error(f"--seed must be in 0..{SEED_LIMIT - 1}")
    try:
        root = ensure_dataset(args.out, args.n_train, args.n_val, args.seed, knobs=CLI_KNOBS)
    except SaqError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"{root} holds the {args.n_train} train and {args.n_val} val scenes of seed {args.seed} (made now, or "
          "found complete and reused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
