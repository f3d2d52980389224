"""BIG: KDE peak counting, and a planted bimodal key channel detected and folded with the model's outputs unchanged."""

import math

import numpy as np
import pytest
import torch

from saq.quant import apply_big, quantize
from saq.quant.big import count_modes, gaussian_kde
from saq.sam.build import build_random_sam
from saq.sam.segmenter import PromptedImage, Segmenter

torch.set_num_threads(1)

FINAL_T2I = "mask_decoder.transformer.final_attn_token_to_image"


def test_gaussian_kde_uses_scotts_bandwidth():
    samples = torch.tensor([0.0, 1.0])
    bandwidth = math.sqrt(0.5) * 2 ** (-1 / 5)  # std (ddof 1) · n^(-1/5)
    expected = math.exp(-0.5 * (0.5 / bandwidth) ** 2) / (bandwidth * math.sqrt(2 * math.pi))
    assert math.isclose(float(gaussian_kde(samples, torch.tensor([0.5]))[0]), expected, rel_tol=1e-9)


def test_count_modes_on_known_mixtures():
    gen = torch.Generator().manual_seed(0)
    unimodal = torch.randn(20_000, generator=gen)
    bimodal = torch.cat([torch.randn(10_000, generator=gen) * 0.5 - 4, torch.randn(10_000, generator=gen) * 0.5 + 4])
    assert count_modes(unimodal) == 1
    assert count_modes(bimodal) == 2


@pytest.fixture(scope="module")
def planted():
    """sam_tiny whose final token→image key projection is offset by +4 on even and -4 on odd channels."""
    sam = build_random_sam("sam_tiny", 0)
    attn = sam.mask_decoder.transformer.final_attn_token_to_image
    channels = attn.k_proj.out_features
    with torch.no_grad():
        attn.k_proj.bias.copy_(torch.where(torch.arange(channels) % 2 == 0, 4.0, -4.0))
    rng = np.random.default_rng(0)
    sample = PromptedImage(rng.integers(0, 256, (180, 256, 3), dtype=np.uint8),
                           boxes=np.array([[10, 20, 120, 150], [60, 40, 250, 170]], np.float32))
    return sam, sample


def _keys(model, sample):
    out = []
    handle = model.mask_decoder.transformer.final_attn_token_to_image.k_proj.register_forward_hook(
        lambda m, i, o: out.append(o.detach().clone()))
    prediction = Segmenter(model).run(sample)
    handle.remove()
    return prediction, torch.cat(out)


def test_big_folds_a_planted_bimodal_channel_and_keeps_outputs(planted):
    sam, sample = planted
    fp_state = {k: v.clone() for k, v in sam.state_dict().items()}
    qmodel = quantize(sam, {"w_bits": 8, "a_bits": 8})
    before, keys_before = _keys(qmodel, sample)
    assert count_modes(keys_before[0]) == 2
    results = {r.name: r for r in apply_big(qmodel, lambda: Segmenter(qmodel).run(sample))}
    assert set(results) == {FINAL_T2I, "mask_decoder.transformer.layers.0.cross_attn_token_to_image",
                            "mask_decoder.transformer.layers.1.cross_attn_token_to_image"}
    final = results[FINAL_T2I]
    odd = list(range(1, keys_before.shape[-1], 2))
    assert final.bimodal and final.flipped == odd
    after, keys_after = _keys(qmodel, sample)
    # exact in FP: q·kᵀ is unchanged when q_j and k_j flip together
    assert torch.allclose(after.low_res_logits, before.low_res_logits, atol=1e-5)
    assert torch.allclose(after.iou_scores, before.iou_scores, atol=1e-5)
    assert torch.equal(keys_after[..., odd], -keys_before[..., odd])
    assert count_modes(keys_after[0]) == 1  # the key distribution is now unimodal
    attn = qmodel.mask_decoder.transformer.final_attn_token_to_image
    fp_attn = sam.mask_decoder.transformer.final_attn_token_to_image
    assert torch.equal(attn.q_proj.weight[odd], -fp_attn.q_proj.weight[odd])
    assert torch.equal(attn.q_proj.weight[0::2], fp_attn.q_proj.weight[0::2])
    # only the quantized copy changed
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in fp_state.items())


def test_big_leaves_unimodal_keys_alone(planted):
    _, sample = planted
    qmodel = quantize(build_random_sam("sam_tiny", 1), {"w_bits": 8, "a_bits": 8})
    weights = {k: v.clone() for k, v in qmodel.state_dict().items()}
    results = apply_big(qmodel, lambda: Segmenter(qmodel).run(sample))
    assert len(results) == 3 and not any(r.bimodal or r.flipped for r in results)
    assert all(torch.equal(v, qmodel.state_dict()[k]) for k, v in weights.items())


def test_kde_matches_scipy():
    from scipy import stats

    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(3000, generator=gen) - 3, torch.randn(1000, generator=gen) * 0.5 + 2])
    points = torch.linspace(float(values.min()), float(values.max()), 128)
    ours = gaussian_kde(values, points).numpy()
    theirs = stats.gaussian_kde(values.double().numpy())(points.double().numpy())
    assert np.allclose(ours, theirs, rtol=1e-6)
