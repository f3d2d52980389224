"""The FP-metrics cache (reused only for the same model, data, prompts, seed, device and metric code) and what a run
checks before it evaluates anything."""

from __future__ import annotations

import json

import pytest
import torch
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
            "device": "cpu", "threads": None, "fp_cache": True, "progress": False}
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
    # a broken entry (truncated, or no metrics) is evaluated again and replaced, never used or fatal
    for broken in ('{"mIoU": 0.', "{}"):
        pipeline.fp_cache_path(cfg, task).write_text(broken)
        runs = task.runs
        metrics, source = pipeline.fp_metrics(cfg, model, task)
        assert source is None and metrics["runs"] == runs + 1
        assert json.loads(pipeline.fp_cache_path(cfg, task).read_text()) == metrics


def test_fp_cache_key_covers_device_seed_decoding_threads_versions_and_metric_code(ckpt, monkeypatch):
    task = CountingTask()
    path = pipeline.fp_cache_path(config(ckpt), task)
    assert pipeline.fp_cache_path(config(ckpt), task) == path
    assert pipeline.fp_cache_path(config(ckpt, device="cuda"), task) != path  # cached timings are per device
    assert pipeline.fp_cache_path(config(ckpt, seed=1), task) != path
    assert pipeline.fp_cache_path(config(ckpt, model={"decode_batch_size": 16}), task) != path
    # the threads in use, which threads=null leaves to the process (OMP_NUM_THREADS): timings measured at another
    # count were reused under this one's threads_used
    threads = pipeline.torch.get_num_threads()
    monkeypatch.setattr(pipeline.torch, "get_num_threads", lambda: threads + 1)
    assert pipeline.fp_cache_path(config(ckpt), task) != path
    monkeypatch.setattr(pipeline.torch, "get_num_threads", lambda: threads)
    # outliers planted from other calibration images (task.calib.order): other offsets, another FP model
    planted = [{"attention": "layers.0.cross_attn_token_to_image", "offsets": [3.5, -2.0]}]
    moved = [{"attention": "layers.0.cross_attn_token_to_image", "offsets": [3.25, -2.0]}]
    assert pipeline.fp_cache_path(config(ckpt), task, planted) not in (path, pipeline.fp_cache_path(config(ckpt), task,
                                                                                                     moved))
    versions = pipeline.package_versions()
    monkeypatch.setattr(pipeline, "package_versions", lambda: {**versions, "torch": "0.0.0"})
    assert pipeline.fp_cache_path(config(ckpt), task) != path
    monkeypatch.setattr(pipeline, "package_versions", lambda: versions)
    monkeypatch.setattr(pipeline, "source_digest", lambda: "edited-metric-code")
    assert pipeline.fp_cache_path(config(ckpt), task) != path


def test_replacing_an_image_or_label_in_place_invalidates_the_fp_cache(synthetic_root, tmp_path):
    import os
    import shutil

    from tasks.instance import InstanceTask
    from tasks.oriented import OrientedTask
    from tasks.semantic import SemanticTask

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    instance = lambda: InstanceTask({"root": str(root), "ann_file": "annotations/instances_val.json",  # noqa: E731
                                     "img_dir": "val/images"},
                                    {"ann_file": "annotations/instances_train.json", "img_dir": "train/images"})
    oriented = lambda: OrientedTask({"root": str(root), "img_dir": "val/images", "ann_dir": "val/labelTxt"},  # noqa: E731
                                    {"img_dir": "train/images", "ann_dir": "train/labelTxt"})
    semantic = lambda: SemanticTask({"root": str(root), "img_dir": "val/images", "label_dir": "val/labels"},  # noqa: E731
                                    {"img_dir": "train/images"}, classes=9)
    before = {name: make().fingerprint() for name, make in (("i", instance), ("o", oriented), ("s", semantic))}
    image = sorted((root / "val" / "images").iterdir())[0]
    stat = image.stat()
    image.write_bytes(sorted((root / "val" / "images").iterdir())[1].read_bytes())  # another image, same name
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = {name: make().fingerprint() for name, make in (("i", instance), ("o", oriented), ("s", semantic))}
    assert all(after[k] != before[k] for k in before), (before, after)


