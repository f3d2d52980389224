"""Reconstruction on SAM: the units and the PAR probe against segment_anything's own forward, PAR / QDrop runs leave
a fully quantized model (or exactly the documented paper-compatible one), configs and method presets, ViT-B stages."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saq.errors import SaqError
from saq.quant import LSQQuantizer, QuantLayer, QuantState, assert_fully_quantized, calibrate, iter_quantizers, quantize
from saq.recon import EVAL_FULL, EVAL_PAPER, ReconConfig, reconstruct
from saq.recon.config import PAR_OFFICIAL_ITERS, ParLoss, RoundingRegularizer, budget_line
from saq.recon.loop import Reconstructor
from saq.recon.losses import squared_error, unit_loss
from saq.sam.build import ARCHITECTURES, build_sam, make_sam
from saq.sam.segmenter import PromptedImage
from saq.sam.unit_kinds import GRANULARITIES, KINDS_AT
from saq.sam.units import (
    build_chain,
    encode_sample,
    encoder_stages,
    mask_probabilities,
    probe_image_tokens,
)
from tests.conftest import REPO

torch.set_num_threads(1)
W4A4 = {"name": "w4a4", "w_bits": 4, "a_bits": 4}
FEW = {"stage": 2, "layer": 2, "block": 1, "neck": 2, "decoder_layer": 2, "decoder_block": 1, "final_attn": 3}


def samples(n=2, size=(96, 128), boxes=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        xy = rng.integers(0, min(size) // 2, (boxes, 2))
        wh = rng.integers(8, min(size) // 2, (boxes, 2))
        out.append(PromptedImage(rng.integers(0, 256, (*size, 3), dtype=np.uint8),
                                 boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def tiny():
    return build_sam("sam_tiny")


def calibrated(model, cal, quant=None, fast_weights=False):
    """quantize + calibrate; fast_weights: min/max weight ranges instead of the per-channel MSE search, for tests that
    look at neither the weights nor what reconstruction learns from them."""
    quant = dict(quant or W4A4)
    if fast_weights:
        quant.update({part: {**quant.get(part, {}), "weight": {"observer": "minmax"}} for part in ("encoder", "decoder")})
    qmodel = quantize(model, quant)
    calibrate(qmodel, cal, progress=False)
    return qmodel


def run_states(model, chain, data, upto: int):
    state = ()
    with torch.no_grad():
        for step in chain[:upto + 1]:
            state = step.run(model, state, data)
    return state


def test_stages_end_at_the_global_attention_blocks(tiny):
    assert encoder_stages(tiny) == [range(0, 3), range(3, 6)]
    vit_b = make_sam(dataclasses.replace(ARCHITECTURES["sam_vit_b"], image_size=128))
    assert encoder_stages(vit_b) == [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]


def test_every_granularity_chains_to_segment_anythings_transformer_output(tiny):
    data = encode_sample(tiny, samples(1)[0], 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding = tiny.image_encoder(data.image)
        tokens, _ = tiny.mask_decoder.transformer(embedding + data.dense, tiny.prompt_encoder.get_dense_pe(),
                                                  data.tokens)
    for granularity in ("stage", "layer", "block"):
        chain = build_chain(tiny, granularity)
        hs = run_states(tiny, chain, data, len(chain) - 1)[0]
        assert torch.allclose(hs, tokens, atol=1e-5), granularity
    kinds = [s.kind for s in build_chain(tiny, "block") if s.learnable]
    assert kinds.count("block") == 12 and kinds.count("decoder_block") == 8 and len(kinds) == 22


def test_par_probe_is_the_fp_neck_and_two_way_transformer_of_the_stage_output(tiny):
    """Layer skipping: stage 0's output, taken straight to the neck and the decoder, equals that path by hand."""
    sample = samples(1, boxes=20)[0]
    data = encode_sample(tiny, sample, 16, torch.Generator().manual_seed(0))
    assert data.tokens.shape[0] == 16 and data.dense.shape[0] == 1  # capped, one shared dense embedding
    encoder = tiny.image_encoder
    with torch.no_grad():
        x = encoder.patch_embed(data.image) + encoder.pos_embed
        for block in encoder.blocks[:3]:
            x = block(x)
        stage0 = run_states(tiny, build_chain(tiny, "stage"), data, 1)[0]
        assert torch.equal(stage0, x)
        probe = probe_image_tokens(tiny, stage0, data)
        embedding = encoder.neck(x.permute(0, 3, 1, 2))
        prompts = data.tokens.shape[0]
        _, keys = tiny.mask_decoder.transformer(
            embedding.repeat(prompts, 1, 1, 1) + data.dense.expand(prompts, -1, -1, -1),
            tiny.prompt_encoder.get_dense_pe().repeat(prompts, 1, 1, 1), data.tokens)
    assert probe.shape == keys.shape == (16, 32 * 32, 128)
    assert torch.allclose(probe, keys, atol=1e-5)
    # ... and so is the target the loop's PAR loss learns stage 0 against, through the FP twin (not the quantized
    # model being learned), while the loss probes the quantized stage's output along the same FP path
    qmodel = calibrated(tiny, [sample], fast_weights=True)
    chain = build_chain(qmodel, "stage")
    rec = Reconstructor(qmodel, tiny, ReconConfig(), seed=0, chain=chain)
    loss_fn = unit_loss(rec.cfg, chain[1], rec._probe, rec._downstream(1))
    assert loss_fn.output_weights == {} and loss_fn.uses_response  # the interaction loss only (official weights)
    with torch.no_grad():
        (target,) = loss_fn.response((stage0,), data)
        assert torch.allclose(target, keys, atol=1e-5)
        q_stage0 = run_states(qmodel, chain, data, 1)
        assert not torch.allclose(q_stage0[0], stage0, atol=1e-3)  # 4 bits: the quantized stage differs
        loss = loss_fn(q_stage0, (stage0,), data, (target,))
        assert torch.allclose(loss, squared_error(probe_image_tokens(tiny, q_stage0[0], data), keys), rtol=1e-4)


