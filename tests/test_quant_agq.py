"""AGQ: the post-softmax log2 quantizer picks τ and scale that minimise the error of (Â - A)·V."""

import math

import torch

from saq.quant import Log2AGQQuantizer, QuantMatMul, QuantState, UniformQuantizer, make_observer
from saq.quant.grid import log2_fake_quant
from saq.quant.observers import AGQObserver, agq_search_bounds

torch.set_num_threads(1)


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
    expected = log2_fake_quant(a, torch.tensor(scale), tau, 4, ste=False) @ matmul.b_quantizer(v)
    assert torch.allclose(matmul(a, v), expected)
    assert not torch.equal(matmul(a, v), a @ v)
    # the scale is learnable through STE rounding
    s = matmul.a_quantizer.scale
    matmul(a, v).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad) and float(s.grad) != 0.0