def test_a_saved_recon_unit_is_reused_only_with_the_same_calibration_data_and_code(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from saq.sam.segmenter import PromptedImage

    ckpt = tmp_path / "sam.pth"
    torch.save(build_random_sam("sam_tiny").state_dict(), ckpt)
    cfg = config(ckpt, quant={"name": "w4a4"}, clip={"name": "mse"}, recon={"name": "par"})
    keys = []
    monkeypatch.setattr("saq.recon.reconstruct", lambda *args, **kwargs: keys.append(args[5]))
    image = lambda i: np.full((8, 8, 3), i, np.uint8)  # noqa: E731
    samples = [PromptedImage(image(i), boxes=np.array([[0, 0, 4, 4]], np.float32), image_id=i) for i in range(3)]
    moved = [PromptedImage(image(0), boxes=np.array([[1, 0, 4, 4]], np.float32), image_id=0), *samples[1:]]
    for calibration in (samples, samples, samples[::-1], moved):  # same; another order; one prompt moved
        pipeline.reconstruct_for_run(cfg, None, None, calibration)
    monkeypatch.setattr(pipeline, "source_digest", lambda *parts: "edited-recon-code")
    pipeline.reconstruct_for_run(cfg, None, None, samples)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # another thread count: other float sums, other 4-bit roundings
    try:
        pipeline.reconstruct_for_run(cfg, None, None, samples)
    finally:
        torch.set_num_threads(threads)
    assert keys[0] == keys[1] and len(set(keys)) == 5 and "torch " in keys[0]


def test_results_that_cannot_be_written_are_one_line_and_leave_no_stray_file(tmp_path, monkeypatch):
    import errno

    from saq import log
    from saq.errors import SaqError

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log.os, "replace", full_disk)
    with pytest.raises(SaqError, match=r"cannot write .*results.json \(No space left on device\); the run's metrics "
                                       r"are printed above"):
        log.write_results(tmp_path, {"metrics": {}})
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_an_earlier_runs_figures_are_set_aside_with_its_results(tmp_path):
    from omegaconf import OmegaConf

    from saq import log
    from saq.sweep import should_skip

    log.write_results(tmp_path, {"metrics": {"fp": {"mask_AP": 0.5}}})
    (tmp_path / "pcc_clip_ranges.png").write_bytes(b"earlier")
    (tmp_path / "sensitivity.json").write_text("{}")  # an analysis of the earlier run's model
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "media.png").write_bytes(b"W&B's own")
    # what lies below a run folder is not the run's (hydra.run.dir=. over a dataset, a nested run's folder)
    (tmp_path / "data" / "labels").mkdir(parents=True)
    (tmp_path / "data" / "labels" / "000000.png").write_bytes(b"a label map")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "pcc_clip_ranges.png").write_bytes(b"another run's")
    log.write_results(tmp_path, {"metrics": {"fp": {"mask_AP": 0.6}}})
    assert (tmp_path / "data" / "labels" / "000000.png").read_bytes() == b"a label map"
    assert (tmp_path / "nested" / "pcc_clip_ranges.png").read_bytes() == b"another run's"
    # a rerun that draws no PCC figure must not show (or upload) the earlier run's
    assert log.run_figures(tmp_path) == []  # (W&B's own files are never counted, set aside or not)
    kept = sorted(p.name.split(".")[0] for p in tmp_path.iterdir() if p.name.endswith(".previous"))
    # the earlier run's W&B folder goes with it: `wandb sync */wandb/offline-run-*` would upload it again
    assert kept == ["pcc_clip_ranges", "results", "sensitivity", "wandb"]
    assert next(tmp_path.glob("wandb.*.previous/media.png")).read_bytes() == b"W&B's own"
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "media.png").write_bytes(b"W&B's own")  # this run's
    assert log.run_figures(tmp_path) == []
    # a sweep job recomputed (resume=false, another config, a partial file) sets its earlier figures aside the same way
    (tmp_path / "recon_units.png").write_bytes(b"earlier")
    assert not should_skip(OmegaConf.create({"resume": False}), tmp_path)
    assert log.run_figures(tmp_path) == [] and not (tmp_path / "results.json").exists()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("recon_units.png.")]) == 1


def test_a_new_runs_record_replaces_the_earlier_one_only_with_its_results(tmp_path):
    from saq import log

    assert log.hydra_record_dir(tmp_path) == tmp_path / ".hydra"  # an empty folder: the record goes in place
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("earlier")
    (tmp_path / "results.json").write_text('{"earlier": 1}')
    pending = log.hydra_record_dir(tmp_path)  # beside an earlier run's results: waits until this run's are written
    assert pending == tmp_path / ".hydra.pending"
    pending.mkdir()
    (pending / "config.yaml").write_text("this run")
    log.write_results(tmp_path, {"metrics": {"fp": {"mask_AP": 0.6}}})
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "this run" and not pending.exists()
    kept = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".previous"))
    assert [p.name.rsplit(".", 2)[0] for p in kept] == [".hydra", "results.json"]  # aside together, one stamp
    assert kept[0].name.removeprefix(".hydra") == kept[1].name.removeprefix("results.json")
    assert (kept[0] / "config.yaml").read_text() == "earlier" and json.loads(kept[1].read_text()) == {"earlier": 1}
    # a run refused (or killed) after writing its pending record: the next run never takes that record for its own
    pending.mkdir()
    (pending / "config.yaml").write_text("refused run")
    assert log.hydra_record_dir(tmp_path) == pending and not pending.exists()


