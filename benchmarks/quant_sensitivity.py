"""Prints where a saved quantized run loses accuracy: its task metrics fully quantized, then with the quantizers of one
part of the model at a time switched off (that part computes in FP, everything else stays quantized as saved).

The run is evaluated as `quant.load=RUN_DIR` would (its results.json config, fully quantized). Parts are module paths
of the SAM (`image_encoder`, `mask_decoder.transformer.layers.0.cross_attn_image_to_token`, ...); by default the
encoder, the decoder, each two-way layer, each of its four sub-blocks and the final token->image attention.
A part that gains a lot when switched off is where the quantization error sits; one that loses means learning there
compensated for error elsewhere.
Usage: python benchmarks/quant_sensitivity.py RUN_DIR [parts=a,b,...] [max_images=N] [threads=2]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saq.pipeline import build_task, scalar_metrics
from saq.quant import set_quant_state
from saq.sam.build import build_sam
from saq.sam.segmenter import Segmenter
from saq.saved import load_run


def default_parts(sam) -> list[str]:
    transformer = "mask_decoder.transformer"
    parts = ["image_encoder", "mask_decoder"]
    for i, layer in enumerate(sam.mask_decoder.transformer.layers):
        parts.append(f"{transformer}.layers.{i}")
        parts += [f"{transformer}.layers.{i}.{name}" for name, _ in layer.named_children() if not name.startswith("norm")]
    return parts + [f"{transformer}.final_attn_token_to_image"]


def main(run_dir: str, parts: str | None = None, max_images: str | None = None, threads: str = "2") -> None:
    torch.set_num_threads(int(threads))
    record = json.loads((Path(run_dir) / "results.json").read_text())
    cfg = OmegaConf.create(record["config"])
    cfg.quant.load = run_dir
    if max_images is not None:
        cfg.task.max_images = int(max_images)
    model = build_sam(cfg.model.name, cfg.model.checkpoint)
    task = build_task(cfg)
    names = parts.split(",") if parts else default_parts(model)
    print(f"{run_dir}: {record['method']} {record['quant']} on {record['model']}, {task.name}, "
          f"{'all' if max_images is None else max_images} val images")
    for part in [None] + names:
        qmodel, _ = load_run(model, cfg)
        if part is not None:
            set_quant_state(qmodel.get_submodule(part), "off")
        start = time.perf_counter()
        metrics = scalar_metrics(task.evaluate(Segmenter(qmodel, cfg.model.decode_batch_size), progress=False))
        shown = "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{'(fully quantized)' if part is None else part + ' in FP':<66} {shown}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    main(sys.argv[1], **args)
