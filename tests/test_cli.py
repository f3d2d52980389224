"""End to end through `python -m saq`: results.json lands; user errors are one line without a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def saq(*overrides: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # beside the other test worker on 2 cores
    return subprocess.run([sys.executable, "-m", "saq", *overrides], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_ctrl_c_ends_a_run_with_one_line(synthetic_root, tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "saq", f"task.data.root={synthetic_root}", "task.generate=null",
                             "quant=w4a4", "recon=par", "logger=none", "threads=1", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # once its settings passed (an interrupt inside a library's parsing may come out as that library's error)
    while not (run_dir / ".hydra" / "config.yaml").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (run_dir / ".hydra" / "config.yaml").exists(), "the run started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = ("error: interrupted (Ctrl-C); this run wrote no results.json; reconstruction units it finished, if any, "
            "are saved: the same command with recon.resume=true continues from them")
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert line in (run_dir / "run.log").read_text() and not (run_dir / "results.json").exists()


def test_run_writes_results_json_and_wandb_offline(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = saq(f"task.data.root={synthetic_root}", "task.generate=null", "task.max_images=3", "fp_cache=false",
               "logger=wandb", "logger.mode=offline", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((run_dir / "results.json").read_text())
    fp = rec["metrics"]["fp"]
    for name in ("mask_AP", "mask_AP50", "mask_AP75", "mIoU"):
        assert 0.0 <= fp[name] <= 1.0
    assert fp["images"] == 3
    assert rec["model"] == "sam_tiny" and rec["seed"] == 0
    from saq.sam.build import checkpoint_digest
    assert rec["checkpoint_sha256"] == checkpoint_digest("sam_tiny", None)  # the weights, whatever their path
    assert rec["config"]["task"]["max_images"] == 3
    assert rec["versions"]["torch"] and rec["wall_time_s"] > 0 and rec["threads_used"] >= 1
    assert "mask_AP" in proc.stdout and "sam_tiny" in proc.stdout
    log = (run_dir / "run.log").read_text()
    assert "mask_AP" in log and f"results: {run_dir / 'results.json'}" in log and "W&B: offline run in" in log
    assert not (run_dir / "__main__.log").exists()  # Hydra's empty job log is gone
    # Hydra's record of the run, written by saq once it holds the folder
    from omegaconf import OmegaConf
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").task.max_images == 3
    assert "task.max_images=3" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    assert OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.output_dir == str(run_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "an offline W&B run is recorded"
    assert f"W&B: offline run in {offline[0]} (upload: wandb sync {offline[0]})" in proc.stdout


def test_missing_checkpoint_is_one_line_without_traceback(tmp_path):
    proc = saq("model=sam_vit_b", "model.checkpoint=/nonexistent.pth", "logger=none",
               f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err == ["error: checkpoint not found: /nonexistent.pth (set model.checkpoint to the path of a SAM "
                   ".pth file)"], proc.stderr
    assert "Traceback" not in proc.stderr
    log = (tmp_path / "r" / "run.log").read_text().splitlines()  # the run folder keeps what the run said
    assert log[0].endswith("python -m saq model=sam_vit_b model.checkpoint=/nonexistent.pth logger=none "
                           f"hydra.run.dir={tmp_path / 'r'}") and log[-1] == err[0]


def test_wandb_failure_keeps_local_results(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    # A file where W&B's folder goes makes wandb.init raise: the run must still succeed and keep results.json.
    run_dir.mkdir()
    (run_dir / "wandb").write_text("")
    proc = saq(f"task.data.root={synthetic_root}", "task.generate=null", "task.max_images=1", "fp_cache=false",
               "logger=wandb", "logger.mode=offline", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("W&B logging failed") == 1  # one line, not a Python warning beside it
    assert json.loads((run_dir / "results.json").read_text())["metrics"]["fp"]["images"] == 1


def test_error_raised_while_building_the_task_is_one_line(tmp_path):
    # Hydra wraps constructor exceptions; the user must still see only saq's own message.
    proc = saq("prompts=detections", "logger=none", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: prompts=detections needs a file: set prompts.file=/path/to/detections.json "
        "(or a folder of DOTA Task1_<class>.txt files)"], proc.stderr


def test_quantized_run_through_the_cli_equals_the_library(synthetic_root, tmp_path):
    import torch

    from saq.quant import calibrate, quantize
    from saq.sam.build import build_sam
    from saq.sam.segmenter import Segmenter
    from tasks.instance import InstanceTask

    run_dir = tmp_path / "run"
    proc = saq(f"task.data.root={synthetic_root}", "task.generate=null", "task.max_images=3", "fp_cache=false",
               "logger=none", "quant=w4a4", "clip=minmax", "quant.calib_images=2", "threads=1",
               f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((run_dir / "results.json").read_text())
    assert rec["quant"] == "w4a4" and rec["config"]["clip"]["name"] == "minmax"
    assert rec["calibration"]["prompts"] == "gt" and rec["calibration"]["images"] == 2

    # the same run through the library, in this process
    torch.set_num_threads(1)
    task = InstanceTask({"root": str(synthetic_root), "ann_file": "annotations/instances_val.json",
                         "img_dir": "val/images"},
                        {"ann_file": "annotations/instances_train.json", "img_dir": "train/images"}, max_images=3)
    model = build_sam("sam_tiny")
    fp = task.evaluate(Segmenter(model), progress=False)
    samples = task.calibration_samples(2)
    qmodel = quantize(model, {"name": "w4a4", "w_bits": 4, "a_bits": 4})
    calibrate(qmodel, samples, None, {"name": "minmax"}, progress=False)
    quantized = task.evaluate(Segmenter(qmodel), progress=False)
    assert rec["calibration"]["image_ids"] == [s.image_id for s in samples]
    for name in ("mask_AP", "mask_AP50", "mask_AP75", "mIoU", "prompts"):
        assert rec["metrics"]["fp"][name] == pytest.approx(fp[name], abs=1e-9), name
        assert rec["metrics"]["quantized"][name] == pytest.approx(quantized[name], abs=1e-9), name
    fp_miou, quantized_miou = rec["metrics"]["fp"]["mIoU"], rec["metrics"]["quantized"]["mIoU"]
    # quantization really ran, and did not break the model (measured: 0.889 against FP 0.860 on these 3 images)
    assert quantized_miou != fp_miou and abs(quantized_miou - fp_miou) < 0.15


def test_clip_num_ranges_is_taken_where_a_per_channel_activation_quantizer_reads_it():
    from hydra import compose, initialize_config_dir

    from saq.errors import SaqError
    from saq.pipeline import check_clip_grid_read

    overrides = ["quant=w4a4", "quant.decoder.act.granularity=per_channel", "clip.num_ranges=20"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    check_clip_grid_read(cfg, overrides)  # read: no error
    cfg.quant.decoder.enabled = False  # the only per-channel part kept FP: read by none
    with pytest.raises(SaqError, match=r"^clip\.num_ranges is read only by per-channel"):
        check_clip_grid_read(cfg, overrides)


@pytest.mark.parametrize(("overrides", "line"), [
    (["logger=none", "+logger.project=mine"], "logger.project would not be read: logger=none sends nothing to W&B"),
    (["quant=w4a4", "quant.agq=false", "quant.agq_taus=[1,2,3]"], "quant.agq_taus would not be read: quant.agq=false"),
    (["quant=w4a4", "quant.encoder.enabled=false", "quant.encoder.w_bits=3"],
     "quant.encoder.w_bits would not be read: quant.encoder.enabled=false keeps the encoder in full precision"),
    (["quant=w4a4", "quant.decoder.enabled=false", "quant.decoder.weight.quantizer=lsq"],
     "quant.decoder.weight.quantizer would not be read: quant.decoder.enabled=false"),
    (["quant=w4a4", "quant.decoder.weight.granularity=per_tensor", "quant.decoder.weight.ch_axis=1"],
     "quant.decoder.weight.ch_axis would not be read: quant.decoder.weight.granularity=per_tensor has no channel axis"),
    (["quant=w4a4", "quant.encoder.act.ch_axis=-1"], "quant.encoder.act.ch_axis would not be read"),
    # reconstruction iterations of a part kept in FP: its units learn nothing, yet the budget line counted them
    (["quant=w4a4", "recon=par", "quant.decoder.enabled=false", "recon.iters.final_attn=5"],
     "recon.iters.final_attn would not be read: quant.decoder.enabled=false leaves the decoder's units nothing to "
     "learn"),
    (["quant=w4a4", "recon=par", "quant.encoder.enabled=false", "recon.iters.stage=5"],
     "recon.iters.stage would not be read: quant.encoder.enabled=false leaves the encoder's units nothing to learn"),
])
def test_a_knob_of_something_switched_off_is_refused_when_given(overrides, line):
    # each composed, checked and recorded before, while changing nothing the run computes
    from hydra import compose, initialize_config_dir

    from saq.errors import SaqError
    from saq.pipeline import check_overrides_read

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
        with pytest.raises(SaqError) as err:
            check_overrides_read(cfg, overrides)
        assert str(err.value).startswith(line)
        # what is read passes: the same knobs with the part, AGQ, W&B or the channel axis on
        for fine in (["logger=wandb", "logger.project=mine"], ["quant=w4a4", "quant.agq_taus=[1,2,3]"],
                     ["quant=w4a4", "quant.encoder.w_bits=3", "quant.decoder.enabled=false"],
                     ["quant=w4a4", "quant.decoder.weight.ch_axis=1"],
                     ["quant=w4a4", "recon=par", "quant.decoder.enabled=false", "recon.iters.stage=5"]):
            check_overrides_read(compose(config_name="config", overrides=fine), fine)


def test_activation_observer_set_beside_clip_is_one_line(tmp_path):
    proc = saq("quant=w8a8", "quant.encoder.act.observer=mse", "clip=minmax", "logger=none",
               f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: quant.encoder.act.observer=mse conflicts with clip=minmax: clip= alone sets the activation range "
        "strategy (the same as this observer: clip=mse); leave quant.encoder.act.observer unset"], proc.stderr


BAD_VALUE_CASES = [
    ("quant.w_bits=0", "error: quant.w_bits=0 is not allowed; expected an integer from 2 to 8"),
    ("clip.p=-1", "error: clip.p=-1 invalid; expected a finite Lp exponent >= 1 (paper: 2.4)"),
    ("clip.p=0.5", "error: clip.p=0.5 invalid; expected a finite Lp exponent >= 1 (paper: 2.4)"),
    ("clip.p=inf", "error: clip.p=inf invalid; expected a finite Lp exponent >= 1 (paper: 2.4)"),
    # a group's name is its preset's label: renamed by hand, one preset would run under another's name
    ("quant=fp quant.name=w4a4", "error: quant.name='w4a4' would label this run, but quant=fp sets its knobs: "
                                 "choose the preset with quant=w4a4"),
    ("clip=mse clip.name=pcc", "error: clip.name='pcc' would label this run, but clip=mse sets its knobs: choose "
                               "the preset with clip=pcc"),
    ("recon=qdrop recon.name=par", "error: recon.name='par' would label this run, but recon=qdrop sets its knobs: "
                                   "choose the preset with recon=par"),
    # a unit kind the granularity does not make: nothing would read it
    ("recon=par +recon.iters.foo=10", "error: recon.iters.foo is not a unit kind; expected one of ['stage', 'layer', "
                                      "'block', 'neck', 'decoder_layer', 'decoder_block', 'final_attn']"),
    ("recon=par recon.iters.layer=4000", "error: recon.iters.layer is not read at recon.granularity=stage: its units "
                                         "are stage, neck, decoder_layer, final_attn (set recon.iters of one of those)"),
    ("recon=par recon.iters={stage:100,block:100}", "error: recon.iters.block is not read at recon.granularity=stage: "
                                                    "its units are stage, neck, decoder_layer, final_attn (set "
                                                    "recon.iters of one of those)"),
    ("recon=qdrop recon.iters.decoder_layer=100", "error: recon.iters.decoder_layer is not read at "
                                                  "recon.granularity=block: its units are block, neck, decoder_block, "
                                                  "final_attn (set recon.iters of one of those)"),
    # sizes MSE's per-channel grid, which per-tensor activations never search (weights have their own observer)
    ("quant=w4a4 clip.num_ranges=20", "error: clip.num_ranges is read only by per-channel activation quantizers "
                                      "(quant.encoder.act.granularity=per_channel or "
                                      "quant.decoder.act.granularity=per_channel); this run's are per-tensor, and "
                                      "weights use quant.*.weight.observer (mse: 100 ranges, p = 2.4)"),
    ("method=saq_sam_star clip=mse clip.name=pcc", "error: clip.name='pcc' would label this run, but clip=mse sets "
                                                   "its knobs: choose the preset with clip=pcc"),
    ("clip.name=mine", "error: clip.name='mine' would label this run, but clip=mse sets its knobs: leave "
                       "clip.name at the preset's 'mse'"),
    # a paper row or a reconstruction on the FP default would otherwise run FP under the method's label
    ("quant=fp method=saq_sam", "error: method=saq_sam quantizes the model but quant=fp runs it in full precision; "
                                "add a bit-width: quant=w4a4, quant=w6a6 or quant=w8a8"),
    ("quant=fp recon=qdrop", "error: recon=qdrop quantizes the model but quant=fp runs it in full precision; "
                             "add a bit-width: quant=w4a4, quant=w6a6 or quant=w8a8"),
    # Hydra's own hint for a key the FP preset lacks is `+quant.w_bits=4`: followed, it must not run FP silently
    ("quant=fp clip=pcc", "error: clip=pcc (or a clip.* knob) with quant=fp: the ranges of a quantized run are not "
                          "used in full precision; add a bit-width (quant=w4a4, quant=w6a6 or quant=w8a8) or leave "
                          "clip at its default"),
    ("quant=fp clip.p=3.0", "error: clip=mse (or a clip.* knob) with quant=fp: the ranges of a quantized run are not "
                            "used in full precision; add a bit-width (quant=w4a4, quant=w6a6 or quant=w8a8) or leave "
                            "clip at its default"),
    ("quant=fp quant.save=true", "error: quant.save=true with quant=fp: nothing is quantized to save; add a bit-width "
                                 "(quant=w4a4, quant=w6a6 or quant=w8a8)"),
    ("quant=_base", "error: quant=_base is the quantizing presets' shared settings, not a preset; choose quant=w4a4, "
                    "quant=w6a6 or quant=w8a8 (and set quant.w_bits / quant.a_bits for other widths)"),
    ("quant=fp +quant.w_bits=4", "error: quant=fp has no quant.w_bits: it runs the model in full precision; choose a "
                                 "quantizing preset (quant=w4a4, quant=w6a6 or quant=w8a8) to set quant knobs"),
]
BAD_VALUE_MESSAGES = dict(BAD_VALUE_CASES)


@pytest.mark.parametrize("override,message", BAD_VALUE_CASES)
def test_bad_quant_or_clip_value_fails_before_model_data_or_fp_evaluation(override, message, tmp_path, monkeypatch):
    # in-process, as the CLI runs it (Hydra's config of a single run set: the checks read its choices and overrides);
    # the CLI's own exit status and one line are checked by the subprocess cases below
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from saq import pipeline
    from saq.errors import SaqError

    def never(*args, **kwargs):
        raise AssertionError("the model, the data or the FP evaluation was reached before the config was refused")

    for step in ("build_sam", "build_task", "fp_metrics"):
        monkeypatch.setattr(pipeline, step, never)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=cli_overrides(override, tmp_path), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        with pytest.raises(SaqError) as err:
            pipeline.run(cfg, tmp_path / "r")
    finally:
        HydraConfig.instance().cfg = None
    assert f"error: {err.value}" == message


def cli_overrides(override: str, tmp_path) -> list[str]:
    """A bad-value case's command line: the checkpoint and the data do not exist, so had anything been loaded or
    evaluated first, its error would show."""
    return ["model=sam_vit_b", "model.checkpoint=/nonexistent.pth", "task.data.root=/nonexistent", "task.generate=null",
            *(() if override.startswith("quant=") else ("quant=w8a8",)), *override.split(), "logger=none",
            f"hydra.run.dir={tmp_path / 'r'}"]


@pytest.mark.parametrize("override", ["quant=fp quant.name=w4a4", "recon=par recon.iters.layer=4000",
                                      "quant.w_bits=0"])
def test_bad_values_through_the_cli_exit_2_with_one_line(override, tmp_path):
    # the first two need the command's own preset choices and overrides, which only the running CLI gives the checks
    proc = saq(*cli_overrides(override, tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [BAD_VALUE_MESSAGES[override]], proc.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def test_help_lists_the_presets_a_user_can_choose_and_the_sweeps(tmp_path):
    elsewhere = saq("--help", cwd=tmp_path)  # config presets come with the package; sweep presets from the root
    assert elsewhere.returncode == 0 and "quant: fp, w4a4, w6a6, w8a8" in elsewhere.stdout.splitlines()
    assert ("+sweeps: the sweep presets are found from the repository root (sweeps/); run there to use them"
            in elsewhere.stdout.splitlines())
    proc = saq("quant=w4a4", "--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for group in ("clip", "method", "model", "quant", "recon", "task"):
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml") if not p.stem.startswith("_"))
        assert f"{group}: {', '.join(options)}" in lines
    assert "quant: fp, w4a4, w6a6, w8a8" in lines  # the shared quant/_base part is not a choice
    sweeps = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
    assert f"+sweeps (with -m, or make sweep SWEEP=NAME): {', '.join(sweeps)}" in lines
    assert "  w_bits: 4" in lines  # the config, with the overrides given
    launchers = next(line for line in lines if line.startswith("hydra/launcher (parallel or Slurm jobs with -m): "))
    assert {"basic", "joblib", "slurm", "submitit_local"} <= set(launchers.split(": ")[1].split(", "))


@pytest.mark.parametrize("tool", ["saq.report", "saq.deploy", "saq.sensitivity"])
def test_tools_answer_help_with_their_usage_and_refuse_unknown_flags(tool, capsys):
    import importlib

    main = importlib.import_module(tool).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {tool} ") and importlib.import_module(tool).__doc__.strip() in out
    assert main(["somewhere", "--verbose"]) != 0
    assert "unknown flag '--verbose' (options are key=value); usage: python -m " in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["+model.chekpoint=/x.pth"], "model.chekpoint is not a model setting; expected one of"),
    (["seed=abc"], "seed='abc' invalid; expected an integer"),
    (["seed=-1"], "seed=-1 invalid; expected an integer >= 0"),
    (["seed=4294967296"], "seed=4294967296 invalid; expected an integer seed in 0..4294967295"),
    (["method=saq_sam", "quant=w4a4", "recon.seed=-3"], "recon.seed=-3 invalid"),
    (["threads=0"], "threads=0 invalid; expected an integer >= 1 or null"),
    (["threads=two"], "threads='two' invalid"),
    (["task.max_images=2.5"], "task.max_images=2.5 invalid; expected an integer >= 1 or null"),
    (["task.max_images=true"], "task.max_images=True invalid"),
    (["model.decode_batch_size=abc"], "model.decode_batch_size='abc' invalid"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode='bogus' is unknown; expected one of"),
    (["quant=w8a8", "quant.encoder.enabled=false", "quant.decoder.enabled=false"],
     "quant.encoder.enabled and quant.decoder.enabled are both false: nothing would be quantized"),
    (["model=sam_tiny_outliers", "model.outliers.magnitude=abc"], "model.outliers.magnitude='abc' invalid"),
    (["model=sam_tiny_outliers", "model.outliers.magnitude=inf"], "model.outliers.magnitude=inf invalid"),
    (["quant=w4a4", "method=saq_sam", "recon.weight_lr=inf"], "recon.weight_lr=inf invalid; expected a finite number"),
    (["model=sam_tiny_outliers", "model.outliers.attentions=5"], "model.outliers.attentions=5 invalid"),
    (["model=sam_tiny_outliers", "model.outliers.seed=x"], "model.outliers.seed='x' invalid; expected an integer"),
    (["quant=w8a8", "deploy=true", "quant.encoder.act.granularity=per_channel"],
     "cannot deploy: quant.encoder.act.granularity=per_channel; ONNX QuantizeLinear takes per-tensor activations"),
    (["quant=w8a8", "deploy=true", "method=saq_sam", "recon.paper_eval_compat=true"],
     "deploy=true evaluates the int8 graph fully quantized, but recon.paper_eval_compat=true evaluates the model"),
    (["quant=w4a4", "clip=pcc", "quant.decoder.enabled=false"],
     "clip=pcc searches the quantized mask decoder's attention ranges, but quant.decoder.enabled=false"),
    (["quant=w4a4", "clip=pcc", "quant.decoder.act.granularity=per_channel"],
     "clip=pcc searches per-tensor ranges, but quant.decoder.act.granularity=per_channel"),
    # a broken interpolation in a key read only at the end of a run (it cost a finished run its results.json)
    (["quant=w4a4", "logger=wandb", "logger.group=${quant.nam}"], "logger.group cannot be resolved"),
    # on/off switches: 'no' is a truthy string
    *(([f"{key}=no"], f"{key}='no' invalid; expected true or false") for key in
      ("deploy", "fp_cache", "figures", "progress", "resume")),
    # keys added with + that nothing reads
    (["+thread=1"], "thread is not a run setting; expected one of"),
    (["logger=wandb", "+logger.modee=online"], "logger.modee is not a logger setting"),
    (["logger=wandb", "logger.init_timeout_s=0"], "logger.init_timeout_s=0 invalid; expected a finite number >= 1"),
    (["logger=wandb", "logger.tags=[[a]]"], "logger.tags=[['a']] is not a tag list; expected e.g. logger.tags="),
    (["logger=wandb", "logger.project=[a,b]"], "logger.project=['a', 'b'] is not a name; expected text or null"),
    # a removed group every step reads (the logger may be removed: no W&B)
    (["~model"], "the model group is required (removed with ~model?); choose one with model=NAME"),
    (["~recon"], "the recon group is required (removed with ~recon?)"),
    # a run-level key removed: later steps read it (were tracebacks, one after the model and task were built)
    (["~device"], "device is required (removed with ~device?); set it (device=VALUE) or leave it to its default"),
    (["~model.decode_batch_size"], "model.decode_batch_size is required (removed with ~model.decode_batch_size?)"),
    (["~fp_cache"], "fp_cache is required (removed with ~fp_cache?)"),
    # a method preset with its clipping or reconstruction swapped is another method
    (["quant=w4a4", "method=minmax", "clip=mse"], "method=minmax is clip=minmax; this run sets clip=mse, so it is not"),
    (["quant=w4a4", "method=saq_sam", "recon=none"], "method=saq_sam is recon=par; this run sets recon=none"),
    # ... and so is one with the quantizers, ranges or loss of another row (PTQ4SAM-S's, QDrop's, PAR's)
    (["quant=w4a4", "method=minmax", "quant.big=true", "quant.agq=true"],
     "method=minmax sets quant.big=false; this run sets quant.big=true, so it is another of the paper's rows"),
    (["quant=w4a4", "method=minmax", "clip.reduction=mean"], "method=minmax sets clip.reduction=extreme; this run sets "
                                                              "clip.reduction=mean"),
    (["quant=w4a4", "method=ptq4sam_s", "clip.reduction=extreme"], "method=ptq4sam_s sets clip.reduction=mean; this "
                                                                    "run sets clip.reduction=extreme"),
    (["quant=w4a4", "method=qdrop", "clip.reduction=extreme"], "method=qdrop sets clip.reduction=mean"),
    (["quant=w4a4", "method=saq_sam", "recon.loss=mse"], "method=saq_sam sets recon.loss=par; this run sets "
                                                         "recon.loss=mse, so it is another"),
    (["quant=w4a4", "method=qdrop", "recon.loss=par"], "method=qdrop sets recon.loss=mse; this run sets recon.loss=par"),
    (["quant=w4a4", "method=saq_sam_star", "quant.agq=false"], "method=saq_sam_star sets quant.agq=true; this run "
                                                                "sets quant.agq=false"),
    (["quant=w4a4", "+recon.drop_prob=0.2"], "recon=none learns nothing, so recon.drop_prob would have no effect"),
    (["quant=w4a4", "recon=par", "recon.name=none"], "recon=none learns nothing, so recon.best_state"),
    (["quant=w4a4", "recon=par", "recon.name=foo"], "recon.name='foo' unknown; expected one of ['none', 'qdrop', "),
    (["quant=w4a4", "clip=pcc", "clip.images=64"], "clip.images=64 scores more images than calibration has"),
    (["quant=w4a4", "method=saq_sam", "recon.state_dir=null"], "recon.state_dir=None invalid; expected a folder path"),
    (["quant=w4a4", "recon=par", "recon.round_reg.b_start=10"], "recon.round_reg.b_start=10 shapes AdaRound's rounding "
                                                                  "regulariser, which is off"),
    (["quant=w4a4", "recon=par", "quant.agq=false", "recon.softmax_scale_lr=0.002"],
     "recon.softmax_scale_lr=0.002 learns AGQ's post-softmax scale, but quant.agq=false"),
    (["quant=w4a4", "quant.load=5"], "quant.load=5 invalid; expected null or the path of a run directory"),
    # on quant=fp: null passed unchecked, the string 'false' was said as quant.save=true
    (["quant=fp", "quant.save=null"], "quant.save=None invalid; expected true or false"),
    (["quant=fp", "quant.save='false'"], "quant.save='false' invalid; expected true or false"),
    # Path() of these is a TypeError traceback
    *(([f"model.checkpoint={value}"], f"model.checkpoint={shown} invalid; expected null or the path of a SAM .pth "
                                      "file") for value, shown in (("123", "123"), ("true", "True"),
                                                                   ("[a.pth,b.pth]", "['a.pth', 'b.pth']"))),
    (["quant=w4a4", "quant.load=true"], "quant.load=True invalid; expected null or the path of a run directory"),
    # the file itself, before the run's folder gets its record and before the FP evaluation's data is read
    (["model=sam_vit_b", "model.checkpoint=/nonexistent.pth"], "checkpoint not found: /nonexistent.pth (set "
                                                                "model.checkpoint to the path of a SAM .pth file)"),
    (["model=sam_vit_l"], "model sam_vit_l needs a checkpoint: set model.checkpoint=/path/to/sam_vit_l.pth"),
    # planted outliers make another model: with them off, or on another model, the run would carry the wrong name
    (["model=sam_tiny_outliers", "model.outliers=null"], "model=sam_tiny_outliers plants its outliers with "
                                                         "model.outliers; it cannot be null"),
    (["+model.outliers={magnitude: 150}"], "model.outliers plants outliers in a model named sam_tiny, which is then "
                                           "not sam_tiny: use model=sam_tiny_outliers"),
])
def test_run_knobs_of_the_wrong_kind_are_one_line_before_anything_runs(overrides, message):
    from hydra import compose, initialize_config_dir

    from saq.errors import SaqError
    from saq.pipeline import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    with pytest.raises(SaqError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["method=saq_sam", "recon.granularity=block", "recon.budget=equal"],  # the paper's granularity ablation of PAR
    ["method=saq_sam", "recon.weight_lr=0.003", "recon.par_loss.mask_weight=2000"],
    ["method=ptq4sam_l", "recon.iters.block=100", "recon.iters.neck=100", "recon.iters.decoder_block=100",
     "recon.iters.final_attn=100"],
    ["method=minmax", "quant.w_bits=6"],
])
def test_a_method_preset_keeps_its_label_under_tuning(overrides):
    from hydra import compose, initialize_config_dir

    from saq.pipeline import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", "quant=w4a4", *overrides])
    validate(cfg)  # the knobs that make a paper row are untouched: still that row


def test_a_removed_logger_group_runs_without_wandb(synthetic_root, tmp_path):
    from hydra import compose, initialize_config_dir

    from saq.pipeline import run, validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["~logger", f"task.data.root={synthetic_root}",
                                                       "task.generate=null", "task.max_images=1", "fp_cache=false",
                                                       "progress=false", "figures=false"])
        tagged = [compose(config_name="config", overrides=["logger=wandb", f"logger.{key}={value}"])
                  for key, value in (("tags", "baseline"), ("tags", "2024"), ("group", "2024"))]
    assert "logger" not in cfg
    record = run(cfg, tmp_path)  # the end of the run logs nowhere instead of failing after results.json
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == record["metrics"]
    for each in tagged:  # one tag, or a name, that Hydra reads as a word or a number
        validate(each)


def test_task_seeds_and_jitter_sizes_of_the_wrong_kind_are_one_line(synthetic_root):
    from saq.errors import SaqError
    from tasks.prompts import JitteredBoxes
    from tasks.semantic import SemanticTask

    for kwargs, message in (({"seed": -1}, "prompts.seed=-1 invalid"), ({"scale": "abc"}, "prompts.scale='abc' invalid"),
                            ({"max_px": None}, "prompts.max_px=None invalid; expected a finite number >= 0")):
        with pytest.raises(SaqError, match=re.escape(message)):
            JitteredBoxes(**kwargs)
    data = {"root": str(synthetic_root), "img_dir": "val/images", "label_dir": "val/labels"}
    with pytest.raises(SaqError, match=re.escape("task.coarse.seed=-2 invalid; expected an integer >= 0")):
        SemanticTask(data, {"img_dir": "train/images"}, classes=5, coarse={"seed": -2})


def test_every_model_preset_key_is_a_known_model_setting():
    from omegaconf import OmegaConf

    from saq.pipeline import MODEL_KEYS

    for path in sorted((REPO / "conf" / "model").glob("*.yaml")):
        assert set(OmegaConf.load(path)) <= set(MODEL_KEYS), path.name


def test_benchmark_arguments_are_checked_and_every_key_a_script_reads_is_accepted(capsys):
    import ast
    import re

    from saq.cli import run_script, script_args
    from saq.errors import SaqError

    doc = "Times things.\n\nUsage: python benchmarks/x.py [images=4]\n       [model=sam_tiny]\n"
    kinds = {"images": int, "model": str, "vit_b": ("yes", "no")}
    assert script_args(["images=8", "model=sam_vit_b", "vit_b=no"], doc, kinds) == {"images": 8, "model": "sam_vit_b",
                                                                                   "vit_b": "no"}
    for argv, message in ((["images"], "'images' is not one of this script's key=value options"),
                          (["vit_b=true"], "vit_b='true' is not allowed; expected one of ['yes', 'no']"),
                          (["run=/x"], "'run=/x' is not one of this script's key=value options"),
                          (["images=abc"], "images='abc' invalid; expected a whole number >= 1"),
                          (["images=0"], "images='0' invalid; expected a whole number >= 1; Usage: python "
                                         "benchmarks/x.py [images=4] [model=sam_tiny]"),
                          (["model="], "model= is empty"),
                          (["images=2", "images=3"], "images= is given twice")):
        with pytest.raises(SaqError, match=re.escape(message)):
            script_args(argv, doc, kinds)
    assert run_script(lambda args: None, doc, kinds, ["images=abc"]) == 2
    assert "Usage: python benchmarks/x.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script_args(["--help"], doc, kinds)
    assert capsys.readouterr().out.startswith("Times things.")
    # each script accepts exactly the keys its main reads
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        source = path.read_text()
        read = set(re.findall(r"""args(?:\.get\(|\[)["']([a-z_0-9]+)["']""", source))
        accepted = None
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Dict) and node.keys and all(
                    (isinstance(v, ast.Name) and v.id in ("int", "str"))
                    or (isinstance(v, ast.Tuple) and all(isinstance(e, ast.Constant) for e in v.elts))
                    for v in node.values):
                accepted = {k.value for k in node.keys}
        assert accepted == read, path.name
        usage = ast.get_docstring(ast.parse(source)).split("Usage:")[1].split("\n\n")[0]
        assert all(f"[{key}=" in usage for key in accepted), path.name  # the usage line names every option


def run_benchmark(script: str, args: dict):
    """A benchmark's main(args) in this process, leaving torch's thread count and random state as they were."""
    import importlib

    import torch

    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            return importlib.import_module(f"benchmarks.{script}").main(args)
    finally:
        torch.set_num_threads(threads)


def test_amg_speed_says_or_refuses_a_new_root_as_the_main_command_does_naming_its_own_knob(tmp_path, monkeypatch,
                                                                                          capsys):
    from benchmarks import amg_speed
    from saq.errors import SaqError

    # a typo above the last part of a path to real data: refused, nothing made (it made the whole set there)
    with pytest.raises(SaqError, match=rf"^root={re.escape(str(tmp_path / 'nope' / 'deep'))} does not exist, nor "
                                       rf"does its folder {re.escape(str(tmp_path / 'nope'))}: refusing to generate "
                                       r"the synthetic dataset there \(fix the path to the data\)$"):
        run_benchmark("amg_speed", {"root": str(tmp_path / "nope" / "deep"), "images": 1})
    assert not (tmp_path / "nope").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SaqError, match=rf"^root={re.escape(str(tmp_path / 'a_file'))} is a file; root needs a folder"):
        run_benchmark("amg_speed", {"root": str(tmp_path / "a_file"), "images": 1})
    (tmp_path / "ade" / "images" / "validation").mkdir(parents=True)  # real data in another layout: not generated into
    with pytest.raises(SaqError, match=rf"^root={re.escape(str(tmp_path / 'ade'))} has no val/images folder: give a "
                                       r"root laid out as data/synthetic \(its images under ROOT/val/images\)$"):
        run_benchmark("amg_speed", {"root": str(tmp_path / "ade"), "images": 1})

    # a new root in an existing folder is generated, and said (not the whole set here: the line is what is tested)
    def generated(root, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(amg_speed, "ensure_dataset", generated)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark("amg_speed", {"root": str(tmp_path / "new"), "images": 1})
    assert capsys.readouterr().out == (f"root={tmp_path / 'new'} does not exist: generating the synthetic dataset into "
                                       f"{tmp_path / 'new'}\n")


@pytest.mark.parametrize(("script", "knob", "args"), [
    ("recon_speed", "data", {"iters": 1, "images": 1}),
    ("decoder_qk_outliers", "data", {"images": 1}),
    ("int8_latency", "root", {"vit_b": "no", "val_images": 1, "calib_images": 1}),
])
def test_benchmarks_name_their_own_data_knob_for_a_root_without_the_dataset(script, knob, args, tmp_path):
    from saq.errors import SaqError

    # the main command's task.data.root means nothing to a user who typed data= or root=
    with pytest.raises(SaqError) as raised:
        run_benchmark(script, {**args, knob: str(tmp_path)})
    assert str(raised.value) == (f"COCO annotation file not found: {tmp_path / 'annotations' / 'instances_val.json'} "
                                 f"(set {knob}=ROOT, laid out as data/synthetic)")
    with pytest.raises(SaqError) as raised:
        run_benchmark(script, {**args, knob: str(tmp_path / "missing")})
    assert str(raised.value) == (f"{knob}={tmp_path / 'missing'} is not a folder; give a COCO-format dataset root "
                                 "(data/synthetic is generated when missing)")


@pytest.mark.parametrize(("overrides", "message"), [
    (["+task.max_image=3"], "task.max_image is not a setting of tasks.instance.InstanceTask"),
    (["prompts=jittered", "+prompts.sead=3"], "prompts.sead is not a setting of tasks.prompts.JitteredBoxes"),
    # a class that takes no settings: was Hydra's 'GroundTruthBoxes() takes no arguments' with its full key
    (["prompts=gt", "+prompts.scale=0.1"], "prompts.scale is not a setting of tasks.prompts.GroundTruthBoxes; it "
                                           "takes none"),
    # under task.data / task.calib too: the oriented task has no calibration order, and nothing would read it
    (["task=oriented", "+task.calib.order=official"], "task.calib.order is not a setting of task.calib; expected "
                                                      "one of ['img_dir', 'ann_dir']"),
    (["+task.data.ann_files=x.json"], "task.data.ann_files is not a setting of task.data"),
    (["task=semantic", "+task.calib.label_dir=train/labels"], "task.calib.label_dir is not a setting of task.calib"),
    # a null path is named, not a TypeError from joining it to the root
    (["task.calib.ann_file=null"], "task.calib.ann_file=None invalid; expected a path (relative to task.data.root)"),
    (["task=oriented", "task.data.root=null"], "task.data.root=None invalid; expected a path"),
    (["task.calib=null"], "task.calib must be a mapping with ann_file, img_dir, got None"),
])
def test_a_key_added_with_plus_that_the_task_does_not_take_is_one_line(synthetic_root, overrides, message):
    from hydra import compose, initialize_config_dir

    from saq.errors import SaqError
    from saq.pipeline import build_task

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", f"task.data.root={synthetic_root}",
                                                       "task.generate=null", *overrides])
    with pytest.raises(SaqError, match=re.escape(message)):
        build_task(cfg)


