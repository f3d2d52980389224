"""quantize() / calibrate() on SAM: what gets wrapped, off-state identity, states after calibration, summary, export."""

import copy
import re

import numpy as np
import pytest
import torch
from segment_anything.modeling.transformer import Attention as DecoderAttention
from torch import nn

from saq.errors import SaqError
from saq.quant import (
    Log2AGQQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    QuantState,
    assert_fully_quantized,
    calibrate,
    export_quantized,
    iter_quantizers,
    load_quantized,
    quant_states,
    quant_summary,
    quantize,
    set_quant_state,
)
from saq.sam.attention import QuantDecoderAttention, QuantEncoderAttention
from saq.sam.build import build_random_sam
from saq.sam.segmenter import PromptedImage, Segmenter
from tests.conftest import random_vit_b

torch.set_num_threads(1)

W4A4 = {"name": "w4a4", "w_bits": 4, "a_bits": 4}


def _samples(n=2, size=(200, 240), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        x0, y0 = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
        boxes = np.array([[x0, y0, x0 + size[1] // 3, y0 + size[0] // 3], [5, 5, size[1] - 5, size[0] - 5],
                          [x0, 0, size[1] - 1, y0 + 20]], np.float32)
        out.append(PromptedImage(image, boxes=boxes))
    return out


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def _predict(model, sample):
    return Segmenter(model).run(sample)


def test_sam_vit_b_wraps_what_the_paper_quantizes_and_is_exact_when_off():
    sam = random_vit_b()  # ViT-B's blocks and decoder at a 256-px input: what is wrapped does not depend on the size
    qmodel = quantize(sam, W4A4)
    # paper.md §2.1 for ViT-B: 12 blocks × (qkv, proj, lin1, lin2) = 48 linears, neck = 2 convs; the decoder's
    # 7 attentions × 4 projections + 2 MLPs × 2 = 32 linears; matmuls: 2 per attention, 12 + 7 attentions
    assert _count(qmodel, QuantLinear) == 48 + 32
    assert _count(qmodel, QuantConv2d) == 2
    assert _count(qmodel, QuantMatMul) == 2 * (12 + 7)
    assert _count(qmodel, Log2AGQQuantizer) == 12 + 7  # one post-softmax operand per attention
    assert len(list(iter_quantizers(qmodel))) == 2 * (80 + 2 + 38)
    assert _count(qmodel, QuantEncoderAttention) == 12 and _count(qmodel, QuantDecoderAttention) == 7
    # kept FP: patch embedding, prompt encoder, upscaling, hypernetwork MLPs, IoU head
    assert type(qmodel.image_encoder.patch_embed.proj) is nn.Conv2d
    for part in (qmodel.prompt_encoder, qmodel.mask_decoder.output_upscaling,
                 qmodel.mask_decoder.output_hypernetworks_mlps, qmodel.mask_decoder.iou_prediction_head):
        assert not any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in part.modules())
    assert not any(type(m) is DecoderAttention for m in qmodel.modules())
    assert type(sam.mask_decoder.transformer.layers[0].self_attn) is DecoderAttention  # the FP model is untouched
    assert set(quant_states(qmodel)) == {"off"}
    sample = PromptedImage(np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8),
                           boxes=np.array([[8, 8, 60, 90], [30, 20, 120, 95]], np.float32))
    fp, off = _predict(sam, sample), _predict(qmodel, sample)  # one 256² forward each (padded windows included)
    assert fp.low_res_logits.shape == (2, 1, 64, 64) and torch.isfinite(fp.low_res_logits).all()
    assert torch.equal(fp.low_res_logits, off.low_res_logits)
    assert torch.equal(fp.iou_scores, off.iou_scores)


@pytest.fixture(scope="module")
def tiny():
    return build_random_sam("sam_tiny", seed=0)


