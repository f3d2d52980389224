"""Real multiruns (joblib, submitit_local, basic): results, report numbers, resume, failure isolation, W&B options."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from saq.log import method_label
from tests.conftest import REPO

# 2 x 2 jobs: bit-width x clipping, with 2 calibration images. `++` because Hydra composes a multirun's
# first config without the swept groups (quant=fp there has no calib_images); sweep presets set a quantizing default.
SWEEP_2X2 = ["quant=w6a6,w4a4", "clip=minmax,mse", "++quant.calib_images=2"]


def multirun_command(sweep_dir: Path, *overrides: str, data: Path, images: int = 2) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MPLBACKEND": "Agg"}
    args = [sys.executable, "-m", "saq", "-m", f"task.data.root={data}", "task.generate=null",
            f"task.max_images={images}", "logger=none", "threads=1", "progress=false", f"hydra.sweep.dir={sweep_dir}",
            *overrides]
    return args, env


def multirun(sweep_dir: Path, *overrides: str, data: Path, cwd: Path, images: int = 2) -> subprocess.CompletedProcess:
    args, env = multirun_command(sweep_dir, *overrides, data=data, images=images)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def results_in(sweep_dir: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("results.json"))}


def assert_report_equals_results(sweep_dir: Path, results: dict[Path, dict], widths=("w6a6", "w4a4")) -> None:
    """Every quantized mask AP in report.csv is exactly a results.json value, and the markdown shows it in %; the
    sweep ran minmax and mse at each of `widths`."""
    rows = list(csv.DictReader((sweep_dir / "report.csv").open()))
    ours = {(r["row"], r["bits"]): r for r in rows if r["source"] == "ours" and r["metric"] == "mask_AP"}
    assert len(results) == 2 * len(widths)
    md = (sweep_dir / "report.md").read_text()
    for rec in results.values():
        row, bits = method_label(rec["config"]), rec["quant"]  # clip=minmax alone: "minmax (custom)"
        cell = ours[(row, bits)]
        assert float(cell["mean"]) == rec["metrics"]["quantized"]["mask_AP"]
        assert cell["n"] == "1" and cell["seeds"] == "0"
        assert f"{100 * rec['metrics']['quantized']['mask_AP']:.2f}" in md
        assert float(ours[("FP", bits)]["mean"]) == rec["metrics"]["fp"]["mask_AP"]
    assert {k[0] for k in ours} == {"FP", "minmax (custom)", "mse"}
    assert {k[1] for k in ours} == set(widths)


@pytest.fixture(scope="module")
def joblib_sweep(synthetic_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The 2 x 2 sweep under joblib on one image (its folder is copied by the resume test)."""
    work = tmp_path_factory.mktemp("joblib")
    sweep_dir = work / "sweep"
    proc = multirun(sweep_dir, *SWEEP_2X2, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    data=synthetic_root, cwd=work, images=1)
    return sweep_dir, proc


def test_joblib_multirun_writes_four_results_and_a_report_with_their_numbers(joblib_sweep):
    sweep_dir, proc = joblib_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stderr + proc.stdout
    assert_report_equals_results(sweep_dir, results_in(sweep_dir))
    for name in ("report.md", "report.csv", "report.tex", "plots/instance_gt_mask_AP_sam_tiny_vs_bits.png"):
        assert (sweep_dir / name).is_file(), name
    # The callback printed the main table at the end of the multirun.
    assert "| method | sam_tiny W6A6 | sam_tiny W4A4 |" in proc.stdout


def test_job_folders_are_named_by_their_overrides_without_nesting(joblib_sweep, synthetic_root):
    sweep_dir, _ = joblib_sweep
    names = sorted(p.parent.name for p in sweep_dir.rglob("results.json"))
    data = str(synthetic_root).replace("/", "%2F")
    assert names == sorted(f"++quant.calib_images=2,clip={c},quant={q},task.data.root={data},task.generate=null,"
                           f"task.max_images=1" for c in ("minmax", "mse") for q in ("w4a4", "w6a6"))
    assert all(p.parent.parent == sweep_dir for p in sweep_dir.rglob("results.json"))
    # each job keeps its own log, headed by its own overrides (not the sweep's comma lists)
    for results in sweep_dir.rglob("results.json"):
        record = json.loads(results.read_text())
        header = (results.parent / "run.log").read_text().splitlines()[0]
        assert f"clip={record['config']['clip']['name']}" in header and "," not in header.split("clip=")[1]


def test_resume_skips_finished_jobs_and_recomputes_only_a_deleted_one(joblib_sweep, synthetic_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(joblib_sweep[0], sweep_dir)
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("results.json")}

    proc = multirun(sweep_dir, *SWEEP_2X2, data=synthetic_root, cwd=tmp_path, images=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped: ") == 4
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("results.json")} == before

    deleted = sorted(before)[1]
    deleted.unlink()
    proc = multirun(sweep_dir, *SWEEP_2X2, data=synthetic_root, cwd=tmp_path, images=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped: ") == 3
    after = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("results.json")}
    assert set(after) == set(before)
    assert [p for p in after if after[p] != before.get(p)] == [deleted]


