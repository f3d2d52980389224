"""Observers and range strategies on known distributions: MinMax, AvgMinMax, Percentile, MSE grid and bounded search."""

import math
import re

import pytest
import torch

from saq.clipping import MinMaxClipping, MSEClipping, PercentileClipping, build_range_strategy, error_sample
from saq.clipping.percentile import tail_quantiles
from saq.errors import SaqError
from saq.quant import AvgMinMaxObserver, MinMaxObserver, MSEObserver, PercentileObserver
from saq.quant.grid import QuantGrid, bounded_minimize, fake_quant_range, lp_error

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _fake_quant_by_hand(x, lo, hi, grid, per_row=False):
    """x on the grid spanning [lo, hi], written out in float64 apart from saq.quant.grid: the range widened to hold 0,
    step = range / (qmax - qmin) (symmetric: the larger side over half the codes, zero-point 0), zero-point
    qmin - round(lo / step) clamped to the codes, codes clamp(round(x / step) + z). per_row: lo and hi per row of x."""
    lo = torch.as_tensor(lo, dtype=torch.float64).clamp(max=0.0)
    hi = torch.as_tensor(hi, dtype=torch.float64).clamp(min=0.0)
    if grid.symmetric:
        step, zero = torch.maximum(-lo, hi) / ((grid.qmax - grid.qmin) / 2), torch.zeros_like(lo)
    else:
        step = (hi - lo) / (grid.qmax - grid.qmin)
        zero = (grid.qmin - torch.round(lo / step)).clamp(grid.qmin, grid.qmax)
    if per_row:
        step, zero = step[:, None], zero[:, None]
    x = x.double()
    return (torch.clamp(torch.round(x / step) + zero, grid.qmin, grid.qmax) - zero) * step


def _exact_error(x, lo, hi, grid, p=2.4, dim=None):
    """Mean |x̂ - x|^p (over dim, per row when dim=1), x̂ by _fake_quant_by_hand, in float64: the reference the
    searches are checked against does not share their code (fake_quant_range, lp_error)."""
    x_hat = _fake_quant_by_hand(x, lo, hi, grid, per_row=dim is not None)
    err = (x_hat - x.double()).abs() ** p
    return err.mean() if dim is None else err.mean(dim)


def test_fake_quant_range_and_lp_error_are_the_formulas_by_hand():
    x = torch.randn(5, 300, generator=_gen(10)) * torch.tensor([0.1, 1.0, 3.0, 0.5, 8.0])[:, None]
    x[2] = x[2].abs() + 0.2  # a row wholly above zero: its range is widened down to 0
    for grid in (QuantGrid(4), QuantGrid(3, symmetric=True), QuantGrid(8)):
        lo, hi = x.amin(1) * 0.7, x.amax(1) * 0.8  # clipping on both sides
        ours = fake_quant_range(x, lo, hi, grid, ch_axis=0)
        by_hand = _fake_quant_by_hand(x, lo, hi, grid, per_row=True)
        # same codes: values differ by float32 rounding only (x / s against x · (1/s) may tie-break one code apart
        # at an exact .5, which these random values do not hit)
        assert torch.allclose(ours.double(), by_hand, rtol=1e-6, atol=1e-6), grid
        whole = fake_quant_range(x[1], float(lo[1]), float(hi[1]), grid)
        assert torch.allclose(whole.double(), _fake_quant_by_hand(x[1], lo[1], hi[1], grid), rtol=1e-6, atol=1e-6)
        for p in (2.0, 2.4, 1.0):
            for dim in (None, 1):
                got = lp_error(ours, x, p, dim=dim)
                want = ((ours.double() - x.double()).abs() ** p).mean() if dim is None else \
                    ((ours.double() - x.double()).abs() ** p).mean(dim)
                assert torch.allclose(got.double(), want, rtol=1e-5, atol=0), (grid, p, dim)
    # lp_error does not change its inputs (it works in place on a difference it made)
    x_hat, before = ours.clone(), x.clone()
    lp_error(x_hat, x, 2.4)
    assert torch.equal(x_hat, ours) and torch.equal(x, before)


