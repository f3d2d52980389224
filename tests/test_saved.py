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
from tests.conftest import REPO

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


def test_evaluation_refuses_a_model_that_is_not_fully_quantized(synthetic_root, tmp_path, monkeypatch):
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
    pipeline.run(run_config(synthetic_root, "task.max_images=1"), tmp_path / "made")
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


def test_a_run_into_a_used_folder_keeps_the_earlier_results_and_model(synthetic_root, tmp_path):
    cfg = run_config(synthetic_root, "task.max_images=1")
    first = pipeline.run(cfg, tmp_path / "run")
    fp, quantized = first["metrics"]["fp"]["mIoU"], first["metrics"]["quantized"]["mIoU"]
    assert fp - 0.02 < quantized != fp  # W8A8 min/max: quantized, and close to FP (measured 0.9396 against 0.9404)
    pipeline.run(cfg, tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".previous"))
    assert [k.split(".")[0] for k in kept] == ["quantized_model", "results"]
    earlier = json.loads((tmp_path / "run" / kept[1]).read_text())
    assert earlier["wall_time_s"] == first["wall_time_s"] and (tmp_path / "run" / kept[0] / "recipe.json").is_file()


def test_a_run_failing_after_it_saved_its_model_leaves_no_results_beside_it(synthetic_root, tmp_path, monkeypatch):
    cfg = run_config(synthetic_root, "task.max_images=1")
    first = pipeline.run(cfg, tmp_path / "run")

    def fail(*args, **kwargs):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr("saq.quant.quant_summary", fail)  # right after the model is saved
    with pytest.raises(RuntimeError, match="killed while evaluating"):
        pipeline.run(run_config(synthetic_root, "task.max_images=1", "clip=percentile"), tmp_path / "run")
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
    with pytest.raises(SaqError, match=r"holds no saved quantized model .*quant\.save=false"):
        saved_dir(tmp_path)
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


