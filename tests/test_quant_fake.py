"""Quantizer math: fake quantization against torch's reference kernels, LSQ's step gradient, AdaRound's rounding."""

import math

import pytest
import torch

from saq.errors import SaqError
from saq.quant import AdaRoundQuantizer, LSQQuantizer, QuantState, UniformQuantizer, make_observer
from saq.quant.grid import QuantGrid, fake_quant, log2_fake_quant, qparams_from_range

torch.set_num_threads(1)


def _data(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    # values exactly on rounding ties and far outside the range exercise round-half-even and clamping
    x.view(-1)[:8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e4, -1e4, 0.0])
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_matches_torch(bits, symmetric):
    grid = QuantGrid(bits, symmetric)
    x = _data((64, 33))
    for lo, hi in [(-2.0, 5.0), (0.3, 4.0), (-7.0, -1.0), (-1.0, 1.0)]:
        scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), grid)
        ours = fake_quant(x, scale, zp, grid)
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), grid.qmin, grid.qmax)
        assert torch.equal(ours, ref), (bits, symmetric, lo, hi)
        assert torch.equal(fake_quant(x.clone().requires_grad_(), scale, zp, grid), ref)  # the autograd path
        # scale 1.0 and integer zero-point make every tie exactly x.5: round half to even must match too
        ours = fake_quant(x, torch.tensor(1.0), torch.tensor(float(grid.qmin + 2 ** (bits - 1))), grid)
        ref = torch.fake_quantize_per_tensor_affine(x, 1.0, grid.qmin + 2 ** (bits - 1), grid.qmin, grid.qmax)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel_matches_torch_any_axis(bits, axis):
    grid = QuantGrid(bits)
    x = _data((5, 6, 7), seed=1)
    ax = axis % x.ndim
    gen = torch.Generator().manual_seed(2)
    lo = -torch.rand(x.shape[ax], generator=gen) * 4
    hi = torch.rand(x.shape[ax], generator=gen) * 4
    scale, zp = qparams_from_range(lo, hi, grid)
    ours = fake_quant(x, scale, zp, grid, ch_axis=ax)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), ax, grid.qmin, grid.qmax)
    assert torch.equal(ours, ref)
    # and the quantizer module (its no-grad fast path) agrees with the autograd formula
    q = UniformQuantizer(bits, make_observer("minmax"), ch_axis=axis)
    q.set_range(lo, hi)
    q.calibrated.fill_(True)
    q.set_state(QuantState.QUANT)
    with torch.no_grad():
        assert torch.equal(q(x), ours)
    assert torch.equal(q(x.requires_grad_()), ours)


def test_qparams_asymmetric_rule():
    grid = QuantGrid(4)
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), grid)
    assert math.isclose(float(scale), 3.0 / 15, rel_tol=1e-6) and float(zp) == 5.0  # -round(-1 / 0.2) = 5
    scale, zp = qparams_from_range(torch.tensor(0.5), torch.tensor(3.0), grid)  # range is widened to hold 0
    assert math.isclose(float(scale), 3.0 / 15, rel_tol=1e-6) and float(zp) == 0.0


def test_qparams_symmetric_rule():
    grid = QuantGrid(4, symmetric=True)  # codes -8..7: the scale spans the larger side over 7.5 codes (torch's rule)
    assert (grid.qmin, grid.qmax) == (-8, 7)
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), grid)
    assert math.isclose(float(scale), 3.0 / 7.5, rel_tol=1e-6) and float(zp) == 0.0
    scale, _ = qparams_from_range(torch.tensor(-6.0), torch.tensor(0.5), grid)
    assert math.isclose(float(scale), 6.0 / 7.5, rel_tol=1e-6)
    x = torch.tensor([-6.0, -0.4, 0.0, 0.5, 6.0])
    # codes -7.5 → -8 and -0.5 → 0 (half to even), 7.5 → 8 clamped to 7
    assert torch.allclose(fake_quant(x, scale, torch.zeros(()), grid), torch.tensor([-6.4, 0.0, 0.0, 0.8, 5.6]))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_calibration_input_is_named_not_a_nan_model(bad):
    q = UniformQuantizer(4, make_observer("minmax"))
    q.name = "blocks.0.attn.qkv.input_quantizer"
    q.set_state(QuantState.OBSERVE)
    q(torch.tensor([-1.0, 0.5]))
    with pytest.raises(SaqError, match=r"^quantizer blocks.0.attn.qkv.input_quantizer: its calibration input holds "
                                       r"NaN or inf"):
        q(torch.tensor([-1.0, 0.5, bad]))


