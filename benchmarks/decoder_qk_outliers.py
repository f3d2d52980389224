"""Prints, per mask-decoder attention, the largest |activation| over its 99th percentile at the q/k projection outputs.

The SAQ-SAM paper reports outliers ~180x the normal range there on SAM-B; this measures ours.
Usage: python benchmarks/decoder_qk_outliers.py [model=sam_tiny] [checkpoint=PATH] [images=16] [data=data/synthetic]
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saq.sam.build import build_sam  # noqa: E402
from saq.sam.segmenter import Segmenter  # noqa: E402
from tasks.instance import InstanceTask  # noqa: E402


def main(args: dict[str, str]) -> None:
    torch.manual_seed(0)
    model = build_sam(args.get("model", "sam_tiny"), args.get("checkpoint"))
    root = args.get("data", "data/synthetic")
    task = InstanceTask({"root": root, "ann_file": "annotations/instances_val.json", "img_dir": "val/images"},
                        {"ann_file": "annotations/instances_train.json", "img_dir": "train/images"},
                        generate={"n_train": 64, "n_val": 500, "seed": 0} if root == "data/synthetic" else None)
    values: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = []
    for name, module in model.mask_decoder.transformer.named_modules():
        for proj in ("q_proj", "k_proj"):
            if hasattr(module, proj) and hasattr(module, "num_heads"):
                key = f"{name}.{proj}"
                hooks.append(getattr(module, proj).register_forward_hook(
                    lambda _m, _i, out, key=key: values[key].append(out.detach().flatten().abs())))
    seg = Segmenter(model)
    for sample in task.calibration_samples(int(args.get("images", 16))):
        seg.run(sample)
    for h in hooks:
        h.remove()
    worst = 0.0
    print(f"{'decoder projection':45s} {'max|x|':>9s} {'p99|x|':>9s} {'ratio':>8s}")
    for key, chunks in values.items():
        x = torch.cat(chunks)
        p99 = torch.quantile(x[torch.randperm(len(x))[:1_000_000]], 0.99).item()
        ratio = x.max().item() / max(p99, 1e-12)
        worst = max(worst, ratio)
        print(f"{key:45s} {x.max().item():9.3f} {p99:9.3f} {ratio:8.1f}")
    print(f"largest max/p99 ratio: {worst:.1f}x")


if __name__ == "__main__":
    main(dict(a.split("=", 1) for a in sys.argv[1:]))