def test_mask_response_is_segment_anythings_box_mask(tiny):
    """The chain's last state through the mask head equals MaskDecoder's low-resolution mask (multimask off)."""
    data = encode_sample(tiny, samples(1)[0], 16, torch.Generator().manual_seed(0))
    chain = build_chain(tiny, "stage")
    decoder = tiny.mask_decoder
    with torch.no_grad():
        masks = mask_probabilities(tiny, run_states(tiny, chain, data, len(chain) - 1), data)
        sparse = data.tokens[:, 1 + decoder.num_mask_tokens:]
        logits, _ = decoder(tiny.image_encoder(data.image), tiny.prompt_encoder.get_dense_pe(), sparse, data.dense,
                            multimask_output=False)
    assert masks.shape == (3, 128 * 128, 1) and logits.shape == (3, 1, 128, 128)
    assert torch.allclose(masks, logits.sigmoid().flatten(2).transpose(1, 2), atol=1e-5)


def test_mask_weight_adds_the_mask_error_to_every_decoder_unit(tiny):
    """recon.par_loss.mask_weight=w adds w·‖Δmask‖² to a decoder layer's loss and makes the final attention's
    loss its hs error + w·‖Δmask‖²; at 0 (the official loss) no mask is computed."""
    data = encode_sample(tiny, samples(1)[0], 16, torch.Generator().manual_seed(0))
    chain = build_chain(tiny, "stage")
    layer0, final = chain.index(next(s for s in chain if s.kind == "decoder_layer")), len(chain) - 1
    with torch.no_grad():
        inputs = {i: run_states(tiny, chain, data, i - 1) for i in (layer0, final)}
    noisy = {i: tuple(t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for t in s)
             for i, s in inputs.items()}
    official_cfg, masks_cfg = ReconConfig(), ReconConfig(par_loss=ParLoss(mask_weight=3.0))
    official_run, masks_run = (Reconstructor(tiny, tiny, c, 0, progress=False) for c in (official_cfg, masks_cfg))

    with torch.no_grad():
        for index in (layer0, final):
            step, target = chain[index], chain[index].run(tiny, inputs[index], data)
            out = step.run(tiny, noisy[index], data)
            assert len(official_run._downstream(index)(target, data)) == 1  # no mask computed at weight 0
            want, got = masks_run._downstream(index)(target, data), masks_run._downstream(index)(out, data)
            assert torch.equal(want[1], mask_probabilities(tiny, run_states(tiny, chain, data, len(chain) - 1), data))
            mask_error = float(squared_error(got[1], want[1]))
            official = unit_loss(official_cfg, step, None, official_run._downstream(index))
            with_masks = unit_loss(masks_cfg, step, None, masks_run._downstream(index))
            assert mask_error > 0
            base = float(official(out, target, data, want[:1] if official.uses_response else None))
            assert float(with_masks(out, target, data, want)) == pytest.approx(base + 3.0 * mask_error, rel=1e-5)
            if index == final:
                assert not official.uses_response
                assert base == pytest.approx(float(squared_error(out[0], target[0])), rel=1e-6)