def test_minmax_and_avg_minmax_on_known_batches():
    grid = QuantGrid(8)
    batches = [torch.tensor([-1.0, 0.0, 3.0]), torch.tensor([-5.0, 1.0]), torch.tensor([2.0, 0.5, 7.0])]
    running, average = MinMaxObserver(), AvgMinMaxObserver()
    for b in batches:
        running.observe(b, grid, None)
        average.observe(b, grid, None)
    assert [float(v) for v in running.range()] == [-5.0, 7.0]
    lo, hi = average.range()
    assert math.isclose(float(lo), (-1 - 5 + 0.5) / 3, rel_tol=1e-6)
    assert math.isclose(float(hi), (3 + 1 + 7) / 3, rel_tol=1e-6)


def test_minmax_per_channel_any_axis():
    x = torch.arange(24.0).reshape(2, 3, 4)
    lo, hi = MinMaxObserver().strategy.batch_range(x, QuantGrid(8), 1)
    assert lo.tolist() == [0.0, 4.0, 8.0] and hi.tolist() == [15.0, 19.0, 23.0]


def test_tail_quantiles_match_torch_quantile():
    x = torch.randn(50_001, generator=_gen(0))
    probs = [0.99, 0.999, 0.9999, 0.01, 0.001, 0.5]
    assert torch.allclose(tail_quantiles(x, probs), torch.quantile(x, torch.tensor(probs)), atol=1e-6)
    ramp = torch.arange(100_001.0)  # known: q(p) = p·(n - 1)
    assert torch.allclose(tail_quantiles(ramp, [0.99, 0.01]), torch.tensor([99_000.0, 1_000.0]))


@pytest.mark.parametrize("size,clips", [(20_000, False), (400_000, True)])
def test_percentile_picks_the_candidate_with_the_lowest_error(size, clips):
    grid = QuantGrid(4)
    x = torch.randn(size, generator=_gen(1))
    x[:3] = torch.tensor([40.0, -35.0, 60.0])  # rare enough to clip only in the larger tensor
    strategy = PercentileClipping()
    lo, hi = strategy.batch_range(x, grid, None)
    candidates = [(float(torch.quantile(x, 1 - p)), float(torch.quantile(x, p))) for p in strategy.percentiles]
    errors = [float(_exact_error(x, a, b, grid)) for a, b in candidates]
    best = min(range(len(errors)), key=errors.__getitem__)
    assert math.isclose(float(lo), candidates[best][0], rel_tol=1e-4)
    assert math.isclose(float(hi), candidates[best][1], rel_tol=1e-4)
    assert (float(hi) < 10) == clips
    observer = PercentileObserver()
    observer.observe(x, grid, None)
    assert torch.allclose(torch.stack(observer.range()), torch.stack([lo, hi]))


def _brute_force_channel_grid(w, grid, num=100, p=2.4):
    """The paper's MSEObserver written as plain loops: every range i·xrange/num, every zero-point (xrange from
    min(x_min, 0) to max(x_max, 0), as the official code clamps a channel on one side of zero)."""
    levels = grid.qmax - grid.qmin
    best = []
    for row in w:
        x_min, x_max = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        best_err = math.inf
        for i in range(1, num + 1):
            r = (x_max - x_min) * i / num
            step = r / levels
            for z in range(levels + 1):
                err = float(_exact_error(row, -z * step, r - z * step, grid, p))
                best_err = min(best_err, err)
        best.append(best_err)
    return torch.tensor(best, dtype=torch.float64)


