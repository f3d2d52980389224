"""Prints, per mask-decoder attention, how far the q/k projection outputs reach beyond their bulk.

The SAQ-SAM paper reports outliers ~180x the normal range there on SAM-B. A whole outlier channel (a constant key
offset) moves the plain p99 into the outlier band, so the bulk is measured on the channels without outliers: a
channel is an outlier channel when its median |x| exceeds the p99 |x| of all values. Columns: largest |x|, the
bulk's p50 and p99 |x|, max/p50 and max/p99 of the bulk, and the number of outlier channels.
Usage: python benchmarks/decoder_qk_outliers.py [model=sam_tiny|sam_tiny_outliers] [checkpoint=PATH] [images=16]
       [data=data/synthetic] [threads=2]
(data: a COCO-format dataset laid out as data/synthetic is: annotations/instances_{val,train}.json, {val,train}/images)
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.recon_speed import instance_task  # noqa: E402
from saq.clipping.percentile import tail_quantiles  # noqa: E402
from saq.sam.build import build_sam  # noqa: E402
from saq.sam.outliers import OutlierSpec, plant_key_outliers  # noqa: E402
from saq.sam.segmenter import Segmenter  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def bulk_stats(x: torch.Tensor) -> tuple[float, float, float, int]:
    """(max|x|, p50 and p99 of |x| over the channels without outliers, number of outlier channels); x is N x C."""
    a = x.abs().float()
    overall_p99 = float(tail_quantiles(a.flatten(), [0.99])[0])
    outlier = a.median(0).values > overall_p99
    bulk = a[:, ~outlier].flatten()
    sample = bulk[torch.randperm(bulk.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    p50, p99 = (float(v) for v in torch.quantile(sample, torch.tensor([0.5, 0.99])))
    return float(a.max()), p50, p99, int(outlier.sum())


def main(args: dict[str, str]) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(args.get("threads", 2)))
    name = args.get("model", "sam_tiny")
    model = build_sam(name, args.get("checkpoint"), config_key="checkpoint")
    task = instance_task(args.get("data", "data/synthetic"), "data")
    model_cfg = REPO / "conf" / "model" / f"{name}.yaml"
    outliers = OmegaConf.load(model_cfg).get("outliers") if model_cfg.is_file() else None
    if outliers:  # the same planting as a run of this model (saq/pipeline.py)
        spec = OutlierSpec.from_cfg(outliers)
        knob = f"outliers.calib_images of conf/model/{name}.yaml"
        plant_key_outliers(model, task.calibration_samples(spec.calib_images, knob), spec)
    values: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = []
    for module_name, module in model.mask_decoder.transformer.named_modules():
        for proj in ("q_proj", "k_proj"):
            if hasattr(module, proj) and hasattr(module, "num_heads"):
                key = f"{module_name}.{proj}"
                hooks.append(getattr(module, proj).register_forward_hook(
                    lambda _m, _i, out, key=key: values[key].append(out.detach().reshape(-1, out.shape[-1]))))
    seg = Segmenter(model)
    for sample in task.calibration_samples(int(args.get("images", 16)), "images"):
        seg.run(sample)
    for h in hooks:
        h.remove()
    worst = 0.0
    print(f"{'decoder projection (' + name + ')':48s} {'max|x|':>9s} {'p50':>7s} {'p99':>7s} {'max/p50':>8s} "
          f"{'max/p99':>8s} {'outlier ch':>10s}")
    for key, chunks in values.items():
        peak, p50, p99, n_out = bulk_stats(torch.cat(chunks))
        ratio = peak / max(p99, 1e-12)
        worst = max(worst, ratio)
        print(f"{key:48s} {peak:9.3f} {p50:7.3f} {p99:7.3f} {peak / max(p50, 1e-12):8.1f} {ratio:8.1f} {n_out:10d}")
    print(f"largest max/p99 (bulk channels) ratio: {worst:.1f}x")


if __name__ == "__main__":
    from saq.cli import run_script

    sys.exit(run_script(main, __doc__, {"model": str, "checkpoint": str, "data": str, "images": int, "threads": int}))