def test_par_leaves_every_quantizer_hard_and_on(tiny):
    cal = samples()
    qmodel = calibrated(tiny, cal)
    start = copy.deepcopy(qmodel)  # the calibrated model, before reconstruction
    flags = [p.requires_grad for p in qmodel.parameters()] + [p.requires_grad for p in tiny.parameters()]
    report = reconstruct(qmodel, tiny, cal, {"name": "par", "iters": FEW}, seed=0, progress=False)
    assert [u.name for u in report.units] == ["encoder.stage0", "encoder.stage1", "encoder.neck", "decoder.layers.0",
                                              "decoder.layers.1", "decoder.final_attn_token_to_image"]
    assert report.eval_mode == EVAL_FULL and report.as_dict()["iters"] == 13
    assert all(q.state is QuantState.QUANT and q.drop_prob == 1.0 for q in iter_quantizers(qmodel))
    assert all(q.mode == "nearest" for q in iter_quantizers(qmodel, "weight"))  # hardened into the weights
    # ... and their rounding variables let go: a weight-sized α per layer would double the saved model
    assert all(q.alpha.numel() == 0 for q in iter_quantizers(qmodel, "weight"))
    assert not any(k.endswith(".alpha") and v.numel() for k, v in qmodel.state_dict().items())
    assert_fully_quantized(qmodel)
    assert flags == [p.requires_grad for p in qmodel.parameters()] + [p.requires_grad for p in tiny.parameters()]
    # AdaRound learned something: some weight moved off its round-to-nearest grid point
    # (the start's round-to-nearest weight, not its FP weight: a hardened weight is on the grid, so differs from FP
    # whatever was learned) ...
    pairs = [(a, b) for a, b in zip(qmodel.modules(), start.modules()) if isinstance(a, QuantLayer)]
    assert len(pairs) == 56 + 2
    with torch.no_grad():
        assert any(not torch.equal(a.weight, b.quantized_weight()) for a, b in pairs)
        # ... and each weight is either hardened (round-to-nearest of it is itself) or, in a unit whose best state
        # was its start, the start's own weight
        assert all(torch.equal(a.quantized_weight(), a.weight) or torch.equal(a.weight, b.weight) for a, b in pairs)


def test_agq_scale_is_learned_only_with_its_own_lr(tiny):
    """recon.softmax_scale_lr=0 (par's default) keeps AGQ's searched post-softmax scales while the LSQ steps learn;
    a positive one learns them."""
    from saq.quant.quantizers import Log2AGQQuantizer

    cal = samples(1)
    stages = {"name": "par", "iters": {"stage": 20, "neck": 0, "decoder_layer": 0, "final_attn": 0}}
    start = calibrated(tiny, cal)
    scales = lambda m, agq: {n: float(q.scale.detach()) for n, q in m.named_modules()  # noqa: E731
                             if isinstance(q, Log2AGQQuantizer if agq else LSQQuantizer) and "blocks.2" in n}
    assert scales(start, True) and scales(start, False)
    # best_state only measures the unit's loss before and after (it learns the same): stage 0 keeping what it learned
    # (asserted below) makes this run the softmax_scale_lr=0 one and the loss measurement at once
    frozen = copy.deepcopy(start)
    report = reconstruct(frozen, tiny, cal, dict(stages, best_state=True), seed=0, progress=False)
    unit = report.units[0]
    assert unit.name == "encoder.stage0" and unit.kind == "stage" and unit.iters == 20 and unit.kept == "learned"
    assert scales(frozen, True) == scales(start, True) and scales(frozen, False) != scales(start, False)
    # what stage 0 learns lowers its PAR loss over the calibration samples (hard rounding, nothing dropped)
    assert unit.eval_after < 0.9 * unit.eval_before, (unit.eval_before, unit.eval_after)
    # a positive lr learns them: Adam moves every scale with a gradient from its first step, so 2 steps show it
    learned = copy.deepcopy(start)
    few = {**stages, "iters": {**stages["iters"], "stage": 2}, "best_state": False}
    reconstruct(learned, tiny, cal, dict(few, softmax_scale_lr=0.002), seed=0, progress=False)
    assert all(scales(learned, True)[n] != s for n, s in scales(start, True).items())


