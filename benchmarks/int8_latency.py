"""Prints encoder and decoder latency of torch FP32, ONNX Runtime FP32 and ONNX Runtime int8 (saq.deploy), and the
mask IoU of int8 against FP.

Models: the shipped sam_tiny (W8A8 calibrated on synthetic train images, the w8a8 preset with clip=minmax) and a
random-init sam_vit_b at 1024 px (calibrated on one random image with minmax weight observers: timing only). The
decoder is timed on a batch of box prompts. Mask IoU: sam_tiny with ground-truth boxes on val images, int8 ONNX
masks against FP torch masks (and saq's fake-quant masks against FP, for reference), and int8 ONNX masks against
the fake-quant model they were exported from (what the export must reproduce; also exported with softmax=log2,
saq's own post-softmax codes, where only float rounding should differ).
Usage: python benchmarks/int8_latency.py [threads=2] [repeats=3] [prompts=16] [val_images=50] [calib_images=8]
       [vit_b=yes|no] [root=data/synthetic]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quant_overhead import sample as random_image
from benchmarks.quant_overhead import timed
from benchmarks.recon_speed import require_layout
from saq import deploy
from saq.errors import SaqError
from saq.pipeline import build_task
from saq.quant import calibrate, quantize
from saq.sam.build import build_random_sam, build_sam
from saq.sam.segmenter import Segmenter, encoder_input
from tasks.instance import gt_boxes, read_annotated_image

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=["quant=w8a8", "clip=minmax", *overrides])


def latencies(name: str, fp, qmodel, workdir: Path, threads: int, repeats: int, prompts: int) -> list[tuple]:
    """(model, part, torch fp32 s, ort fp32 s, ort int8 s) for the encoder and the decoder."""
    deploy.export_graphs(fp, workdir / "fp")
    report = deploy.export_onnx(qmodel, workdir / "int8")
    print(f"{name}: {deploy.format_report(report)}")
    sample = random_image(fp.image_encoder.img_size, prompts, seed=1)
    segmenter = Segmenter(fp, decode_batch_size=prompts)
    segmenter.set_image(sample.image)
    image = encoder_input(fp, segmenter.transform, sample.image)
    boxes = segmenter.transform.apply_boxes_torch(torch.as_tensor(sample.boxes), sample.image.shape[:2])
    with torch.no_grad():
        sparse, dense = fp.prompt_encoder(points=None, boxes=boxes, masks=None)
        decoder_inputs = (segmenter._features, fp.prompt_encoder.get_dense_pe(), sparse, dense)
    rows = []
    # the FP32 graph keeps ONNX Runtime's MatMul + Add fusion, which only the int8 graph must go without
    sessions = {precision: (deploy.OnnxImageEncoder(workdir / precision / deploy.ENCODER_FILE,
                                                    fp.image_encoder.img_size, threads, int8=precision == "int8"),
                            deploy.OnnxMaskDecoder(workdir / precision / deploy.DECODER_FILE,
                                                   fp.mask_decoder.num_mask_tokens, threads, int8=precision == "int8"))
                for precision in ("fp", "int8")}
    with torch.no_grad():
        rows.append((name, "encoder", timed(lambda: fp.image_encoder(image), repeats),
                     timed(lambda: sessions["fp"][0](image), repeats),
                     timed(lambda: sessions["int8"][0](image), repeats)))
        rows.append((name, f"decoder ({prompts} boxes)", timed(lambda: fp.mask_decoder.predict_masks(*decoder_inputs),
                                                               repeats),
                     timed(lambda: sessions["fp"][1].predict_masks(*decoder_inputs), repeats),
                     timed(lambda: sessions["int8"][1].predict_masks(*decoder_inputs), repeats)))
    return rows


def mask_ious(fp, qmodel, int8_dir: Path, task, n_images: int, threads: int) -> tuple[dict[str, float], int, int]:
    """Mean mask IoUs over GT-box prompts ({"int8": int8 ONNX vs FP, "fake": saq's fake-quant vs FP, "int8_vs_fake":
    int8 ONNX vs the fake-quant model it exports, "log2_vs_fake": the same with softmax*V's operand exported as saq's
    log2 codes (softmax=log2), which a broken export would lower even where it moved towards FP}); then the mask and
    image counts they cover (images without objects give no prompts)."""
    deploy.export_onnx(qmodel, int8_dir.parent / "int8_log2", "log2")
    segmenters = {"fp": Segmenter(fp), "fake": Segmenter(qmodel),
                  "int8": Segmenter(deploy.deployed_sam(qmodel, int8_dir, threads)),
                  "log2": Segmenter(deploy.deployed_sam(qmodel, int8_dir.parent / "int8_log2", threads))}
    pairs = {"fake": ("fake", "fp"), "int8": ("int8", "fp"), "int8_vs_fake": ("int8", "fake"),
             "log2_vs_fake": ("log2", "fake")}
    ious, images = {key: [] for key in pairs}, 0
    for image_id in task.image_ids()[:n_images]:
        image = read_annotated_image(task.coco, image_id, task.img_dir)
        prompts, _ = gt_boxes(task.coco, image_id)
        if not len(prompts.boxes):
            continue
        images += 1
        masks = {}
        for key, segmenter in segmenters.items():
            segmenter.set_image(image)
            masks[key] = segmenter.predict(boxes=prompts.boxes).masks[:, 0]
        for key, (a, b) in pairs.items():
            inter = (masks[a] & masks[b]).flatten(1).sum(1).float()
            union = (masks[a] | masks[b]).flatten(1).sum(1).float()
            ious[key] += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist()
    if not ious["int8"]:
        raise SaqError(f"none of the first {n_images} val images has ground-truth boxes: no masks to compare; raise "
                       "val_images= or give another root=")
    return {key: float(np.mean(values)) for key, values in ious.items()}, len(ious["int8"]), images


def main(args: dict[str, str]) -> None:
    threads, repeats = int(args.get("threads", 2)), int(args.get("repeats", 3))
    prompts, val_images = int(args.get("prompts", 16)), int(args.get("val_images", 50))
    torch.set_num_threads(threads)
    root = args.get("root", "data/synthetic")
    own = [] if root == "data/synthetic" else ["task.generate=null"]  # a real dataset is read, never generated
    cfg = compose_cfg(f"quant.calib_images={args.get('calib_images', 8)}", *own)
    with open_dict(cfg):  # set, not parsed as an override: a root with a comma or quote is a path all the same
        cfg.task.data.root = root
    if own:  # said in this script's root=, not in the main command's task.data.root the task's own checks name
        require_layout(root, cfg.task.data, cfg.task.calib, "root")
    task = build_task(cfg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="saq_int8_") as tmp, torch.no_grad():
        tmp = Path(tmp)
        tiny = build_sam("sam_tiny")
        start = time.perf_counter()
        tiny_q = quantize(tiny, cfg.quant)
        calibrate(tiny_q, task.calibration_samples(cfg.quant.calib_images), cfg.quant, cfg.clip, progress=False)
        print(f"sam_tiny: calibrated on {cfg.quant.calib_images} train images in {time.perf_counter() - start:.0f} s")
        rows += latencies("sam_tiny", tiny, tiny_q, tmp / "tiny", threads, repeats, prompts)
        ious, n_masks, n_images = mask_ious(tiny, tiny_q, tmp / "tiny" / "int8", task, val_images, threads)
        if args.get("vit_b", "yes") == "yes":
            vit_b = build_random_sam("sam_vit_b", seed=0)
            quick = compose_cfg("quant.encoder.weight.observer=minmax", "quant.decoder.weight.observer=minmax").quant
            vit_b_q = quantize(vit_b, quick)
            calibrate(vit_b_q, [random_image(1024, 4)], quick, {"name": "minmax"}, progress=False)
            rows += latencies("sam_vit_b", vit_b, vit_b_q, tmp / "vit_b", threads, repeats, prompts)
    print(f"latency, median of {repeats} after a warm-up, {threads} threads (torch and ONNX Runtime), "
          f"onnxruntime {__import__('onnxruntime').__version__}")
    print(f"{'model':10s} {'part':20s} {'torch fp32 ms':>14s} {'ort fp32 ms':>12s} {'ort int8 ms':>12s} "
          f"{'int8 vs torch':>14s} {'int8 vs ort fp32':>17s}")
    for name, part, torch_s, ort_s, int8_s in rows:
        print(f"{name:10s} {part:20s} {torch_s * 1e3:14.1f} {ort_s * 1e3:12.1f} {int8_s * 1e3:12.1f} "
              f"{torch_s / int8_s:13.2f}x {ort_s / int8_s:16.2f}x")
    print(f"sam_tiny masks vs FP over {n_masks} GT-box prompts on {n_images} val images: int8 ONNX mean IoU "
          f"{ious['int8']:.3f}, saq fake-quant W8A8 mean IoU {ious['fake']:.3f}; int8 ONNX vs the fake-quant model "
          f"it exports: mean IoU {ious['int8_vs_fake']:.3f} (softmax*V float), {ious['log2_vs_fake']:.3f} (softmax=log2)")
    encoder = {name: (torch_s / int8_s, ort_s / int8_s) for name, part, torch_s, ort_s, int8_s in rows
               if part == "encoder"}
    if "sam_vit_b" in encoder:
        # against ONNX Runtime FP32: the same runtime, so the ratio does not depend on torch's threading
        print(f"int8 encoder speedup (sam_vit_b): {encoder['sam_vit_b'][0]:.2f}x vs torch fp32, "
              f"{encoder['sam_vit_b'][1]:.2f}x vs ONNX Runtime fp32")
    print(f"int8 mask IoU vs fp (sam_tiny): {ious['int8']:.3f}; vs fake-quant: {ious['int8_vs_fake']:.3f} "
          f"(softmax=log2 export: {ious['log2_vs_fake']:.3f})")


if __name__ == "__main__":
    from saq.cli import run_script

    kinds = {"threads": int, "repeats": int, "prompts": int, "val_images": int, "calib_images": int, "root": str,
             "vit_b": ("yes", "no")}
    sys.exit(run_script(main, __doc__, kinds))