def test_submitit_local_multirun_writes_two_results_and_a_matching_report(synthetic_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 1 x 2 on one image: the processes start at once on 2 cores, and most of their time is importing torch
    proc = multirun(sweep_dir, "quant=w4a4", "clip=minmax,mse", "++quant.calib_images=2",
                    "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", data=synthetic_root, cwd=tmp_path,
                    images=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((sweep_dir / ".submitit").iterdir()), "jobs went through submitit"
    assert_report_equals_results(sweep_dir, results_in(sweep_dir), widths=("w4a4",))


def test_a_failed_job_is_recorded_and_listed_without_stopping_the_others(synthetic_root, tmp_path):
    import torch

    sweep_dir = tmp_path / "sweep"
    broken = tmp_path / "broken.pth"
    # the sweep's pre-check reads a file's index only (an unreadable file or one of another model size stops the
    # sweep first): damaged values are found by the job that loads them
    state = torch.load(REPO / "saq" / "sam" / "tiny" / "sam_tiny.pt", weights_only=True)
    first = next(iter(state))
    state[first].view(-1)[0] = float("nan")
    torch.save(state, broken)
    proc = multirun(sweep_dir, f"model.checkpoint={broken},null", data=synthetic_root, cwd=tmp_path, images=1)
    assert proc.returncode == 1, "a sweep with a failed job ends with exit status 1, after its report"
    results = results_in(sweep_dir)
    assert len(results) == 1 and next(iter(results.values()))["config"]["model"]["checkpoint"] is None
    failures = list(sweep_dir.rglob("failure.json"))
    assert len(failures) == 1
    failure = json.loads(failures[0].read_text())
    line = (f"checkpoint {broken}: tensor {first} holds 1 NaN or infinite value; the weights are damaged (re-export "
            "them from training)")
    assert failure["error"] == line and f"model.checkpoint={broken}" in failure["overrides"]
    assert "1 failed jobs:" in proc.stdout and line in proc.stdout
    assert line in (sweep_dir / "report.md").read_text()
    # the user drops the bad job: its old failure is listed apart and no longer fails the sweep
    again = multirun(sweep_dir, "model.checkpoint=null", data=synthetic_root, cwd=tmp_path, images=1)
    assert again.returncode == 0, again.stdout[-2000:]
    assert "1 failure.json from earlier sweeps" in again.stdout and "failed jobs:" not in again.stdout
    # each multirun keeps its own start marker while it runs (another multirun into the folder cannot move it)
    assert not list(sweep_dir.glob(".sweep_started*"))


def test_ctrl_c_stops_the_sweep_and_leaves_the_interrupted_job_listed(synthetic_root, tmp_path):
    import signal
    import time

    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    args = [sys.executable, "-m", "saq", "-m", f"task.data.root={synthetic_root}", "task.generate=null",
            "task.max_images=2", "logger=none", "threads=1", "progress=false", f"hydra.sweep.dir={sweep_dir}",
            "seed=0,1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # once the first job's settings passed (an interrupt inside OmegaConf's parsing comes out as OmegaConf's error)
    while not list(sweep_dir.glob("*/.hydra/config.yaml")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(sweep_dir.rglob("running.json")), "the first job is running"
    while proc.poll() is None and time.monotonic() < deadline:  # pressed again, as a user would, should Python
        proc.send_signal(signal.SIGINT)  # (what Ctrl-C sends) have swallowed it: one arriving inside a __del__ is
        try:  # printed as "Exception ignored" and the run goes on (seen once under the full suite's load)
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    failures = list(sweep_dir.rglob("failure.json"))
    assert len(failures) == 1 and "interrupted (Ctrl-C)" in json.loads(failures[0].read_text())["error"]
    assert not list(sweep_dir.rglob("running.json")) and not list(sweep_dir.rglob("results.json"))
    assert not list(sweep_dir.glob(".sweep_started*")), "the sweep's start marker goes with it"


def test_a_job_that_does_not_compose_stops_the_sweep_before_any_job_runs(synthetic_root, tmp_path):
    # a preset's swept values (the command line's are checked before Hydra starts, in one line of their own)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "typo.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n"
                                                   "      clip: minmax,pcc_not_here\n")
    sweep_dir = tmp_path / "sweep"
    proc = multirun(sweep_dir, "quant=w4a4", "+sweeps=typo", data=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == ("error: 1 jobs of this sweep cannot run (they do not compose, their settings are refused, "
                         "or their checkpoint is missing or of another model); nothing was run")
    assert "clip=pcc_not_here" in lines[-2] and "Could not find 'clip/pcc_not_here'" in lines[-2]
    assert not list(sweep_dir.rglob("results.json"))


def test_a_jobs_missing_checkpoint_stops_the_sweep_before_any_job_runs(synthetic_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = multirun(sweep_dir, "model=sam_tiny,sam_vit_b", "model.checkpoint=null,/nonexistent.pth",
                    data=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: job ") for line in lines[:3]), proc.stderr
    missing = "checkpoint not found: /nonexistent.pth (set model.checkpoint to the path of a SAM .pth file)"
    assert lines[0].endswith(f"model=sam_tiny model.checkpoint=/nonexistent.pth: {missing}")
    assert lines[1].endswith("model=sam_vit_b model.checkpoint=null: model sam_vit_b needs a checkpoint: set "
                             "model.checkpoint=/path/to/sam_vit_b.pth")
    assert lines[2].endswith(f"model=sam_vit_b model.checkpoint=/nonexistent.pth: {missing}")
    assert lines[3] == ("error: 3 jobs of this sweep cannot run (they do not compose, their settings are refused, or "
                        "their checkpoint is missing or of another model); nothing was run")
    assert not list(sweep_dir.rglob("results.json"))


def test_a_jobs_checkpoint_of_another_model_stops_the_sweep_before_any_job_runs(synthetic_root, tmp_path):
    """A file linked to the wrong model size was found only when its job started, after the others had run."""
    import shutil

    tiny = tmp_path / "ckpt" / "sam_tiny.pth"
    tiny.parent.mkdir()
    shutil.copy(REPO / "saq" / "sam" / "tiny" / "sam_tiny.pt", tiny)
    sweep_dir = tmp_path / "sweep"
    proc = multirun(sweep_dir, "model=sam_tiny,sam_vit_b", f"model.checkpoint={tiny}", data=synthetic_root,
                    cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and " model=sam_vit_b model.checkpoint=" in lines[0], proc.stderr
    assert f"checkpoint {tiny} does not fit sam_vit_b: " in lines[0] and \
        lines[0].endswith("It looks like a sam_tiny checkpoint.")
    assert lines[1].startswith("error: 1 jobs of this sweep cannot run")
    assert not list(sweep_dir.rglob("results.json"))
    # a file that is no PyTorch file at all stops it the same way
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    proc = multirun(sweep_dir, f"model.checkpoint={broken},null", data=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith(
        f"model.checkpoint={broken}: checkpoint {broken} is not a readable PyTorch file; model.checkpoint must point "
        "to a SAM state dict (.pth)"), proc.stderr
    assert not list(sweep_dir.rglob("results.json"))


def test_a_job_whose_settings_a_run_refuses_stops_the_sweep_before_any_job_runs(synthetic_root, tmp_path):
    # it composes, but method=saq_sam is PCC's clipping: the clip=minmax job would fail alone, after the others ran
    sweep_dir = tmp_path / "sweep"
    proc = multirun(sweep_dir, "quant=w4a4", "method=saq_sam", "clip=pcc,minmax", data=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: 1 jobs of this sweep cannot run")
    assert "clip=minmax" in lines[-2] and "method=saq_sam is clip=pcc; this run sets clip=minmax" in lines[-2]
    assert not list(sweep_dir.rglob("results.json"))


def test_learning_knobs_swept_beside_quant_load_stop_the_sweep_before_any_job_runs(synthetic_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = multirun(sweep_dir, "quant=w4a4", "method=saq_sam", f"quant.load={tmp_path}", "recon.weight_lr=0.01,0.003",
                    data=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all("recon.weight_lr would not be read: quant.load evaluates the saved model" in line
                                   for line in lines[:2]), proc.stderr
    assert lines[2].startswith("error: 2 jobs of this sweep cannot run")


def test_slurm_launcher_without_slurm_is_one_line_and_runs_nothing(synthetic_root, tmp_path, monkeypatch):
    # PATH holds only this Python's folder: no sbatch/srun, as on any machine outside a cluster
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    sweep_dir = tmp_path / "sweep"
    proc = multirun(sweep_dir, "quant=w4a4", "clip=minmax,mse", "hydra/launcher=slurm", data=synthetic_root,
                    cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm submits to Slurm, but sbatch and srun are not on PATH: run the sweep on the "
        "cluster's login node, or here with hydra/launcher=joblib (parallel local jobs) or "
        "hydra/launcher=submitit_local; nothing was run"]
    assert not sweep_dir.exists() or not any(sweep_dir.rglob("*"))


def test_sweep_preset_outside_the_repository_root_is_one_clear_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # with a knob only the preset's groups have too: the preset is what is missing, not the knob
    for flags, extra in (([], []), (["-m"], ["recon.weight_lr=0.003", f"hydra.sweep.dir={tmp_path / 's'}"])):
        proc = subprocess.run([sys.executable, "-m", "saq", *flags, "+sweeps=bits", "logger=none", *extra], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "error: sweep preset 'bits' not found: run from the repository root (sweeps/ is searched there), "
            "where sweeps/bits.yaml must exist"], proc.stderr
    assert not (tmp_path / "s").exists()


def test_a_sweep_preset_without_dash_m_runs_only_when_every_swept_key_has_a_value(tmp_path):
    from hydra import compose, initialize_config_dir

    from saq.errors import SaqError
    from saq.sweep import check_single_run_of_a_sweep

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "saq", "+sweeps=seeds", "logger=none",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: this sweep preset sweeps method, seed, but without -m one job runs with none of their values "
        "(method unset): add -m (python -m saq -m +sweeps=...), or give each swept key one value"], proc.stderr
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        # a W&B agent's run: every swept key given (as sweeps/wandb/seeds.yaml's command does)
        agent = compose(config_name="config", overrides=["+sweeps=seeds", "method=saq_sam", "seed=1"],
                        return_hydra_config=True)
        partial = compose(config_name="config", overrides=["+sweeps=recon_ablation", "recon=par"],
                          return_hydra_config=True)
    check_single_run_of_a_sweep(agent.hydra)
    with pytest.raises(SaqError, match=r"\(recon\.granularity unset\)"):
        check_single_run_of_a_sweep(partial.hydra)


def test_an_override_whose_interpolation_does_not_resolve_is_named_by_the_checks_not_raised_on_reading(tmp_path):
    # reading Hydra's override list resolved a ${...} inside a value: a traceback in a single run, and in a
    # multirun the pre-flight callback raised (Hydra only warns) so every job ran unchecked
    from hydra import compose, initialize_config_dir

    from saq.sweep import check_single_run_of_a_sweep, composed_jobs, override_strings

    overrides = ["model.checkpoint=${nope}", "quant=w4a4", f"hydra.sweep.dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        assert override_strings(config.hydra.overrides.task)[0] == "model.checkpoint=${nope}"
        check_single_run_of_a_sweep(config.hydra)  # no preset: nothing to say, and nothing raised
        [(job, why)] = composed_jobs(config)
    assert why == "model.checkpoint cannot be resolved: Interpolation key 'nope' not found", why


def test_a_sweeper_param_is_resolved_as_hydra_resolves_it(tmp_path, monkeypatch):
    # Hydra resolves hydra.sweeper.params when it builds the sweeper: the pre-flight must predict the same jobs
    from hydra import compose, initialize_config_dir

    from saq.sweep import composed_jobs

    monkeypatch.setenv("SAQ_TEST_SEEDS", "0,1,2")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        overrides = ["+sweeps=seeds", "hydra.sweeper.params.seed=${oc.env:SAQ_TEST_SEEDS}", f"hydra.sweep.dir={tmp_path}"]
        config = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        jobs = composed_jobs(config)
    assert [job[:2] for job, _ in jobs] == [["method=saq_sam", f"seed={n}"] for n in range(3)]
    assert not [why for _, why in jobs if isinstance(why, str)]


@pytest.mark.parametrize("overrides", [["+sweeps=seeds", "recon.weight_lr=0.003"],
                                       ["+sweeps=seeds", "method=qdrop", "recon.drop_prob=0.75"],
                                       ["+sweeps=recon_ablation", "recon.iters.stage=5"]])
def test_recon_knobs_can_be_set_on_the_presets_of_one_learned_method(overrides):
    # Hydra composes a multirun's first config without its swept values: a recon=none there refused recon.* knobs
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    key, value = overrides[-1].split("=")
    assert str(OmegaConf.select(cfg, key)) == value and cfg.recon.name != "none"


# ------------------------------------------------------------------ resume rules, without running SAM

def finished(config: dict, quant: str = "w4a4") -> dict:
    metrics = {"fp": {"mask_AP": 0.5}} | ({} if quant == "fp" else {"quantized": {"mask_AP": 0.4}})
    return {"model": "sam_tiny", "task": "instance", "quant": quant, "metrics": metrics, "config": config}


def test_should_skip_only_a_finished_run_of_the_same_config_and_never_loses_a_file(tmp_path):
    from saq.sweep import should_skip

    cfg = OmegaConf.create({"seed": 0, "quant": {"name": "w4a4"}, "logger": {"name": "none"}, "progress": True})
    same_but_logging = {"seed": 0, "quant": {"name": "w4a4"}, "logger": {"name": "wandb"}, "progress": False}
    path = tmp_path / "results.json"
    assert not should_skip(cfg, tmp_path)  # nothing there

    path.write_text(json.dumps(finished(same_but_logging)))
    assert should_skip(cfg, tmp_path)  # logging knobs do not change results

    path.write_text(json.dumps(finished({"seed": 1, "quant": {"name": "w4a4"}})))
    assert not should_skip(cfg, tmp_path)
    assert not path.exists() and len(list(tmp_path.glob("results.json.*.other-config"))) == 1

    path.write_text("{ half a file")
    assert not should_skip(cfg, tmp_path)
    assert len(list(tmp_path.glob("results.json.*.unfinished"))) == 1

    partial = finished(same_but_logging)
    del partial["metrics"]["quantized"]
    path.write_text(json.dumps(partial))
    assert not should_skip(cfg, tmp_path)  # quantized metrics missing: not finished

    # deploy=true whose int8 evaluation failed: the job raised after writing FP and quantized metrics; a rerun
    # must deploy again, not skip it as finished (and drop its failure.json)
    deploying = {**same_but_logging, "deploy": True}
    failed = finished(deploying)
    failed["metrics"]["deployed"] = {"error": "onnxruntime: out of memory"}
    path.write_text(json.dumps(failed))
    assert not should_skip(OmegaConf.create({**cfg, "deploy": True}), tmp_path)
    assert len(list(tmp_path.glob("results.json.*.unfinished"))) == 3  # the half file, the partial, this one
    failed["metrics"]["deployed"] = {"mask_AP": 0.7}
    path.write_text(json.dumps(failed))
    assert should_skip(OmegaConf.create({**cfg, "deploy": True}), tmp_path)
    # an FP run deploys nothing (runs of 2026-11-29..12-01 took deploy=true and ran FP): finished
    from saq.log import record_problem

    assert record_problem(finished({**deploying, "quant": {"name": "fp"}}, quant="fp")) is None


def test_a_sweep_without_a_usable_run_replaces_the_earlier_report(tmp_path, capsys):
    from saq.sweep import SweepReport

    (tmp_path / "report.md").write_text("| mse | 72.75 |")  # the tables of runs that are now set aside
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "mask_AP_vs_bits.png").write_bytes(b"png")
    job = tmp_path / "quant=w4a4"
    job.mkdir()
    (job / "failure.json").write_text(json.dumps({"status": "failed", "error": "checkpoint not found: /x.pth"}))
    with pytest.raises(SystemExit) as stop:
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert stop.value.code == 1
    report = (tmp_path / "report.md").read_text()
    assert "72.75" not in report and "0 runs" in report and "checkpoint not found: /x.pth" in report
    assert not (tmp_path / "plots" / "mask_AP_vs_bits.png").exists()


def test_a_run_made_before_a_knob_existed_counts_as_that_knobs_old_behaviour(tmp_path):
    from hydra import compose, initialize_config_dir

    from saq.sweep import KNOBS_ADDED_SINCE, should_skip

    assert KNOBS_ADDED_SINCE["recon.response_input"] == "mixed"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for dotted, value in KNOBS_ADDED_SINCE.items():  # a knob's default keeps what runs without it did
            group = dotted.split(".")[0]
            presets = [p.stem for p in (REPO / "conf" / group).glob("*.yaml")]
            absent = object()
            found = [OmegaConf.select(compose(config_name="config", overrides=[f"{group}={name}"]), dotted,
                                      default=absent) for name in presets]
            if callable(value):  # the old behaviour depends on the run: the default keeps it where it can
                value = value({"prompts": {"_target_": "tasks.prompts.GroundTruthBoxes"}})
            assert {f for f in found if f is not absent} == {value}, dotted
    before = {"seed": 0, "recon": {"name": "par", "drop_prob": 0.5}}  # stored by a run made before the knob
    path = tmp_path / "results.json"
    path.write_text(json.dumps(finished(before)))
    now = OmegaConf.create({"seed": 0, "recon": {"name": "par", "drop_prob": 0.5, "response_input": "mixed"}})
    assert should_skip(now, tmp_path)  # it ran what the knob's default does
    other = OmegaConf.create({"seed": 0, "recon": {"name": "par", "drop_prob": 0.5, "response_input": "quantized"}})
    assert not should_skip(other, tmp_path)  # set otherwise now: that run did something else
    # task.score: ground-truth boxes were ranked as auto ranks them now, a detector's boxes were not
    for target, skipped in (("tasks.prompts.GroundTruthBoxes", True), ("tasks.prompts.DetectionsFile", False)):
        config = {"seed": 0, "task": {"ap_method": "voc07"}, "prompts": {"_target_": target}}
        job = tmp_path / target
        job.mkdir()
        (job / "results.json").write_text(json.dumps(finished(config)))
        now = OmegaConf.create({**config, "task": {"ap_method": "voc07", "score": "auto"}})
        assert should_skip(now, job) is skipped, target
    assert len(list(tmp_path.glob("results.json.*.other-config"))) == 1
    path.write_text(json.dumps(finished({"seed": 0, "recon": {"name": "par", "drop_prob": 0.25}})))
    assert not should_skip(now, tmp_path)  # other knobs still count


def test_where_a_run_keeps_its_files_does_not_make_another_config(tmp_path):
    from hydra import compose, initialize_config_dir

    from saq.sweep import RESUME_IGNORED_NESTED, should_skip

    stored = {"seed": 0, "quant": {"name": "w4a4", "save": True},
              "recon": {"name": "par", "resume": False, "state_dir": "outputs/.cache/recon", "log_every": 50}}
    (tmp_path / "results.json").write_text(json.dumps(finished(stored)))
    # continuing a killed job's reconstruction (recon.resume=true) must not recompute the sweep's finished jobs
    rerun = OmegaConf.create({"seed": 0, "quant": {"name": "w4a4", "save": False},
                              "recon": {"name": "par", "resume": True, "state_dir": "/scratch/recon", "log_every": 5,
                                        "cache_device": "cpu"}})
    assert should_skip(rerun, tmp_path)
    rerun.recon.drop_prob = 0.25  # a knob that changes the numbers still counts
    assert not should_skip(rerun, tmp_path)
    # nor do those keys name another job folder
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert set(RESUME_IGNORED_NESTED) <= set(cfg.hydra.job.config.override_dirname.exclude_keys)


def test_a_config_the_resume_check_cannot_read_fails_its_job_not_the_sweep(tmp_path, capsys):
    from saq.sweep import FAILURE_FILE, run_sweep_job

    (tmp_path / "results.json").write_text(json.dumps(finished({"seed": 0})))
    cfg = OmegaConf.create({"seed": 0, "logger": {"name": "${nope}"}})  # unresolvable, and only read to compare
    assert run_sweep_job(cfg, tmp_path, lambda *a: pytest.fail("must not run"), ["logger.name=x"]) is None
    failure = json.loads((tmp_path / FAILURE_FILE).read_text())
    assert failure["error_type"] == "InterpolationKeyError" and "nope" in failure["error"]
    assert "nope" in capsys.readouterr().err


def test_files_set_aside_together_share_one_time_stamp(tmp_path, monkeypatch):
    import itertools

    from saq.log import set_aside_run

    ticks = itertools.count()  # a second ticks over between every two renames
    monkeypatch.setattr("saq.log.time.strftime", lambda fmt: f"20261202-0000{next(ticks):02d}")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "quantized_model").mkdir()
    (tmp_path / "attention.png").write_bytes(b"png")
    (tmp_path / "wandb" / "offline-run-20261202_000000-abc").mkdir(parents=True)  # awaiting `wandb sync`
    set_aside_run(tmp_path, "previous")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.split(".")[0] for n in names] == ["attention", "quantized_model", "results", "wandb"]
    assert not list(tmp_path.glob("wandb/offline-run-*"))  # the README's sync glob (*/wandb/offline-run-*) misses it
    assert len({n.split(".")[-2] for n in names}) == 1, names  # one run's files, renamed alike


def test_resume_false_recomputes_and_keeps_the_previous_result(tmp_path):
    from saq.sweep import should_skip

    cfg = OmegaConf.create({"seed": 0, "resume": False})
    (tmp_path / "results.json").write_text(json.dumps(finished({"seed": 0, "resume": True})))
    assert not should_skip(cfg, tmp_path)
    assert len(list(tmp_path.glob("results.json.*.previous"))) == 1


def test_job_dirname_is_one_safe_component_and_bounded():
    from saq.sweep import job_dirname

    assert job_dirname("clip=mse,quant=w4a4") == "clip=mse,quant=w4a4"
    assert job_dirname("model.checkpoint=/ckpt/sam_vit_b.pth") == "model.checkpoint=%2Fckpt%2Fsam_vit_b.pth"
    # two paths that differ only where one has a slash and the other an underscore or a '%2F' get their own folders
    paths = ("task.data.root=/d/coco_2017", "task.data.root=/d/coco/2017", "task.data.root=/d/coco%2F2017")
    assert len({job_dirname(p) for p in paths}) == 3
    assert job_dirname("") == "default"
    long_a, long_b = "a=" + "x" * 300, "a=" + "x" * 299 + "y"
    assert len(job_dirname(long_a)) <= 171 and job_dirname(long_a) != job_dirname(long_b)
    # a long name drops its keys' groups, so every value, the seed's too, stays readable; the hash keeps apart names
    # that shorten alike
    iters = ",".join(f"recon.iters.{k}=20" for k in ("block", "decoder_block", "decoder_layer", "final_attn", "neck",
                                                      "stage"))
    long = f"+sweeps=seeds,quant.calib_images=2,{iters},recon.paper_eval_compat=false,seed=1,task.max_images=4"
    name = job_dirname(long)
    assert len(long) > 160 and len(name) <= 171
    assert name.startswith("+sweeps=seeds,calib_images=2,block=20,decoder_block=20,") and \
        ",paper_eval_compat=false,seed=1,max_images=4-" in name
    assert job_dirname(long.replace("task.max_images", "task.other.max_images")) != name
    # bounded in bytes, the file system's unit: a non-ASCII path in an override (3 bytes a character) was cut at
    # 160 characters, 335 bytes, and Hydra's mkdir failed with 'File name too long'
    wide = job_dirname("seed=0,task.data.root=/数据/" + "分割图像" * 40)
    assert len(wide.encode()) <= 171 and wide.startswith("seed=0,root=%2F数据%2F分割")
    assert job_dirname("seed=0,task.data.root=/数据/" + "分割图像" * 40 + "x") != wide


# ------------------------------------------------------------------ W&B conventions

def test_wandb_summary_holds_every_metric_by_its_path(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from saq.log import log_to_wandb

    class Run:
        summary: dict = {}
        url = None
        settings = None

        def log(self, data):
            logged.append(data)

        def finish(self, exit_code=0):
            finished.append(exit_code)

    logged, finished, tables = [], [], []
    run = Run()
    run.summary = {}

    def table(columns, data):
        tables.append(columns)
        return columns

    fake = types.SimpleNamespace(init=lambda **kwargs: run, Image=str, Table=table, Settings=dict)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    record = {"metrics": {"fp": {"mask_AP": 0.76, "images": 500, "ok": True},
                          "quantized": {"mask_AP": 0.73, "by_class": {"circle": 0.8}, "note": "x"}},
              "wall_time_s": 12.5, "config": {}, "model": "sam_tiny", "quant": "w4a4", "task": "instance",
              "run_name": "r", "seed": 0}
    assert log_to_wandb({"name": "wandb", "mode": "offline"}, record, tmp_path) == str(tmp_path / "wandb")
    # numbers only (no bools, no strings), nested dicts joined with '/'
    assert run.summary == {"fp/mask_AP": 0.76, "fp/images": 500, "quantized/mask_AP": 0.73,
                           "quantized/by_class/circle": 0.8, "wall_time_s": 12.5}
    assert finished == [0]
    # a point search's table leaves the per-candidate curve (a list) in results.json
    points = [{"name": "q", "pcc_hi": 1.0, "curve": [0.1, 0.2]}]
    log_to_wandb({"name": "wandb", "mode": "offline"}, {**record, "clipping": {"points": points}}, tmp_path)
    assert tables == [["name", "pcc_hi"]]
    # a failure after the run started: a warning, and the run closed as failed (not left open for the next job)
    fake.Image = lambda path: (_ for _ in ()).throw(OSError("disk full"))
    (tmp_path / "figure.png").write_bytes(b"")
    assert log_to_wandb({"name": "wandb", "mode": "offline"}, record, tmp_path) is None
    assert "warning: W&B logging failed (OSError: disk full)" in capsys.readouterr().err
    assert finished == [0, 0, 1]


def test_wandb_options_group_job_type_tags_and_config():
    from saq.log import wandb_run_options

    config = {"clip": {"name": "mse"}, "quant": {"name": "w4a4", "w_bits": 4, "a_bits": 4}, "seed": 0}
    record = {"run_name": "sam_tiny-instance-w4a4", "model": "sam_tiny", "task": "instance", "config": config}
    opts = wandb_run_options({"project": "p", "group": None, "tags": ["mine"], "mode": "offline"}, record,
                             sweep_group="outputs/sweeps/bits")
    assert opts["group"] == "outputs/sweeps/bits" and opts["job_type"] == "mse" and opts["project"] == "p"
    assert opts["tags"] == ["mine", "model:sam_tiny", "bits:w4a4", "method:mse", "task:instance"]
    assert opts["name"] == "sam_tiny-instance-w4a4-mse"
    # dotted keys: a W&B sweep agent's parameter quant=w4a4 (the group's choice) merged into the run's config must
    # not replace the run's quant settings
    assert opts["config"] == {"clip.name": "mse", "quant.name": "w4a4", "quant.w_bits": 4, "quant.a_bits": 4,
                              "seed": 0}
    assert wandb_run_options({"tags": "baseline"}, record)["tags"][0] == "baseline"  # one tag, not its letters
    assert wandb_run_options({"tags": ["w4", 2024]}, record)["tags"][:2] == ["w4", "2024"]
    assert wandb_run_options({"tags": 2024, "group": 2024}, record)["tags"][0] == "2024"
    assert wandb_run_options({"group": 2024}, record)["group"] == "2024"
    # A preset's group wins over the sweep folder; a method preset and reconstruction name the job type.
    config = {**config, "recon": {"name": "par"}}
    assert wandb_run_options({"group": "bits"}, {**record, "config": config}, "x")["group"] == "bits"
    assert wandb_run_options({}, {**record, "config": config})["job_type"] == "mse+par"
    config = {**config, "method": {"name": "saq_sam"}}
    assert wandb_run_options({}, {**record, "config": config})["job_type"] == "saq_sam"
    # the official evaluation (half the linear inputs unquantized) is never grouped with the fully quantized runs
    compat = wandb_run_options({}, {**record, "config": config, "recon": {"eval_mode": "paper_compat (drop 0.5)"}})
    assert compat["job_type"] == "saq_sam (paper-compat eval)" and "eval:paper_compat" in compat["tags"]
    assert compat["name"] == "sam_tiny-instance-w4a4-saq_sam-paper_compat"
    # a sweep job's runs differ in their overrides (a theta sweep): the name says them
    theta = wandb_run_options({}, {**record, "config": config}, "x", "clip.theta=0.3,method=saq_sam")
    assert theta["name"] == "sam_tiny-instance-w4a4-saq_sam (clip.theta=0.3,method=saq_sam)"


def test_wandb_logs_summary_config_and_run_figures(tmp_path, monkeypatch):
    """With a stand-in wandb module: metrics go to the summary and every PNG in the run dir is logged as an image."""
    import types

    from saq.log import log_to_wandb

    calls: dict = {"logged": {}}

    class FakeRun:
        summary: dict = {}
        url = None

        def log(self, data):
            calls["logged"].update(data)

        def finish(self, exit_code=0):
            calls["finished"] = exit_code

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(init=init, Image=lambda path: ("image", Path(path).name), Settings=dict)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    # a run draws its figures at its folder's top; below it is not the run's (W&B's media, a dataset, another run)
    for name in ("hist_q.png", "attention.png", "wandb/media/skip.png", "data/labels/000000.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"png")
    record = {"run_name": "r", "model": "sam_tiny", "task": "instance", "wall_time_s": 1.0,
              "metrics": {"fp": {"mask_AP": 0.5}, "quantized": {"mask_AP": 0.4}},
              "config": {"clip": {"name": "mse"}, "quant": {"name": "w4a4", "w_bits": 4, "a_bits": 4}}}
    log_to_wandb({"name": "wandb", "mode": "offline", "group": "g", "init_timeout_s": 7}, record, tmp_path)
    assert calls["init"]["group"] == "g" and calls["init"]["job_type"] == "mse"
    assert calls["init"]["settings"] == {"init_timeout": 7.0}  # this run's own, whatever an earlier job set
    assert calls["init"]["config"] == {"clip.name": "mse", "quant.name": "w4a4", "quant.w_bits": 4, "quant.a_bits": 4}
    assert FakeRun.summary["quantized/mask_AP"] == 0.4 and FakeRun.summary["fp/mask_AP"] == 0.5
    assert calls["logged"] == {"figures/hist_q": ("image", "hist_q.png"), "figures/attention": ("image", "attention.png")}
    assert calls["finished"] == 0
    # deploy=true whose int8 evaluation failed: the run raises after logging, and W&B shows it as failed
    failed = {**record, "config": {**record["config"], "deploy": True}}
    failed["metrics"] = {**record["metrics"], "deployed": {"error": "onnxruntime: out of memory"}}
    log_to_wandb({"name": "wandb", "mode": "offline"}, failed, tmp_path)
    assert calls["finished"] == 1


def test_wandb_logs_the_clipping_ranges_as_a_table(tmp_path, monkeypatch):
    import types

    from saq.log import log_to_wandb

    logged: dict = {}

    class FakeRun:
        summary: dict = {}
        url = None

        def log(self, data):
            logged.update(data)

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Image=lambda path: path, Settings=dict,
                                 Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    points = [{"name": "a.k", "pcc_lo": -1.0, "pcc_hi": 2.0}, {"name": "a.q", "pcc_lo": -3.0, "pcc_hi": 3.0}]
    record = {"run_name": "r", "model": "sam_tiny", "task": "instance", "metrics": {"fp": {"mask_AP": 0.5}},
              "config": {"clip": {"name": "pcc"}, "quant": {"name": "w6a6", "w_bits": 6, "a_bits": 6}},
              "clipping": {"method": "pcc", "points": points}}
    log_to_wandb({"name": "wandb", "mode": "offline"}, record, tmp_path)
    assert logged["clipping/ranges"] == ("table", ["name", "pcc_lo", "pcc_hi"],
                                         [["a.k", -1.0, 2.0], ["a.q", -3.0, 3.0]])


def test_make_sweep_passes_args_to_the_shell_as_written():
    # make would expand ${model.name} itself (to nothing); quoted for the shell it reaches Hydra intact
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}  # under make test
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "sweep", "SWEEP=bits",
                           "ARGS='model.checkpoint=/ckpt/${model.name}.pth' seed=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    command = [line for line in proc.stdout.splitlines() if " -m saq -m " in line]
    assert len(command) == 1 and command[0].endswith(
        "-m saq -m +sweeps=bits 'model.checkpoint=/ckpt/${model.name}.pth' seed=1"), proc.stdout


def test_jobs_that_would_share_a_folder_stop_the_sweep_before_any_job_runs(synthetic_root, tmp_path):
    # threads is left out of job folder names (it changes no result's meaning), so threads=1,2 is one folder twice
    sweep_dir = tmp_path / "sweep"
    proc = multirun(sweep_dir, "quant=w4a4", "threads=1,2", data=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: the jobs with threads=1 and with threads=2 would share one job folder: job folder names leave those "
        "keys out; sweep those values into separate hydra.sweep.dir folders, or name jobs by number "
        "(hydra.sweep.subdir='${hydra.job.num}'); nothing was run")
    assert not list(sweep_dir.rglob("results.json"))
    again = multirun(sweep_dir, "quant=w4a4", "seed=0,0", data=synthetic_root, cwd=tmp_path)
    assert again.returncode == 2 and "seed=0 is in this sweep twice" in again.stderr.strip().splitlines()[-1]
    # any folder scheme that does not name what the jobs differ in: each job would set the other's run aside
    named = multirun(sweep_dir, "quant=w4a4,w6a6", "hydra.sweep.subdir=${clip.name}", data=synthetic_root,
                     cwd=tmp_path)
    assert named.returncode == 2 and named.stderr.strip().splitlines()[-1].startswith(
        "error: the jobs with quant=w4a4 and with quant=w6a6 would share one job folder"), named.stderr[-2000:]
    # a recon.iters kind that no job's granularity makes would change nothing (a single run refuses it itself);
    # one that some job reads is fine in a sweep of several granularities
    unread = multirun(sweep_dir, "quant=w4a4", "method=saq_sam", "recon.granularity=stage,block", "recon.iters.layer=1",
                      data=synthetic_root, cwd=tmp_path)
    assert unread.returncode == 2 and unread.stderr.strip().splitlines()[-1] == (
        "error: recon.iters.layer is read by no job of this sweep (their recon.granularity: stage, block); "
        "nothing was run")
    assert not list(sweep_dir.rglob("results.json"))


def test_a_job_folder_held_by_another_process_is_a_failure_or_left_to_its_sweep(synthetic_root, tmp_path):
    from saq.log import claim_run_dir
    from saq.sweep import RUNNING_FILE

    sweep_dir = tmp_path / "sweep"
    held = sweep_dir / "held"
    with claim_run_dir(held):  # as saq.sensitivity or saq.deploy on that job's folder
        proc = multirun(sweep_dir, "quant=w4a4", "hydra.sweep.subdir=held", data=synthetic_root, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr[-2000:]  # the job failed; the sweep ended and reported it
        failure = json.loads((held / "failure.json").read_text())
        assert failure["error"].startswith(f"another saq process is writing into {held}")
        # another multirun into the same sweep folder computes it (its running.json is there): left to that one
        (held / "failure.json").unlink()
        (held / RUNNING_FILE).write_text(json.dumps({"time": "T", "pid": 1, "host": "h"}))
        again = multirun(sweep_dir, "quant=w4a4", "hydra.sweep.subdir=held", data=synthetic_root, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "is being computed by another sweep's process" in again.stdout
        assert "1 jobs still running in another process" in again.stdout and not (held / "failure.json").exists()


def test_a_slurm_sweep_leaves_checkpoint_files_to_the_nodes_but_checks_the_rest():
    from hydra import compose, initialize_config_dir

    from saq.sweep import composed_jobs

    def checked(launcher: str, checkpoint: str) -> list:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            config = compose(config_name="config", overrides=["model=sam_vit_b", f"model.checkpoint={checkpoint}",
                                                              f"hydra/launcher={launcher}"], return_hydra_config=True)
            return [why if isinstance(why, str) else None for _, why in composed_jobs(config)]

    # a path only the compute nodes may have (node-local scratch): left to the job there
    assert checked("slurm", "/node-local/sam_vit_b.pth") == [None]
    assert checked("basic", "/node-local/sam_vit_b.pth") == [
        "checkpoint not found: /node-local/sam_vit_b.pth (set model.checkpoint to the path of a SAM .pth file)"]
    assert checked("slurm", "null") == ["model sam_vit_b needs a checkpoint: set model.checkpoint=/path/to/sam_vit_b.pth"]


def test_a_finished_job_that_a_check_now_refuses_is_kept_for_its_report(tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, open_dict

    from saq.sweep import composed_jobs

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = compose(config_name="config", overrides=["model=sam_vit_b", "model.checkpoint=/moved/sam_vit_b.pth",
                                                          f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
        [(job, why)] = composed_jobs(config)
        assert why.startswith("checkpoint not found: /moved/sam_vit_b.pth")
        job_cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
        run_dir = tmp_path / str(job_cfg.hydra.sweep.subdir)
        with open_dict(job_cfg):
            del job_cfg["hydra"]
        run_dir.mkdir()
        record = {"model": "sam_vit_b", "task": "instance", "quant": "fp", "metrics": {"fp": {"mask_AP": 0.5}},
                  "config": OmegaConf.to_container(job_cfg, resolve=True)}
        (run_dir / "results.json").write_text(json.dumps(record))  # the job finished before its file moved
        [(_, kept)] = composed_jobs(config)
        assert isinstance(kept, DictConfig), kept  # skipped when the sweep runs: its report is made again
        assert f"kept as it finished in {run_dir} (it would not run now: checkpoint not found" in capsys.readouterr().out
        record["config"]["seed"] = 5  # another config's results in that folder: the job would run, and cannot
        (run_dir / "results.json").write_text(json.dumps(record))
        [(_, why)] = composed_jobs(config)
        assert why.startswith("checkpoint not found: /moved/sam_vit_b.pth")


def test_a_finished_job_is_found_in_the_folder_the_command_line_names(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, open_dict

    from saq.sweep import composed_jobs

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = compose(config_name="config", overrides=["model=sam_vit_b", "model.checkpoint=/moved/sam_vit_b.pth",
                                                          f"hydra.sweep.dir={tmp_path}",
                                                          "hydra.sweep.subdir=job${hydra.job.num}"],
                         return_hydra_config=True)
        [(job, why)] = composed_jobs(config)  # resolving job${hydra.job.num} here is no traceback
        assert why.startswith("checkpoint not found")
        job_cfg = compose(config_name="config", overrides=job)
    with open_dict(job_cfg):
        job_cfg.pop("hydra", None)
    (tmp_path / "job0").mkdir()  # job number 0's folder, as the launcher names it
    (tmp_path / "job0" / "results.json").write_text(json.dumps({
        "model": "sam_vit_b", "task": "instance", "quant": "fp", "metrics": {"fp": {"mask_AP": 0.5}},
        "config": OmegaConf.to_container(job_cfg, resolve=True)}))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        [(_, kept)] = composed_jobs(config)
    assert isinstance(kept, DictConfig), kept


def test_a_job_whose_process_is_killed_still_gets_the_sweep_its_report(synthetic_root, tmp_path):
    # joblib (as submitit) raises when a worker dies (out of memory, a time limit), and Hydra then never calls
    # on_multirun_end: the report of what finished is written at exit, the killed job listed as unfinished
    import signal
    import time

    from saq.sweep import RUNNING_FILE

    sweep_dir = tmp_path / "sweep"
    args, env = multirun_command(sweep_dir, "quant=w8a8", "clip=minmax", "seed=0,1", "++quant.calib_images=2",
                                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", data=synthetic_root, images=4)
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    killed = None
    while killed is None and time.time() < deadline and proc.poll() is None:
        for running in sweep_dir.rglob(RUNNING_FILE):
            if "seed=1" in running.parent.name:  # its own worker process (n_jobs=2: never the sweep's)
                try:
                    os.kill(json.loads(running.read_text())["pid"], signal.SIGKILL)
                    killed = running.parent
                except (ValueError, KeyError, ProcessLookupError):  # half written, or just ended: look again
                    pass
        time.sleep(0.05)
    out, err = proc.communicate(timeout=240)
    assert killed is not None, err[-2000:]
    assert proc.returncode != 0
    assert "the sweep ended before every job returned" in err
    assert out.count("=== sweep report") == 1 and "did not finish: killed" in out, out[-2000:]
    assert str(killed) in (sweep_dir / "report.md").read_text()


def test_a_sweep_job_waits_out_a_moments_hold_of_its_folder_but_not_a_tools(tmp_path):
    import threading
    from contextlib import ExitStack

    from saq.log import RunDirHeld, claim_run_dir
    from saq.sweep import RUNNING_FILE, claim_sweep_job_folder

    folder = tmp_path / "job"
    other = ExitStack()
    other.enter_context(claim_run_dir(folder))  # another multirun's job, before its running.json (or skipping)
    threading.Timer(0.3, other.close).start()
    with ExitStack() as stack:
        assert claim_sweep_job_folder(folder, stack, grace_s=5) == "claimed"  # was a failure.json at once
    with claim_run_dir(folder):  # a tool's hold outlasts the grace: this job's failure
        with ExitStack() as stack, pytest.raises(RunDirHeld):
            claim_sweep_job_folder(folder, stack, grace_s=0.2)
        (folder / RUNNING_FILE).write_text("{}")  # ... unless another multirun says it computes the job
        with ExitStack() as stack:
            assert claim_sweep_job_folder(folder, stack, grace_s=0.2) == "running"