def assert_only_linear_inputs_drop(qmodel):
    """The paper-compatible evaluation's state: every linear/conv input at drop 0.5, every other quantizer hard."""
    inputs = {id(m.input_quantizer) for m in qmodel.modules() if isinstance(m, QuantLayer)}
    dropping = {id(q) for q in iter_quantizers(qmodel) if q.drop_prob != 1.0}
    assert dropping == inputs and all(q.drop_prob == 0.5 for q in iter_quantizers(qmodel) if id(q) in inputs)
    with pytest.raises(SaqError, match="quantizers still drop quantization"):
        assert_fully_quantized(qmodel)
    assert_fully_quantized(qmodel, allow_dropped_inputs=True)


def test_paper_eval_compat_after_par_leaves_exactly_the_linear_inputs_dropping(tiny):
    """The same documented state after SAQ-SAM's own reconstruction (stage units, PAR's losses)."""
    cal = samples(1)
    qmodel = calibrated(tiny, cal, fast_weights=True)
    report = reconstruct(qmodel, tiny, cal, {"name": "par", "iters": {k: 1 for k in PAR_OFFICIAL_ITERS},
                                              "paper_eval_compat": True, "best_state": False}, seed=0, progress=False)
    assert report.eval_mode == EVAL_PAPER and [u.kind for u in report.units] == [
        "stage", "stage", "neck", "decoder_layer", "decoder_layer", "final_attn"]
    assert_only_linear_inputs_drop(qmodel)


def test_paper_eval_compat_leaves_exactly_the_linear_inputs_dropping(tiny, tmp_path):
    cal = samples(1)
    qmodel = calibrated(tiny, cal, fast_weights=True)  # which quantizers drop does not depend on the weight ranges
    report = reconstruct(qmodel, tiny, cal, {"name": "qdrop", "granularity": "block", "loss": "mse",
                                              "iters": {k: 1 for k in FEW}, "paper_eval_compat": True,
                                              "best_state": False}, seed=0, progress=False)
    assert report.eval_mode == EVAL_PAPER and report.as_dict()["eval_mode"].startswith("paper_compat")
    assert_only_linear_inputs_drop(qmodel)
    # quant.load of the saved model: the same quantizers dropping, from the recipe's recon, without reconstructing
    from saq.quant.export import export_quantized, load_quantized
    from saq.recon import loaded_evaluation

    saved_recon = {"name": "qdrop", "granularity": "block", "loss": "mse", "drop_prob": 0.5}
    directory = export_quantized(qmodel, Path(tmp_path) / "saved")
    names = lambda m: sorted(n for n, q in m.named_modules() if getattr(q, "drop_prob", 1.0) != 1.0)  # noqa: E731
    full = load_quantized(tiny, directory)
    assert loaded_evaluation(full, saved_recon, None, directory) == {"method": "qdrop", "eval_mode": EVAL_FULL,
                                                                      "loaded_from": str(directory)}
    assert names(full) == [] and names(qmodel)
    compat = load_quantized(tiny, directory)
    record = loaded_evaluation(compat, saved_recon, dict(saved_recon, paper_eval_compat=True), directory)
    assert record["eval_mode"] == EVAL_PAPER and names(compat) == names(qmodel)
    # automatic masks share one image-token tensor among a chunk's prompts; dropping, each prompt gets its own (and
    # with it its own dropping masks), as segment_anything's decoder repeats them
    from saq.sam.segmenter import Segmenter

    points = np.array([[10, 10], [40, 30], [60, 50]], np.float32)
    for model, rows in ((full, 1), (compat, len(points))):
        seen = []
        k_proj = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj
        handle = k_proj.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].shape[0]))
        segmenter = Segmenter(model)
        segmenter.set_image(cal[0].image)
        list(segmenter.predict_above_iou(points, np.ones(len(points), np.int64), 0.0))
        handle.remove()
        assert seen == [rows]
    with pytest.raises(SaqError, match="reconstructed with recon=qdrop; this run sets recon=par"):
        loaded_evaluation(compat, saved_recon, {"name": "par"}, directory)
    with pytest.raises(SaqError, match="was not reconstructed"):
        loaded_evaluation(compat, {"name": "none"}, {"name": "qdrop", "paper_eval_compat": True}, directory)
    with pytest.raises(SaqError, match=r"loads learned with recon\.drop_prob=1\.0, dropping nothing"):
        loaded_evaluation(load_quantized(tiny, directory), dict(saved_recon, drop_prob=1.0),
                          dict(saved_recon, paper_eval_compat=True), directory)


