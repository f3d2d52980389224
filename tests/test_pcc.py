"""Perceptual-Consistency Clipping: the focus metric, the search on planted outliers, the outlier testbed, errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from segment_anything.modeling.transformer import Attention

from saq.clipping import MSEClipping, PerceptualConsistencyClipping, build_range_strategy
from saq.clipping.pcc import focus_iou, focus_mask, pcc_distance
from saq.errors import SaqError
from saq.quant import QuantConfig, QuantizerFactory, QuantState, calibrate, iter_quantizers, quantize
from saq.quant.grid import qparams_from_range
from saq.sam.attention import AttentionProbe, QuantDecoderAttention, decoder_attention_probes, decoder_attentions
from saq.sam.build import build_random_sam, build_sam
from saq.sam.outliers import OutlierSpec, plant_key_outliers
from saq.sam.segmenter import PromptedImage, Segmenter
from tests.conftest import random_vit_b
from tests.test_cli import saq

torch.set_num_threads(1)


def test_focus_mask_and_distance_by_hand():
    # one prompt, one head, two query rows over four keys
    a = torch.tensor([[[[0.1, 0.5, 0.3, 0.1], [0.4, 0.4, 0.1, 0.1]]]])
    b = torch.tensor([[[[0.5, 0.1, 0.3, 0.1], [0.4, 0.1, 0.4, 0.1]]]])
    # theta 0.5, row max: a's masks {1, 2} and {0, 1}; b's {0, 2} and {0, 2}
    assert focus_mask(a, 0.5).int().tolist() == [[[[0, 1, 1, 0], [1, 1, 0, 0]]]]
    # intersection: {2} and {0} = 2 entries; union: {0, 1, 2} and {0, 1, 2} = 6 entries
    assert float(focus_iou(a, b, 0.5)) == pytest.approx(2 / 6, abs=1e-6)
    assert pcc_distance([a], [b], 0.5) == pytest.approx(1 - 2 / 6, abs=1e-6)
    assert pcc_distance([a], [a.clone()], 0.5) == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.tensor([[[[0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.5, 0.5]]]])
    assert pcc_distance([a], [disjoint], 0.5) == pytest.approx(1.0, abs=1e-6)
    # the map-wide max: a's peak 0.5 gives the mask {0.5, 0.3, 0.4, 0.4} >= 0.25 ... strictly greater
    assert focus_mask(a, 0.5, "map").int().tolist() == [[[[0, 1, 1, 0], [1, 1, 0, 0]]]]
    assert focus_mask(a, 0.7, "map").int().tolist() == [[[[0, 1, 0, 0], [1, 1, 0, 0]]]]


def _planted_attention(seed=0):
    """A 64-dim, 4-head decoder attention whose key channel 5 carries a constant offset 150x the bulk."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    attn = Attention(64, 4)
    with torch.no_grad():
        attn.k_proj.bias[5] += 150.0 * 3.0
    quant = QuantDecoderAttention.from_float(attn, QuantizerFactory(QuantConfig.from_cfg({"name": "w6a6", "w_bits": 6,
                                                                                         "a_bits": 6})))
    for name, module in quant.named_modules():
        if hasattr(module, "set_state"):
            module.name = name
    q = torch.randn(3, 7, 64, generator=gen)
    k = torch.randn(3, 200, 64, generator=gen)
    return attn, quant, q, k


def test_pcc_clips_planted_key_outliers_far_tighter_than_mse_and_keeps_the_focus():
    attn, quant, q, k = _planted_attention()
    probe = AttentionProbe("toy", quant)
    pcc = PerceptualConsistencyClipping(sweeps=1)
    report = pcc.search([probe], [lambda: quant(q=q, k=k, v=k)], progress=False)
    k_out = next(p for p in report.points if p.point == "k_out")
    assert k_out.fp_max > 400  # the planted channel
    assert k_out.mse_hi > 0.9 * k_out.fp_max  # MSE keeps the outliers
    assert k_out.pcc_hi < 0.05 * k_out.fp_max and k_out.clip_ratio > 20  # PCC clips them hard
    assert k_out.dist_pcc < k_out.dist_mse - 0.2
    # the chosen ranges are in force: the focus of the quantized map is close to FP's
    fp_map = attn.q_proj(q).reshape(3, 7, 4, 16).transpose(1, 2) @ attn.k_proj(k).reshape(3, 200, 4, 16).permute(0, 2, 3, 1)
    fp_map = torch.softmax(fp_map / 4.0, -1)
    with torch.no_grad():
        assert pcc_distance([fp_map], [quant.attention_probs(q, k)], 0.5) == pytest.approx(report.points[-1].dist_pcc)
    assert all(point.state is QuantState.QUANT for point in probe.points.values())