def test_straight_through_gradient():
    q = UniformQuantizer(4, make_observer("minmax"))
    q.set_range(-1.0, 1.0)
    q.calibrated.fill_(True)
    q.set_state("quant")
    x = torch.linspace(-0.9, 0.9, 11, requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # round is identity backward inside the range


@pytest.mark.parametrize("bits", [4, 8])
def test_lsq_step_gradient_matches_formula(bits):
    q = LSQQuantizer(bits, make_observer("minmax"))
    q.set_range(-1.5, 2.5)
    q.calibrated.fill_(True)
    q.set_state(QuantState.QUANT)
    x = _data((40, 25), seed=3) / 2
    x.view(-1)[:2] = torch.tensor([100.0, -100.0])  # clipped above and below
    q(x).sum().backward()
    s, z, grid = float(q.scale.detach()), float(q.zero_point), q.grid
    v = x * (1.0 / torch.tensor(s))
    code = torch.round(v) + z
    # LSQ: d x̂ / ds = round(x/s) - x/s inside the grid, qmin - z or qmax - z when clipped; times g = 1/√(n·qmax)
    per_element = torch.where(code < grid.qmin, torch.tensor(grid.qmin - z),
                              torch.where(code > grid.qmax, torch.tensor(grid.qmax - z), torch.round(v) - v))
    expected = per_element.sum() / math.sqrt(x.numel() * grid.qmax)
    assert torch.allclose(q.scale.grad, expected, rtol=1e-4, atol=1e-6)


def test_lsq_quantizes_with_exactly_the_step_it_stores():
    # the step's gradient scaling must not move the step used forward: the ONNX export takes the stored one
    x = _data((7, 256), seed=5)
    moved = 0
    for i in range(2000):  # the old formula missed the stored step on about 6 of these ranges
        q = LSQQuantizer(4, make_observer("minmax"))
        q.set_range(-1.0 - i * 1e-3, 2.0 + i * 7e-4)
        q.calibrated.fill_(True)
        q.set_state(QuantState.QUANT)
        with torch.no_grad():
            expected = fake_quant(x, q.scale.detach(), q.zero_point, q.grid)
            moved += not torch.equal(q.step(x), q.scale)
            assert torch.equal(q(x), expected), i
    assert moved == 0


def _adaround(bits=4):
    q = AdaRoundQuantizer(bits, make_observer("minmax"), ch_axis=0)
    w = torch.randn((12, 20), generator=torch.Generator().manual_seed(4)) / 3
    w[0, :3] = torch.tensor([2.0, -2.5, 0.0])  # one channel with a wide range, and an exact zero
    q.set_state("observe")
    q(w)
    q.set_state("quant")
    return q, w


def test_adaround_defaults_to_nearest_and_initialises_soft_to_the_fraction():
    q, w = _adaround()
    reference = fake_quant(w, q.scale, q.zero_point, q.grid, ch_axis=0)
    assert torch.equal(q(w), reference)  # round-to-nearest until reconstruction
    q.init_soft(w)
    ws = w / q.scale[:, None]
    assert torch.allclose(q.rectified_sigmoid(), ws - torch.floor(ws), atol=1e-5)
    # soft rounding at init reproduces w itself wherever the grid does not clip
    inside = (torch.floor(ws) + q.zero_point[:, None] >= 0) & (torch.floor(ws) + 1 + q.zero_point[:, None] <= 15)
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-5)