def test_sam_tiny_off_state_is_bit_identical_and_fp_model_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    qmodel = quantize(tiny, W4A4)
    sample = _samples(1)[0]
    fp, off = _predict(tiny, sample), _predict(qmodel, sample)
    assert torch.equal(fp.low_res_logits, off.low_res_logits) and torch.equal(fp.iou_scores, off.iou_scores)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert qmodel.image_encoder.blocks[0].attn.qkv.weight is not tiny.image_encoder.blocks[0].attn.qkv.weight


def test_parts_can_stay_fp(tiny):
    qmodel = quantize(tiny, {**W4A4, "encoder": {"enabled": False}})
    assert not any(isinstance(m, QuantLinear) for m in qmodel.image_encoder.modules())
    assert _count(qmodel, QuantLinear) == 32 and _count(qmodel, QuantConv2d) == 0


def test_per_channel_activations_are_linear_inputs_only_matmul_operands_stay_per_tensor(tiny):
    # a transposed key's channels are not on one axis: per channel there would quantize per key token
    act = {"granularity": "per_channel", "ch_axis": -1}
    minmax_weights = {"observer": "minmax"}  # the weights' ranges are not what this test is about: no MSE search
    qmodel = quantize(tiny, {**W4A4, "encoder": {"act": act, "weight": minmax_weights},
                             "decoder": {"act": act, "weight": minmax_weights}})
    matmuls = [m for m in qmodel.modules() if isinstance(m, QuantMatMul)]
    linears = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert matmuls and all(getattr(q, "ch_axis", None) is None for m in matmuls for q in (m.a_quantizer, m.b_quantizer))
    assert linears and all(m.input_quantizer.ch_axis == -1 for m in linears)
    convs = [m for m in qmodel.modules() if isinstance(m, QuantConv2d)]
    assert convs and all(m.input_quantizer.ch_axis == 1 for m in convs)  # NCHW: the channel axis of a conv input
    samples = _samples(1)
    calibrate(qmodel, samples, None, {"name": "minmax"}, progress=False)  # the config it was quantized with
    # one scale per input channel (a conv's, 128 on the tiny neck, not one per image column)
    assert all(m.input_quantizer.scale.numel() == m.in_channels for m in convs)
    segmenter = Segmenter(qmodel)
    segmenter.set_image(samples[0].image)  # other prompt counts than calibration saw: no shape error
    out = segmenter.predict(boxes=np.array([[5, 5, 60, 60], [10, 20, 90, 80], [0, 0, 30, 30]], np.float32))
    assert out.masks.shape == (3, 1, *samples[0].image.shape[:2]) and out.low_res_logits.shape == (3, 1, 128, 128)
    assert torch.isfinite(out.low_res_logits).all() and torch.isfinite(out.iou_scores).all()


@pytest.fixture(scope="module")
def calibrated(tiny):
    samples = _samples(2)
    qmodel = quantize(tiny, W4A4)
    report = calibrate(qmodel, samples, W4A4, {"name": "minmax"}, progress=False)
    return qmodel, samples, report


def test_calibrate_ends_with_every_quantizer_quantizing_even_after_evaluation(calibrated, tiny):
    qmodel, samples, report = calibrated
    assert report.states == {"quant": len(list(iter_quantizers(qmodel)))}
    assert report.images == 2 and report.prompts == 6 and len(report.big) == 3
    first = _predict(qmodel, samples[0])
    for sample in samples:  # an evaluation pass
        prediction = _predict(qmodel, sample)
        assert torch.isfinite(prediction.low_res_logits).all()
    assert all(q.state is QuantState.QUANT for q in iter_quantizers(qmodel))
    assert_fully_quantized(qmodel)
    # every single quantizer changes what passes through it (one left pass-through would go unnoticed otherwise)
    changed: dict[str, bool] = {}

    def record(module, inputs, output):
        changed[module.name] = changed.get(module.name, False) or not torch.equal(output, inputs[0])

    handles = [q.register_forward_hook(record) for q in iter_quantizers(qmodel)]
    try:
        _predict(qmodel, samples[0])
    finally:
        for handle in handles:
            handle.remove()
    assert len(changed) == len(list(iter_quantizers(qmodel)))
    assert [name for name, was_changed in changed.items() if not was_changed] == []
    fp = _predict(tiny, samples[0])
    assert not torch.allclose(first.low_res_logits, fp.low_res_logits, atol=1e-3)  # quantization is really on
    assert torch.equal(_predict(qmodel, samples[0]).low_res_logits, first.low_res_logits)  # and deterministic


