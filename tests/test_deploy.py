"""int8 deployment: the ONNX encoder runs int8 kernels and stays close to saq's fake-quant W8A8; bad inputs are refused."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saq import deploy
from saq.errors import SaqError
from saq.quant import QuantConfig, calibrate, export_quantized, quantize
from saq.sam.build import build_sam
from saq.sam.segmenter import PromptedImage, Segmenter
from saq.saved import EXPORT_ID_ATTR
from tasks.base import read_rgb

torch.set_num_threads(1)
W8A8 = {"name": "w8a8", "calib_images": 1,
        "encoder": {"weight": {"observer": "minmax"}}, "decoder": {"weight": {"observer": "minmax"}}}
BOXES = np.array([[20, 20, 120, 120], [100, 60, 200, 220], [10, 150, 90, 250]], np.float32)
# ONNX Runtime's float ops (GELU, softmax, LayerNorm) differ from torch's in the last bits, which moves a few
# activations across a rounding boundary; the log2 post-softmax codes (steps of 2^(1/tau)) amplify such flips. Measured
# on the fixture: ~1.5% relative L2, below the W8A8 quantization error itself (~1.9% against FP).
ENCODER_RTOL = 0.05


@pytest.fixture(scope="module")
def calibrated(synthetic_root):
    image = read_rgb(sorted((synthetic_root / "train/images").iterdir())[0])
    qmodel = quantize(build_sam("sam_tiny"), W8A8)
    calibrate(qmodel, [PromptedImage(image, boxes=BOXES)], None, {"name": "minmax"}, progress=False)
    return qmodel


def test_cli_exports_int8_graphs_close_to_fake_quant(calibrated, synthetic_root, tmp_path):
    # the checkpoint the model was made from has since gone: deploy needs only the export, which holds every weight
    export_quantized(calibrated, tmp_path / "run" / "quantized_model",
                     extra={"model": "sam_tiny", "checkpoint": str(tmp_path / "gone.pth"), "export_id": "e1"})
    assert deploy.main([str(tmp_path / "run"), "softmax=log2"]) == 0  # saq's formula for every quantized operand
    (tmp_path / "a_file").write_text("")
    assert deploy.main([str(tmp_path / "run"), f"out={tmp_path / 'a_file' / 'deployed'}"]) == 1  # one line, no trace
    out = tmp_path / "run" / deploy.DEPLOY_DIR
    report = json.loads((out / deploy.REPORT_FILE).read_text())
    assert report["export_id"] == "e1"  # the saved model it was made from
    # every encoder linear (4 per block) and q·kᵀ go int8; softmax·V (log2 codes) and the neck convs stay float
    assert report["encoder"]["int8_ops"] == {"MatMulIntegerToFloat": 6 * 5}
    assert report["encoder"]["float_ops"]["attn.av_matmul (MatMul)"] == 6
    assert report["decoder"]["int8_ops"]["MatMulIntegerToFloat"] == 7 * 5 + 2 * 2  # 7 attentions, 2 MLPs

    image = read_rgb(sorted((synthetic_root / "val/images").iterdir())[0])
    fake, onnx = Segmenter(calibrated), Segmenter(deploy.deployed_sam(calibrated, out))
    for segmenter in (fake, onnx):
        segmenter.set_image(image)
    error = (onnx._features - fake._features).norm() / fake._features.norm()
    assert error < ENCODER_RTOL
    # and it is the quantized model that runs: the int8 graph is nearer saq's fake quantization than the FP model
    # (measured 0.0128 against 0.0156)
    fp = Segmenter(build_sam("sam_tiny"))
    fp.set_image(image)
    from_fp = (onnx._features - fp._features).norm() / fp._features.norm()
    assert error < from_fp
    masks_fake, masks_onnx = fake.predict(boxes=BOXES).masks, onnx.predict(boxes=BOXES).masks
    iou = (masks_fake & masks_onnx).flatten(1).sum(1) / (masks_fake | masks_onnx).flatten(1).sum(1)
    assert iou.mean() > 0.93  # measured 0.96; the fake-quant masks themselves are at 0.86-0.97 IoU from FP here

    # the default leaves softmax·V's post-softmax operand float: the same int8 kernels, and no worse against FP
    report = deploy.export_onnx(calibrated, tmp_path / "float")
    assert report["softmax"] == "float" and report["encoder"]["int8_ops"] == {"MatMulIntegerToFloat": 6 * 5}
    fp = Segmenter(build_sam("sam_tiny"))
    fast = Segmenter(deploy.deployed_sam(calibrated, tmp_path / "float"))
    for segmenter in (fp, fast):
        segmenter.set_image(image)
    masks_fp, masks_fast = fp.predict(boxes=BOXES).masks, fast.predict(boxes=BOXES).masks
    mean_iou = lambda a, b: ((a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1)).mean()  # noqa: E731
    assert mean_iou(masks_fast, masks_fp) >= mean_iou(masks_fake, masks_fp) - 0.02

    # deploying again into the same folder keeps the earlier deployment's files
    deploy.export_onnx(calibrated, tmp_path / "float", softmax="log2")
    kept = {p.name.split(".")[0]: p for p in (tmp_path / "float").glob("*.previous")}
    assert sorted(kept) == ["deploy", "image_encoder", "mask_decoder"]
    assert json.loads(kept["deploy"].read_text())["softmax"] == "float"
    assert json.loads((tmp_path / "float" / deploy.REPORT_FILE).read_text())["softmax"] == "log2"
    # the decoder graph takes any number of prompts (exported at 3)
    for n in (1, 5):
        boxes = np.concatenate([BOXES, BOXES[:2] + 7])[:n]
        assert fast.predict(boxes=boxes).masks.shape == (n, 1, *image.shape[:2])

    # an export that fails midway leaves the earlier deployment whole, and no half-built folder
    def broken(model, directory):
        (Path(directory) / deploy.ENCODER_FILE).write_bytes(b"half")
        raise RuntimeError("killed")

    real = deploy.export_graphs
    deploy.export_graphs = broken
    try:
        with pytest.raises(RuntimeError, match="killed"):
            deploy.export_onnx(calibrated, tmp_path / "float")
    finally:
        deploy.export_graphs = real
    assert json.loads((tmp_path / "float" / deploy.REPORT_FILE).read_text())["softmax"] == "log2"
    assert (tmp_path / "float" / deploy.ENCODER_FILE).read_bytes() != b"half"
    assert not list(tmp_path.glob(".float.*.partial")) and not list((tmp_path / "float").glob(".export.*"))

    # RUN_DIR/quantized_model given: the deployment still goes beside the model, into RUN_DIR/deployed
    (out / deploy.REPORT_FILE).unlink()
    assert deploy.main([str(tmp_path / "run" / "quantized_model")]) == 0
    assert (out / deploy.REPORT_FILE).is_file() and not (tmp_path / "run" / "quantized_model" / "deployed").exists()


def test_uncalibrated_or_low_bit_models_are_refused(tmp_path):
    sam = build_sam("sam_tiny")
    with pytest.raises(SaqError, match=r"^cannot deploy: 168 quantizers were never calibrated \(first: "):
        deploy.export_onnx(quantize(sam, W8A8), tmp_path)
    with pytest.raises(SaqError, match=r"int8 kernels need W8A8, the encoder is W4A4 \(quant=w8a8\)"):
        deploy.export_onnx(quantize(sam, QuantConfig(name="w4a4", w_bits=4, a_bits=4)), tmp_path)
    with pytest.raises(SaqError, match=r"quant.decoder.act.symmetric=true; ONNX Runtime fuses its int8 GEMMs for "
                                       r"uint8 \(asymmetric\) activations only"):
        deploy.check_deploy_config({**W8A8, "decoder": {**W8A8["decoder"], "act": {"symmetric": True}}})
    with pytest.raises(SaqError, match=r"quant\.decoder\.weight\.ch_axis=1; int8 export needs per-output-channel"):
        deploy.check_deploy_config(QuantConfig.from_cfg({"name": "w8a8", "decoder": {"weight": {"ch_axis": 1}}}))
    assert not list(tmp_path.iterdir())  # refused before writing anything
    assert deploy.main([str(tmp_path / "missing")]) == 1


def test_deploy_knob_is_checked_before_compute(tmp_path):
    from hydra import compose, initialize_config_dir

    from saq.pipeline import validate
    from tests.conftest import REPO

    def cfg(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            return compose(config_name="config", overrides=["deploy=true", *overrides])

    with pytest.raises(SaqError, match=r"^deploy=true needs a quantized W8A8 model: set quant=w8a8"):
        validate(cfg())
    with pytest.raises(SaqError, match=r"int8 kernels need W8A8, the encoder is W4A4"):
        validate(cfg("quant=w4a4"))
    assert validate(cfg("quant=w8a8"))[0].w_bits == 8


def test_cli_errors_name_its_own_argument(tmp_path, capsys):
    assert deploy.main([str(tmp_path / "nonexist")]) == 1
    assert capsys.readouterr().err.strip() == f"error: RUN_DIR {tmp_path / 'nonexist'}: no such directory"
    assert deploy.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"error: RUN_DIR {tmp_path} holds no saved quantized model")
    export = tmp_path / "run" / "quantized_model"
    export.mkdir(parents=True)
    # a broken saved model: one line naming the file
    (export / "recipe.json").write_text(json.dumps({"format": 1, "quant": W8A8,
                                                    "extra": {"model": "sam_tiny", "checkpoint": None}}))
    (export / "quantized_state.pt").write_bytes(b"PK\x03\x04 cut short")
    assert deploy.main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {export / 'quantized_state.pt'} is truncated or not a PyTorch file; save the model again (a run "
        "with quant.save)")
    (export / "recipe.json").write_text("[]")
    assert deploy.main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {export / 'recipe.json'} is not a quantized-model recipe: a JSON list, not an object")
    assert not (tmp_path / "run" / deploy.DEPLOY_DIR).exists()


def test_every_exported_linear_computes_its_fake_quant_layer(calibrated, synthetic_root, tmp_path):
    """Module by module, on each layer's real input: the export and ONNX Runtime match saq's fake quantization up to
    a rare one-code flip (ONNX Runtime divides by the scale where saq multiplies by its inverse), far below what a
    missing or mis-scaled quantizer costs (the layer without input quantization is 0.25-1.1% away)."""
    from saq.quant.modules import QuantLinear

    layers = {n: m for n, m in calibrated.named_modules() if isinstance(m, QuantLinear)}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.setdefault(n, args[0].detach()))
             for n, m in layers.items()]
    try:
        segmenter = Segmenter(calibrated)
        segmenter.set_image(read_rgb(sorted((synthetic_root / "val/images").iterdir())[0]))
        segmenter.predict(boxes=BOXES)
    finally:
        for hook in hooks:
            hook.remove()
    assert inputs.keys() == layers.keys()
    rel = lambda got, want: float((got - want).norm() / want.norm())  # noqa: E731
    with torch.no_grad():
        for name, layer in layers.items():
            x, want = inputs[name], layer(inputs[name])
            # the input left unquantized: what a missing quantizer would give, which the export must be far below
            missing = rel(torch.nn.functional.linear(x, layer.quantized_weight(), layer.bias), want)
            assert rel(deploy.DeployLinear(layer)(x), want) < 0.1 * missing, name
            if name in ("image_encoder.blocks.0.attn.qkv",
                        "mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj"):
                deploy._export(deploy.DeployLinear(layer), (x,), tmp_path / "layer.onnx", ["x"], ["y"], {})
                got = torch.as_tensor(deploy.session(tmp_path / "layer.onnx").run(None, {"x": x.numpy()})[0])
                assert rel(got, want) < 0.1 * missing, name


def test_an_fp32_session_keeps_matmul_add_fusion_that_an_int8_one_goes_without(tmp_path):
    import onnx

    linear = torch.nn.Linear(16, 8)
    deploy._export(linear, (torch.randn(2, 4, 16),), tmp_path / "fp.onnx", ["x"], ["y"], {})  # 3-D: MatMul + Add
    ops = {}
    for int8 in (True, False):
        deploy.session(tmp_path / "fp.onnx", 1, tmp_path / f"opt{int8}.onnx", int8=int8)
        ops[int8] = {n.op_type for n in onnx.load(str(tmp_path / f"opt{int8}.onnx")).graph.node}
    assert "Add" in ops[True] and "Gemm" not in ops[True]  # int8: the Add stays apart, for the QDQ MatMul fusion
    assert "Gemm" in ops[False] and "Add" not in ops[False]  # FP32 at its best: MatMul + Add as one Gemm


def test_a_failed_deployment_inside_a_run_keeps_its_metrics(synthetic_root, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from saq import pipeline
    from saq.errors import SaqError
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"task.data.root={synthetic_root}", "task.generate=null", "task.max_images=1", "logger=none",
            "fp_cache=false", "progress=false", "threads=1", "quant=w8a8", "clip=minmax", "quant.calib_images=1",
            "deploy=true"])
    run = tmp_path / "run"

    def refused(model, directory):  # the exporter failing on the model (anything in run/deployed is set aside first)
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr(deploy, "export_graphs", refused)
    with pytest.raises(SaqError, match=r"deploy=true failed \(RuntimeError: the exporter broke\); the FP and quantized "
                                       r"metrics are"):
        pipeline.run(cfg, run)
    record = json.loads((run / "results.json").read_text())
    assert record["metrics"]["quantized"]["images"] == 1
    assert record["metrics"]["deployed"]["error"] == "RuntimeError: the exporter broke"


def quick_export(monkeypatch):
    """export_onnx with stand-in graphs: what it does with files and folders, in milliseconds."""
    monkeypatch.setattr(deploy, "export_graph_modules", lambda qmodel, softmax: None)
    monkeypatch.setattr(deploy, "export_graphs", lambda model, directory: [
        (Path(directory) / name).write_text("new") for name in (deploy.ENCODER_FILE, deploy.DECODER_FILE)])
    monkeypatch.setattr(deploy, "operator_report", lambda path, shown=None: {"int8_ops": {}, "float_ops": {}})


def test_a_deployment_cut_short_while_moving_in_is_no_deployment(calibrated, tmp_path, monkeypatch):
    quick_export(monkeypatch)
    out = tmp_path / "deployed"
    out.mkdir()
    for name in (deploy.ENCODER_FILE, deploy.DECODER_FILE, deploy.REPORT_FILE):
        (out / name).write_text("old")
    replace = Path.replace

    def killed_at_the_decoder(self, target):
        if Path(target) == out / deploy.DECODER_FILE:
            raise OSError("killed")
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_at_the_decoder)
    with pytest.raises(OSError, match="killed"):
        deploy.export_onnx(calibrated, out)
    # a new encoder beside the old decoder, and no deploy.json: deployed_sam refuses the folder
    assert (out / deploy.ENCODER_FILE).read_text() == "new" and not (out / deploy.REPORT_FILE).exists()
    with pytest.raises(SaqError, match=re.escape(f"{out / deploy.DECODER_FILE} is missing; run python -m saq.deploy")):
        deploy.deployed_sam(calibrated, out)
    monkeypatch.setattr(Path, "replace", replace)
    deploy.export_onnx(calibrated, out)  # whole again: the report moves in last
    assert json.loads((out / deploy.REPORT_FILE).read_text())["softmax"] == "float"


def test_deploying_into_the_current_folder_and_without_agq(calibrated, tmp_path, monkeypatch):
    quick_export(monkeypatch)
    monkeypatch.chdir(tmp_path)
    deploy.export_onnx(calibrated, ".")  # out=. (a path without a name)
    assert (tmp_path / deploy.ENCODER_FILE).read_text() == "new" and (tmp_path / deploy.REPORT_FILE).is_file()
    # without AGQ the post-softmax operand is uniformly quantized: the report must not call it float
    no_agq = quantize(build_sam("sam_tiny"), {"name": "w8a8", "agq": False})
    report = deploy.export_onnx(no_agq, tmp_path / "no_agq")
    assert report["softmax"] == "uniform"
    assert deploy.format_report(report).startswith("softmax * V: post-softmax operand uniformly quantized")


def test_a_model_that_does_not_quantize_fully_is_refused(calibrated, tmp_path):
    from saq.quant import AdaRoundQuantizer
    from saq.quant.observers import make_observer

    off = copy.deepcopy(calibrated)  # an input quantizer switched off: the graph would quantize what saq does not
    off.image_encoder.blocks[0].attn.qkv.input_quantizer.set_state("off")
    with pytest.raises(SaqError, match=r"^cannot deploy: 1 quantizers are not quantizing \(first: image_encoder\.blocks"
                                       r"\.0\.attn\.qkv\.input_quantizer\)"):
        deploy.export_onnx(off, tmp_path / "off")
    dropping = copy.deepcopy(calibrated)
    dropping.mask_decoder.transformer.layers[0].mlp.lin1.input_quantizer.drop_prob = 0.5
    with pytest.raises(SaqError, match=r"^cannot deploy: 1 quantizers still drop quantization"):
        deploy.export_onnx(dropping, tmp_path / "dropping")
    assert not list(tmp_path.iterdir())  # refused before writing anything

    # soft AdaRound rounding: weights between two codes, which rounding to the nearest code would silently change
    quantizer, weight = AdaRoundQuantizer(8, make_observer("minmax"), ch_axis=0), torch.randn(16, 32)
    quantizer.name = "ada"
    quantizer.set_state("observe")
    quantizer(weight)
    quantizer.set_state("quant")
    codes, scale, zero_point = deploy._int8_codes(quantizer, weight)  # nearest rounding: on the grid
    assert torch.allclose((codes.float() - zero_point.float()[:, None]) * scale[:, None], quantizer(weight))
    quantizer.init_soft(weight)
    with pytest.raises(SaqError, match=r"^cannot deploy ada: its weights are not on the int8 grid \(soft AdaRound "
                                       r"rounding\?\): up to 0\.\d+ of a step off"):
        deploy._int8_codes(quantizer, weight)


def test_onnx_runtime_and_protobuf_errors_are_one_line_naming_the_file(calibrated, tmp_path, monkeypatch):
    (tmp_path / "bad.onnx").write_bytes(b"new")  # ONNX Runtime's exceptions are no RuntimeError
    with pytest.raises(SaqError, match=rf"^ONNX Runtime cannot load {re.escape(str(tmp_path / 'bad.onnx'))}: "
                                       r"InvalidProtobuf: "):
        deploy.session(tmp_path / "bad.onnx")
    operator_report = deploy.operator_report
    quick_export(monkeypatch)
    monkeypatch.setattr(deploy, "operator_report", operator_report)  # on the stand-in graphs: refused
    out = tmp_path / "deployed"
    # named as the file the export writes, not its staging copy (gone when the error is read)
    with pytest.raises(SaqError, match=rf"^ONNX Runtime cannot load {re.escape(str(out / deploy.ENCODER_FILE))}: "):
        deploy.export_onnx(calibrated, out)
    # a graph ONNX Runtime takes but whose optimized copy onnx.load cannot parse: protobuf's DecodeError
    monkeypatch.setattr(deploy, "session", lambda path, threads, optimized, shown=None: optimized.write_bytes(b"new"))
    with pytest.raises(SaqError, match=rf"^cannot read ONNX Runtime's optimized graph of "
                                       rf"{re.escape(str(out / deploy.ENCODER_FILE))}: DecodeError: "):
        deploy.export_onnx(calibrated, out)
    assert not (out / deploy.REPORT_FILE).exists() and not list(out.glob(".export.*"))


def test_cli_checks_the_config_first_records_the_export_and_refuses_an_out_without_a_name(calibrated, tmp_path,
                                                                                        monkeypatch, capsys):
    export = tmp_path / "run" / "quantized_model"
    export_quantized(calibrated, export, extra={"model": "sam_tiny", "export_id": "e1"})
    quick_export(monkeypatch)
    assert deploy.main([str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / deploy.DEPLOY_DIR / deploy.REPORT_FILE).read_text())["export_id"] == "e1"
    capsys.readouterr()
    assert deploy.main([str(tmp_path / "run"), "out=/"]) == 1  # no name to stage the export beside
    assert capsys.readouterr().err.strip() == ("error: cannot deploy into /: a folder without a name (the file system "
                                               "root); give a folder inside it, e.g. out=/deployed")
    # a hand-edited recipe whose model is no name: one line, not a TypeError
    recipe = json.loads((export / "recipe.json").read_text())
    (export / "recipe.json").write_text(json.dumps({**recipe, "extra": {**recipe["extra"], "model": ["sam_tiny"]}}))
    assert deploy.main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {export} does not say which model it quantized (recipe "
                                               "extra.model, a model name (it holds ['sam_tiny']))")
    (export / "recipe.json").write_text(json.dumps(recipe))
    # a W4A4 model is refused from its recipe, before it is built and loaded: its broken state file is never read
    (export / "recipe.json").write_text(json.dumps({**recipe, "quant": QuantConfig(name="w4a4", w_bits=4,
                                                                                   a_bits=4).to_dict()}))
    (export / "quantized_state.pt").write_bytes(b"PK\x03\x04 cut short")
    assert deploy.main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == ("error: cannot deploy: int8 kernels need W8A8, the encoder is W4A4 "
                                               "(quant=w8a8)")


def test_an_out_that_is_or_lies_in_a_file_is_one_line_before_the_export(calibrated, tmp_path, monkeypatch, capsys):
    export_quantized(calibrated, tmp_path / "run" / "quantized_model", extra={"model": "sam_tiny", "export_id": "e1"})
    monkeypatch.setattr("saq.saved.read_recipe", lambda *args: pytest.fail("read the model for a folder it refuses"))
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "deployed"):  # not mkdir's errno once the export is done
        assert deploy.main([str(tmp_path / "run"), f"out={out}"]) == 1
        assert capsys.readouterr().err == (f"error: cannot deploy into out={out} ({tmp_path / 'a_file'} is a file, not "
                                           "a folder); give a writable folder\n")


def test_a_deployment_of_another_saved_model_is_refused(calibrated, tmp_path, monkeypatch):
    quick_export(monkeypatch)
    first, second = copy.copy(calibrated), copy.copy(calibrated)
    setattr(first, EXPORT_ID_ATTR, "aaa")
    setattr(second, EXPORT_ID_ATTR, "bbb")  # saved later into the same run folder
    out = tmp_path / "deployed"
    assert deploy.export_onnx(first, out)["export_id"] == "aaa"
    with pytest.raises(SaqError, match=rf"^{re.escape(str(out))} was deployed from another model \(export_id aaa\) "
                                       r"than this saved one \(export_id bbb\); deploy this one again"):
        deploy.deployed_sam(second, out)
    # its own model passes the check and gets as far as ONNX Runtime (which refuses the stand-in graphs)
    with pytest.raises(SaqError, match=r"^ONNX Runtime cannot load .*image_encoder\.onnx"):
        deploy.deployed_sam(first, out)
    # a deployment that recorded no export (an unsaved model's) is not that of a saved one
    deploy.export_onnx(calibrated, out)
    with pytest.raises(SaqError, match=r"another model \(no export_id recorded: an unsaved model or an older saq\)"):
        deploy.deployed_sam(first, out)


def test_an_export_holds_its_folder_and_removes_what_killed_exports_left(calibrated, tmp_path, monkeypatch):
    from saq.log import file_lock

    quick_export(monkeypatch)
    out = tmp_path / "deployed"
    left = out / ".export.0123abcd.partial"  # an export killed (SIGKILL, OOM) before its cleanup
    left.mkdir(parents=True)
    (left / deploy.ENCODER_FILE).write_text("half")
    before = tmp_path / ".deployed.4567abcd.partial"  # one killed when exports staged beside their folder
    before.mkdir()
    others = [tmp_path / ".deployed_b.0123abcd.partial", tmp_path / ".deployed.notours.partial",
              out / ".export.notours.partial"]
    for other in others:
        other.mkdir()
    with file_lock(out / deploy.DEPLOY_LOCK):  # another process deploying into the same out=
        with pytest.raises(SaqError, match=rf"^another process is deploying into {re.escape(str(out))} \(it holds "
                                           rf"{re.escape(str(out / deploy.DEPLOY_LOCK))}\); wait for it"):
            deploy.export_onnx(calibrated, out)
        assert left.is_dir()  # while it runs, a staging folder may be its own
    staged = []
    real = deploy.export_graphs
    monkeypatch.setattr(deploy, "export_graphs", lambda model, directory: staged.append(directory) or real(model,
                                                                                                          directory))
    deploy.export_onnx(calibrated, out)
    assert not left.exists() and not before.exists() and all(other.is_dir() for other in others)
    assert (out / deploy.ENCODER_FILE).read_text() == "new"
    # staged inside the target: moving in is a rename on its file system (a target linked to another file system
    # failed there, after the earlier deployment had been set aside) and needs no writable parent
    assert [p.parent for p in staged] == [out] and not staged[0].exists()


def test_an_earlier_deployment_is_set_aside_under_one_stamp(calibrated, tmp_path, monkeypatch):
    quick_export(monkeypatch)
    out = tmp_path / "deployed"
    deploy.export_onnx(calibrated, out)
    ticks = iter(range(1000))
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: f"20261202-0000{next(ticks):02d}")  # a second per call
    deploy.export_onnx(calibrated, out)
    kept = [p.name for p in out.glob("*.previous")]
    assert len(kept) == 3 and len({name.split(".")[-2] for name in kept}) == 1, kept


def test_sessions_do_not_spin_beside_torchs_thread_pool(tmp_path):
    deploy._export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), tmp_path / "linear.onnx", ["x"], ["y"], {})
    options = deploy.session(tmp_path / "linear.onnx", 1).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