def test_folder_write_problem_names_what_mkdir_would_fail_on(tmp_path):
    from saq.log import folder_write_problem

    (tmp_path / "a-file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert folder_write_problem(tmp_path / "new" / "deeper") is None  # made when written
    assert folder_write_problem(tmp_path / "a-file" / "run") == f"{tmp_path / 'a-file'} is a file, not a folder"
    assert folder_write_problem(tmp_path / "dangling" / "run") == (f"{tmp_path / 'dangling'} is a link to "
                                                                   f"{tmp_path / 'gone'}, which does not exist")
    assert not (tmp_path / "new").exists()  # asked without leaving anything behind
    # a file system that refuses new folders although os.access allows them (/proc): mkdir is what answers
    from pathlib import Path

    proc = Path("/proc")
    if proc.is_dir():
        problem = folder_write_problem(proc / "saq-run" / "x")  # as root: mkdir's ENOENT; else: not writable
        assert problem in ("/proc is not writable", "no folder can be made in /proc: No such file or directory")
    assert not list(tmp_path.glob(".saq-probe-*"))  # the probe removed again


def test_a_record_the_os_will_not_move_is_a_warning_once_the_results_are_written(tmp_path, monkeypatch, capsys):
    from saq import log

    (tmp_path / "results.json").write_text('{"earlier": 1}')
    (tmp_path / ".hydra").mkdir()
    log.hydra_record_dir(tmp_path).mkdir()

    from pathlib import Path

    def refuse(path, *args, **kwargs):
        if path.name == ".hydra.pending":
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)

    real = Path.replace
    monkeypatch.setattr(Path, "replace", refuse)
    log.write_results(tmp_path, {"metrics": {"fp": {"mask_AP": 0.6}}})  # no error: the results are there
    assert json.loads((tmp_path / "results.json").read_text()) == {"metrics": {"fp": {"mask_AP": 0.6}}}
    assert capsys.readouterr().err.startswith(f"warning: cannot move this run's record {tmp_path / '.hydra.pending'}")


def test_an_earlier_runs_model_and_deployment_leave_with_it_unless_the_new_run_made_or_read_them(tmp_path):
    import shutil

    from saq import log

    def earlier_run():
        log.write_results(tmp_path, {"metrics": {"fp": {"mask_AP": 0.5}}})
        for folder in ("quantized_model", "deployed"):
            (tmp_path / folder).mkdir()
            (tmp_path / folder / "earlier").write_text("")

    # an FP (or quant.save=false) rerun: saq.deploy and quant.load of this folder must not find the earlier model
    earlier_run()
    log.write_results(tmp_path, {"metrics": {"fp": {"mask_AP": 0.6}}})
    assert not (tmp_path / "quantized_model").exists() and not (tmp_path / "deployed").exists()
    kept = sorted(p.name.split(".")[0] for p in tmp_path.iterdir() if p.name.endswith(".previous"))
    assert kept == ["deployed", "quantized_model", "results"]
    for path in tmp_path.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    # a run that evaluated the model in this folder (quant.load=RUN_DIR) and deployed it anew keeps both
    earlier_run()
    log.write_results(tmp_path, {"quantized_model": str(tmp_path), "metrics": {"fp": {}, "deployed": {"mask_AP": 1}}})
    assert (tmp_path / "quantized_model" / "earlier").exists() and (tmp_path / "deployed" / "earlier").exists()


def _run_config(synthetic_root, *overrides):
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=[
            f"task.data.root={synthetic_root}", "task.generate=null", "task.max_images=1", "logger=none",
            "fp_cache=false", "progress=false", "threads=1", *overrides])


@pytest.mark.parametrize("task", ["instance", "oriented", "semantic"])
def test_a_missing_calibration_split_fails_before_the_fp_evaluation(task, synthetic_root, tmp_path, monkeypatch):
    from saq.errors import SaqError

    monkeypatch.setattr(pipeline, "fp_metrics", lambda *args: pytest.fail("the FP evaluation ran first"))
    cfg = _run_config(synthetic_root, f"task={task}", "quant=w8a8", "task.calib.img_dir=nope")
    with pytest.raises(SaqError, match=r"calibration image folder not found: .*nope \(set task.calib.img_dir\)"):
        pipeline.run(cfg, tmp_path / "run")