def test_search_uses_its_first_images_and_runs_every_sweep():
    _, quant, q, k = _planted_attention()
    calls = {"first": 0}

    def first():
        calls["first"] += 1
        quant(q=q, k=k, v=k)

    def second():
        raise AssertionError("clip.images=1 searches on the first calibration image only")

    counts, reports = [], []
    for sweeps in (1, 2):
        calls["first"] = 0
        pcc = PerceptualConsistencyClipping(sweeps=sweeps, images=1)
        reports.append(pcc.search([AttentionProbe("toy", quant)], [first, second], progress=False))
        counts.append(calls["first"])
        for point in quant.modules():  # the next search starts from FP again
            if hasattr(point, "set_state"):
                point.set_state("off")
    assert counts[1] == counts[0] + 1  # one more recording of the attention's inputs: the second sweep ran
    # the distance curve over the candidates is kept from the last sweep, one value per candidate
    assert all(len(point.curve) == len(reports[1].candidates) for point in reports[1].points)
    # in the second sweep each point is searched with the others already at their PCC ranges
    assert [p.dist_pcc for p in reports[1].points] != [p.dist_pcc for p in reports[0].points]


@pytest.fixture(scope="module")
def tiny():
    return build_random_sam("sam_tiny", seed=0)


def _sample(seed=0, size=(200, 240)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    boxes = np.array([[20, 30, 120, 150], [5, 5, 230, 190], [100, 40, 200, 100]], np.float32)
    return PromptedImage(image, boxes=boxes)


def test_search_touches_only_its_points_and_calibration_keeps_their_ranges(tiny):
    # min/max weight ranges: only activation ranges are looked at here, and an MSE weight search takes seconds
    minmax_weights = {"weight": {"observer": "minmax"}}
    w4a4 = {"name": "w4a4", "w_bits": 4, "a_bits": 4, "encoder": minmax_weights, "decoder": minmax_weights}
    qmodel = quantize(tiny, w4a4)
    pcc = build_range_strategy({"name": "pcc", "attentions": ["layers.0.cross_attn_token_to_image",
                                                              "final_attn_token_to_image"], "sweeps": 1})
    searched = {id(q) for p in decoder_attention_probes(qmodel) if p.name in pcc.attentions
                for q in p.points.values()}
    assert len(searched) == 8
    sample = _sample()
    segmenter = Segmenter(qmodel)
    segmenter.set_image(sample.image)
    report = pcc.search(decoder_attention_probes(qmodel), [lambda: segmenter.predict(sample.boxes)],
                        progress=False)
    for quantizer in iter_quantizers(qmodel):
        if id(quantizer) in searched:
            assert quantizer.state is QuantState.QUANT
        else:
            assert quantizer.state is QuantState.OFF and not bool(quantizer.calibrated), quantizer.name
    # through calibrate(): the searched ranges survive the general activation calibration unchanged
    qmodel = quantize(tiny, w4a4)
    result = calibrate(qmodel, [sample, _sample(1)], None, {"name": "pcc", "attentions": pcc.attentions,
                                                             "sweeps": 1}, progress=False)
    report = result.clipping
    assert {p.name for p in report.points} == {q.name for q in report.frozen} and len(report.points) == 8
    for point, quantizer in zip(report.points, report.frozen):
        assert point.name == quantizer.name
        scale, zero_point = qparams_from_range(point.pcc_lo, point.pcc_hi, quantizer.grid)
        assert torch.equal(quantizer.scale.detach(), scale) and torch.equal(quantizer.zero_point, zero_point)
        # the quant summary names the search, with the percentile it chose, as what set this range
        assert quantizer.observer.name == f"pcc(theta=0.5,pct={point.percentile:g})"
    # every other activation got its range from MSE (SAQ-SAM*'s observer), and says so in the quant summary
    others = [q for q in iter_quantizers(qmodel, "act") if q.name not in {p.name for p in report.points}
              and hasattr(q, "grid")]
    assert others and all(q.observer.strategy.name == "pcc" and isinstance(q.observer.strategy.others, MSEClipping)
                          for q in others)
    assert {q.observer.name for q in others} == {"avg_mse(p=2.4)"}


def test_outlier_model_is_exact_in_fp_and_carries_the_planted_magnitude():
    base = build_sam("sam_tiny")
    planted_model = build_sam("sam_tiny_outliers")
    samples = [_sample(0, (256, 256)), _sample(1, (256, 256))]
    planted = plant_key_outliers(planted_model, samples[:1], OutlierSpec())
    assert len(planted) == 7 and [p["offset"] > 0 for p in planted] == [True, False] * 3 + [True]
    for sample in samples:
        fp, out = Segmenter(base).run(sample), Segmenter(planted_model).run(sample)
        assert torch.equal(fp.masks, out.masks)
        assert torch.allclose(fp.iou_scores, out.iou_scores, atol=1e-5)
    # the keys carry the planted offset: max|k| / p99|k| of the planting image is about the magnitude
    keys: dict[str, torch.Tensor] = {}
    attentions = decoder_attentions(planted_model)
    handles = [attentions[p["attention"]].k_proj.register_forward_hook(
        lambda _m, _i, out, name=p["attention"]: keys.setdefault(name, out.detach())) for p in planted]
    Segmenter(planted_model).run(samples[0])
    for handle in handles:
        handle.remove()
    for p in planted:
        k = keys[p["attention"]]
        assert float(k[..., p["channels"]].abs().min()) > 100 * p["p99"]
        assert float(k.abs().max()) == pytest.approx(abs(p["offset"]), rel=0.05)
        # measured here, not taken from the planter: the largest key over the p99 of the channels without outliers
        bulk = k[..., [c for c in range(k.shape[-1]) if c not in p["channels"]]].abs().flatten()
        ratio = float(k.abs().max()) / float(torch.quantile(bulk.double(), 0.99))
        assert 135 < ratio < 165, (p["attention"], ratio)
    assert 0.0 < len(planted[0]["channels"]) / attentions["layers.0.self_attn"].internal_dim <= 0.02


def test_a_magnitude_whose_rounding_changes_fp_masks_is_refused():
    # the offsets cancel in softmax only up to float rounding: far beyond the paper's ~150x, boundary pixels flip
    with pytest.raises(SaqError, match=r"model.outliers.magnitude=100000 moves the FP model's mask logits by up to "
                                       r"0\.0\d+ on the planting images"):
        plant_key_outliers(build_sam("sam_tiny_outliers"), [_sample(0, (256, 256))], OutlierSpec(magnitude=1e5))


def test_replayed_offsets_equal_planting_and_a_malformed_record_is_one_line():
    from saq.sam.outliers import add_key_offsets

    planted_model, replayed = build_sam("sam_tiny_outliers"), build_sam("sam_tiny_outliers")
    planted = plant_key_outliers(planted_model, [_sample(0, (256, 256))], OutlierSpec())
    add_key_offsets(replayed, json.loads(json.dumps(planted)))  # as a saved recipe gives them back
    assert all(torch.equal(a, b) for a, b in zip(planted_model.state_dict().values(), replayed.state_dict().values()))
    for bad in ({"attention": "layers.0.self_attn", "channels": [1]}, {"attention": "layers.0.self_attn",
                                                                       "channels": "1", "offset": 2.0}):
        with pytest.raises(SaqError, match=r"planted outlier record .* is malformed; expected \{attention, channels"):
            add_key_offsets(replayed, [bad])
    with pytest.raises(SaqError, match=r"planted outliers name 'nowhere', which is not a decoder attention"):
        add_key_offsets(replayed, [{"attention": "nowhere", "channels": [1], "offset": 2.0}])


def test_outliers_are_planted_in_listed_attentions_in_forward_order():
    # signs alternate and heads are drawn in the listed order: another order of the same set would plant other
    # outliers under an equal-looking config, so only the forward order is taken
    samples = [_sample(0, (256, 256))]
    listed = ["layers.0.self_attn", "final_attn_token_to_image"]
    planted = plant_key_outliers(build_sam("sam_tiny_outliers"), samples, OutlierSpec.from_cfg({"attentions": listed}))
    assert [r["attention"] for r in planted] == listed and [r["offset"] > 0 for r in planted] == [True, False]
    with pytest.raises(SaqError, match=re.escape(f"model.outliers.attentions must list the attentions in forward "
                                                 f"order: {listed}")):
        plant_key_outliers(build_sam("sam_tiny_outliers"), samples, OutlierSpec.from_cfg({"attentions": listed[::-1]}))


@pytest.mark.parametrize("attentions", [[], ["layers.0.self_attn", "layers.0.self_attn"], "layers.0.self_attn"])
def test_an_outlier_attention_list_that_plants_nothing_or_twice_is_refused(attentions):
    # an empty list would label an unchanged sam_tiny as the outlier model; a repeat plants two offsets in one key
    with pytest.raises(SaqError, match=r"model\.outliers\.attentions=.* invalid; expected all or a non-empty list of "
                                       "distinct decoder attention names"):
        OutlierSpec.from_cfg({"attentions": attentions})
    assert OutlierSpec.from_cfg({"attentions": ["layers.0.self_attn"]}).attentions == ("layers.0.self_attn",)


@pytest.mark.parametrize("value", [3, "strong", None])
def test_outlier_settings_given_as_one_value_are_refused(value):
    # a string was read letter by letter ('model.outliers.g is not a known key'), a number was a TypeError
    with pytest.raises(SaqError, match=r"^model\.outliers=.* invalid; expected a mapping of \['attentions', .*\]; set "
                                       r"one knob as model\.outliers\.magnitude=\.\.\.$"):
        OutlierSpec.from_cfg(value)


def test_pcc_runs_on_sam_vit_b_shapes():
    vit_b = random_vit_b()  # ViT-B's decoder (8 heads of 256 wide, 7 attentions) at a 256-px input: a 16x16 grid
    qmodel = quantize(vit_b, {"name": "w4a4", "w_bits": 4, "a_bits": 4})
    sample = PromptedImage(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8),
                           boxes=np.array([[4, 4, 40, 50], [10, 20, 60, 60]], np.float32))
    segmenter = Segmenter(qmodel)
    segmenter.set_image(sample.image)
    pcc = PerceptualConsistencyClipping(sweeps=1, candidates=[0.9, 0.99, 0.999])
    report = pcc.search(decoder_attention_probes(qmodel), [lambda: segmenter.predict(sample.boxes)], progress=False)
    assert len(report.points) == 28 and len(report.frozen) == 28
    assert all(p.pcc_lo <= p.pcc_hi and p.percentile in (0.9, 0.99, 0.999) for p in report.points)
    grid = vit_b.prompt_encoder.image_embedding_size
    assert grid == (16, 16)  # the image token grid this ViT-B's decoder attends over (64 x 64 at 1024 px)
    assert report.heatmaps is not None and np.asarray(report.heatmaps["fp"]).shape == grid