def test_state_switch_round_trip(calibrated, tiny):
    qmodel, samples, _ = calibrated
    quantized = _predict(qmodel, samples[0]).low_res_logits
    set_quant_state(qmodel, "off")
    try:
        with pytest.raises(SaqError, match="not quantizing"):
            assert_fully_quantized(qmodel)
        off = _predict(qmodel, samples[0]).low_res_logits
        # BIG may have flipped q/k signs: FP up to float rounding
        assert torch.allclose(off, _predict(tiny, samples[0]).low_res_logits, atol=1e-5)
        set_quant_state(qmodel, QuantState.QUANT, kind="weight")
        assert quant_states(qmodel) == {"quant": 56 + 2, "off": 56 + 2 + 2 * 26}  # weights on, inputs off
    finally:
        set_quant_state(qmodel, QuantState.QUANT)
    assert torch.equal(_predict(qmodel, samples[0]).low_res_logits, quantized)


def test_quant_summary_lists_every_quantizer(calibrated):
    qmodel, _, _ = calibrated
    text = quant_summary(qmodel)
    lines = text.splitlines()
    quantizers = list(iter_quantizers(qmodel))
    assert len(lines) == len(quantizers) + 3
    assert lines[0].split() == ["layer", "role", "quantizer", "bits", "granularity", "observer", "state"]
    qkv_weight = next(line for line in lines if line.startswith("image_encoder.blocks.0.attn.qkv ")).split()
    assert qkv_weight[1:5] == ["weight", "adaround/asym", "4", "per_channel(0)"] and qkv_weight[-2:] == ["mse", "quant"]
    assert any("log2_agq" in line and "tau in {1,2,4}, chose" in line for line in lines)
    assert any("input" in line and "lsq/asym" in line and "minmax" in line for line in lines)
    assert lines[-1].startswith("quantized: 56 linear, 2 conv, 26 matmul (168 quantizers)")


def test_export_and_load_reproduce_outputs(calibrated, tmp_path):
    qmodel, samples, _ = calibrated
    export_quantized(qmodel, tmp_path / "export", extra={"model": "sam_tiny"})
    state = torch.load(tmp_path / "export" / "quantized_state.pt", weights_only=True)  # tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    loaded = load_quantized(build_random_sam("sam_tiny", seed=5), tmp_path / "export")  # other weights: replaced
    assert_fully_quantized(loaded)
    for sample in samples:
        assert torch.equal(_predict(loaded, sample).low_res_logits, _predict(qmodel, sample).low_res_logits)
    # what set each range comes back too (a quant.load run prints the same summary as the run that saved it)
    relabelled = copy.deepcopy(qmodel)
    next(m for m in relabelled.modules() if getattr(m, "observer", None) is not None).observer.relabel("pcc_search")
    export_quantized(relabelled, tmp_path / "relabelled")
    summary = quant_summary(load_quantized(build_random_sam("sam_tiny", seed=5), tmp_path / "relabelled"))
    assert summary == quant_summary(relabelled) and "pcc_search" in summary


def test_a_state_file_from_another_granularity_is_refused(calibrated, tmp_path):
    from saq.errors import SaqError

    qmodel, _, _ = calibrated
    export_quantized(qmodel, tmp_path / "export")
    state = torch.load(tmp_path / "export" / "quantized_state.pt", weights_only=True)
    key = next(k for k in state if k.endswith("input_quantizer.scale"))
    state[key] = state[key].reshape(1).repeat(3)  # as a per-channel quantizer would have saved it
    torch.save(state, tmp_path / "export" / "quantized_state.pt")
    with pytest.raises(SaqError, match=re.escape(f"does not fit the model: size mismatch for {key}: copying a param "
                                                 "with shape torch.Size([3])")):
        load_quantized(build_random_sam("sam_tiny", seed=5), tmp_path / "export")