def _recon_yaml(name: str) -> dict:
    """A recon preset with its defaults list resolved (qdrop builds on par)."""
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"recon={name}"])
    return OmegaConf.to_container(cfg.recon, resolve=True)


def test_equal_budget_gives_qdrop_the_total_of_pars_official_schedule(tiny):
    qdrop = ReconConfig.from_cfg(_recon_yaml("qdrop") | {"budget": "equal"})
    kinds = [s.kind for s in build_chain(tiny, "block") if s.learnable]
    reference = [s.kind for s in build_chain(tiny, "stage") if s.learnable]
    iters = qdrop.unit_iters(kinds, reference)
    assert sum(reference.count(k) * n for k, n in PAR_OFFICIAL_ITERS.items()) == 20000  # sam_tiny's 2 stages
    assert sum(iters) == 20000 and max(iters) - min(iters) <= 1  # exactly the total, shared as evenly as it goes
    par = ReconConfig.from_cfg(_recon_yaml("par") | {"budget": "equal"})
    uneven = par.unit_iters(["block", "block", "final_attn"], reference)  # 2k : 2k : 10k of 20k
    assert uneven == [2857, 2857, 14286] and sum(uneven) == 20000
    official = ReconConfig.from_cfg(_recon_yaml("qdrop")).unit_iters(kinds, reference)
    assert official == [20000] * len(kinds)  # QDrop / PTQ4SAM-L's own budget: 20k per block
    # recon.iters are proportions there, which a user setting recon.iters.stage=20 learns from this line
    assert budget_line("equal", ["block", "block", "final_attn"], uneven) == (
        "recon.budget=equal: 20,000 iterations (PAR's official total on this model) over 3 units, shared in proportion "
        "to recon.iters: block 2857 x2, final_attn 14286 (recon.budget=official learns recon.iters as set)")
    small = ReconConfig.from_cfg(_recon_yaml("qdrop") | {"budget": "equal", "iters": {**qdrop.iters, "block": 10}})
    shares = small.unit_iters(kinds, reference)
    line = budget_line("equal", kinds, shares)
    assert sum(shares) == 20000 and line.startswith("recon.budget=equal: 20,000 iterations") and "block 1" in line
    assert Reconstructor(tiny, tiny, small, seed=0, progress=False).budget_line == line
    nothing = ReconConfig.from_cfg(_recon_yaml("qdrop") | {"budget": "equal", "iters": dict.fromkeys(qdrop.iters, 0)})
    assert Reconstructor(tiny, tiny, nothing, seed=0, progress=False).budget_line is None  # no "0 iterations of PAR's"
    # the official budget says its iterations too: a partial override leaves the other kinds at 20k each
    partial = ReconConfig.from_cfg(_recon_yaml("qdrop") | {"iters": {**qdrop.iters, "block": 500}})
    line = Reconstructor(tiny, tiny, partial, seed=0, progress=False).budget_line
    blocks = kinds.count("block")
    assert line == (f"recon.budget=official: {500 * blocks + 20000 * (len(kinds) - blocks):,} iterations over "
                    f"{len(kinds)} units, recon.iters as set: block 500 x{blocks}, neck 20000, decoder_block 20000 "
                    f"x{kinds.count('decoder_block')}, final_attn 20000")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_the_unit_kinds_a_granularity_reads_are_those_its_chain_makes(tiny, granularity):
    # check_overrides_read refuses recon.iters of the other kinds: the list must be the chain's own
    assert sorted(KINDS_AT[granularity]) == sorted({s.kind for s in build_chain(tiny, granularity) if s.kind})


