"""Prints the fake-quantized forward time over the FP forward time: sam_tiny on CPU, and sam_vit_b when CUDA exists.

Encoder (one image) and decoder (a batch of box prompts) are timed separately, median of `repeats` runs each, with
every quantizer on after a one-image calibration (ranges do not change the cost); the networks alone, without the
image resizing, prompt encoding and mask upscaling that cost FP and quantized the same. Random weights: timing only.
Usage: python benchmarks/quant_overhead.py [quant=w4a4] [repeats=5] [prompts=16] [threads=N] [vit_b=auto|yes|no]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saq.quant import assert_fully_quantized, calibrate, quantize
from saq.sam.build import build_random_sam
from saq.sam.segmenter import PromptedImage, Segmenter, decode_prompts, encoder_input, prompt_tensors

CONF = Path(__file__).resolve().parent.parent / "conf"


def preset(name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name=None, overrides=[f"+quant={name}"]).quant


def sample(size: int, prompts: int, seed: int = 0) -> PromptedImage:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size * 0.6, (prompts, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (prompts, 2))
    return PromptedImage(rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                         boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32))


def timed(fn, repeats: int, device: torch.device | None = None) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up (on a CUDA device, with its work finished)."""
    fn()
    times = []
    for _ in range(repeats):
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, device: torch.device, quant: str, repeats: int, prompts: int) -> list[tuple]:
    fp = build_random_sam(name, seed=0).to(device)
    qmodel = quantize(fp, preset(quant)).to(device)
    image = sample(fp.image_encoder.img_size, prompts)
    calibrate(qmodel, [image], None, {"name": "minmax"}, progress=False)
    assert_fully_quantized(qmodel)
    # the networks alone, on inputs made once: resizing, prompt encoding and mask upscaling cost both the same
    transform = Segmenter(fp).transform
    x = encoder_input(fp, transform, image.image)
    boxes, _, _ = prompt_tensors(transform, image.image.shape[:2], device, image.boxes)
    sparse, dense = fp.prompt_encoder(points=None, boxes=boxes, masks=None)
    seconds = {"encoder": [], "decoder": []}
    for model in (fp, qmodel):
        features = model.image_encoder(x)
        seconds["encoder"].append(timed(lambda m=model: m.image_encoder(x), repeats, device))
        seconds["decoder"].append(timed(lambda m=model, f=features: decode_prompts(m, f, sparse, dense), repeats,
                                        device))
    return [(name, device.type, part, fp_s * 1e3, q_s * 1e3, q_s / fp_s) for part, (fp_s, q_s) in seconds.items()]


def main(args: dict[str, str]) -> None:
    torch.manual_seed(0)
    if "threads" in args:
        torch.set_num_threads(int(args["threads"]))
    quant, repeats, prompts = args.get("quant", "w4a4"), int(args.get("repeats", 5)), int(args.get("prompts", 16))
    want_vit_b = args.get("vit_b", "auto")
    runs = [("sam_tiny", torch.device("cpu"))]
    if want_vit_b == "yes" or (want_vit_b == "auto" and torch.cuda.is_available()):
        runs.append(("sam_vit_b", torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    rows = []
    with torch.no_grad():
        for name, device in runs:
            rows += measure(name, device, quant, repeats, prompts)
    print(f"fake-quant overhead, quant={quant}, {prompts} box prompts, median of {repeats}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'model':10s} {'device':6s} {'part':8s} {'fp ms':>9s} {'quant ms':>9s} {'quant/fp':>9s}")
    for name, device, part, fp_ms, q_ms, ratio in rows:
        print(f"{name:10s} {device:6s} {part:8s} {fp_ms:9.1f} {q_ms:9.1f} {ratio:9.2f}")
    for name, device in runs:
        fp_total = sum(r[3] for r in rows if r[0] == name)
        q_total = sum(r[4] for r in rows if r[0] == name)
        print(f"{name} on {device.type}: whole forward quant/fp = {q_total / fp_total:.2f}")


if __name__ == "__main__":
    from saq.cli import run_script

    sys.exit(run_script(main, __doc__, {"quant": ("w8a8", "w6a6", "w4a4"), "repeats": int, "prompts": int, "threads": int,
                                        "vit_b": ("auto", "yes", "no")}))