def test_a_saved_quantizer_layout_other_than_the_built_one_is_refused(calibrated, tmp_path):
    import json

    from saq.errors import SaqError

    qmodel, _, _ = calibrated
    export_quantized(qmodel, tmp_path / "export")
    recipe_path = tmp_path / "export" / "recipe.json"
    recipe = json.loads(recipe_path.read_text())
    name = "image_encoder.neck.0.input_quantizer"
    assert recipe["quantizers"][name] == {"quantizer": "lsq/asym", "bits": 4, "granularity": "per_tensor"}
    assert len(recipe["quantizers"]) == len(list(iter_quantizers(qmodel)))
    # as a version that quantized the neck's inputs per channel would have saved it: same config, other grid
    recipe["quantizers"][name]["granularity"] = "per_channel(1)"
    recipe_path.write_text(json.dumps(recipe))
    with pytest.raises(SaqError, match=re.escape(f"quantizer {name} was saved as {{'quantizer': 'lsq/asym', 'bits': 4, "
                                                 "'granularity': 'per_channel(1)'} and is built here as")):
        load_quantized(build_random_sam("sam_tiny", seed=5), tmp_path / "export")
    # an export from before the layout was recorded loads on its tensor shapes alone
    del recipe["quantizers"]
    recipe_path.write_text(json.dumps(recipe))
    assert_fully_quantized(load_quantized(build_random_sam("sam_tiny", seed=5), tmp_path / "export"))


def test_export_load_keeps_adaround_rounding(calibrated, tmp_path):
    qmodel, _, _ = calibrated
    layer = qmodel.mask_decoder.transformer.layers[0].mlp.lin1
    quantizer = layer.weight_quantizer
    quantizer.init_soft(layer.weight)
    try:
        with torch.no_grad():
            quantizer.alpha.copy_(torch.randn(quantizer.alpha.shape, generator=torch.Generator().manual_seed(0)))
        export_quantized(qmodel, tmp_path / "soft")
        loaded = load_quantized(build_random_sam("sam_tiny", seed=5), tmp_path / "soft")
        twin = loaded.mask_decoder.transformer.layers[0].mlp.lin1
        assert twin.weight_quantizer.mode == "soft"
        assert torch.equal(twin.quantized_weight(), layer.quantized_weight())
    finally:
        quantizer.set_mode("nearest")


def test_calibration_misuse_is_reported(tiny):
    qmodel = quantize(tiny, W4A4)
    with pytest.raises(SaqError, match="never calibrated"):
        set_quant_state(qmodel, "quant")
    # all or none: the weight quantizers, calibrated by hand, did not switch while the activations could not
    for layer in qmodel.modules():
        if isinstance(layer, QuantLinear):
            layer.weight_quantizer.calibrated.fill_(True)
    with pytest.raises(SaqError, match="never calibrated"):
        set_quant_state(qmodel, "quant")
    assert set(quant_states(qmodel)) == {"off"}
    with pytest.raises(SaqError, match="at least one sample"):
        calibrate(qmodel, [], W4A4)
    no_prompts = PromptedImage(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(SaqError, match="no calibration sample has prompts"):
        calibrate(qmodel, [no_prompts], W4A4)
    with pytest.raises(SaqError, match="cannot export"):
        export_quantized(qmodel, "/tmp/never-written")


def test_calibrate_with_mse_clipping_sets_the_activation_strategy(tiny):
    from saq.clipping import MSEClipping
    from saq.quant.grid import qparams_from_range

    qmodel = quantize(tiny, {"name": "w4a4", "w_bits": 4, "a_bits": 4, "big": False})
    # capture what two activation quantizers see: each sees exactly one batch from one image with one prompt chunk
    probes = {"encoder": qmodel.image_encoder.blocks[0].attn.qkv.input_quantizer,
              "decoder": qmodel.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.input_quantizer}
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in probes}
    handles = [q.register_forward_hook(lambda m, i, o, k=k: seen[k].append(i[0].detach().clone()))
               for k, q in probes.items()]
    try:
        calibrate(qmodel, _samples(1, seed=3), None, {"_target_": "saq.clipping.MSEClipping", "name": "mse"},
                  progress=False)
    finally:
        for handle in handles:
            handle.remove()
    for key, quantizer in probes.items():
        assert len(seen[key]) == 1, key
        lo, hi = MSEClipping().batch_range(seen[key][0], quantizer.grid, None)
        full_lo, full_hi = torch.aminmax(seen[key][0])
        assert float(hi - lo) < 0.9 * float(full_hi - full_lo), key  # 4-bit MSE really clips
        scale, zero_point = qparams_from_range(lo, hi, quantizer.grid)
        assert torch.equal(quantizer.scale.detach(), scale) and torch.equal(quantizer.zero_point, zero_point), key
    names = {q.observer.name for q in iter_quantizers(qmodel, "act") if not isinstance(q, Log2AGQQuantizer)}
    assert names == {"avg_mse(p=2.4)"}
    assert {q.observer.name for q in iter_quantizers(qmodel, "weight")} == {"mse"}
    assert_fully_quantized(qmodel)