@pytest.mark.parametrize(("overrides", "message"), [
    (["quant.calib_images=1000"], r"has only \d+ images with prompts \(gt\), 1000 requested"),
    (["quant.calib_images=4", "task.calib.order=official"], r"task.calib.order=official"),
])
def test_too_few_calibration_images_fail_before_the_fp_evaluation(synthetic_root, tmp_path, monkeypatch, overrides,
                                                                    message):
    from saq.errors import SaqError

    monkeypatch.setattr(pipeline, "fp_metrics", lambda *args: pytest.fail("the FP evaluation ran first"))
    with pytest.raises(SaqError, match=message):
        pipeline.run(_run_config(synthetic_root, "quant=w8a8", *overrides), tmp_path / "run")


def test_the_record_names_the_bit_widths_that_ran(synthetic_root, tmp_path):
    record = pipeline.run(_run_config(synthetic_root, "quant=w8a8", "quant.w_bits=6", "quant.calib_images=1",
                                      "clip=minmax"), tmp_path / "run")
    assert record["quant"] == "w6a8" and record["run_name"] == "sam_tiny-instance-w6a8"


def test_a_home_relative_checkpoint_is_the_same_file_everywhere(tmp_path, monkeypatch):
    """model.checkpoint=~/... (the shell leaves a ~ after '=' alone): loading, the FP cache key and quant.load's
    checks all read the file under $HOME."""
    from saq.sam.build import TINY_CHECKPOINT, build_sam
    from saq.saved import _checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny.pt").write_bytes(TINY_CHECKPOINT.read_bytes())
    build_sam("sam_tiny", "~/tiny.pt")
    key = pipeline.checkpoint_fingerprint(OmegaConf.create({"name": "sam_tiny", "checkpoint": "~/tiny.pt"}))
    assert f"|{(tmp_path / 'tiny.pt').resolve()}|" in key
    assert _checkpoint("sam_tiny", "~/tiny.pt") == (tmp_path / "tiny.pt").resolve()


def test_threads_null_is_the_process_default_after_a_job_that_set_another(synthetic_root, tmp_path, monkeypatch):
    """Sweep jobs of the basic launcher share one process: threads=null must not inherit an earlier job's count."""
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # right after the threads are set: nothing else of the run is needed here

    monkeypatch.setattr(pipeline, "build_sam", stop)
    monkeypatch.setattr(pipeline, "DEFAULT_THREADS", 3)
    before = torch.get_num_threads()
    try:
        for threads, expected in (("1", 1), ("null", 3)):
            with pytest.raises(Stop):
                pipeline.run(_run_config(synthetic_root, f"threads={threads}"), tmp_path / "run")
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_too_few_images_to_plant_outliers_names_the_outlier_knob(synthetic_root, tmp_path):
    from saq.errors import SaqError

    cfg = _run_config(synthetic_root, "model=sam_tiny_outliers", "model.outliers.calib_images=100")
    with pytest.raises(SaqError, match=r"100 requested \(lower model.outliers.calib_images\)"):
        pipeline.run(cfg, tmp_path / "run")


def test_run_log_keeps_lines_and_tracebacks_but_not_progress_redraws(tmp_path):
    import sys

    from saq.log import tee_run_log

    out, err = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="boom"):
        with tee_run_log(tmp_path / "run.log", command="python -m saq x=1"):
            print("warning: a", file=sys.stderr)
            print("warning: b", file=sys.stderr)
            sys.stderr.write("\rcalibrate:  50%|#####     | 1/2")  # a progress bar redraw
            print("table")
            raise RuntimeError("boom")
    assert (sys.stdout, sys.stderr) == (out, err)  # the real streams are back, after a crash too
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert lines[0].endswith(" python -m saq x=1")
    assert lines[1:4] == ["warning: a", "warning: b", "table"]
    assert lines[4] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: boom"
    assert "calibrate" not in "".join(lines)