def test_adaround_hardened_values_are_floor_or_ceil():
    q, w = _adaround()
    q.init_soft(w)
    with torch.no_grad():
        q.alpha.copy_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(5)))
    alpha = q.alpha.detach().clone()
    hard = q.harden(w)
    assert q.alpha.numel() == 0  # read no more once hardened: released
    scale, zp = q.scale[:, None], q.zero_point[:, None]
    codes = hard / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    ws = w / scale
    lower = torch.clamp(torch.floor(ws) + zp, 0, 15)
    upper = torch.clamp(torch.floor(ws) + 1 + zp, 0, 15)
    is_floor, is_ceil = torch.isclose(codes, lower, atol=1e-4), torch.isclose(codes, upper, atol=1e-4)
    assert bool((is_floor | is_ceil).all())
    assert torch.equal(is_ceil & ~is_floor, (alpha >= 0) & (lower != upper))  # the sign of α decides
    assert is_floor.any() and (is_ceil & ~is_floor).any()
    assert q.mode == "nearest" and torch.equal(q(hard), hard)  # written back, the weight stays put


def test_adaround_soft_mode_needs_init():
    q, _ = _adaround()
    with pytest.raises(SaqError, match="init_soft"):
        q.set_mode("soft")


def test_log2_quantizer_autograd_and_inference_paths_agree():
    a = torch.softmax(torch.randn(4, 30, 30, generator=torch.Generator().manual_seed(6)) * 4, -1)
    for tau in (1, 2, 3, 4):
        fast = log2_fake_quant(a, torch.tensor(0.7), tau, 4)
        slow = log2_fake_quant(a.clone().requires_grad_(), torch.tensor(0.7), tau, 4)
        assert torch.equal(fast, slow.detach())


def test_log2_quantizer_levels_and_flush():
    a = torch.tensor([1.0, 0.5, 0.3, 2.0**-20, 0.0, 0.25])
    out = log2_fake_quant(a, torch.tensor(1.0), tau=1, bits=3, ste=False)
    # codes round(-log2 a): 0, 1, 2 (0.3 → 1.74 → 2), 20 ≥ 8 → flushed, 0 → flushed, 2
    assert torch.equal(out, torch.tensor([1.0, 0.5, 0.25, 0.0, 0.0, 0.25]))
    out = log2_fake_quant(torch.tensor([0.7]), torch.tensor(1.0), tau=2, bits=4, ste=False)
    assert torch.allclose(out, torch.tensor([2 ** (-1 / 2)]))  # -2·log2(0.7) = 1.03 → code 1 → 2^(-1/2)


def test_a_per_channel_quantizer_refuses_a_per_tensor_state():
    # a fresh per-channel scale is 0-d like a per-tensor one, so torch sees no size mismatch: the layer would load
    # one step and quantize per tensor under a per-channel recipe
    per_tensor = UniformQuantizer(4, make_observer("minmax"))
    per_tensor.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    per_tensor.calibrated.fill_(True)
    with pytest.raises(RuntimeError, match=r"scale holds one per-tensor step, but this quantizer is per channel"):
        UniformQuantizer(4, make_observer("minmax"), ch_axis=0).load_state_dict(per_tensor.state_dict())
    # an uncalibrated state, and a calibrated one-channel state, still load
    UniformQuantizer(4, make_observer("minmax"), ch_axis=0).load_state_dict(UniformQuantizer(4, make_observer(
        "minmax")).state_dict())
    one = UniformQuantizer(4, make_observer("minmax"), ch_axis=0)
    one.set_range(torch.tensor([-1.0]), torch.tensor([2.0]))
    one.calibrated.fill_(True)
    loaded = UniformQuantizer(4, make_observer("minmax"), ch_axis=0)
    loaded.load_state_dict(one.state_dict())
    assert loaded.scale.shape == (1,) and bool(loaded.calibrated)