def test_activation_observer_beside_clip_is_one_error_naming_both(tiny):
    minmax_weights = {"weight": {"observer": "minmax"}}  # no MSE weight search: the weights are not looked at here
    cfg = {"name": "w8a8", "encoder": {"act": {"observer": "mse"}, **minmax_weights}, "decoder": minmax_weights}
    qmodel = quantize(tiny, cfg)
    with pytest.raises(SaqError) as err:
        calibrate(qmodel, _samples(1), cfg, {"name": "minmax"}, progress=False)
    assert str(err.value) == ("quant.encoder.act.observer=mse conflicts with clip=minmax: clip= alone sets the "
                              "activation range strategy (the same as this observer: clip=mse); leave "
                              "quant.encoder.act.observer unset")
    # the running-extreme observer is clip=minmax with the extreme reduction, not clip=minmax's default mean
    minmax = {"name": "w8a8", "encoder": {"act": {"observer": "minmax"}}}
    with pytest.raises(SaqError, match=r"\(the same as this observer: clip=minmax clip.reduction=extreme\)"):
        calibrate(quantize(tiny, minmax), _samples(1), minmax, {"name": "mse"}, progress=False)
    # without a clip strategy (library use) the observer named in the config is the one that measures
    calibrate(qmodel, _samples(1), cfg, None, progress=False)
    assert qmodel.image_encoder.blocks[0].attn.qkv.input_quantizer.observer.name == "mse"


def test_an_image_decoded_in_chunks_is_one_observer_batch(calibrated, tiny):
    # paper.md §2.3: each calibration image with all its prompts is one batch; memory chunks must not reweight images
    whole, samples, _ = calibrated  # W4A4 on _samples(2), clip=minmax, the default decode batch (all 3 prompts at once)
    chunked_cfg = {**W4A4, "calib_decode_batch": 1}  # three chunks of one prompt per image
    chunked = quantize(tiny, chunked_cfg)
    calibrate(chunked, samples, chunked_cfg, {"name": "minmax"}, progress=False)
    pairs = list(zip(iter_quantizers(whole, "act"), iter_quantizers(chunked, "act")))
    decoder = [(a, b) for a, b in pairs if a.name.startswith("mask_decoder.") and hasattr(a.observer, "lo")]
    assert decoder and all(b.observer.batches == a.observer.batches == 2 for a, b in pairs)
    for a, b in decoder:  # min/max of a whole is that of its pieces: the same ranges however the prompts are chunked
        torch.testing.assert_close(b.observer.lo, a.observer.lo, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.observer.hi, a.observer.hi, rtol=1e-5, atol=1e-6)
