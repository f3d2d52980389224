"""Trains sam_tiny on a COCO-format dataset (the synthetic train split) with box and point prompts.

Run as `python -m saq.sam.tiny.train` (knobs in conf/train_tiny.yaml) or `make tiny-sam`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from saq.errors import SaqError, check_int, check_number, check_seed
from saq.log import atomic_path, write_text_atomic
from saq.sam.build import ARCHITECTURES, TINY_CHECKPOINT, build_random_sam, read_state_dict
from saq.sam.segmenter import decode_prompts


@dataclass
class InstanceImages:
    """A COCO split held in memory: images, an instance-id map per image (0 = none), and the boxes."""

    images: np.ndarray  # N x H x W x 3 uint8
    instance_ids: np.ndarray  # N x H x W uint8, k+1 for the k-th instance
    counts: np.ndarray  # N, instances per image


def load_coco_split(root: Path, ann_file: str, img_dir: str, limit: int | None = None,
                    size: int | None = None) -> InstanceImages:
    """Read a COCO-format split of same-size images into memory (visible instance masks are disjoint here); size:
    the square side every image must have (SaqError naming the first that has not)."""
    from pycocotools.coco import COCO

    ann_path = root / ann_file
    if not ann_path.is_file():
        raise SaqError(f"annotation file not found: {ann_path} (generate it with `make data` or set data.root)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(ann_path))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # bad JSON, or JSON of another layout
        raise SaqError(f"annotation file {ann_path} is not a COCO annotation file ({type(exc).__name__}: "
                       f"{str(exc)[:120]})") from None
    ids = sorted(coco.getImgIds())[:limit]
    if not ids:
        raise SaqError(f"annotation file {ann_path} lists no images")
    images, id_maps, counts = [], [], []
    for image_id in tqdm(ids, desc="loading", leave=False):
        info = coco.loadImgs(image_id)[0]
        path = root / img_dir / str(info.get("file_name"))
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SaqError(f"cannot read image {path}")
        if bgr.shape[:2] != (info.get("height"), info.get("width")):  # the masks are drawn at the entry's size
            raise SaqError(f"image {path} is {bgr.shape[1]}x{bgr.shape[0]} (w x h), its entry in {ann_path} says "
                           f"{info.get('width')}x{info.get('height')}")
        if size is not None and bgr.shape[:2] != (size, size):  # a split is stacked, and the model sees size px
            raise SaqError(f"sam_tiny trains on {size}px square images; {path} is {bgr.shape[1]}x{bgr.shape[0]}")
        id_map = np.zeros(bgr.shape[:2], np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        for k, ann in enumerate(anns[:255]):
            id_map[coco.annToMask(ann).astype(bool)] = k + 1
        images.append(bgr[..., ::-1])
        id_maps.append(id_map)
        counts.append(min(len(anns), 255))
    return InstanceImages(np.stack(images), np.stack(id_maps), np.asarray(counts))


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel edges) of N x H x W boolean masks."""
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)
    y0 = torch.where(rows, ys, h).min(1).values
    y1 = torch.where(rows, ys, -1).max(1).values + 1
    x0 = torch.where(cols, xs, w).min(1).values
    x1 = torch.where(cols, xs, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], 1).float()


def sample_batch(data: InstanceImages, rng: np.random.Generator, batch: int, prompts_per_image: int):
    """Random images (with horizontal flips) and, per image, random instances with replacement."""
    valid = np.nonzero(data.counts > 0)[0]
    idx = rng.choice(valid, batch, replace=False)
    images = data.images[idx].copy()
    id_maps = data.instance_ids[idx].copy()
    flip = rng.random(batch) < 0.5
    images[flip] = images[flip][:, :, ::-1]
    id_maps[flip] = id_maps[flip][:, :, ::-1]
    picks = np.stack([rng.integers(1, data.counts[i] + 1, prompts_per_image) for i in idx])
    masks = torch.from_numpy(id_maps).unsqueeze(1) == torch.from_numpy(picks)[:, :, None, None]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float(), masks.flatten(0, 1)