def test_every_recon_key_is_documented_and_consumed():
    fields = {f.name for f in dataclasses.fields(ReconConfig)}
    nested = {"round_reg": {f.name for f in dataclasses.fields(RoundingRegularizer)},
              "par_loss": {f.name for f in dataclasses.fields(ParLoss)}}
    for name in ("par", "qdrop", "none"):
        keys = _recon_yaml(name)
        assert set(keys) <= fields, name
        ReconConfig.from_cfg(keys)
    par = _recon_yaml("par")
    assert set(par) == fields and all(set(par[k]) == v for k, v in nested.items())  # every knob in the YAML
    text = (REPO / "conf/recon/par.yaml").read_text()
    assert all(re.search(rf"^\s*{k}:.*#", text, re.M) for k in fields), "every knob has a comment"
    sources = "".join(p.read_text() for p in (REPO / "saq/recon").glob("*.py") if p.name != "config.py")
    config_src = (REPO / "saq/recon/config.py").read_text().split("def unit_iters")[1]
    reading = sources + config_src
    # read through the config object itself (cfg.X, self.X inside ReconConfig), par_loss through `par`, round_reg
    # through `reg`: a bare `.weight` or `.alpha` of a layer or quantizer does not count
    readers = {"": r"\b(cfg|self)", "par_loss": r"\bpar", "round_reg": r"\breg"}
    for group, keys in [("", fields), *nested.items()]:
        for key in keys:
            assert re.search(rf"{readers[group]}\.{key}\b", reading), f"recon.{group + '.' if group else ''}{key} unread"


@pytest.mark.parametrize("method, clip, recon, big, agq", [
    ("minmax", "minmax", "none", False, False), ("ptq4sam_s", "minmax", "none", True, True),
    ("saq_sam_star", "pcc", "none", True, True), ("qdrop", "minmax", "qdrop", False, False),
    ("ptq4sam_l", "minmax", "qdrop", True, True), ("saq_sam", "pcc", "par", True, True)])
def test_method_presets_compose_and_stay_overridable(method, clip, recon, big, agq):
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"method={method}", "quant=w4a4"])
        assert (cfg.method, cfg.clip.name, cfg.recon.name, cfg.quant.big, cfg.quant.agq) == (
            method, clip, recon, big, agq)
        assert cfg.quant.w_bits == 4
        ReconConfig.from_cfg(cfg.recon)
        mine = compose("config", overrides=[f"method={method}", "quant=w4a4", "clip=mse", "quant.big=false",
                                            "recon=par", "recon.budget=equal"])
        assert (mine.clip.name, mine.quant.big, mine.recon.name, mine.recon.budget) == ("mse", False, "par", "equal")


def test_recon_config_errors_name_the_key():
    for bad, key in (({"granularity": "pixel"}, "recon.granularity"), ({"iters": {"stages": 3}}, "recon.iters.stages"),
                     ({"drop_prob": 0.0}, "recon.drop_prob"), ({"speed": 1}, "recon.speed"),
                     ({"round_reg": {"weight": -1}}, "recon.round_reg.weight"),
                     ({"round_reg": {"warm_up": 1.0}}, "recon.round_reg.warm_up"),
                     # whole numbers only: 10.0 would reach torch as a float (a slice index, a seed) after calibration
                     ({"log_every": 10.0}, "recon.log_every"), ({"seed": 1.0}, "recon.seed"),
                     ({"max_prompts": 16.0}, "recon.max_prompts"), ({"iters": {"stage": 2.5}}, "recon.iters.stage"),
                     ({"cache_device": "gpu"}, "recon.cache_device")):
        with pytest.raises(SaqError, match=re.escape(key)):
            ReconConfig.from_cfg(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SaqError, match="recon.cache_device=cuda but no CUDA device is available"):
            ReconConfig.from_cfg({"cache_device": "cuda"})
    # numbers come out as the type the loop uses: an integer lr or drop probability is a float
    cfg = ReconConfig.from_cfg({"weight_lr": 1, "drop_prob": 1, "round_reg": {"weight": 1}, "cache_device": "cpu"})
    assert (type(cfg.weight_lr), type(cfg.drop_prob), type(cfg.round_reg.weight)) == (float, float, float)
    # the paper-compatible evaluation of a model learned without dropping would be the full one under its label
    with pytest.raises(SaqError, match=r"recon\.paper_eval_compat=true .* but recon\.drop_prob=1\.0 drops nothing"):
        ReconConfig.from_cfg({"drop_prob": 1.0, "paper_eval_compat": True}).check_run()
    # ... a run's own config only: a saved recipe that says so still parses, so its model stays loadable
    assert ReconConfig.from_cfg({"drop_prob": 1.0, "paper_eval_compat": True}).drop_prob == 1.0
    # PAR's loss knobs with the block MSE: nothing reads them, and the run would be named after them
    for bad, key in (({"par_loss": {"mask_weight": 2000}}, r"recon\.par_loss\.mask_weight=2000\.0"),
                     ({"response_input": "quantized"}, r"recon\.response_input='quantized'")):
        with pytest.raises(SaqError, match=key + " is a knob of PAR's loss, but recon.loss=mse"):
            ReconConfig.from_cfg({"name": "qdrop", "loss": "mse", **bad}).check_run()
        ReconConfig.from_cfg({"name": "par", "loss": "par", **bad}).check_run()  # PAR's loss reads them
    ReconConfig.from_cfg({"name": "qdrop", "loss": "mse", "par_loss": {"alpha": 1.0}}).check_run()  # the default