@pytest.mark.parametrize("cfg,message", [
    ({"theta": 1.5}, "clip.theta=1.5 invalid; expected a number in (0, 1) (paper: 0.5)"),
    ({"theta": 0}, "clip.theta=0 invalid"),
    ({"candidates": []}, "clip.candidates=[] invalid"),
    ({"points": ["q_in", "v_in"]}, "clip.points=['q_in', 'v_in'] invalid"),
    ({"others": "pcc"}, "clip.others='pcc' is unknown"),
    # values of the wrong kind are named as such, not reported as a bad key
    ({"candidates": 0.9}, "clip.candidates=0.9 invalid; expected a non-empty list of percentiles"),
    ({"points": 3}, "clip.points=3 invalid"),
    ({"theta": "0.5"}, "clip.theta='0.5' invalid"),
    ({"sweeps": 1.5}, "clip.sweeps=1.5 invalid; expected an integer >= 1"),
    # was "has a bad key: 'int' object is not iterable"
    ({"attentions": 3}, "clip.attentions=3 invalid; expected 'all' or a list of decoder attention names"),
    ({"attentions": None}, "clip.attentions=None invalid"),
    ({"attentions": [3]}, "clip.attentions=[3] invalid"),
    # a key the strategy does not take is named with those it does (was Python's TypeError text)
    ({"p": 2}, "clip.p is not a setting of PerceptualConsistencyClipping; it takes reduction, theta, "),
])
def test_bad_pcc_settings_are_named(cfg, message):
    with pytest.raises(SaqError) as err:
        build_range_strategy({"name": "pcc", **cfg})
    assert str(err.value).startswith(message)