@pytest.mark.parametrize("bits", [3, 4])
def test_mse_channel_grid_equals_brute_force(bits):
    grid = QuantGrid(bits)
    w = torch.randn(6, 120, generator=_gen(2)) * torch.linspace(0.1, 2.0, 6)[:, None]
    w[1, 0], w[3, 5] = 6.0, -9.0  # channels with an outlier
    w[4] = w[4].abs() - 0.05  # mostly positive channel
    w[2] = w[2].abs() + 0.3  # wholly positive channel in a two-sided tensor: its range must still reach its max
    # heavy tails on both sides: the best window is narrower than the data and sits inside it, away from either end
    w[5] = torch.sign(w[5]) * torch.empty(120).exponential_(generator=_gen(9)) ** 2
    lo, hi = MSEClipping(num_ranges=30).batch_range(w, grid, 0)
    ours = _exact_error(w, lo, hi, grid, dim=1)
    reference = _brute_force_channel_grid(w, grid, num=30)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-9), (ours, reference)


def test_mse_channel_grid_one_sided_and_symmetric():
    w = torch.rand(4, 50, generator=_gen(3))
    w[0, 0] = 5.0
    for grid in (QuantGrid(4), QuantGrid(4, symmetric=True)):
        lo, hi = MSEClipping(num_ranges=50).batch_range(w, grid, 0)
        ours = _exact_error(w, lo, hi, grid, dim=1)
        span = w.amax(1) if not grid.symmetric else w.abs().amax(1)
        best = torch.full((4,), math.inf)
        for i in range(1, 51):
            r = span * i / 50
            low = -r if grid.symmetric else torch.zeros_like(r)
            best = torch.minimum(best, _exact_error(w, low, r, grid, dim=1))
        assert torch.allclose(ours, best, rtol=1e-4)
    # a symmetric grid reaches further below zero than above (-2^(b-1) codes against 2^(b-1) - 1): short rows whose
    # extreme is negative must not stop scanning early on the positive end's clipping bound
    w = torch.randn(64, 6, generator=_gen(4))
    w[::2] = -w[::2].abs() * 3
    for bits in (2, 3):
        grid = QuantGrid(bits, symmetric=True)
        ours = _exact_error(w, *MSEClipping(num_ranges=25).batch_range(w, grid, 0), grid, dim=1)
        span, best = w.abs().amax(1), torch.full((64,), math.inf)
        for i in range(1, 26):
            best = torch.minimum(best, _exact_error(w, -span * i / 25, span * i / 25, grid, dim=1))
        assert torch.allclose(ours, best, rtol=1e-4), bits


@pytest.mark.parametrize("size", [16_000, 300_000])  # exact scoring, and the tails + sample scoring of big tensors
def test_mse_beats_minmax_with_outliers(size):
    grid = QuantGrid(4)
    x = torch.randn(size, generator=_gen(4))
    x[0] = 20.0 if size < 20_000 else 80.0  # a lone outlier: keeping it in range wastes the grid on the bulk
    mse_lo, mse_hi = MSEClipping().batch_range(x, grid, None)
    minmax_lo, minmax_hi = MinMaxClipping().batch_range(x, grid, None)
    mse_err = float(_exact_error(x, mse_lo, mse_hi, grid))
    minmax_err = float(_exact_error(x, minmax_lo, minmax_hi, grid))
    assert mse_err < 0.5 * minmax_err
    assert float(mse_hi) < 10.0
    observer = MSEObserver()  # per batch, then averaged
    observer.observe(x, grid, None)
    observer.observe(x, grid, None)
    assert torch.allclose(torch.stack(observer.range()), torch.stack([mse_lo, mse_hi]))


def test_mse_never_loses_to_minmax():
    grid = QuantGrid(4)
    x = torch.randn(5_000, generator=_gen(8))
    x[::1000] = 80.0  # five outliers: here the full range is the best there is
    mse_err = float(_exact_error(x, *MSEClipping().batch_range(x, grid, None), grid))
    minmax_err = float(_exact_error(x, *MinMaxClipping().batch_range(x, grid, None), grid))
    assert mse_err <= minmax_err