def test_saq_sam_reconstructs_the_four_stages_of_a_vit_b():
    """method=saq_sam as composed (PCC ranges, BIG, AGQ, PAR) on the real ViT-B architecture (12 blocks, global
    attention at 2/5/8/11, the same decoder), random weights, at a 128-pixel input so that the test takes seconds:
    one small image, two prompts, one iteration per unit."""
    from saq.clipping import PerceptualConsistencyClipping, build_range_strategy

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        # min/max weight ranges: the per-channel MSE search over ViT-B's 86M weights would take minutes
        cfg = compose("config", overrides=["method=saq_sam", "quant=w4a4", "model=sam_vit_b", "recon.best_state=false",
                                           "quant.encoder.weight.observer=minmax", "quant.decoder.weight.observer=minmax"]
                      + [f"recon.iters.{kind}=1" for kind in PAR_OFFICIAL_ITERS])
    arch = dataclasses.replace(ARCHITECTURES["sam_vit_b"], image_size=128)
    torch.manual_seed(0)
    model = make_sam(arch)
    cal = samples(1, size=(64, 64), boxes=2)
    strategy = build_range_strategy(cfg.clip)
    assert isinstance(strategy, PerceptualConsistencyClipping)
    qmodel = quantize(model, cfg.quant)
    calibration = calibrate(qmodel, cal, cfg.quant, strategy, progress=False)
    assert len(calibration.clipping.record()["points"]) == 28  # PCC searched every decoder q/k point
    from saq.quant.quantizers import Log2AGQQuantizer
    assert len(calibration.big) == 3  # BIG looked at the keys of the three token->image attentions
    assert sum(isinstance(q, Log2AGQQuantizer) for q in qmodel.modules()) == 12 + 7  # AGQ after every softmax
    report = reconstruct(qmodel, model, cal, OmegaConf.to_container(cfg.recon, resolve=True), seed=0, progress=False)
    assert [u.name for u in report.units][:5] == [f"encoder.stage{k}" for k in range(4)] + ["encoder.neck"]
    assert len(report.units) == 8 and report.as_dict()["method"] == "par"
    assert [(u.iters, u.kept) for u in report.units] == [(1, "learned")] * 8  # every unit learned
    assert_fully_quantized(qmodel)