def test_sensitivity_switches_one_part_off_at_a_time(synthetic_root, tmp_path, capsys):
    from saq.sam.build import build_sam
    from saq.sam.units import model_parts
    from saq.sensitivity import FULL, IOU_SCORES, main, sensitivity

    first = pipeline.run(run_config(synthetic_root, "quant=w4a4", "task.max_images=1"), tmp_path / "first")
    rows = sensitivity(tmp_path / "first", ["", "mask_decoder"], report=lambda line: None)
    assert rows[FULL] == first["metrics"]["quantized"]  # rebuilt as quant.load does, fully quantized
    assert rows[FULL]["mIoU"] != rows[""]["mIoU"]
    assert rows[""]["mIoU"] == pytest.approx(first["metrics"]["fp"]["mIoU"], abs=1e-6)  # every quantizer off = FP
    assert rows["mask_decoder"]["mIoU"] != rows[FULL]["mIoU"]  # W4A4 decoder error is gone, the encoder's is not
    assert rows["mask_decoder"]["mIoU"] != rows[""]["mIoU"]
    # by another road: a run that never quantized the decoder (its encoder calibrated the same way)
    encoder_only = pipeline.run(run_config(synthetic_root, "quant=w4a4", "task.max_images=1",
                                           "quant.decoder.enabled=false"), tmp_path / "encoder_only")
    for key in ("mIoU", "mask_AP"):
        assert rows["mask_decoder"][key] == pytest.approx(encoder_only["metrics"]["quantized"][key], abs=1e-6), key
    # the rows are kept beside the run, with the run's FP row (same images) for the figure's "all there is" line
    saved = json.loads((tmp_path / "first" / "sensitivity.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["metric"] == "mask_AP"
    assert saved["fp"]["mIoU"] == first["metrics"]["fp"]["mIoU"] and saved["images"] == 1
    assert (tmp_path / "first" / "sensitivity.png").stat().st_size > 0
    # one quantizer is a part too: it exists only in the quantized model; the earlier rows are kept aside
    one = "mask_decoder.transformer.layers.0.cross_attn_image_to_token.av_matmul.a_quantizer"
    assert sensitivity(tmp_path / "first", [one], report=lambda line: None)[one]["mIoU"] != rows[FULL]["mIoU"]
    kept = list((tmp_path / "first").glob("sensitivity.json.*.previous"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["rows"] == saved["rows"]
    assert len(list((tmp_path / "first").glob("sensitivity.png.*.previous"))) == 1

    parts = model_parts(build_sam("sam_tiny"))
    assert parts[:3] == ["image_encoder", "mask_decoder", "mask_decoder.transformer.layers.0"]
    assert "mask_decoder.transformer.layers.1.cross_attn_image_to_token" in parts
    assert parts[-1] == "mask_decoder.transformer.final_attn_token_to_image" and not any("norm" in p for p in parts)

    assert main([str(tmp_path / "first"), "parts=mask_decoder.nope"]) == 2
    assert "no module 'mask_decoder.nope' in quantized sam_tiny" in capsys.readouterr().err
    assert main([str(tmp_path / "first"), "parts=mask_decoder.nope, ,"]) == 2  # spaces and empty names dropped
    assert "no module 'mask_decoder.nope' in quantized sam_tiny" in capsys.readouterr().err
    assert main([str(tmp_path), "parts=image_encoder"]) == 2
    assert "results.json not found" in capsys.readouterr().err
    assert main([str(tmp_path / "first"), "max_images=two"]) == 2
    assert "whole numbers" in capsys.readouterr().err
    assert main([str(tmp_path / "first"), "threads=-1"]) == 2
    assert "threads and max_images must be >= 1" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{ half")
    assert main([str(tmp_path / "broken")]) == 2
    assert "is not a saq run record (JSONDecodeError" in capsys.readouterr().err
    # the header names the image count that runs: the run's own limit (1) when max_images= is not given
    lines = []
    sensitivity(tmp_path / "first", ["mask_decoder"], report=lines.append)
    assert lines[0].endswith("one part at a time in FP (its quantizers off, its FP weights back), 1 val images")
    # iou_scores: the quantized masks (same mIoU) ranked by the FP model's predicted IoUs (another mask AP)
    both = sensitivity(tmp_path / "first", [IOU_SCORES], max_images=4, report=lambda line: None)
    assert both[IOU_SCORES]["mIoU"] == both[FULL]["mIoU"] and both[IOU_SCORES]["mask_AP"] != both[FULL]["mask_AP"]


def test_sensitivity_scores_ious_with_the_runs_own_fp_model_planted_outliers_included(synthetic_root, tmp_path,
                                                                                       monkeypatch):
    from saq.quant.model import quant_states
    from saq.sam.attention import decoder_attentions
    from saq.sam.build import build_sam
    from saq.sam.segmenter import ScoreSwapSegmenter
    from saq.sensitivity import IOU_SCORES, sensitivity

    pipeline.run(run_config(synthetic_root, "model=sam_tiny_outliers", "quant=w4a4", "task.max_images=1"),
                 tmp_path / "run")
    scorers = []
    swap = ScoreSwapSegmenter.__init__
    monkeypatch.setattr(ScoreSwapSegmenter, "__init__",
                        lambda self, sam, scorer, *a, **k: scorers.append(scorer) or swap(self, sam, scorer, *a, **k))
    sensitivity(tmp_path / "run", [IOU_SCORES], report=lambda line: None, save=False)
    scorer, plain = scorers[0], build_sam("sam_tiny")
    assert set(quant_states(scorer)) == {"off"}
    ours = decoder_attentions(scorer)
    planted = [name for name, attention in decoder_attentions(plain).items()
               if not torch.allclose(ours[name].k_proj.bias.abs(), attention.k_proj.bias.abs())]
    assert len(planted) == 7  # the planted key offsets (|bias|: BIG may flip a channel's sign) score the IoUs


def test_sensitivity_that_cannot_write_its_file_still_measures(synthetic_root, tmp_path, monkeypatch):
    from saq.sensitivity import FULL, sensitivity

    pipeline.run(run_config(synthetic_root, "quant=w4a4", "task.max_images=1"), tmp_path / "run")

    def refuse(path, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("saq.sensitivity.write_json_atomic", refuse)
    lines = []
    # a part without quantizers is named and skipped, not reported as a measured zero; a repeated part runs once
    rows = sensitivity(tmp_path / "run", ["mask_decoder", "mask_decoder.transformer.norm_final_attn", "mask_decoder"],
                       max_images=1, report=lines.append)
    assert "skipped, no quantizers in them (nothing to switch to FP): mask_decoder.transformer.norm_final_attn" in lines
    assert set(rows) == {FULL, "mask_decoder"} and not (tmp_path / "run" / "sensitivity.json").exists()
    assert sum("warning: cannot write" in line and "rows are printed only" in line for line in lines) == 1
    assert sum(line.startswith("mask_decoder in FP") for line in lines) == 1
    with pytest.raises(SaqError, match=r"none of the parts has quantizers \(mask_decoder.transformer.norm_final_attn\)"):
        sensitivity(tmp_path / "run", ["mask_decoder.transformer.norm_final_attn"], max_images=1, report=lines.append)

    pipeline.run(run_config(synthetic_root, "quant=w4a4", "task.max_images=1", "quant.save=false"), tmp_path / "unsaved")
    with pytest.raises(SaqError, match=r"unsaved was run with quant.save=false and kept no quantized model; run it "
                                       r"again with quant.save=true"):
        sensitivity(tmp_path / "unsaved", ["mask_decoder"], report=lines.append)


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


def test_sensitivity_of_a_run_that_loaded_its_own_folders_model(synthetic_root, tmp_path):
    from saq.log import claim_run_dir
    from saq.sensitivity import FULL, main

    run = tmp_path / "run"
    pipeline.run(run_config(synthetic_root, "task.max_images=1"), run)
    loaded = pipeline.run(run_config(synthetic_root, "task.max_images=1", "task=semantic",
                                     f"quant.load={run / SAVED_DIR}"), run)  # its model stays in the folder
    assert main([str(run), "parts=mask_decoder"]) == 0  # holds the folder once, not twice (another process)
    rows = json.loads((run / "sensitivity.json").read_text())["rows"]
    assert rows[FULL]["mIoU"] == loaded["metrics"]["quantized"]["mIoU"]
    with claim_run_dir(run):  # ... and another process holding it still stops the tool
        assert main([str(run), "parts=mask_decoder"]) == 2


def test_a_broken_saved_model_is_one_line_naming_the_file_before_compute(synthetic_root, tmp_path):
    from saq.quant.export import load_quantized
    from saq.sam.build import build_sam

    cfg = run_config(synthetic_root)
    cases = {
        "list": (lambda d: (d / "recipe.json").write_text("[1, 2]"),
                 r"recipe\.json is not a quantized-model recipe: a JSON list, not an object"),
        "no_quant": (lambda d: (d / "recipe.json").write_text(json.dumps({"format": 1, "extra": {}})),
                     r"recipe\.json is not a quantized-model recipe: no \"quant\" settings object"),
        "truncated": (lambda d: (d / "quantized_state.pt").write_bytes((d / "quantized_state.pt").read_bytes()[:200]),
                      r"quantized_state\.pt is truncated or not a PyTorch file"),
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


def test_sensitivity_names_what_it_needs_not_settings_it_lacks(synthetic_root, tmp_path, capsys):
    from omegaconf import OmegaConf

    from saq.sensitivity import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.json").write_text(json.dumps({"config": {}}))
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: sensitivity: {tmp_path / 'empty' / 'results.json'} is not a saq run record (config.model.name "
        "missing); give the directory of a finished quantized run")
    for record in ({"config": []}, [1]):
        (tmp_path / "empty" / "results.json").write_text(json.dumps(record))
        assert main([str(tmp_path / "empty")]) == 2
        assert 'is not a saq run record (no "config" object)' in capsys.readouterr().err
    assert main([str(tmp_path / "empty"), "parts="]) == 2
    assert "error: parts= is empty; give it a value" in capsys.readouterr().err
    config = OmegaConf.to_container(run_config(synthetic_root, f"task.data.root={tmp_path / 'moved'}"), resolve=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"config": config}))
    assert main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: sensitivity: cannot rebuild the task of {tmp_path / 'run'}: ")
    assert err.endswith(f"; the run's data must be where the run had it (config.task.data in "
                        f"{tmp_path / 'run' / 'results.json'})")
    assert "set task.data" not in err and "\n" not in err
    if not torch.cuda.is_available():  # the run's device is used unless device= names another
        (tmp_path / "run" / "results.json").write_text(json.dumps({"config": dict(config, device="cuda")}))
        assert main([str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err.strip() == (
            "error: device=cuda but no CUDA device is available; use device=cpu")
        assert main([str(tmp_path / "run"), "device=cpu"]) == 2
        assert "cannot rebuild the task" in capsys.readouterr().err
    assert main([str(tmp_path / "run"), "device=gpu"]) == 2
    assert "device='gpu' is not allowed; expected one of ['cpu', 'cuda']" in capsys.readouterr().err
    config["model"]["checkpoint"] = str(tmp_path / "gone.pth")
    (tmp_path / "run" / "results.json").write_text(json.dumps({"config": config}))
    assert main([str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: sensitivity: {tmp_path / 'run'} was run on checkpoint {tmp_path / 'gone.pth'}, which is not there "
        "any more; the run's checkpoint must be where the run had it")


def test_sensitivity_puts_back_fp_weights_of_a_reconstructed_outlier_model(synthetic_root, tmp_path, capsys,
                                                                          monkeypatch):
    """Reconstruction writes its rounding into the weights, BIG may flip q/k signs and the outlier model's keys carry
    planted offsets: "in FP" must still be the run's own FP model, not its quantizers off over learned weights."""
    import shutil

    from saq.sensitivity import FULL, sensitivity

    run, checkpoint = tmp_path / "learned", tmp_path / "sam_tiny.pt"
    shutil.copy(REPO / "saq" / "sam" / "tiny" / "sam_tiny.pt", checkpoint)
    first = pipeline.run(run_config(
        synthetic_root, "model=sam_tiny_outliers", f"model.checkpoint={checkpoint}", "method=ptq4sam_l",
        "quant=w4a4", "quant.calib_images=2",
        "task.max_images=1", f"recon.state_dir={tmp_path / 'recon'}", "recon.iters.block=1", "recon.iters.neck=1",
        "recon.iters.decoder_block=1",
        "recon.iters.final_attn=1", "recon.best_state=false"), run)
    assert first["planted_outliers"] and first["metrics"]["quantized"]["mIoU"] != first["metrics"]["fp"]["mIoU"]
    rows = sensitivity(run, ["", "mask_decoder"], report=lambda line: None)
    assert rows[FULL] == first["metrics"]["quantized"]
    for key in ("mIoU", "mask_AP"):  # every quantizer off and every FP weight back: the FP row, to float rounding
        assert rows[""][key] == pytest.approx(first["metrics"]["fp"][key], abs=1e-6)
    assert rows["mask_decoder"]["mIoU"] > rows[FULL]["mIoU"] + 0.3  # the outliers only hurt a quantized decoder
    # the recipe holds the checkpoint's hash, checked on loading: how far learned (hardened) weights lie from the
    # FP ones is no criterion then (a W2 min/max layer comes near the bound an unrelated checkpoint reaches)
    with monkeypatch.context() as patch:
        patch.setattr("saq.sensitivity.MAX_WEIGHT_QUANT_ERROR", 0.0)
        assert sensitivity(run, [""], report=lambda line: None, save=False)[""] == rows[""]
    # a run that evaluated the saved model on another task reads the model where that run did
    loaded = pipeline.run(run_config(
        synthetic_root, "model=sam_tiny_outliers", f"model.checkpoint={checkpoint}", "method=ptq4sam_l",
        "quant=w4a4", "task=semantic",
        "task.max_images=1", f"quant.load={run}"), tmp_path / "loaded")
    rows = sensitivity(tmp_path / "loaded", [""], report=lambda line: None)
    assert rows[FULL]["mIoU"] == loaded["metrics"]["quantized"]["mIoU"]  # semantic metrics carry timings too
    from saq.log import claim_run_dir

    with claim_run_dir(run), pytest.raises(SaqError, match="another saq process is writing into"):
        sensitivity(tmp_path / "loaded", [""], report=lambda line: None, save=False)  # its model may change
    assert rows[""]["mIoU"] == pytest.approx(loaded["metrics"]["fp"]["mIoU"], abs=1e-6)
    # the paper-compatible evaluation drops linear inputs at random: every row draws the same, so rows compare
    compat = pipeline.run(run_config(
        synthetic_root, "model=sam_tiny_outliers", f"model.checkpoint={checkpoint}", "method=ptq4sam_l",
        "quant=w4a4", "task.max_images=1", f"quant.load={run}", "recon.paper_eval_compat=true"), tmp_path / "compat")
    assert compat["recon"]["eval_mode"] != first["recon"]["eval_mode"]
    again = [sensitivity(tmp_path / "compat", ["mask_decoder.transformer.layers.0.mlp"], report=lambda line: None)
             for _ in range(2)]
    assert again[0] == again[1]
    # a later run saving into the loaded folder set the evaluated model aside: the model there now is not analysed
    # under this run's results
    recipe_path = run / SAVED_DIR / "recipe.json"
    original = recipe_path.read_text()
    recipe_path.write_text(json.dumps({**json.loads(original), "extra": {**json.loads(original)["extra"], "seed": 5}}))
    with pytest.raises(SaqError, match=r"now holds another model than the one .*loaded evaluated \(its seed differs\)"):
        sensitivity(tmp_path / "loaded", [""], report=lambda line: None, save=False)
    # ... and by the same command (same settings: a retrained checkpoint, other code): another export all the same
    recipe_path.write_text(json.dumps({**json.loads(original), "extra": {**json.loads(original)["extra"],
                                                                         "export_id": "0" * 32}}))
    with pytest.raises(SaqError, match=r"now holds another model than the one .*loaded evaluated \(saved later\)"):
        sensitivity(tmp_path / "loaded", [""], report=lambda line: None, save=False)
    recipe_path.write_text(original)
    # a checkpoint replaced since the run (same path, other weights) is refused, not taken for the FP weights
    weights = torch.load(checkpoint, weights_only=True)

    def replace(prefix):
        torch.save({k: v.std() * torch.randn_like(v) if k.startswith(prefix) and v.numel() > 1 else v
                    for k, v in weights.items()}, checkpoint)

    replace("image_encoder.")
    with pytest.raises(SaqError, match=r"was made from another version of the checkpoint file"):  # its recipe's hash
        sensitivity(run, [""], report=lambda line: None)
    recipe_path = run / SAVED_DIR / "recipe.json"  # a recipe of an earlier version, without the hash: the weights tell
    recipe = json.loads(recipe_path.read_text())
    del recipe["extra"]["checkpoint_sha256"]
    recipe_path.write_text(json.dumps(recipe))
    with pytest.raises(SaqError, match=r"cannot rebuild the FP model of .*: image_encoder\..* saved weight is no "
                                       r"quantization of the checkpoint's \(relative difference 1\.\d\d\); the "
                                       r"run's checkpoint must be where the run had it$"):
        sensitivity(run, [""], report=lambda line: None)
    replace("")  # the decoder too: BIG's query and key signs read back from it no longer agree
    with pytest.raises(SaqError, match=r"cannot rebuild the FP model of .*the signs of .*query and key projections "
                                       r"against the checkpoint's do not agree"):
        sensitivity(run, [""], report=lambda line: None)
    # a saved model that is gone is named as the run's, not as a quant.load setting of this tool
    (run / SAVED_DIR).rename(tmp_path / "moved")
    with pytest.raises(SaqError, match=r"the quantized model of .*loaded is not there any more \(.*learned holds no recipe"):
        sensitivity(tmp_path / "loaded", [""], report=lambda line: None)


def test_big_signs_are_read_back_from_a_rounded_saved_layer():
    from saq.quant.big import fold_channel_signs
    from saq.sensitivity import folded_signs

    torch.manual_seed(0)
    fp = torch.nn.Linear(16, 8)
    saved = torch.nn.Linear(16, 8)
    saved.load_state_dict(fp.state_dict())
    gamma = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0])
    fold_channel_signs(saved, torch.nn.Linear(16, 8), gamma)
    with torch.no_grad():  # 3-bit rounding per row, the AdaRound way (floor or ceil): signs kept or zeroed
        step = saved.weight.abs().amax(1, keepdim=True) / 3
        saved.weight.copy_(step * torch.where(torch.rand_like(step.expand_as(saved.weight)) < 0.5,
                                              torch.floor(saved.weight / step), torch.ceil(saved.weight / step)))
    assert torch.equal(folded_signs(saved.weight, fp.weight), gamma)
    with torch.no_grad():
        saved.weight[2] = 0.0  # a row rounded to nothing does not say: 0, its partner projection's row tells
    assert folded_signs(saved.weight, fp.weight)[2] == 0


def test_big_signs_of_a_pair_fall_back_on_the_biases_when_both_rows_rounded_to_zero():
    from saq.quant.big import fold_channel_signs
    from saq.sensitivity import pair_signs

    torch.manual_seed(1)
    fp = [torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)]
    saved = [torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)]
    for s, f in zip(saved, fp):
        s.load_state_dict(f.state_dict())
    gamma = torch.tensor([1.0, -1.0, -1.0, 1.0])
    fold_channel_signs(*saved, gamma)
    assert torch.equal(pair_signs(saved, fp), gamma)
    with torch.no_grad():
        for s in saved:
            s.weight[1] = 0.0  # channel 1 rounded to nothing in both projections: its biases still tell
    assert torch.equal(pair_signs(saved, fp), gamma)
    with torch.no_grad():
        saved[0].weight[3] *= -1  # the q row says flipped, the k row not: not the run's checkpoint
    assert pair_signs(saved, fp) is None


def test_restoring_fp_weights_touches_only_the_layers_of_the_part(synthetic_root):
    import copy

    from saq.quant import quantize
    from saq.quant.modules import QuantLayer
    from saq.sam.build import build_sam
    from saq.sensitivity import restore_fp_weights

    reference = quantize(build_sam("sam_tiny"), run_config(synthetic_root).quant)
    fp_weights = {name: layer.weight for name, layer in reference.named_modules() if isinstance(layer, QuantLayer)}
    learned = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in learned.parameters():
            parameter.add_(1.0)
    attention = "mask_decoder.transformer.layers.0.cross_attn_token_to_image"

    def same(model, name):
        return torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight)

    restore_fp_weights(learned, fp_weights, f"{attention}.q_proj.weight_quantizer")  # one weight quantizer: its layer
    assert same(learned, f"{attention}.q_proj") and not same(learned, f"{attention}.k_proj")
    restore_fp_weights(learned, fp_weights, f"{attention}.k_proj.input_quantizer")  # an input quantizer: no weight
    assert not same(learned, f"{attention}.k_proj")
    restore_fp_weights(learned, fp_weights, attention)  # a module: every layer in it, and nothing outside
    assert all(same(learned, f"{attention}.{p}") for p in ("k_proj", "v_proj", "out_proj"))
    assert not same(learned, "mask_decoder.transformer.layers.0.self_attn.q_proj")
    assert not torch.equal(learned.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.bias,
                           reference.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.bias)


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


def test_sensitivity_command_names_a_held_folder_and_refuses_parts_naming_nothing(tmp_path, capsys):
    from saq.log import claim_run_dir
    from saq.sensitivity import main

    run = tmp_path / "run"
    run.mkdir()
    assert main([str(run), "parts=,"]) == 2  # would evaluate the fully quantized row alone, then draw nothing
    assert capsys.readouterr().err.startswith("error: parts=, names no module; give module paths")
    with claim_run_dir(run):  # this tool has no folder of its own to move to: it can only wait
        assert main([str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: another saq process is writing into {run}; wait for it to "
                                               "finish, then run the analysis again")