def test_a_second_run_into_a_held_folder_stops_in_one_line(tmp_path):
    import subprocess
    import sys

    from saq.errors import SaqError
    from saq.log import RUN_LOG, claim_run_dir
    from tests.conftest import REPO

    held = tmp_path / "run"
    with claim_run_dir(held):
        (held / RUN_LOG).write_text("the first run's log\n")
        (held / ".hydra").mkdir()
        (held / ".hydra" / "config.yaml").write_text("the first run's config\n")
        # another process: `python -m saq` into the folder (two runs started in the same second share Hydra's)
        proc = subprocess.run([sys.executable, "-m", "saq", "logger=none", f"hydra.run.dir={held}"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: another saq process is writing into {held}; give this one its own folder (hydra.run.dir=...), "
            "or wait for it to finish"], proc.stderr[-2000:]
        assert (held / RUN_LOG).read_text() == "the first run's log\n"  # turned away before it wrote a line there
        assert (held / ".hydra" / "config.yaml").read_text() == "the first run's config\n"  # nor Hydra's record
    with claim_run_dir(held):  # released when the run ends (a killed one releases it too: an OS lock)
        pass
    with pytest.raises(SaqError, match="another saq process is writing into"), claim_run_dir(tmp_path / "x"):
        with claim_run_dir(tmp_path / "x"):  # flock is per open file: a second claim in one process is refused too
            pass


def test_a_recon_state_dir_that_cannot_be_written_is_one_line_before_anything_runs(synthetic_root, tmp_path,
                                                                                    monkeypatch):
    from saq.errors import SaqError

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder under a regular file cannot be made, even by root
    learned = ("quant=w4a4", "recon=qdrop", "quant.calib_images=1")
    # the units are saved at every one, resume or not (a later run may resume): refused before calibration
    with pytest.raises(SaqError, match=rf"^recon.state_dir={blocker}/recon cannot be written \({blocker} is a "
                                       r"file, not a folder\); set recon.state_dir to a writable folder$"):
        pipeline.validate(_run_config(synthetic_root, *learned, f"recon.state_dir={blocker}/recon"))
    # a folder that can be made passes, and the check makes nothing (a run refused later leaves no empty folder)
    pipeline.validate(_run_config(synthetic_root, *learned, f"recon.state_dir={tmp_path}/new/recon"))
    assert not (tmp_path / "new").exists()
    # an FP cache that cannot be written is no reason to refuse: its write only warns (test below)
    monkeypatch.setattr(pipeline, "FP_CACHE_DIR", blocker / "fp_metrics")
    pipeline.validate(_run_config(synthetic_root, "fp_cache=true"))


def test_an_fp_cache_that_cannot_be_written_warns_and_keeps_the_metrics(tmp_path, ckpt, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(pipeline, "FP_CACHE_DIR", blocker / "cache")  # made unwritable after the run's checks
    metrics, source = pipeline.fp_metrics(config(ckpt), build_random_sam("sam_tiny"), CountingTask())
    assert metrics == {"mIoU": 0.5, "runs": 1} and source is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: cannot write the FP cache {blocker}/cache/")
    assert err[0].endswith(f"{blocker}/cache); the next run evaluates FP again")


def test_a_file_the_prompts_or_task_cannot_read_is_named_in_one_line(synthetic_root, tmp_path):
    from omegaconf import open_dict

    from saq.errors import SaqError

    cfg = _run_config(synthetic_root)
    with open_dict(cfg):  # a constructor that opens a folder where a file is expected: IsADirectoryError, even as root
        cfg.prompts = {"_target_": "builtins.open", "file": str(tmp_path)}
    with pytest.raises(SaqError) as err:
        pipeline.build_task(cfg)
    assert str(err.value) == (f"the prompts (builtins.open) cannot be built: Is a directory: {tmp_path}; check the "
                              "paths among its prompts.* settings")


def test_the_printed_table_labels_a_paper_compatible_evaluation():
    from saq.recon import EVAL_FULL, EVAL_PAPER

    metrics = {"fp": {"mask_AP": 0.76, "images": 5}, "quantized": {"mask_AP": 0.74, "images": 5}}
    assert list(pipeline.table_rows(metrics, {"eval_mode": EVAL_FULL})) == ["fp", "quantized"]
    rows = pipeline.table_rows(metrics, {"eval_mode": EVAL_PAPER})
    assert list(rows) == ["fp", "quantized (paper-compat eval)"]
    table = pipeline.format_table("sam_tiny", "instance", "gt", rows)
    assert table.splitlines()[-1].split()[3:7] == ["quantized", "(paper-compat", "eval)", "0.7400"]


def test_printed_paths_are_relative_to_the_working_folder_inside_it(tmp_path, monkeypatch):
    from saq.log import shown_path

    inside = tmp_path / "work"
    (inside / "outputs" / "run").mkdir(parents=True)
    monkeypatch.chdir(inside)
    assert str(shown_path(inside / "outputs" / "run" / "results.json")) == "outputs/run/results.json"
    assert shown_path(tmp_path / "elsewhere" / "results.json") == tmp_path / "elsewhere" / "results.json"