def test_pipeline_records_the_method_and_the_evaluation_mode(synthetic_root, tmp_path, monkeypatch):
    from saq import pipeline

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[
            "method=ptq4sam_l", "quant=w6a6", f"task.data.root={synthetic_root}", "task.generate=null",
            "task.max_images=2", "quant.calib_images=2", "fp_cache=false", "logger=none", "progress=false",
            "recon.iters.block=1", "recon.iters.neck=1", "recon.iters.decoder_block=1", "recon.iters.final_attn=1",
            "recon.best_state=false"])
    import saq.recon
    import saq.recon.loop
    import saq.saved

    models = {}
    save_run, load_run = saq.saved.save_run, saq.saved.load_run

    def keep_saved(qmodel, *args):
        models["saved"] = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
        return save_run(qmodel, *args)

    def keep_loaded(*args):
        qmodel, recon = load_run(*args)
        models["loaded"] = qmodel.state_dict()
        return qmodel, recon

    def state(qmodel):
        return {k: v.detach().clone() for k, v in qmodel.state_dict().items()}

    reconstruct_run = saq.recon.reconstruct

    def keep_learned(qmodel, *args, **kwargs):
        models["calibrated"] = state(qmodel)
        report = reconstruct_run(qmodel, *args, **kwargs)
        models["learned"] = state(qmodel)
        return report

    monkeypatch.setattr(saq.saved, "save_run", keep_saved)
    monkeypatch.setattr(saq.saved, "load_run", keep_loaded)
    monkeypatch.setattr(saq.recon, "reconstruct", keep_learned)
    state_dir = tmp_path / cfg.recon.state_dir
    saved_units = []
    save_units = saq.recon.loop.Reconstructor._save
    monkeypatch.setattr(saq.recon.loop.Reconstructor, "_save",
                        lambda self, *a: (save_units(self, *a), saved_units.append(self.checkpoint)))
    record = pipeline.run(cfg, tmp_path / "run")
    # each unit was saved for recon.resume, and the finished run removed the file (a whole model per run)
    assert len(saved_units) == 22 and (tmp_path / saved_units[0]).parent == state_dir and not list(state_dir.glob("*"))
    assert record["method"] == "ptq4sam_l" and record["recon"]["method"] == "qdrop"
    assert record["recon"]["eval_mode"] == EVAL_FULL and len(record["recon"]["units"]) == 22
    saved = json.loads(Path(tmp_path / "run" / "results.json").read_text())
    assert saved["recon"]["eval_mode"] == EVAL_FULL and 0.0 <= saved["metrics"]["quantized"]["mask_AP"] <= 1.0
    assert (tmp_path / "run" / "recon_units.png").is_file()  # every unit's loss curve, beside results.json
    # the saved model holds what reconstruction learned (not the calibrated model it started from) ...
    learned_keys = [k for k in models["calibrated"] if not torch.equal(models["calibrated"][k], models["learned"][k])]
    assert any(k.endswith(".weight") for k in learned_keys) and any(k.endswith(".scale") for k in learned_keys)
    assert [k for k in models["learned"] if not torch.equal(models["learned"][k], models["saved"][k])] == []
    # ... and loading it reproduces the metrics, reconstructing nothing
    monkeypatch.setattr("saq.recon.reconstruct", lambda *a, **k: pytest.fail("quant.load must not reconstruct"))
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        load = compose("config", overrides=[
            "method=ptq4sam_l", "quant=w6a6", f"task.data.root={synthetic_root}", "task.generate=null",
            "task.max_images=2", "fp_cache=false", "logger=none", "progress=false", f"quant.load={tmp_path / 'run'}"])
    loaded = pipeline.run(load, tmp_path / "loaded")
    assert loaded["metrics"]["quantized"] == record["metrics"]["quantized"]
    assert loaded["recon"] == {"method": "qdrop", "eval_mode": EVAL_FULL, "loaded_from": str(tmp_path / "run")}
    # tensor for tensor, not only metrics (a few iterations leave the rounding close to nearest)
    assert models["saved"].keys() == models["loaded"].keys()
    assert [k for k in models["saved"] if not torch.equal(models["saved"][k], models["loaded"][k])] == []


def test_the_fp_scorer_beside_a_paper_compat_model_leaves_its_masks_as_they_were(tiny):
    # sensitivity's iou_scores row: the quantized masks must be the fully quantized row's, dropping draws included
    from saq.sam.segmenter import ScoreSwapSegmenter, Segmenter
    from saq.sensitivity import quiet_fp

    cal = samples(1)
    qmodel = calibrated(tiny, cal, {"name": "w8a8", "w_bits": 8, "a_bits": 8}, fast_weights=True)
    for layer in qmodel.modules():
        if isinstance(layer, QuantLayer):
            layer.input_quantizer.drop_prob = 0.5  # the paper-compatible evaluation
    scorer = quiet_fp(copy.deepcopy(qmodel))
    assert all(q.drop_prob == 1.0 and q.state == QuantState.OFF for q in iter_quantizers(scorer))
    outputs = []
    for segmenter in (Segmenter(qmodel), ScoreSwapSegmenter(qmodel, scorer)):
        torch.manual_seed(0)
        segmenter.set_image(cal[0].image)
        outputs.append(segmenter.predict(boxes=cal[0].boxes).low_res_logits)
    assert torch.equal(outputs[0], outputs[1])