def test_bad_pcc_values_fail_in_one_line_before_any_compute(tmp_path):
    proc = saq("quant=w6a6", "clip=pcc", "clip.theta=1.5", "task.data.root=/nonexistent", "task.generate=null",
               "logger=none", f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.stderr.strip().splitlines() == ["error: clip.theta=1.5 invalid; expected a number in (0, 1) "
                                                "(paper: 0.5)"], proc.stderr
    proc = saq("quant=w6a6", "clip=pcc", "clip.attentions=[layers.0.nope]", "task.data.root=/nonexistent",
               "task.generate=null", "logger=none", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: clip.attentions names 'layers.0.nope', which is not a decoder "
                                               "attention"), proc.stderr


def test_pcc_figures_are_written_as_png(tmp_path):
    from saq.plots import clipping_figures

    _, quant, q, k = _planted_attention()
    report = PerceptualConsistencyClipping(sweeps=1).search([AttentionProbe("toy", quant)],
                                                            [lambda: quant(q=q, k=k, v=k)], progress=False)
    report.heatmaps = {"attention": "toy", "prompt": 0, "fp": np.eye(4).tolist(), "mse": np.zeros((4, 4)).tolist(),
                       "pcc": np.eye(4).tolist()}
    paths = clipping_figures(report, tmp_path)
    assert [p.name for p in paths] == ["pcc_clip_ranges.png", "pcc_distance_curves.png", "pcc_attention_heatmaps.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_a_pcc_run_records_its_search_and_draws_it(synthetic_root, tmp_path):
    import json

    from saq import pipeline
    from tests.test_saved import run_config

    cfg = run_config(synthetic_root, "quant=w6a6", "clip=pcc", "clip.candidates=[0.9,0.99]", "task.max_images=1")
    record = pipeline.run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    points = saved["clipping"]["points"]
    assert len(points) == 28  # sam_tiny's 7 decoder attentions x q_in, k_in, q_out, k_out
    assert all(p["percentile"] in (0.9, 0.99) and len(p["curve"]) == 2 for p in points)
    assert saved["clipping"]["settings"]["sweeps"] == 2  # the default: each point searched again after the others
    assert record["metrics"]["quantized"]["mask_AP"] > 0
    for name in ("pcc_clip_ranges.png", "pcc_distance_curves.png", "pcc_attention_heatmaps.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_pcc_keeps_the_outlier_model_that_statistics_lose(synthetic_root, tmp_path):
    # the claim the outlier testbed exists for, on the real model: a min/max key range set by the planted outlier
    # leaves the bulk of the keys one 6-bit code; PCC's ranges keep the decoder close to FP
    from saq import pipeline
    from tests.test_saved import run_config

    runs = {clip: pipeline.run(run_config(synthetic_root, "model=sam_tiny_outliers", "quant=w6a6", f"clip={clip}",
                                          "task.max_images=2", *extra), tmp_path / clip)["metrics"]
            for clip, extra in (("minmax", ()), ("pcc", ("clip.candidates=[0.9,0.99]", "clip.sweeps=1")))}
    fp = runs["pcc"]["fp"]["mIoU"]
    assert runs["minmax"]["fp"]["mIoU"] == fp
    assert runs["pcc"]["quantized"]["mIoU"] > fp - 0.08  # measured: 0.795 against FP 0.831 (min/max: 0.007)
    assert runs["minmax"]["quantized"]["mIoU"] < runs["pcc"]["quantized"]["mIoU"] - 0.3


def test_pcc_figures_draw_what_they_say(tmp_path, monkeypatch):
    """Read back what the figures drew: empty histogram bins are not drawn (on a log axis they would look like a
    count of one, hiding a lone outlier), distance curves run left to right whatever the candidates' order."""
    from types import SimpleNamespace

    import saq.plots

    drawn = {}
    monkeypatch.setattr(saq.plots, "save_figure", lambda fig, path, **kw: drawn.setdefault(path.name, fig) and path)
    point = SimpleNamespace(histogram=([0, 5, 0, 0, 1], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), fp_min=0.0, fp_max=5.0,
                            mse_lo=0.0, mse_hi=3.0, pcc_lo=0.0, pcc_hi=4.5, attention="layers.0.cross_attn",
                            point="k_out", clip_ratio=1.1, curve=[0.3, 0.1, 0.2], percentile=0.97, dist_pcc=0.1)
    report = SimpleNamespace(points=[point], candidates=[0.98, 0.95, 0.97], heatmaps=None)
    saq.plots.clipping_figures(report, tmp_path)
    histogram = drawn["pcc_clip_ranges.png"].axes[0]
    assert [bar.get_height() for bar in histogram.patches] == [5, 1]
    assert histogram.get_yscale() == "log" and histogram.get_ylabel() == "count (log)"
    curves = drawn["pcc_distance_curves.png"].axes[0]
    x, y = curves.lines[0].get_data()
    assert bool((np.diff(x) > 0).all()) and list(y) == [0.1, 0.2, 0.3]  # at 0.95, 0.97, 0.98
    assert len(curves.get_xticks()) == 3