def test_the_progress_setting_reaches_a_prompt_source_that_reads_files(synthetic_root, tmp_path):
    from hydra import compose, initialize_config_dir

    from saq.pipeline import build_task

    coco = json.loads((synthetic_root / "annotations/instances_val.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in coco["annotations"]]
    (tmp_path / "d.json").write_text(json.dumps(dets))
    base = ["logger=none", f"task.data.root={synthetic_root}", "task.generate=null"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for progress in (True, False):
            cfg = compose(config_name="config", overrides=[*base, "prompts=detections",
                                                           f"prompts.file={tmp_path / 'd.json'}", f"progress={progress}"])
            assert build_task(cfg).prompts.progress is progress
        assert build_task(compose(config_name="config", overrides=[*base, "progress=false"])).prompts.name == "gt"


@pytest.mark.parametrize("case", ["under a file", "record", "log", "sweep"])
def test_a_run_folder_that_cannot_be_written_is_one_line(case, tmp_path):
    # what cannot be written even as root: a folder under a regular file, a file or folder where saq writes the other
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "a-file" / "run" if case in ("under a file", "sweep") else tmp_path / "run"
    if case == "record":  # found once the config passed its checks, before anything is computed
        run_dir.mkdir()
        (run_dir / ".hydra").write_text("")
    if case == "log":
        (run_dir / "run.log").mkdir(parents=True)
    key = "hydra.sweep.dir" if case == "sweep" else "hydra.run.dir"
    proc = saq(*(["-m", "seed=0,1"] if case == "sweep" else []), "logger=none", f"{key}={run_dir}")
    assert proc.returncode == 2
    reason = {"record": f"File exists: {run_dir / '.hydra'}", "log": f"Is a directory: {run_dir / 'run.log'}"}.get(
        case, f"{tmp_path / 'a-file'} is a file, not a folder")
    line = f"error: cannot write the run folder {run_dir} ({reason}); set {key}=<a writable folder>"
    assert proc.stderr.strip().splitlines() == [line + ("; nothing was run" if case in ("under a file", "sweep")
                                                        else "")], proc.stderr


def test_a_sweep_job_whose_log_cannot_be_written_is_a_listed_failure(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "seed=0" / "run.log").mkdir(parents=True)  # the job's folder takes files, its log cannot be opened
    proc = saq("-m", "seed=0", "logger=none", "progress=false", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, "a sweep with a failed job ends with exit status 1"
    failure = json.loads((sweep / "seed=0" / "failure.json").read_text())
    assert failure["error"] == (f"cannot write the run folder {sweep / 'seed=0'} (Is a directory: "
                                f"{sweep / 'seed=0' / 'run.log'}); set hydra.sweep.dir=<a writable folder>")
    assert "1 failed jobs:" in proc.stdout


def test_a_refused_run_into_a_finished_folder_leaves_its_record_with_its_results(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the earlier run's config\n")
    (run_dir / "results.json").write_text('{"the earlier run": "results"}')
    proc = saq("seed=-1", "logger=none", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "seed=-1 invalid" in proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the earlier run's config\n"
    assert (run_dir / "results.json").read_text() == '{"the earlier run": "results"}'
    assert "seed=-1 invalid" in (run_dir / "run.log").read_text()  # the folder keeps what the refused run said
    # refused after its checks (the data is not there): the record it wrote beside the earlier one goes with it
    proc = saq("logger=none", f"task.data.root={tmp_path / 'no-data'}", "task.generate=null",
               f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "no-data" in proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the earlier run's config\n"
    assert (run_dir / "results.json").read_text() == '{"the earlier run": "results"}'
    assert not (run_dir / ".hydra.pending").exists()


@pytest.mark.parametrize(("arguments", "line"), [
    (["quant=w4a4", "recon.drop_prob=0.3"], "recon.drop_prob is not a key of recon=none; recon=par, qdrop have it "
                                            "(choose one)"),
    (["quant=w4a4", "quant.encoder.act.nop=1"], "quant.encoder.act.nop is not a known key; expected one of "
                                                "['ch_axis', 'granularity', 'observer', 'quantizer', 'symmetric']"),
    (["sed=1"], "sed is not a known key; expected one of ['clip', 'deploy', 'device', 'figures', 'fp_cache', "
                "'logger', 'method', 'model', 'progress', 'prompts', 'quant', 'recon', 'resume', 'seed', 'task', "
                "'threads']"),
    # a multirun's first composition has the swept group's default: Hydra's way round it is ++
    (["-m", "quant=w6a6,w4a4", "quant.calib_images=8"], "quant.calib_images is not a key of quant=fp; quant=w4a4, "
                                                        "w6a6, w8a8 have it (choose one); this multirun sweeps quant, "
                                                        "and Hydra composes its first config without the swept values: "
                                                        "to give every job quant.calib_images, write "
                                                        "++quant.calib_images=..."),
    # a method sweep sets recon per job: the same way round; a typo gets no such hint (++ would not help)
    (["-m", "method=qdrop,saq_sam", "quant=w4a4", "recon.drop_prob=0.3"], "recon.drop_prob is not a key of recon=none; "
                                                                          "recon=par, qdrop have it (choose one); this "
                                                                          "multirun sweeps method, and Hydra composes "
                                                                          "its first config without the swept values: "
                                                                          "to give every job recon.drop_prob, write "
                                                                          "++recon.drop_prob=..."),
    (["-m", "quant=w6a6,w4a4", "quant.calib_imgs=8"], "quant.calib_imgs is not a known key; expected one of ['load', "
                                                      "'name', 'save']"),
    # deeper keys of another preset, and a dict value with a key the node lacks
    (["quant.encoder.act.granularity=per_channel"], "quant.encoder.act.granularity is not a key of quant=fp; "
                                                    "quant=w4a4, w6a6, w8a8 have it (choose one)"),
    (["model.outliers.calib_images=4"], "model.outliers.calib_images is not a key of model=sam_tiny; "
                                        "model=sam_tiny_outliers has it (choose one)"),
    (["quant=w4a4", "recon=par", "recon.iters={stage:10,typo:5}"], "recon.iters.typo is not a known key; expected "
                                                                   "one of ['block', 'decoder_block', "
                                                                   "'decoder_layer', 'final_attn', 'layer', 'neck', "
                                                                   "'stage']"),
    # several at once: every one said, keys with the same answer together, the ++ hint only where it helps
    (["foo=1", "bar=2"], "foo, bar are not known keys; expected one of ['clip', 'deploy', 'device', 'figures', "
                         "'fp_cache', 'logger', 'method', 'model', 'progress', 'prompts', 'quant', 'recon', 'resume', "
                         "'seed', 'task', 'threads']"),
    (["quant.weight_bits=4", "quant.calib_images=2"], "quant.weight_bits is not a known key; expected one of ['load', "
                                                      "'name', 'save']; quant.calib_images is not a key of quant=fp; "
                                                      "quant=w4a4, w6a6, w8a8 have it (choose one)"),
    (["-m", "quant=w6a6,w4a4", "quant.calib_images=8", "recon.drop_prob=0.1"],
     "quant.calib_images is not a key of quant=fp; quant=w4a4, w6a6, w8a8 have it (choose one); recon.drop_prob is "
     "not a key of recon=none; recon=par, qdrop have it (choose one); this multirun sweeps quant, and Hydra composes "
     "its first config without the swept values: to give every job quant.calib_images, write "
     "++quant.calib_images=..."),
    # several such keys: said together, the ++ hint once
    (["-m", "recon=qdrop,par", "recon.drop_prob=0.3", "recon.weight_lr=0.01"],
     "recon.drop_prob, recon.weight_lr are not keys of recon=none; recon=par, qdrop have them (choose one); this "
     "multirun sweeps recon, and Hydra composes its first config without the swept values: to give every job "
     "recon.drop_prob, recon.weight_lr, write ++recon.drop_prob=... ++recon.weight_lr=..."),
    # a swept option whose preset lacks the knob: ++ would give it to a job that refuses it
    (["-m", "method=minmax,saq_sam", "recon.drop_prob=0.5"], "recon.drop_prob is not a key of recon=none; recon=par, "
                                                              "qdrop have it (choose one); of the swept "
                                                              "method=minmax,saq_sam, saq_sam has recon.drop_prob and "
                                                              "minmax not: sweep them apart"),
    # another composition problem beside it: the key is still said (Hydra's message for it suggests +quant.foo)
    (["quant.foo=1", "+seed=3"], "quant.foo is not a known key; expected one of ['load', 'name', 'save']"),
    # argparse's refusal of a flag among the overrides is a usage page
    (["quant=w4a4", "-m", "clip=mse,pcc"], "-m comes after an override; Hydra's flags go before the overrides: "
                                           "python -m saq -m quant=w4a4 clip=mse,pcc"),
    (["quant=w4a4", "--cfg", "job", "clip=pcc"], "--cfg comes after an override; Hydra's flags go before the "
                                                 "overrides"),
    # a mapping where a list belongs and the reverse (Hydra's lines call recon.iters a list)
    (["quant=w4a4", "clip=percentile", "clip.percentiles={a:1}"], "clip.percentiles={a:1}: clip.percentiles takes a "
                                                                  "list (now [0.99, 0.999, 0.9999, 0.99999]); write "
                                                                  "clip.percentiles=[...]"),
    (["-m", "method=saq_sam", "quant=w4a4,w6a6", "recon.iters=[1,2]"],
     "recon.iters=[1,2]: recon.iters is a group of settings (stage, layer, block, neck, decoder_layer, decoder_block, "
     "final_attn), not a list; set them by name: recon.iters.stage=... or recon.iters={stage: ...}"),
    # Hydra's several lines each: a comma list without -m, a preset group added with +, a key without its value
    (["quant=w4a4,w6a6"], "quant=w4a4,w6a6 sweeps its values: add -m (python -m saq -m ...) to run one job per value, "
                          "or quote it for one text value (quant='w4a4,w6a6')"),
    (["+method=saq_sam"], "method is chosen with method=NAME, without a plus (+method=saq_sam adds a second method "
                          "beside the one the config has): python -m saq method=saq_sam"),
    (["quant=w4a4", "quant.w_bits"], "quant.w_bits needs a value: quant.w_bits=VALUE (or ~quant.w_bits to remove it)"),
    (["quant=w4a4", "quant.nope.deeper=1"], "quant.nope.deeper is not a known key: quant has no nope; its keys: "
                                            "['a_bits', 'agq', 'agq_taus', 'big', 'calib_decode_batch', "
                                            "'calib_images', 'decoder', 'encoder', 'load', 'name', 'save', 'w_bits']"),
])
def test_a_key_the_composed_config_lacks_is_one_line_naming_what_has_it(arguments, line):
    from saq.__main__ import check_group_options
    from saq.errors import SaqError

    with pytest.raises(SaqError) as err:
        check_group_options(arguments)
    assert str(err.value) == line
    # what composes passes, ++ and a swept group's knob added that way included
    for fine in (["quant=w4a4", "recon=par", "recon.drop_prob=0.3"], ["-m", "quant=w6a6,w4a4",
                                                                       "++quant.calib_images=8"],
                 ["-cn", "config", "quant=w4a4"], ["-m", "+sweeps=bits"], ["~method", "quant=w4a4"]):
        check_group_options(fine)


@pytest.mark.parametrize(("arguments", "line"), [
    (["quant=w5a5"], "error: quant=w5a5 unknown; options: fp, w4a4, w6a6, w8a8; other bit-widths: quant=w4a4 "
                     "quant.w_bits=5 quant.a_bits=5"),
    (["-m", "task=instance,foo"], "error: task=foo unknown; options: instance, oriented, semantic"),
    (["-m", "hydra/launcher=foo"], "error: hydra/launcher=foo unknown; options: basic, joblib, slurm, submitit_local, "
                                   "submitit_slurm"),
    (["quant.calib_images=2"], "error: quant.calib_images is not a key of quant=fp; quant=w4a4, w6a6, w8a8 have it "
                               "(choose one)"),
    # a group set to null: Hydra's refusal is a traceback (ValueError: Config group override must be a string)
    (["method=null"], "error: method=null invalid; method takes a preset: minmax, ptq4sam_l, ptq4sam_s, qdrop, "
                      "saq_sam, saq_sam_star; to run without a preset leave it out or write ~method"),
    (["clip=null"], "error: clip=null invalid; clip takes a preset: minmax, mse, pcc, percentile"),
    # Hydra's refusal of a sweep with --cfg is a traceback
    (["-m", "--cfg", "hydra", "quant=w4a4,w6a6"], "error: -m and --cfg hydra cannot go together: Hydra either runs "
                                                  "the sweep or prints; drop -m to print what a job starts from "
                                                  "(python -m saq ... --cfg hydra)"),
])
def test_an_unknown_group_option_is_one_line_listing_the_options(arguments, line, tmp_path):
    proc = saq(*arguments, "logger=none", f"hydra.run.dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_an_unknown_option_hint_fits_what_was_typed():
    from saq import CONF_DIR
    from saq.__main__ import unknown_option

    options = "fp, w4a4, w6a6, w8a8"
    assert unknown_option("quant", "W4A4", [CONF_DIR / "quant"]) == (
        f"quant=W4A4 unknown; options: {options} (names are lower case: quant=w4a4)")
    assert unknown_option("clip", "PCC", [CONF_DIR / "clip"]).endswith("(names are lower case: clip=pcc)")
    # no hint towards a width the quantizers refuse
    assert unknown_option("quant", "w9a9", [CONF_DIR / "quant"]) == (
        f"quant=w9a9 unknown; options: {options}; bit-widths run from 2 to 8 (quant=w4a4 quant.w_bits=N "
        "quant.a_bits=N)")
    assert unknown_option("quant", "W3A3", [CONF_DIR / "quant"]).endswith(
        "other bit-widths: quant=w4a4 quant.w_bits=3 quant.a_bits=3")


def test_the_group_option_check_leaves_to_hydra_what_it_cannot_read(monkeypatch):
    from saq.__main__ import check_group_options

    monkeypatch.chdir(REPO)  # sweeps/ is a group from the repository root (hydra.searchpath file://.)
    for argv in (["quant=w4a4", "+sweeps=bits", "~method", "quant=w4a4.yaml"],
                 ["-m", "quant=w4a4,w8a8", "clip=glob(*)", "seed=range(3)", "quant=choice(w4a4,w6a6)"],
                 ["hydra/launcher=joblib", "task.data.root=x", "model.checkpoint=y"],
                 ["-cn", "train_tiny", "quant=w5a5"],  # another config: its groups are not conf/config.yaml's
                 ["hydra.searchpath=[file:///elsewhere]", "quant=w5a5"], ["--unknown-flag"]):
        check_group_options(argv)
    from saq.errors import SaqError

    with pytest.raises(SaqError, match=r"^sweeps=nope unknown; options: bits, .*theta$"):
        check_group_options(["-m", "+sweeps=nope"])
    # sweeps/wandb is a folder of W&B sweep files, not a preset; a preset without its plus is not a change of one
    with pytest.raises(SaqError, match=r"^sweeps=wandb unknown; options: bits, .*theta$"):
        check_group_options(["-m", "+sweeps=wandb"])
    with pytest.raises(SaqError, match=r"^a sweep preset is added with a plus: \+sweeps=bits \(python -m saq -m "
                                       r"\+sweeps=bits, or make sweep SWEEP=\.\.\.\)$"):
        check_group_options(["-m", "sweeps=bits"])
