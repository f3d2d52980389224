"""The CUDA path of quantize / calibrate (PCC, BIG, AGQ) / reconstruct against the same on CPU; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from saq.quant import assert_fully_quantized, calibrate, iter_quantizers, quantize
from saq.recon import reconstruct
from saq.sam.build import build_sam
from tests.test_recon_sam import FEW, W4A4, samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PCC = {"name": "pcc", "sweeps": 1, "candidates": [0.95, 0.99, 0.999]}


def calibrated_on(device: str, cal):
    model = build_sam("sam_tiny").to(device)
    qmodel = quantize(model, W4A4)  # quant defaults: BIG and AGQ on, the two searches that mix CPU and device tensors
    calibrate(qmodel, cal, clip_cfg=PCC, progress=False)
    return model, qmodel


def test_calibration_on_cuda_chooses_the_ranges_it_chooses_on_cpu():
    cal = samples()
    _, on_cpu = calibrated_on("cpu", cal)
    _, on_gpu = calibrated_on("cuda", cal)
    cpu_q, gpu_q = list(iter_quantizers(on_cpu)), list(iter_quantizers(on_gpu))
    assert [q.name for q in cpu_q] == [q.name for q in gpu_q]
    assert all(q.scale.device.type == "cuda" for q in gpu_q)
    # float sums differ between devices, so a search may land a grid step or a candidate away: most ranges agree
    # closely, none is far off
    ratios = [(b.scale.detach().cpu() / a.scale.detach()).flatten() for a, b in zip(cpu_q, gpu_q)]
    close = [bool(((r - 1).abs() < 0.05).all()) for r in ratios]
    assert sum(close) >= 0.9 * len(close), [q.name for q, ok in zip(cpu_q, close) if not ok]
    assert all(bool(((r > 0.5) & (r < 2)).all()) for r in ratios)


def test_par_on_cuda_leaves_a_fully_quantized_model_with_finite_outputs():
    cal = samples()
    model, qmodel = calibrated_on("cuda", cal)
    report = reconstruct(qmodel, model, cal, {"name": "par", "iters": FEW}, seed=0, progress=False)
    assert report.as_dict()["iters"] == 13
    assert_fully_quantized(qmodel)
    size = qmodel.image_encoder.img_size
    image = torch.rand(1, 3, size, size, device="cuda")
    with torch.no_grad():
        assert torch.isfinite(qmodel.image_encoder(image)).all()
