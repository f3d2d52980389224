"""AGQ: the post-softmax log2 quantizer picks τ and scale that minimise the error of (Â - A)·V."""

import math

import numpy as np
import pytest
import torch

from saq.quant import Log2AGQQuantizer, QuantMatMul, QuantState, UniformQuantizer, make_observer
from saq.quant.grid import log2_fake_quant
from saq.quant.observers import AGQObserver, agq_search_bounds

torch.set_num_threads(1)


def reference_log2_quant(a: np.ndarray, s: float, tau: float, bits: int) -> np.ndarray:
    """PTQ4SAM's log2 quantizer written out independently in float64: code = round(-τ·log2(a/s)); codes >= 2^b
    flush to 0, the others clamp to [0, 2^b - 1]; â = s·2^(-code/τ)."""
    code = np.round(-tau * np.log2(np.maximum(a, 1e-300) / s))
    a_hat = s * np.exp2(-np.clip(code, 0, 2**bits - 1) / tau)
    a_hat[code >= 2**bits] = 0.0
    return a_hat


def reference_error(a: np.ndarray, v: np.ndarray, s: float, tau: float, bits: int, p: float = 2.4) -> float:
    return float(np.mean(np.abs(reference_log2_quant(a, s, tau, bits) @ v - a @ v) ** p))


def dense_search_error(a: np.ndarray, v: np.ndarray, bits: int, points: int) -> float:
    """The least reference error over τ in {1, 2, 4} and `points` log-spaced scales in the spec's interval."""
    lower, upper = min(0.1, 0.01 * float(a.max())), float(a.max())
    return min(reference_error(a, v, s, tau, bits) for tau in (1, 2, 4)
               for s in np.logspace(np.log10(lower), np.log10(upper), points))


def decoder_like_maps(groups: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups, 8, 7, 4096) softmax maps, a SAM-B token->image attention: rows of mixed temperatures, or a few sharp
    rows among flat ones (the case a few evenly spaced sample rows miss), and V of (groups, 8, 4096, 16)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(groups, 8, 7, 4096, generator=gen, dtype=torch.float64)
    if kind == "mixed":
        temperature = torch.exp(torch.rand(groups, 8, 7, 1, generator=gen, dtype=torch.float64) * math.log(40))
    else:
        temperature = torch.ones(groups, 8, 7, 1, dtype=torch.float64)
        temperature.view(-1)[[5, 23, 41]] = 60.0
    return torch.softmax(logits * temperature, -1), torch.randn(groups, 8, 4096, 16, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["mixed", "sharp"])
@pytest.mark.parametrize("bits", [4, 6])
def test_agq_on_a_full_size_decoder_map_is_within_5_percent_of_a_dense_search(kind, bits):
    a, v = decoder_like_maps(1, kind)
    observer = AGQObserver()
    observer.observe(a.float(), v.float(), bits)
    tau, scale = observer.choose()
    a_np, v_np = a.numpy(), v.numpy()
    assert reference_error(a_np, v_np, scale, tau, bits) <= 1.05 * dense_search_error(a_np, v_np, bits, 120)


@pytest.mark.parametrize("bits", [4, 6])
def test_agq_on_a_map_too_large_to_score_whole_keeps_its_sharp_rows(bits):
    # 4 prompts' maps (917,504 values) exceed max_elements: scored on the sharpest rows plus a random sample, with
    # the search interval from the whole map
    a, v = decoder_like_maps(4, "sharp", seed=1)
    observer = AGQObserver()
    assert a.numel() > observer.max_elements
    scored, _, weights = observer.rows(a.float(), v.float())
    sharp_row_max = a.reshape(-1, 4096).amax(1).topk(12).values.min()
    assert int((scored.amax(-1).flatten() >= sharp_row_max.float()).sum()) == 12  # all 12 sharp rows are scored
    assert math.isclose(float(weights.sum()), 4 * 8 * 7, rel_tol=1e-6)  # weights stand for every row
    observer.observe(a.float(), v.float(), bits)
    tau, scale = observer.choose()
    a_np, v_np = a.numpy(), v.numpy()
    assert reference_error(a_np, v_np, scale, tau, bits) <= 1.05 * dense_search_error(a_np, v_np, bits, 60)


def _error(a, v, scale, tau, bits, p=2.4):
    a_hat = log2_fake_quant(a, torch.tensor(scale), tau, bits, ste=False)
    return float((a_hat @ v - a @ v).abs().pow(p).mean())


def test_agq_recovers_known_half_power_values():
    # every entry is 2^(-k/2), k = 0..7: exactly representable with τ = 2, s = 1 and 3 bits, not with τ = 1 (odd k)
    # nor with τ = 4 (codes 2k > 7 for k >= 4), so the stated error is zero only for (τ, s) = (2, 1)
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, 8, (2, 4, 9, 16), generator=gen)
    a = 2.0 ** (-k.float() / 2)
    a[..., 0] = 1.0  # max A = 1, so s = 1 lies in the search interval
    v = torch.randn(2, 4, 16, 8, generator=gen)
    observer = AGQObserver(taus=(1, 2, 4))
    observer.observe(a, v, bits=3)
    tau, scale = observer.choose()
    assert tau == 2 and math.isclose(scale, 1.0, rel_tol=1e-6)
    assert _error(a, v, scale, tau, 3) < 1e-12
    assert min(observer.error_sum[1], observer.error_sum[4]) > 1e-6


