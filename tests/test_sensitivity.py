"""saq.sensitivity: a saved run's model with one part at a time back in FP (its quantizers off, its FP weights back),
rebuilt as the run had it; what it needs from the run, and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from saq import pipeline
from saq.errors import SaqError
from saq.recon import EVAL_FULL, EVAL_PAPER
from saq.saved import SAVED_DIR
from tests.conftest import REPO, copy_run
from tests.test_saved import run_config

torch.set_num_threads(1)


def untimed(metrics: dict) -> dict:
    """A run's scalar task metrics (a sensitivity row's) without the timings (encoder_s, decoder_s, ...), which differ
    between two evaluations."""
    return {k: v for k, v in metrics.items() if not k.endswith("_s") and not isinstance(v, dict)}


def test_sensitivity_switches_one_part_off_at_a_time(synthetic_root, tmp_path, capsys, w4a4_run):
    from saq.sam.build import build_sam
    from saq.sam.units import model_parts
    from saq.sensitivity import FULL, IOU_SCORES, main, sensitivity

    first = copy_run(w4a4_run, tmp_path / "first")  # a W4A4 run on 1 image (quant=w4a4 task.max_images=1)
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
    assert (tmp_path / "first" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    assert main([str(tmp_path / "first" / "results.json")]) == 2  # was 'no such directory'
    assert f"results.json is a file; give its folder ({tmp_path / 'first'})" in capsys.readouterr().err
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


def test_sensitivity_that_cannot_write_its_file_still_measures(synthetic_root, tmp_path, monkeypatch, w4a4_run):
    from saq.sensitivity import FULL, sensitivity

    copy_run(w4a4_run, tmp_path / "run")  # a W4A4 run on 1 image

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

    # a run made with quant.save=false: the same record, saying so, and no saved model beside it (what such a run
    # leaves is checked in test_saved; this error comes from the record, before anything is computed)
    record = json.loads((w4a4_run[0] / "results.json").read_text())
    record["config"]["quant"]["save"], record["quantized_model"] = False, None
    (tmp_path / "unsaved").mkdir()
    (tmp_path / "unsaved" / "results.json").write_text(json.dumps(record))
    with pytest.raises(SaqError, match=r"unsaved was run with quant.save=false and kept no quantized model; run it "
                                       r"again with quant.save=true"):
        sensitivity(tmp_path / "unsaved", ["mask_decoder"], report=lines.append)


def test_sensitivity_of_a_run_that_loaded_its_own_folders_model(synthetic_root, tmp_path, w8a8_run):
    from saq.log import RUN_LOCK, claim_run_dir, file_lock
    from saq.sensitivity import FULL, main, sensitivity

    run = tmp_path / "run"
    copy_run(w8a8_run, run)  # a W8A8 run on 1 image
    # a 4 x 4 point grid (16 prompts, not 256): the tool's rows are compared with this same run's metrics
    loaded = pipeline.run(run_config(synthetic_root, "task.max_images=1", "task=semantic", "task.amg.points_per_side=4",
                                     f"quant.load={run / SAVED_DIR}"), run)  # its model stays in the folder
    assert loaded["metrics"]["quantized"]["masks_per_image"] > 0  # masks voted: mIoU is not the coarse prior's alone
    assert main([str(run), "parts=mask_decoder"]) == 0  # holds the folder once, not twice (another process)
    written = json.loads((run / "sensitivity.json").read_text())
    assert untimed(written["rows"][FULL]) == untimed(loaded["metrics"]["quantized"])
    # labelled by the run that made the model, as the report labels it (the loading run's own method is 'custom')
    assert written["method"] == "minmax (custom)"
    with claim_run_dir(run):  # ... and another process holding it still stops the tool
        assert main([str(run), "parts=mask_decoder"]) == 2
    # a quant.load run reading the model meanwhile only reads: the analysis goes on (a shared hold, as its own)
    with file_lock(run / RUN_LOCK, wait=False, shared=True):
        assert main([str(run), "parts=mask_decoder"]) == 0
    # a run made with threads=null is rebuilt at the thread count it ran with, not this process's
    record = json.loads((run / "results.json").read_text())
    record["config"]["threads"], record["threads_used"] = None, 1
    (run / "results.json").write_text(json.dumps(record))
    torch.set_num_threads(2)
    try:
        sensitivity(run, [], report=lambda line: None, save=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


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
    # a run that evaluated the saved model on another task reads the model where that run did (a 4 x 4 point grid, 16
    # prompts instead of 256: the rows are compared with this run's own metrics)
    loaded = pipeline.run(run_config(
        synthetic_root, "model=sam_tiny_outliers", f"model.checkpoint={checkpoint}", "method=ptq4sam_l",
        "quant=w4a4", "task=semantic", "task.amg.points_per_side=4",
        "task.max_images=1", f"quant.load={run}"), tmp_path / "loaded")
    # the FP model's masks vote (the quantized decoder, outliers at 4 bits, keeps none: the coarse prior's mIoU)
    assert loaded["metrics"]["fp"]["masks_per_image"] > 0
    rows = sensitivity(tmp_path / "loaded", [""], report=lambda line: None)
    assert untimed(rows[FULL]) == untimed(loaded["metrics"]["quantized"])  # semantic metrics carry timings too
    from saq.log import claim_run_dir

    with claim_run_dir(run), pytest.raises(SaqError, match=rf"another saq process holds {run} now"):
        sensitivity(tmp_path / "loaded", [""], report=lambda line: None, save=False)  # its model may change
    assert rows[""]["mIoU"] == pytest.approx(loaded["metrics"]["fp"]["mIoU"], abs=1e-6)
    assert rows[""]["masks_per_image"] == loaded["metrics"]["fp"]["masks_per_image"]
    # the paper-compatible evaluation drops linear inputs at random: every row draws the same, so rows compare, and
    # the first row draws what the run drew after calibrating and learning (a run of its own, not a loaded one)
    compat = pipeline.run(run_config(
        synthetic_root, "model=sam_tiny_outliers", f"model.checkpoint={checkpoint}", "method=ptq4sam_l",
        "quant=w4a4", "quant.calib_images=2", "task.max_images=1", f"recon.state_dir={tmp_path / 'recon'}",
        "recon.iters.block=1", "recon.iters.neck=1", "recon.iters.decoder_block=1", "recon.iters.final_attn=1",
        "recon.best_state=false", "recon.paper_eval_compat=true"), tmp_path / "compat")
    assert (first["recon"]["eval_mode"], compat["recon"]["eval_mode"]) == (EVAL_FULL, EVAL_PAPER)
    again = [sensitivity(tmp_path / "compat", ["mask_decoder.transformer.layers.0.mlp"], report=lambda line: None)
             for _ in range(2)]
    assert again[0] == again[1]
    assert again[0][FULL] == compat["metrics"]["quantized"]  # the run's own figures, draws and all
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


def test_an_analysis_excludes_runs_and_other_analyses_of_its_folder_but_not_readers(tmp_path):
    from saq.log import RUN_LOCK, RunDirHeld, analyse_run_dir, claim_run_dir, file_lock

    run = tmp_path / "run"
    run.mkdir()
    with analyse_run_dir(run):
        with pytest.raises(RunDirHeld):  # a run into it would set the analysed model aside
            with claim_run_dir(run):
                pass
        with pytest.raises(RunDirHeld):  # a second analysis would write the same sensitivity.json
            with analyse_run_dir(run):
                pass
        with file_lock(run / RUN_LOCK, wait=False, shared=True):  # a quant.load run reading the model
            pass
    with claim_run_dir(run), pytest.raises(RunDirHeld):
        with analyse_run_dir(run):
            pass


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
    # a folder that is not there is said as such, not as a results.json missing from it
    assert main([str(tmp_path / "nothere")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: sensitivity: no such directory: {tmp_path / 'nothere'}; "
                                               "give the directory of a finished quantized run")
