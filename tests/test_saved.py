"""quant.save / quant.load: a run's calibrated model round-trips through its run directory; mismatches are one line."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from saq import pipeline
from saq.errors import SaqError
from saq.quant import QuantConfig
from saq.saved import SAVED_DIR, check_recipe, read_recipe, saved_dir
from tests.conftest import REPO, copy_run, flip_tensor_byte

torch.set_num_threads(1)


def run_config(synthetic_root, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=[
            f"task.data.root={synthetic_root}", "task.generate=null", "task.max_images=2", "logger=none",
            "fp_cache=false", "progress=false", "threads=1", "quant=w8a8", "clip=minmax", "quant.calib_images=1",
            "quant.encoder.weight.observer=minmax", "quant.decoder.weight.observer=minmax", *overrides])


def test_saved_run_loads_to_the_same_metrics_without_calibrating(synthetic_root, tmp_path, monkeypatch):
    first = pipeline.run(run_config(synthetic_root), tmp_path / "first")
    export = tmp_path / "first" / SAVED_DIR
    assert first["quantized_model"] == str(export)
    recipe = read_recipe(export)
    assert recipe["extra"]["model"] == "sam_tiny" and recipe["extra"]["clip"]["name"] == "minmax"
    assert "save" not in recipe["quant"] and "load" not in recipe["quant"]  # run keys stay out of the recipe

    def no_calibration(*args, **kwargs):
        raise AssertionError("quant.load must not calibrate")

    monkeypatch.setattr("saq.quant.calibrate", no_calibration)
    second = pipeline.run(run_config(synthetic_root, f"quant.load={tmp_path / 'first'}"), tmp_path / "second")
    assert second["metrics"]["quantized"] == first["metrics"]["quantized"]
    assert second["quantized_model"] == str(tmp_path / "first")
    assert not (tmp_path / "second" / SAVED_DIR).exists()  # a loaded model is not saved again
    saved = json.loads((tmp_path / "second" / "results.json").read_text())
    assert saved["config"]["quant"]["load"] == str(tmp_path / "first")

    # quant.save=false: nothing written
    monkeypatch.undo()
    third = pipeline.run(run_config(synthetic_root, "quant.save=false", "task.max_images=1"), tmp_path / "third")
    assert third["quantized_model"] is None and not (tmp_path / "third" / SAVED_DIR).exists()

    # mismatches: one line each, naming what to use instead
    def check(*overrides):
        check_recipe(recipe, run_config(synthetic_root, *overrides), tmp_path / "first")

    check()  # the same settings pass, and calibration-only settings may differ
    check("quant.calib_images=4")
    with pytest.raises(SaqError, match=r"saved with quant\.a_bits=8 but this run sets 4; use its preset \(quant=w8a8"):
        check("quant.a_bits=4")
    with pytest.raises(SaqError, match=r"quant\.decoder\.weight\.quantizer='adaround' but this run sets 'uniform'"):
        check("quant.decoder.weight.quantizer=uniform")
    with pytest.raises(SaqError, match=r"holds a sam_tiny model; this run builds model=sam_vit_b \(use model=sam_tiny\)"):
        check("model=sam_vit_b")
    fp_run = run_config(synthetic_root)
    fp_run.quant.name = "fp"
    with pytest.raises(SaqError, match=r"needs the quantizing preset it was saved with \(quant=w8a8\)"):
        check_recipe(recipe, fp_run, tmp_path / "first")
    # a loaded model is reported under the seed and method that made it: a run claiming others is stopped
    with pytest.raises(SaqError, match=r"calibrated with seed=0; this run sets seed=3 \(use seed=0"):
        check("seed=3")
    assert recipe["extra"]["method"] == "custom"  # saved without a preset: a run may not claim one either
    with pytest.raises(SaqError, match=r"holds a model made without a method preset; this run sets method=ptq4sam_s "
                                       r"\(leave method unset"):
        check("method=ptq4sam_s")
    with pytest.raises(SaqError, match=r"holds a method=ptq4sam_s model; this run sets method=saq_sam "
                                       r"\(use method=ptq4sam_s\)"):
        check_recipe(dict(recipe, extra={**recipe["extra"], "method": "ptq4sam_s"}),
                     run_config(synthetic_root, "method=saq_sam"), tmp_path / "first")


def test_evaluation_refuses_a_model_that_is_not_fully_quantized(synthetic_root, tmp_path, monkeypatch, w8a8_run):
    from saq.quant.model import iter_quantizers

    def reconstruct_leaving_a_dropping_input(qmodel, *args, **kwargs):
        next(iter_quantizers(qmodel, "act")).drop_prob = 0.5
        return None  # as recon=none, so the run must evaluate fully quantized

    monkeypatch.setattr("saq.recon.reconstruct", reconstruct_leaving_a_dropping_input)
    with pytest.raises(SaqError, match="1 quantizers still drop quantization"):
        pipeline.run(run_config(synthetic_root, "task.max_images=1"), tmp_path / "dropping")
    assert not (tmp_path / "dropping" / SAVED_DIR).exists()  # checked before it is saved
    monkeypatch.undo()
    # a loaded model is checked too: a saved AdaRound weight still rounding softly is not evaluated
    copy_run(w8a8_run, tmp_path / "made")  # a W8A8 run on 1 image, as above without the dropping input
    state_file = tmp_path / "made" / SAVED_DIR / "quantized_state.pt"
    state = torch.load(state_file, weights_only=True)
    key = next(k for k in state if k.endswith("weight_quantizer.mode_index"))
    state[key] = torch.tensor(1)  # soft
    state[key.replace("mode_index", "alpha")] = torch.zeros_like(state[key.replace("weight_quantizer.mode_index",
                                                                                   "weight")])
    torch.save(state, state_file)
    with pytest.raises(SaqError, match="1 weight quantizers still round softly"):
        pipeline.run(run_config(synthetic_root, "task.max_images=1", f"quant.load={tmp_path / 'made'}"),
                     tmp_path / "loaded")


def test_a_run_into_a_used_folder_keeps_the_earlier_results_and_model(synthetic_root, tmp_path, w8a8_run):
    cfg = run_config(synthetic_root, "task.max_images=1")
    first = copy_run(w8a8_run, tmp_path / "run")  # what pipeline.run(cfg, tmp_path / "run") leaves
    fp, quantized = first["metrics"]["fp"]["mIoU"], first["metrics"]["quantized"]["mIoU"]
    assert fp - 0.02 < quantized != fp  # W8A8 min/max: quantized, and close to FP (measured 0.9396 against 0.9404)
    pipeline.run(cfg, tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".previous"))
    assert [k.split(".")[0] for k in kept] == ["quantized_model", "results"]
    earlier = json.loads((tmp_path / "run" / kept[1]).read_text())
    assert earlier["wall_time_s"] == first["wall_time_s"] and (tmp_path / "run" / kept[0] / "recipe.json").is_file()


def test_a_run_failing_after_it_saved_its_model_leaves_no_results_beside_it(synthetic_root, tmp_path, monkeypatch,
                                                                            w8a8_run):
    first = copy_run(w8a8_run, tmp_path / "run")  # a finished W8A8 run on 1 image with clip=minmax

    def fail(*args, **kwargs):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr("saq.quant.quant_summary", fail)  # right after the model is saved
    (tmp_path / "run" / ".hydra.pending").mkdir()  # this run's record, as the CLI writes it beside earlier results
    (tmp_path / "run" / ".hydra.pending" / "config.yaml").write_text("this run")
    with pytest.raises(RuntimeError, match="killed while evaluating"):
        pipeline.run(run_config(synthetic_root, "task.max_images=1", "clip=percentile"), tmp_path / "run")
    # the earlier results left with their model: the folder's record is this run's, beside its model
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_text() == "this run"
    # the new model alone in the folder; the earlier results.json went aside with its own model, not beside this one
    assert not (tmp_path / "run" / "results.json").exists()
    assert read_recipe(tmp_path / "run" / SAVED_DIR)["extra"]["clip"]["name"] == "percentile"
    kept = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".previous"))
    assert [k.split(".")[0] for k in kept] == ["quantized_model", "results"]
    assert kept[0].removeprefix("quantized_model") == kept[1].removeprefix("results.json")  # renamed alike
    assert json.loads((tmp_path / "run" / kept[1]).read_text())["wall_time_s"] == first["wall_time_s"]
    assert read_recipe(tmp_path / "run" / kept[0])["extra"]["clip"]["name"] == "minmax"


def test_a_model_saved_over_a_killed_run_sets_its_deployment_aside_with_it(synthetic_root, tmp_path, monkeypatch):
    import time

    from saq import saved
    from saq.log import DEPLOY_DIR

    cfg = run_config(synthetic_root)
    monkeypatch.setattr(saved, "export_quantized", lambda qmodel, target, extra: extra)
    run = tmp_path / "run"
    for folder in (SAVED_DIR, DEPLOY_DIR):  # an earlier run saved and deployed its model, then was killed: no results
        (run / folder).mkdir(parents=True)
    ticks = iter(range(1000))
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: f"20261202-0000{next(ticks):02d}")  # a second per call
    qmodel = torch.nn.Module()
    extra = saved.save_run(qmodel, run, cfg)
    kept = sorted(p.name for p in run.iterdir())  # both aside, under one stamp: no old deployment beside the new model
    assert kept == [f"{DEPLOY_DIR}.20261202-000000.previous", f"{SAVED_DIR}.20261202-000000.previous"], kept
    assert getattr(qmodel, saved.EXPORT_ID_ATTR) == extra["export_id"]  # what a deployment of it records


def test_a_loaded_model_is_labelled_by_the_run_that_made_it(synthetic_root, tmp_path):
    from saq.log import wandb_run_options
    from saq.report import build_report

    pipeline.run(run_config(synthetic_root, "task.max_images=1", "task.calib.ann_file=annotations/instances_val.json",
                            "task.calib.img_dir=val/images"),
                 tmp_path / "runs" / "made")
    # clip=mse and the calibration settings only label this run (a loaded model is not calibrated again): reports
    # must file it under what made it
    loaded = pipeline.run(run_config(synthetic_root, "task.max_images=1", "clip=mse", "quant.calib_images=8",
                                     f"quant.load={tmp_path / 'runs' / 'made'}"), tmp_path / "runs" / "loaded")
    assert loaded["loaded_model"]["clip"]["name"] == "minmax" and loaded["loaded_model"]["seed"] == 0
    assert loaded["loaded_model"]["calib_images"] == 1 and loaded["loaded_model"]["task_calib"]["img_dir"] == "val/images"
    assert wandb_run_options({}, loaded)["job_type"] == "minmax (custom)"  # clip=minmax, BIG and AGQ on
    report = build_report(tmp_path / "runs")
    assert {row for table in report.tables for row in table.rows} == {"FP", "minmax (custom)"}
    assert len(report.duplicates) == 1  # the same model on the same images: one sample, not two


def test_load_paths_and_run_keys_are_checked(tmp_path):
    with pytest.raises(SaqError, match=r"quant\.load=.*nope: no such directory"):
        saved_dir(tmp_path / "nope")
    with pytest.raises(SaqError, match=r"holds no saved quantized model .*quant\.save=false$"):
        saved_dir(tmp_path)
    # a later run into the folder set its model aside: the error names where it is, and that folder loads
    reused = tmp_path / "reused"
    for stamp in ("20261201-100000", "20261202-100000"):
        (reused / f"quantized_model.{stamp}.previous").mkdir(parents=True)
        (reused / f"quantized_model.{stamp}.previous" / "recipe.json").write_text("{}")
    newest = reused / "quantized_model.20261202-100000.previous"
    with pytest.raises(SaqError, match=rf"quant\.save=false; an earlier run's model there was set aside as "
                                       rf"{newest} \(and others\): give quant\.load={newest} to load it$"):
        saved_dir(reused)
    assert saved_dir(newest) == newest
    # a file where a folder is meant: a saved run's own files point to it, anything else to what quant.load takes
    run = tmp_path / "run"
    (run / "quantized_model").mkdir(parents=True)
    (run / "quantized_model" / "recipe.json").write_text("{}")
    with pytest.raises(SaqError, match=rf"quant\.load={run}/quantized_model/recipe\.json is a file; give the run's "
                                       rf"folder \({run}\) or its quantized_model/ folder$"):
        saved_dir(run / "quantized_model" / "recipe.json")
    (tmp_path / "sam.pth").write_bytes(b"")
    with pytest.raises(SaqError, match=r"sam\.pth is a file; give the folder of a run that saved its quantized model "
                                       r"\(it holds quantized_model/recipe\.json\) \(a SAM checkpoint goes in "
                                       r"model\.checkpoint\)$"):
        saved_dir(tmp_path / "sam.pth")
    # a run that evaluated another run's model: the tools (saq.deploy RUN_DIR) are pointed at that one
    (tmp_path / "results.json").write_text(json.dumps({"config": {"quant": {"load": "outputs/made"}}}))
    with pytest.raises(SaqError, match=r"that run evaluated the one saved in outputs/made \(quant\.load\); give "
                                       r"outputs/made$"):
        saved_dir(tmp_path, "RUN_DIR ")
    cfg = QuantConfig.from_cfg({"name": "w8a8", "save": False, "load": "outputs/run"})
    assert cfg == QuantConfig(name="w8a8")  # run keys are checked, then left out of the quant config
    with pytest.raises(SaqError, match=r"quant\.save='yes' invalid; expected true or false"):
        QuantConfig.from_cfg({"save": "yes"})
    with pytest.raises(SaqError, match=r"quant\.load=3 invalid"):
        QuantConfig.from_cfg({"load": 3})


def test_quant_load_is_checked_before_compute(synthetic_root, tmp_path):
    with pytest.raises(SaqError, match=r"quant\.load=.*nope: no such directory"):
        pipeline.validate(run_config(synthetic_root, f"quant.load={tmp_path / 'nope'}"))


def fitting_export(directory, cfg, **extra):
    """An export folder whose recipe fits `cfg` (a state file of no tensors: enough for the up-front checks)."""
    from omegaconf import OmegaConf

    from saq.quant.config import RUN_KEYS

    quant = QuantConfig.from_cfg({k: v for k, v in OmegaConf.to_container(cfg.quant, resolve=True).items()
                                  if k not in RUN_KEYS}).to_dict()
    directory.mkdir(parents=True)
    (directory / "recipe.json").write_text(json.dumps(
        {"format": 1, "quant": quant, "extra": {"model": "sam_tiny", "checkpoint": None, "seed": 0, **extra}}))
    torch.save({}, directory / "quantized_state.pt")
    return directory


def test_a_saved_model_loads_only_with_the_checkpoint_it_was_made_from(synthetic_root, tmp_path):
    from saq.sam.build import TINY_CHECKPOINT

    cfg = run_config(synthetic_root)
    recipe = read_recipe(fitting_export(tmp_path / "run" / SAVED_DIR, cfg))
    other = tmp_path / "other.pth"
    with pytest.raises(SaqError, match=r"quant\.load=.*run holds a model made from checkpoint the shipped sam_tiny one "
                                       r"\(model\.checkpoint unset\); this run's FP model is model\.checkpoint=.*"
                                       r"other\.pth \(leave model\.checkpoint unset"):
        check_recipe(recipe, run_config(synthetic_root, f"model.checkpoint={other}"), tmp_path / "run")
    made = dict(recipe, extra={**recipe["extra"], "checkpoint": str(other)})
    with pytest.raises(SaqError, match=r"made from checkpoint .*other\.pth; this run's FP model is the shipped one "
                                       r"\(model\.checkpoint unset\) \(use model\.checkpoint=.*other\.pth"):
        check_recipe(made, cfg, tmp_path / "run")
    check_recipe(made, run_config(synthetic_root, f"model.checkpoint={tmp_path}/./other.pth"), tmp_path / "run")
    check_recipe(recipe, run_config(synthetic_root, f"model.checkpoint={TINY_CHECKPOINT}"), tmp_path / "run")
    with pytest.raises(SaqError, match=r"made from checkpoint"):  # and before any compute
        pipeline.validate(run_config(synthetic_root, f"model.checkpoint={other}", f"quant.load={tmp_path / 'run'}"))


def test_a_checkpoint_file_changed_since_saving_or_other_planted_outliers_are_refused(synthetic_root, tmp_path,
                                                                                       monkeypatch):
    import shutil

    from saq import saved
    from saq.sam.build import TINY_CHECKPOINT, checkpoint_digest

    weights = tmp_path / "ft.pth"
    shutil.copy(TINY_CHECKPOINT, weights)
    monkeypatch.setattr(saved, "export_quantized", lambda qmodel, target, extra: extra)
    cfg = run_config(synthetic_root, f"model.checkpoint={weights}")
    extra = saved.save_run(torch.nn.Module(), tmp_path / "run", cfg)
    assert extra["checkpoint_sha256"] == checkpoint_digest("sam_tiny", None) and extra["outliers"] is None
    recipe = read_recipe(fitting_export(tmp_path / "saved", cfg, **extra))
    check_recipe(recipe, cfg, tmp_path / "saved")
    moved = tmp_path / "moved" / "ft.pth"  # the same bytes elsewhere are the same model
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    check_recipe(recipe, run_config(synthetic_root, f"model.checkpoint={moved}"), tmp_path / "saved")
    moved.unlink()  # gone: named as missing, not as changed
    with pytest.raises(SaqError, match=r"checkpoint not found: .*moved/ft\.pth \(set model\.checkpoint to the file"):
        check_recipe(recipe, run_config(synthetic_root, f"model.checkpoint={moved}"), tmp_path / "saved")
    with weights.open("ab") as fh:  # retrained or replaced at the same path
        fh.write(b"\0")
    with pytest.raises(SaqError, match=r"was made from another version of the checkpoint file .*ft\.pth"):
        check_recipe(recipe, cfg, tmp_path / "saved")
    outliers = run_config(synthetic_root, "model=sam_tiny_outliers")
    planted = saved.save_run(torch.nn.Module(), tmp_path / "run2", outliers)
    assert planted["outliers"]["magnitude"] == outliers.model.outliers.magnitude
    recipe = read_recipe(fitting_export(tmp_path / "saved2", outliers, **{**planted, "model": "sam_tiny_outliers"}))
    check_recipe(recipe, outliers, tmp_path / "saved2")
    with pytest.raises(SaqError, match=r"holds a model with planted outliers .*; this run plants .*'seed': 5"):
        check_recipe(recipe, run_config(synthetic_root, "model=sam_tiny_outliers", "model.outliers.seed=5"),
                     tmp_path / "saved2")


def test_the_checkpoint_is_recorded_absolute_so_loading_from_another_folder_matches(synthetic_root, tmp_path,
                                                                                      monkeypatch):
    from saq import saved

    monkeypatch.setattr(saved, "export_quantized", lambda qmodel, target, extra: extra)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    extra = saved.save_run(torch.nn.Module(), tmp_path / "run", run_config(synthetic_root, "model.checkpoint=ckpt/ft.pth"))
    assert extra["checkpoint"] == str(tmp_path / "a" / "ckpt" / "ft.pth")
    monkeypatch.chdir(tmp_path)  # the same file, named from elsewhere
    recipe = read_recipe(fitting_export(tmp_path / "saved", run_config(synthetic_root), checkpoint=extra["checkpoint"]))
    check_recipe(recipe, run_config(synthetic_root, "model.checkpoint=a/ckpt/ft.pth"), tmp_path / "saved")


def test_a_broken_saved_model_is_one_line_naming_the_file_before_compute(synthetic_root, tmp_path):
    from saq.quant.export import load_quantized
    from saq.sam.build import build_sam

    cfg = run_config(synthetic_root)
    cases = {
        "list": (lambda d: (d / "recipe.json").write_text("[1, 2]"),
                 r"recipe\.json is not a quantized-model recipe: a JSON list, not an object"),
        "no_quant": (lambda d: (d / "recipe.json").write_text(json.dumps({"format": 1, "extra": {}})),
                     r"recipe\.json is not a quantized-model recipe: no \"quant\" settings object"),
        # a setting another version of saq wrote (or a hand edit): said as the file's, not as the user's quant.*
        "new_knob": (lambda d: (d / "recipe.json").write_text(json.dumps(
            {**json.loads((d / "recipe.json").read_text()), "quant": {**json.loads((d / "recipe.json").read_text())[
                "quant"], "newknob": 1}})),
                     r"recipe\.json: its quant settings are not valid in this version of saq \(quant\.newknob is not "
                     r"a known key; .*\); save the model again"),
        "truncated": (lambda d: (d / "quantized_state.pt").write_bytes((d / "quantized_state.pt").read_bytes()[:200]),
                      r"quantized_state\.pt is truncated or not a PyTorch file"),
        # a bad copy: the zip is whole, a weight's bytes are not (torch.load would read them as the weight)
        "flipped": (lambda d: (torch.save({"w": torch.ones(8)}, d / "quantized_state.pt"),
                               flip_tensor_byte(d / "quantized_state.pt")),
                    r"quantized_state\.pt is damaged: its record .*/data/\d+ does not match the checksum the file "
                    r"stores; save the model again"),
        "no_state": (lambda d: (d / "quantized_state.pt").unlink(),
                     r"not a quantized-model export: .*no_state/quantized_model/quantized_state\.pt is missing"),
    }
    for name, (break_it, message) in cases.items():
        directory = fitting_export(tmp_path / name / SAVED_DIR, cfg)
        break_it(directory)
        with pytest.raises(SaqError, match=message):
            pipeline.validate(run_config(synthetic_root, f"quant.load={tmp_path / name}"))
        with pytest.raises(SaqError, match=message):
            load_quantized(build_sam("sam_tiny"), directory)


def test_a_saved_model_whose_tensors_do_not_fit_fails_before_the_fp_evaluation(synthetic_root, tmp_path, monkeypatch):
    # a whole state file of other tensors passes the up-front checks; loading it found that only after the FP
    # evaluation, hours on ViT-H
    fitting_export(tmp_path / "run" / SAVED_DIR, run_config(synthetic_root))  # a state dict of no tensors

    def fp_metrics(*args, **kwargs):
        raise AssertionError("the FP evaluation ran before the saved model was loaded")

    monkeypatch.setattr(pipeline, "fp_metrics", fp_metrics)
    with pytest.raises(SaqError, match=r"quantized_state\.pt does not fit the model: \d+ tensors missing, 0 unexpected"):
        pipeline.run(run_config(synthetic_root, f"quant.load={tmp_path / 'run'}"), tmp_path / "loaded")


def test_quant_load_reads_no_folder_another_run_is_writing_and_holds_it_while_reading(synthetic_root, tmp_path,
                                                                                      monkeypatch):
    from saq import saved
    from saq.log import RunDirHeld, claim_run_dir

    source = tmp_path / "source"
    fitting_export(source / SAVED_DIR, run_config(synthetic_root))
    cfg = run_config(synthetic_root, f"quant.load={source}")
    held = rf"quant\.load={source}(/{SAVED_DIR})?: another saq process holds {source} now \(a run writing its model there"
    with claim_run_dir(source):  # a run into it (its model set aside and another saved), or an analysis of it
        with pytest.raises(SaqError, match=held):
            pipeline.validate(cfg)  # before the FP evaluation
        with pytest.raises(SaqError, match=held), saved.reading_saved_model(cfg):
            pass
        with pytest.raises(SaqError, match=held):  # named by its quantized_model/ folder: the same run folder
            pipeline.validate(run_config(synthetic_root, f"quant.load={source / SAVED_DIR}"))
        # a run evaluating the model saved in its own folder holds that folder itself
        pipeline.validate(cfg, run_dir=source)
        with saved.reading_saved_model(cfg, source):
            pass
        # a model set aside (or copied elsewhere) is no run's quantized_model/: no run writes into it
        aside = fitting_export(source / f"{SAVED_DIR}.20261203-1200.previous", run_config(synthetic_root))
        pipeline.validate(run_config(synthetic_root, f"quant.load={aside}"))

    # while a run reads the model, a run starting into that folder is refused, and afterwards it is not
    refused = []

    def load_run(model, cfg, held=None):
        with pytest.raises(RunDirHeld):
            with claim_run_dir(source):
                pass
        refused.append(True)
        raise KeyboardInterrupt  # enough: the FP evaluation need not run

    monkeypatch.setattr(saved, "load_run", load_run)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path / "loading")
    assert refused == [True]
    with claim_run_dir(source):
        pass


def test_the_recipe_names_the_checkpoint_as_the_run_read_it(synthetic_root, tmp_path, monkeypatch):
    # a checkpoint retrained or replaced while a long run calibrates: the model is of the weights the run read
    import saq.quant
    from saq.sam.build import TINY_CHECKPOINT, checkpoint_digest

    checkpoint = tmp_path / "tiny.pt"
    checkpoint.write_bytes(TINY_CHECKPOINT.read_bytes())
    real = saq.quant.calibrate

    def calibrate_then_replace(*args, **kwargs):
        report = real(*args, **kwargs)
        state = torch.load(checkpoint, weights_only=True)
        torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, checkpoint)
        return report

    monkeypatch.setattr(saq.quant, "calibrate", calibrate_then_replace)
    record = pipeline.run(run_config(synthetic_root, f"model.checkpoint={checkpoint}"), tmp_path / "run")
    recipe = read_recipe(tmp_path / "run" / SAVED_DIR)
    assert recipe["extra"]["checkpoint_sha256"] == record["checkpoint_sha256"]
    assert record["checkpoint_sha256"] != checkpoint_digest("sam_tiny", checkpoint)
    # so the replaced file is refused as the model's FP twin
    with pytest.raises(SaqError, match=r"was made from another version of the checkpoint file"):
        pipeline.validate(run_config(synthetic_root, f"model.checkpoint={checkpoint}",
                                     f"quant.load={tmp_path / 'run'}"))


def test_export_writes_through_a_temporary_file(tmp_path, monkeypatch):
    from saq.quant import quantize
    from saq.quant.export import export_quantized, load_quantized
    from saq.quant.model import iter_quantizers
    from saq.sam.build import build_sam

    qmodel = quantize(build_sam("sam_tiny"), QuantConfig(name="w8a8"))
    for quantizer in iter_quantizers(qmodel):
        quantizer.calibrated.fill_(True)
        if getattr(quantizer, "ch_axis", None) is not None:  # a calibrated per-channel step is never 0-d
            quantizer.scale.data, quantizer.zero_point.data = quantizer.scale.data.reshape(1), \
                quantizer.zero_point.data.reshape(1)
    export_quantized(qmodel, tmp_path / "export", extra={"model": "sam_tiny"})
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/12: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SaqError, match=r"^cannot save the quantized model into .*export: \[enforce fail.*"
                                       r"file write failed$"):
        export_quantized(qmodel, tmp_path / "export", extra={"model": "other"})
    # the earlier export is whole, and no temporary file is left behind
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    with pytest.raises(SaqError, match=r"cannot save the quantized model into .*fresh"):
        export_quantized(qmodel, tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []  # no truncated quantized_state.pt to be loaded later
    monkeypatch.setattr(torch, "save", real_save)
    load_quantized(build_sam("sam_tiny"), tmp_path / "export")


def test_recipes_of_the_earlier_weight_axis_minus_one(tmp_path):
    from saq.quant.export import FORMAT_VERSION

    per_channel = {"quantizer": "adaround", "granularity": "per_channel", "ch_axis": -1, "symmetric": False,
                   "observer": "mse"}
    for part, readable in (("decoder", True), ("encoder", False)):
        (tmp_path / "recipe.json").write_text(json.dumps(
            {"format": FORMAT_VERSION, "quant": {"name": "w4a4", part: {"weight": per_channel}}}))
        if readable:  # the decoder has linears only: -1 was their input channels, axis 1
            quant = read_recipe(tmp_path)["quant"]
            assert quant["decoder"]["weight"]["ch_axis"] == 1
            assert QuantConfig.from_cfg(quant).decoder.weight.ch_axis == 1
        else:  # the encoder's neck convs were quantized per kernel column: not a model this version makes
            with pytest.raises(SaqError, match=r"recipe.json was saved with quant.encoder.weight.ch_axis=-1, which "
                                               r"quantized the neck convs per kernel column"):
                read_recipe(tmp_path)


def test_a_loaded_outlier_model_gets_the_fp_twin_it_was_saved_beside(synthetic_root, tmp_path):
    """Its offsets are measured on calibration images: another task's (here another calibration split) would give
    others, and the FP row would be of a model other than the one quantized."""
    first = pipeline.run(run_config(synthetic_root, "model=sam_tiny_outliers", "model.outliers.calib_images=2"),
                         tmp_path / "first")
    planted = first["planted_outliers"]
    assert planted and read_recipe(tmp_path / "first" / SAVED_DIR)["extra"]["planted_outliers"] == planted
    other_images = ["model=sam_tiny_outliers", "model.outliers.calib_images=2",
                    "task.calib.ann_file=annotations/instances_val.json", "task.calib.img_dir=val/images"]
    measured = pipeline.run(run_config(synthetic_root, *other_images, "quant.save=false"), tmp_path / "measured")
    assert measured["planted_outliers"] != planted  # what planting afresh would have put in the FP twin
    loaded = pipeline.run(run_config(synthetic_root, *other_images, f"quant.load={tmp_path / 'first'}"),
                          tmp_path / "loaded")
    assert loaded["planted_outliers"] == planted
    assert loaded["metrics"] == first["metrics"]  # the FP row and the quantized one, both of the saved run's models


def test_clip_and_learning_knobs_beside_quant_load_are_refused(synthetic_root, tmp_path):
    from saq.pipeline import check_overrides_read

    cfg = run_config(synthetic_root, "method=saq_sam", "quant=w4a4", f"quant.load={tmp_path}")
    for overrides, message in (
            (["recon.weight_lr=0.01"], "recon.weight_lr would not be read: quant.load evaluates the saved model as it "
                                       "was calibrated and learned"),
            (["recon.iters.stage=20"], "recon.iters.stage would not be read"),
            (["recon={drop_prob: 0.2}"], "recon.drop_prob would not be read"),
            (["clip.images=4"], "clip.images would not be read: quant.load evaluates the saved model as it was "
                                "calibrated (its recipe")):
        with pytest.raises(SaqError, match=message.replace(".", r"\.").replace("(", r"\(")):
            check_overrides_read(cfg, ["method=saq_sam", f"quant.load={tmp_path}", *overrides])
    # how the loaded model is evaluated, and the sweep-wide knobs a loading job takes without effect
    check_overrides_read(cfg, ["recon.paper_eval_compat=true", "recon.budget=equal", "recon.resume=true", "clip=pcc"])
    # without quant.load they are the run's own
    check_overrides_read(run_config(synthetic_root, "method=saq_sam", "quant=w4a4"), ["recon.weight_lr=0.01"])