def test_agq_choice_minimises_the_error_among_candidates():
    gen = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(3, 4, 20, 50, generator=gen) * 3, dim=-1)
    v = torch.randn(3, 4, 50, 16, generator=gen)
    bits = 4
    observer = AGQObserver(taus=(1, 2, 4))
    per_tau = observer.batch_best(a, v, bits)
    observer.observe(a, v, bits)
    tau, scale = observer.choose()
    # the chosen τ is the one whose best error is smallest, with that τ's scale
    assert tau == min(per_tau, key=lambda t: per_tau[t][1]) and math.isclose(scale, per_tau[tau][0])
    # each τ's scale is as good as the best of 400 log-spaced scales over the same interval, up to the objective's
    # fine-scale jitter (codes flip one value at a time as s moves)
    lower, upper = agq_search_bounds(float(a.max()))
    dense = torch.logspace(math.log10(lower), math.log10(upper), 400).tolist()
    for t, (s, e) in per_tau.items():
        assert lower <= s <= upper
        assert math.isclose(e, _error(a, v, s, t, bits), rel_tol=1e-4)
        assert e <= min(_error(a, v, d, t, bits) for d in dense) * 1.02
    # τ > 1 wins on a real softmax: finer levels near the large probabilities
    assert tau > 1


def test_agq_scale_and_tau_average_over_batches():
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.softmax(torch.randn(2, 10, 30, generator=gen) * (1 + i), -1), torch.randn(2, 30, 8, generator=gen))
               for i in range(3)]
    observer = AGQObserver()
    bests = [observer.batch_best(a, v, 4) for a, v in batches]
    for a, v in batches:
        observer.observe(a, v, 4)
    tau, scale = observer.choose()
    totals = {t: sum(b[t][1] for b in bests) for t in observer.taus}
    assert tau == min(totals, key=totals.get)
    assert math.isclose(scale, sum(b[tau][0] for b in bests) / 3, rel_tol=1e-9)


def test_agq_pieces_of_one_batch_count_once_weighted_by_size():
    gen = torch.Generator().manual_seed(5)
    pieces = [(torch.softmax(torch.randn(n, 10, 30, generator=gen) * 3, -1), torch.randn(n, 30, 8, generator=gen))
              for n in (3, 1)]  # one image's prompts decoded in a chunk of three and a chunk of one
    observer = AGQObserver()
    bests = [observer.batch_best(a, v, 4) for a, v in pieces]
    observer.begin_batch()
    for a, v in pieces:
        observer.observe(a, v, 4)
    observer.end_batch()
    assert observer.batches == 1
    for t in observer.taus:
        assert math.isclose(observer.scale_sum[t], (3 * bests[0][t][0] + bests[1][t][0]) / 4, rel_tol=1e-9)
        assert math.isclose(observer.error_sum[t], (3 * bests[0][t][1] + bests[1][t][1]) / 4, rel_tol=1e-9)


def test_agq_quantizer_in_a_matmul():
    gen = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(2, 3, 12, 40, generator=gen) * 2, -1)
    v = torch.randn(2, 3, 40, 8, generator=gen)
    matmul = QuantMatMul(Log2AGQQuantizer(4), UniformQuantizer(8, make_observer("minmax")))
    assert torch.equal(matmul(a, v), a @ v)  # off
    for q in (matmul.a_quantizer, matmul.b_quantizer):
        q.set_state(QuantState.OBSERVE)
    assert torch.equal(matmul(a, v), a @ v)  # observing passes FP through
    for q in (matmul.a_quantizer, matmul.b_quantizer):
        q.set_state(QuantState.QUANT)
    tau, scale = matmul.a_quantizer.tau_value, float(matmul.a_quantizer.scale.detach())
    v_lo, v_hi = float(v.min()), float(v.max())  # the min/max grid of V, written out: 8 bits, asymmetric
    v_step = (v_hi - v_lo) / 255
    v_zero = np.clip(-np.round(v_lo / v_step), 0, 255)
    v_hat = (np.clip(np.round(v.double().numpy() / v_step) + v_zero, 0, 255) - v_zero) * v_step
    expected = reference_log2_quant(a.double().numpy(), scale, tau, 4) @ v_hat
    assert np.allclose(matmul(a, v).detach().double().numpy(), expected, atol=1e-5)
    assert not torch.equal(matmul(a, v), a @ v)
    # the scale is learnable through STE rounding
    s = matmul.a_quantizer.scale
    matmul(a, v).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad) and float(s.grad) != 0.0
