"""Prints automatic-mask-generation time of the semantic task's path against segment_anything.SamAutomaticMaskGenerator.

Same model, point grid, thresholds, single crop, same images, one process; each image is run by both (reference
first), image encoder included in both times. The kept mask sets are compared exactly (count, pixels, areas, boxes,
predicted IoU within 1e-5). segment_anything's generator runs with its default points_per_batch (64) for the headline
ratio and, for transparency, also with ours (the batch size alone accounts for part of the gap on a CPU).
Usage: python benchmarks/amg_speed.py [images=16] [model=sam_tiny] [checkpoint=PATH] [threads=1]
       [root=data/synthetic]
(model: sam_tiny, or sam_vit_b/l/h with checkpoint= its weights; the outlier testbed differs from sam_tiny only once
quantized, so it is no model of its own here. Every model runs with conf/task/semantic.yaml's grid and thresholds,
sam_tiny's, not SAM's defaults for 1024-px inputs; root: images under ROOT/val/images)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saq.errors import SaqError
from saq.sam.build import build_sam
from saq.sam.segmenter import Segmenter
from tasks.base import list_images, read_rgb
from tasks.semantic import AMG_DEFAULTS, AMG_THRESHOLDS, generate_masks, mask_set_differences, point_grid, reference_masks
from tasks.synthetic import Knobs, check_new_root, ensure_dataset

TASK_CONF = Path(__file__).resolve().parent.parent / "conf" / "task" / "semantic.yaml"
# this script's own names for what generation is given (it reads real data from a root that has ROOT/val/images)
KNOBS = Knobs("conf/task/semantic.yaml's generate.seed", "root")


def main(args: dict[str, str]) -> None:
    torch.set_num_threads(int(args.get("threads", 1)))
    n_images = int(args.get("images", 16))
    conf = OmegaConf.load(TASK_CONF)
    amg = {**AMG_DEFAULTS, **OmegaConf.to_container(conf.amg)}  # the semantic task's own settings
    root = Path(args.get("root", conf.data.root))
    if not (root / conf.data.img_dir).is_dir():
        if root.is_dir() and not (root / "meta.json").is_file() and any(root.iterdir()):  # real data, other layout
            raise SaqError(f"root={root} has no {conf.data.img_dir} folder: give a root laid out as data/synthetic "
                           f"(its images under ROOT/{conf.data.img_dir})")
        check_new_root(root, KNOBS)  # a mistyped path to real data is said or refused, as the main command does
        ensure_dataset(root, **OmegaConf.to_container(conf.generate), knobs=KNOBS)
    images = [read_rgb(path) for _, path in list_images(root / conf.data.img_dir, "root")[:n_images]]
    sam = build_sam(args.get("model", "sam_tiny"), args.get("checkpoint"), config_key="checkpoint")
    thresholds = {k: float(amg[k]) for k in AMG_THRESHOLDS}
    ours_batch = int(amg["points_per_batch"])
    seconds = {"reference": 0.0, "reference_same_batch": 0.0, "ours": 0.0}
    identical, masks = True, 0
    with torch.no_grad():
        warm = Segmenter(sam)  # one untimed pass of both paths: first calls (allocator, kernels) favour neither
        reference_masks(warm, images[0], int(amg["points_per_side"]), **thresholds)
        reference_masks(warm, images[0], int(amg["points_per_side"]), **thresholds, points_per_batch=ours_batch)
        warm.set_image(images[0])
        generate_masks(warm, point_grid(int(amg["points_per_side"]), *images[0].shape[:2]), **thresholds,
                       points_per_batch=ours_batch)
        for index, image in enumerate(images):
            segmenter = Segmenter(sam)
            start = time.perf_counter()
            reference = reference_masks(segmenter, image, int(amg["points_per_side"]), **thresholds)
            seconds["reference"] += time.perf_counter() - start
            start = time.perf_counter()
            reference_masks(segmenter, image, int(amg["points_per_side"]), **thresholds, points_per_batch=ours_batch)
            seconds["reference_same_batch"] += time.perf_counter() - start
            start = time.perf_counter()
            segmenter.set_image(image)
            ours = generate_masks(segmenter, point_grid(int(amg["points_per_side"]), *image.shape[:2]), **thresholds,
                                  points_per_batch=ours_batch)
            seconds["ours"] += time.perf_counter() - start
            problems = mask_set_differences(ours, reference)
            if problems:
                identical = False
                print(f"image {index}: {'; '.join(problems[:3])}")
            masks += len(ours.areas)
    print(f"{len(images)} images, {args.get('model', 'sam_tiny')}, {int(amg['points_per_side']) ** 2} points each, "
          f"thresholds {thresholds}, torch threads {torch.get_num_threads()}; {masks} masks kept by ours")
    print(f"segment_anything AMG (points_per_batch 64): {seconds['reference']:.2f} s")
    print(f"segment_anything AMG (points_per_batch {ours_batch}): {seconds['reference_same_batch']:.2f} s "
          f"(ours is {seconds['reference_same_batch'] / seconds['ours']:.2f}x faster)")
    print(f"ours (points_per_batch {ours_batch}, IoU filter before upscaling): {seconds['ours']:.2f} s")
    print(f"amg speedup vs segment_anything: {seconds['reference'] / seconds['ours']:.2f}x, "
          f"masks identical: {'yes' if identical else 'no'}")


if __name__ == "__main__":
    from saq.cli import run_script

    sys.exit(run_script(main, __doc__, {"images": int, "model": ("sam_tiny", "sam_vit_b", "sam_vit_l", "sam_vit_h"),
                                                 "checkpoint": str, "threads": int, "root": str}))