def test_mse_bounded_search_is_near_the_best_two_sided_window():
    grid = QuantGrid(3)
    x = torch.cat([torch.randn(3000, generator=_gen(5)) * 0.5 + 1.0, torch.tensor([-4.0, 6.0])])
    lo, hi = MSEClipping().batch_range(x, grid, None)
    found = float(_exact_error(x, lo, hi, grid))
    grid_best = min(float(_exact_error(x, a, b, grid)) for a in torch.linspace(-4, 0, 41).tolist()
                    for b in torch.linspace(0.1, 6, 60).tolist())
    assert found <= grid_best * 1.02


def test_error_sample_is_exact_when_small_and_close_when_large():
    grid = QuantGrid(4)
    small = torch.randn(1000, generator=_gen(6))
    assert math.isclose(error_sample(small, 4096).error(-1.0, 1.5, grid, 2.4),
                        float(_exact_error(small, -1.0, 1.5, grid)), rel_tol=1e-4)
    large = torch.randn(400_000, generator=_gen(7))
    large[:10] = 50.0
    approx = error_sample(large, 8192).error(-2.0, 2.0, grid, 2.4)
    exact = float(_exact_error(large, -2.0, 2.0, grid))
    assert math.isclose(approx, exact, rel_tol=0.05)  # the clipped outliers dominate and are kept exactly


def test_error_sample_counts_values_tied_at_the_extremes():
    """A ReLU output: most values are exactly 0, the minimum. They must keep their weight (exact, error 0 on a grid
    from 0), not hand it to the sampled positive values, which would make the search clip too hard."""
    grid = QuantGrid(4)
    relu = torch.relu(torch.randn(400_000, generator=_gen(8)) - 0.4)  # ~66% zeros
    sample = error_sample(relu, 8192)
    assert sample.total == pytest.approx(relu.numel())
    for hi in (1.0, 2.5, 4.0):
        assert math.isclose(sample.error(0.0, hi, grid, 2.0), float(_exact_error(relu, 0.0, hi, grid, p=2.0)), rel_tol=0.05)
    tied_top = torch.cat([torch.randn(300_000, generator=_gen(9)).clamp(max=1.0), torch.ones(100_000)])
    assert math.isclose(error_sample(tied_top, 8192).error(-3.0, 0.8, grid, 2.0),  # a saturated output's top
                        float(_exact_error(tied_top, -3.0, 0.8, grid, p=2.0)), rel_tol=0.05)
    constant = torch.full((100_000,), 0.5)
    assert error_sample(constant, 8192).total == pytest.approx(constant.numel())
    searched = MSEClipping(max_points=8192).search_tensor(relu, grid)
    exact = MSEClipping(max_points=10**7).search_tensor(relu, grid)
    assert abs(searched[1] - exact[1]) < 0.05 * exact[1]


def test_bounded_minimize_finds_the_minimum():
    x, fx = bounded_minimize(lambda v: (v - 0.3) ** 2 + 1.0, -2.0, 5.0)
    assert abs(x - 0.3) < 1e-4 and abs(fx - 1.0) < 1e-8
    x, _ = bounded_minimize(lambda v: abs(v - 4.9), 0.0, 5.0, xatol=1e-6)
    assert abs(x - 4.9) < 1e-4