def jitter_boxes(boxes: torch.Tensor, gen: torch.Generator, size: int, scale: float = 0.1, max_px: float = 10):
    """Noise of `scale` x box side (at most max_px) on each coordinate, as SAM's training does."""
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, 1)
    noise = torch.randn(boxes.shape, generator=gen) * (side * scale).clamp(max=max_px)
    return (boxes + noise).clamp(0, size)


def sample_points(masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One foreground point per mask, uniformly over its pixels (xy, pixel centres)."""
    flat = masks.flatten(1).float()
    pick = torch.multinomial(flat, 1, generator=gen).squeeze(1)
    w = masks.shape[-1]
    coords = torch.stack([pick % w, pick // w], 1).float() + 0.5
    return coords[:, None], torch.ones(len(masks), 1, dtype=torch.int64)


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask BCE + dice on low-res logits against soft (area-downsampled) targets."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    prob = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + dice


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = logits > 0
    gt = target > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


@torch.no_grad()
def box_prompt_miou(sam, data: InstanceImages, batch: int = 16) -> float:
    """Mean IoU of single-mask outputs for exact ground-truth box prompts, at full resolution."""
    sam.eval()
    ious = []
    for start in range(0, len(data.images), batch):
        images = torch.from_numpy(data.images[start:start + batch]).permute(0, 3, 1, 2).float()
        id_maps = torch.from_numpy(data.instance_ids[start:start + batch])
        emb = sam.image_encoder(sam.preprocess(images))
        index, masks = [], []
        for i, count in enumerate(data.counts[start:start + batch]):
            for k in range(1, count + 1):
                index.append(i)
                masks.append(id_maps[i] == k)
        if not masks:
            continue
        masks = torch.stack(masks)
        sparse, dense = sam.prompt_encoder(points=None, boxes=masks_to_boxes(masks), masks=None)
        low_res, _ = decode_prompts(sam, emb, sparse, dense, torch.tensor(index))
        full = sam.postprocess_masks(low_res, images.shape[-2:], images.shape[-2:])[:, 0] > 0
        inter = (full & masks).flatten(1).sum(1).float()
        union = (full | masks).flatten(1).sum(1).float().clamp(min=1)
        ious.append(inter / union)
    return float(torch.cat(ious).mean())


def resized_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit an earlier sam_tiny's weights to the current architecture where only the token grid changed.

    A patch size of p/k on the image acts like patch size p on the image upsampled k times, so the patch kernel
    is area-pooled (and scaled to keep its response to flat regions), the absolute position grid is resampled
    bilinearly and the relative-position tables linearly. Any other mismatch is an error.
    """
    extra = sorted(set(source) - set(target))
    if extra:  # another depth or decoder: its tensors would be dropped without a word
        raise SaqError(f"init_checkpoint has {extra[0]} (and {len(extra) - 1} more tensors) that sam_tiny lacks: it is "
                       "another architecture; only the patch grid may differ between rounds")
    patch = "image_encoder.patch_embed.proj.weight"
    regrid = patch in source and patch in target and source[patch].shape != target[patch].shape
    out = {}
    for name, want in target.items():
        if name not in source:
            raise SaqError(f"init_checkpoint lacks {name}: it is not a sam_tiny checkpoint")
        have = source[name]
        if have.shape == want.shape:
            out[name] = have
        elif not regrid:  # the grid is the same: a window or table of another size is another architecture
            raise SaqError(f"init_checkpoint's {name} has shape {tuple(have.shape)}, the architecture needs "
                           f"{tuple(want.shape)} with the same patch grid; only the patch grid may differ between rounds")
        elif name.endswith("patch_embed.proj.weight") and have.shape[:2] == want.shape[:2]:
            out[name] = F.adaptive_avg_pool2d(have, want.shape[-2:]) * (have[0, 0].numel() / want[0, 0].numel())
        elif name.endswith("pos_embed") and have.shape[-1] == want.shape[-1]:
            grid = F.interpolate(have.permute(0, 3, 1, 2), size=want.shape[1:3], mode="bilinear", align_corners=False)
            out[name] = grid.permute(0, 2, 3, 1)
        elif name.endswith(("rel_pos_h", "rel_pos_w")) and have.shape[-1] == want.shape[-1]:
            table = F.interpolate(have.T[None], size=want.shape[0], mode="linear", align_corners=True)
            out[name] = table[0].T
        else:
            raise SaqError(f"init_checkpoint's {name} has shape {tuple(have.shape)}, the architecture needs "
                           f"{tuple(want.shape)}; only the patch grid may differ between rounds")
    return out


RECIPE = Path(__file__).resolve().parents[3] / "conf" / "train_tiny.yaml"


def _unknown_keys(given, known, prefix: str = "") -> list[str]:
    out = []
    for key in given:
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            out.append(f"{prefix}{key}")
        elif isinstance(given[key], DictConfig) and isinstance(known[key], DictConfig):
            out += _unknown_keys(given[key], known[key], f"{prefix}{key}.")
    return out


def check_train_knobs(cfg: DictConfig) -> None:
    """Every count and seed of the recipe, before any data is read (one line naming the knob, not a deep error)."""
    if not isinstance(cfg.get("data"), DictConfig):  # data=/data/coco: each data.* read would fail on a string
        raise SaqError(f"data={cfg.get('data')!r} invalid; expected the mapping of conf/train_tiny.yaml's data "
                       "(a dataset folder is data.root=...)")
    for key in ("root", "train_ann", "train_img_dir", "val_ann", "val_img_dir"):  # Path() of a number is a TypeError
        value = cfg.data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise SaqError(f"data.{key}={value!r} invalid; expected a path"
                           + (" (relative to data.root)" if key != "root" else ""))
    unknown = _unknown_keys(cfg, OmegaConf.load(RECIPE))
    if unknown:  # +stpes=100 would be ignored and the default 2.5 h round run
        raise SaqError(f"{unknown[0]} is not a training setting; expected one of the keys of conf/train_tiny.yaml")
    if cfg.init_checkpoint is not None and not isinstance(cfg.init_checkpoint, str):
        raise SaqError(f"init_checkpoint={cfg.init_checkpoint!r} invalid; expected null or the path of an earlier "
                       "round's checkpoint")
    check_seed(cfg.seed, "seed")
    for key in ("threads", "steps", "batch_size", "prompts_per_image", "point_every", "eval_every"):
        check_int(cfg.get(key), key)
    check_int(cfg.warmup_steps, "warmup_steps", 0)
    check_int(cfg.data.n_train, "data.n_train", allow_none=True)
    check_int(cfg.data.n_val, "data.n_val")
    if not isinstance(cfg.output, str) or not cfg.output:  # the shipped weights are replaced only when named
        raise SaqError(f"output={cfg.output!r} invalid; give the checkpoint path to write (output={TINY_CHECKPOINT} "
                       "to replace the shipped one)")
    # "~" once here (a quoted value or a sweep file reaches Python unexpanded): every later use reads these
    cfg.output = str(Path(cfg.output).expanduser())
    if isinstance(cfg.init_checkpoint, str) and cfg.init_checkpoint:
        cfg.init_checkpoint = str(Path(cfg.init_checkpoint).expanduser())
    if Path(cfg.output).suffix not in (".pt", ".pth"):  # the card goes to output with .json: it must not be the same
        raise SaqError(f"output={cfg.output} invalid; give a checkpoint file name ending in .pt or .pth")
    out, shipped = Path(cfg.output).resolve(), TINY_CHECKPOINT.resolve()
    if out != shipped and out.with_suffix(".json") == shipped.with_suffix(".json"):  # sam_tiny.pth
        raise SaqError(f"output={cfg.output}: its card would be the shipped {shipped.with_suffix('.json').name} while "
                       "the shipped weights stay; give another name (or the shipped checkpoint itself to replace both)")
    if out != shipped and out.exists():  # the first save would replace an earlier round's weights and card
        raise SaqError(f"output={cfg.output} already holds a checkpoint (an earlier round's or run's); give this round "
                       "a file of its own (output=...), or move that one away")
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise SaqError(f"init_checkpoint={cfg.init_checkpoint} not found; give the checkpoint of an earlier round")
    # the optimiser's numbers: a positive lr, fractions and factors that are finite and not negative
    check_number(cfg.lr, "lr", 0, open_min=True)
    for key in ("box_noise", "box_noise_max_px", "weight_decay", "iou_loss_weight"):
        check_number(cfg[key], key, 0)
    check_number(cfg.grad_clip, "grad_clip", 0, open_min=True)  # clipping to a norm of 0 zeroes every gradient
    check_number(cfg.min_lr_ratio, "min_lr_ratio", 0, 1)
    if cfg.warmup_steps > cfg.steps:
        raise SaqError(f"warmup_steps={cfg.warmup_steps} is more than steps={cfg.steps}: the lr would never reach "
                       "its peak; lower warmup_steps")


def train(cfg: DictConfig) -> dict:
    """The training loop; returns the card written beside the checkpoint."""
    check_train_knobs(cfg)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    root = Path(cfg.data.root)
    arch = ARCHITECTURES["sam_tiny"]
    train_data = load_coco_split(root, cfg.data.train_ann, cfg.data.train_img_dir, cfg.data.n_train, arch.image_size)
    val_data = load_coco_split(root, cfg.data.val_ann, cfg.data.val_img_dir, cfg.data.n_val, arch.image_size)
    usable = int((train_data.counts > 0).sum())  # a batch draws images with an object, without repeats
    if cfg.batch_size > usable:
        raise SaqError(f"batch_size={cfg.batch_size} is more than the {usable} training images with an object (of "
                       f"{len(train_data.images)}); lower batch_size or raise data.n_train")
    if not val_data.counts.sum():  # found now, not at the first evaluation, eval_every steps in
        raise SaqError(f"the {len(val_data.images)} val images of {root / cfg.data.val_ann} hold no objects: the "
                       "box-prompt mIoU curve needs some (set data.val_ann or raise data.n_val)")
    # whatever `make data` (or a run's task.generate) left in data.root: said, and recorded in the card
    print(f"training on {len(train_data.images)} train scenes of {root} ({len(val_data.images)} val scenes for the "
          "mIoU curve)")
    prior_rounds = earlier_rounds(cfg)  # read before this run's first save can overwrite that card
    sam = build_random_sam("sam_tiny", cfg.seed)
    if cfg.init_checkpoint:  # continue from an earlier run's weights (optimiser state starts fresh)
        earlier = read_state_dict(Path(cfg.init_checkpoint), "init_checkpoint")
        sam.load_state_dict(resized_state_dict(earlier, sam.state_dict()))
    params = sum(p.numel() for p in sam.parameters())
    opt = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="train sam_tiny")
    for step in bar:
        sam.train()
        images, masks = sample_batch(train_data, rng, cfg.batch_size, cfg.prompts_per_image)
        index = torch.arange(cfg.batch_size).repeat_interleave(cfg.prompts_per_image)
        emb = sam.image_encoder(sam.preprocess(images))
        point_step = step % cfg.point_every == cfg.point_every - 1
        if point_step:
            sparse, dense = sam.prompt_encoder(points=sample_points(masks, gen), boxes=None, masks=None)
        else:
            boxes = jitter_boxes(masks_to_boxes(masks), gen, arch.image_size, cfg.box_noise, cfg.box_noise_max_px)
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, iou_pred = decode_prompts(sam, emb, sparse, dense, index, multimask_output=point_step)
        target = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), low_res.shape[-2:])
        target = target.expand_as(low_res)
        losses = mask_loss(low_res.flatten(0, 1), target.flatten(0, 1)).view(low_res.shape[:2])
        actual_iou = hard_iou(low_res.detach().flatten(0, 1), target.flatten(0, 1)).view(low_res.shape[:2])
        iou_loss = F.mse_loss(iou_pred, actual_iou)
        # Ambiguous point prompts: only the best of the multimask outputs is trained (as in SAM).
        loss = losses.min(1).values.mean() + cfg.iou_loss_weight * iou_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", iou=f"{actual_iou.max(1).values.mean():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            miou = box_prompt_miou(sam, val_data)
            history.append({"step": step + 1, "val_box_mIoU": round(miou, 4), "loss": round(loss.item(), 4),
                            "minutes": round((time.time() - start) / 60, 1)})
            tqdm.write(json.dumps(history[-1]))
            save(sam, cfg, params, history, start, prior_rounds, len(train_data.images))
    return save(sam, cfg, params, history, start, prior_rounds, len(train_data.images))


def earlier_rounds(cfg: DictConfig) -> list[dict]:
    """When continuing from a checkpoint, the training records of the rounds that produced it (from its card)."""
    if not cfg.init_checkpoint:
        return []
    card_path = Path(cfg.init_checkpoint).with_suffix(".json")
    if not card_path.exists():
        return [{"init_checkpoint": str(cfg.init_checkpoint), "card": None}]
    card = json.loads(card_path.read_text())
    keys = ("architecture", "data", "dataset", "train_images", "training", "steps_done", "wall_time_minutes", "machine",
            "history")
    return [*card.get("earlier_rounds", []), {k: card[k] for k in keys if k in card}]


def _dataset_meta(root: Path) -> dict | None:
    """The generator's record of the data (`make data` writes root/meta.json: seed, generator version, counts)."""
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None  # real data, or no record: the card's data paths are all there is
    return {k: meta[k] for k in ("seed", "generator_version", "n_train", "n_val") if k in meta} if isinstance(
        meta, dict) else None


def save(sam, cfg: DictConfig, params: int, history: list, start: float, prior_rounds: list[dict],
         train_images: int) -> dict:
    """Write the checkpoint and its card (architecture, data seed, steps, wall time, val metrics)."""
    out = Path(cfg.output)
    with atomic_path(out) as tmp:  # never leave a half-written checkpoint behind
        torch.save({k: v.detach().clone() for k, v in sam.state_dict().items()}, tmp)
    card = {
        "model": "sam_tiny",
        "architecture": ARCHITECTURES["sam_tiny"].__dict__,
        "parameters": params,
        "data": OmegaConf.to_container(cfg.data),
        "dataset": _dataset_meta(Path(cfg.data.root)),  # which generated set (seed, generator version), not only where
        "train_images": train_images,  # data.n_train may be null (all), and `make data` has grown between rounds
        # every training knob, so a round can be rerun from its card alone
        "training": {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("hydra", "data")},
        "steps_done": history[-1]["step"] if history else 0,
        "wall_time_minutes": round((time.time() - start) / 60, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "history": history,
    }
    card_path = out.with_suffix(".json")
    if prior_rounds:
        card["earlier_rounds"] = prior_rounds
    # no evaluation is carried over: it described the weights this file replaced (`make tiny-card` adds the new one)
    write_text_atomic(card_path, json.dumps(card, indent=1, default=list))
    return card


@hydra.main(version_base=None, config_path="../../../conf", config_name="train_tiny")
def main(cfg: DictConfig) -> None:
    try:
        card = train(cfg)
    except SaqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"sam_tiny: {card['parameters']:,} parameters, {card['wall_time_minutes']} min, "
          f"last val box mIoU {card['history'][-1]['val_box_mIoU'] if card['history'] else 'n/a'}")
    out = Path(cfg.output)
    if out.resolve() != TINY_CHECKPOINT.resolve():
        print(f"wrote {out} and its card; evaluate it with `python -m saq model.checkpoint={out}`; to ship it, copy both "
              f"files over {TINY_CHECKPOINT} and its .json, then `make tiny-card`")


if __name__ == "__main__":
    main()
