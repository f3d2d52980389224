"""The FP-metrics cache: reused only for the same model, data, prompts, seed, device and metric code."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from saq import pipeline
from saq.sam.build import build_random_sam


class CountingTask:
    """A stand-in task whose evaluation only counts how often it ran."""

    def __init__(self):
        self.runs = 0

    def fingerprint(self) -> str:
        return "counting-task"

    def evaluate(self, segmenter, progress: bool = True) -> dict:
        self.runs += 1
        return {"mIoU": 0.5, "runs": self.runs}


def config(ckpt, **overrides):
    base = {"model": {"name": "sam_tiny", "checkpoint": str(ckpt), "decode_batch_size": 8}, "seed": 0,
            "device": "cpu", "fp_cache": True, "progress": False}
    return OmegaConf.merge(base, overrides)


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights")  # only its path, size and mtime enter the key
    return path


def test_fp_metrics_are_reused_and_the_reuse_is_recorded(tmp_path, ckpt, monkeypatch):
    monkeypatch.setattr(pipeline, "FP_CACHE_DIR", tmp_path / "cache")
    model, task, cfg = build_random_sam("sam_tiny"), CountingTask(), config(ckpt)
    first, source = pipeline.fp_metrics(cfg, model, task)
    assert source is None and first["runs"] == 1
    again, source = pipeline.fp_metrics(cfg, model, task)
    assert again == first and task.runs == 1
    assert source == str(pipeline.fp_cache_path(cfg, task))
    fresh, source = pipeline.fp_metrics(config(ckpt, fp_cache=False), model, task)
    assert source is None and fresh["runs"] == 2


def test_fp_cache_key_covers_device_seed_and_metric_code(ckpt, monkeypatch):
    task = CountingTask()
    path = pipeline.fp_cache_path(config(ckpt), task)
    assert pipeline.fp_cache_path(config(ckpt), task) == path
    assert pipeline.fp_cache_path(config(ckpt, device="cuda"), task) != path  # cached timings are per device
    assert pipeline.fp_cache_path(config(ckpt, seed=1), task) != path
    monkeypatch.setattr(pipeline, "source_digest", lambda: "edited-metric-code")
    assert pipeline.fp_cache_path(config(ckpt), task) != path