def test_build_range_strategy_from_config():
    assert isinstance(build_range_strategy({"_target_": "saq.clipping.MSEClipping", "name": "mse", "p": 2.0}),
                      MSEClipping)
    assert isinstance(build_range_strategy({"name": "percentile"}), PercentileClipping)
    assert build_range_strategy(None) is None
    with pytest.raises(SaqError, match="clip.name='kl' is unknown"):
        build_range_strategy({"name": "kl"})
    with pytest.raises(SaqError, match="cannot be imported"):
        build_range_strategy({"_target_": "saq.clipping.Nope"})
    # a shipped name on another class: an MSE search reported as PCC
    with pytest.raises(SaqError, match=r"clip.name='pcc' labels the run as PerceptualConsistencyClipping, but "
                                       r"clip._target_ builds MSEClipping"):
        build_range_strategy({"_target_": "saq.clipping.MSEClipping", "name": "pcc"})
    with pytest.raises(SaqError, match="clip.percentiles"):
        build_range_strategy({"name": "percentile", "percentiles": [1.5]})
    for cfg, message in (({"name": "percentile", "percentiles": 0.99}, "clip.percentiles=0.99 invalid"),
                         ({"name": "mse", "p": "2"}, "clip.p='2' invalid"),
                         ({"name": "mse", "max_points": "abc"}, "clip.max_points='abc' invalid; expected an integer"),
                         ({"name": "mse", "num_ranges": 2.5}, "clip.num_ranges=2.5 invalid")):
        with pytest.raises(SaqError, match=re.escape(message)):
            build_range_strategy(cfg)


@pytest.mark.parametrize("reduction", ["mean", "extreme"])
def test_clip_reduction_combines_different_batches_as_named(reduction):
    grid = QuantGrid(8)
    narrow, wide = torch.linspace(-1, 2, 100), torch.linspace(-3, 6, 100)
    observer = AvgMinMaxObserver()
    observer.use_strategy(build_range_strategy({"name": "minmax", "reduction": reduction}))
    observer.observe(narrow, grid, None)
    observer.observe(wide, grid, None)
    lo, hi = observer.range()
    expected = (-2.0, 4.0) if reduction == "mean" else (-3.0, 6.0)  # averaged per-batch ranges, or the widest seen
    assert (float(lo), float(hi)) == pytest.approx(expected)
    assert observer.name == ("avg_minmax" if reduction == "mean" else "minmax")


def test_pieces_of_one_batch_reduce_to_one_batch():
    grid = QuantGrid(4)
    whole, pieces = torch.tensor([-2.0, 0.0, 1.0, 6.0]), (torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([6.0]))
    by_extremes = AvgMinMaxObserver()
    by_extremes.observe(torch.tensor([-4.0, 2.0]), grid, None)  # an earlier image, one batch
    by_extremes.begin_batch()
    for piece in pieces:
        by_extremes.observe(piece, grid, None)
    by_extremes.end_batch()
    assert by_extremes.batches == 2
    assert [float(v) for v in by_extremes.range()] == [(-4 - 2) / 2, (2 + 6) / 2]  # the whole's min/max, averaged
    # a search's range of a whole is not its pieces' widest: the pieces' ranges weighted by their sizes
    searched = PercentileObserver()
    searched.begin_batch()
    for piece in pieces:
        searched.observe(piece, grid, None)
    searched.end_batch()
    lows, highs = zip(*(PercentileClipping().batch_range(p, grid, None) for p in pieces))
    assert searched.batches == 1
    assert math.isclose(float(searched.range()[0]), (3 * float(lows[0]) + float(lows[1])) / 4, rel_tol=1e-6)
    assert math.isclose(float(searched.range()[1]), (3 * float(highs[0]) + float(highs[1])) / 4, rel_tol=1e-6)
    dropped = AvgMinMaxObserver()  # a block that failed keeps nothing
    dropped.begin_batch()
    dropped.observe(whole, grid, None)
    dropped.end_batch(commit=False)
    assert not dropped.seen
    dropped.observe(whole, grid, None)  # and the observer is back to one batch per observe()
    dropped.observe(pieces[1], grid, None)
    assert dropped.batches == 2
    reset = AvgMinMaxObserver()  # a reset inside a batch starts afresh but keeps collecting pieces
    reset.begin_batch()
    reset.observe(whole, grid, None)
    reset.reset()
    for piece in pieces:
        reset.observe(piece, grid, None)
    reset.end_batch()
    assert reset.batches == 1 and [float(v) for v in reset.range()] == [-2.0, 6.0]
