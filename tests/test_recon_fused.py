"""Reconstruction's fused fake-quant autograd (LSQ and log2-AGQ, with and without QDrop) against the reference graph."""

from __future__ import annotations

import pytest
import torch

from saq.quant.grid import QuantGrid, fake_quant, keep_mask, log2_fake_quant, mix

GRID = QuantGrid(4)

# The reference graphs are written out here, not built from saq.quant.grid's helpers (round_ste, channel_view, mix):
# a mistake in one of those would otherwise sit on both sides of the comparison. keep_mask alone is shared, as the
# random draw itself: under one seed both sides must drop the same elements.


def per_channel(t, ndim, ch_axis):
    """A per-channel parameter shaped to broadcast along ch_axis (a per-tensor one as it is)."""
    if ch_axis is None or t.ndim == 0:
        return t
    return t.reshape([-1 if d == ch_axis % ndim else 1 for d in range(ndim)])


def dropped(v, out, mask):
    """QDrop: the quantized value where the mask keeps it, the FP one elsewhere."""
    return torch.where(mask.bool(), out, v)


def reference_uniform(x, scale, zp, ch_axis):
    s, z = per_channel(scale, x.ndim, ch_axis), per_channel(zp, x.ndim, ch_axis)
    v = x * (1.0 / s)
    code = (v.round() - v).detach() + v + z  # round half to even forward, straight-through backward
    inside = (code >= GRID.qmin) & (code <= GRID.qmax)
    code = torch.where(inside, code, torch.clamp(code.detach(), GRID.qmin, GRID.qmax))
    return (code - z) * s


def reference_log2(a, scale, tau, bits):
    tiny = torch.finfo(a.dtype).tiny
    exponent = -tau * torch.log2(torch.clamp(a, min=tiny) / scale)
    code = (exponent.round() - exponent).detach() + exponent
    a_hat = scale * torch.exp2(torch.clamp(code, 0, 2**bits - 1) / -tau)
    return torch.where(code.detach() < 2**bits, a_hat, torch.zeros_like(a_hat))


def grads(fn, x, scale, seed):
    x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
    torch.manual_seed(seed)
    out = fn(x, scale)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), x.grad, scale.grad


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("ch_axis", [None, 1])
def test_fused_uniform_fake_quant_matches_the_reference_graph(keep, ch_axis):
    x = torch.randn(3, 8, 50, generator=torch.Generator().manual_seed(0)) * 2
    scale = torch.full((8,), 0.2) + torch.rand(8, generator=torch.Generator().manual_seed(2)) if ch_axis else \
        torch.tensor(0.3)
    zp = torch.full(scale.shape, 7.0)
    fused = grads(lambda v, s: fake_quant(v, s, zp, GRID, ch_axis, keep_prob=keep), x, scale, 5)

    def ref(v, s):
        out = reference_uniform(v, s, zp, ch_axis)
        return out if keep == 1.0 else dropped(v, out, keep_mask(v, keep))
    expected = grads(ref, x, scale, 5)
    assert torch.equal(fused[0], expected[0])
    assert torch.allclose(fused[1], expected[1]) and torch.allclose(fused[2], expected[2], rtol=1e-4, atol=1e-4)
    if keep < 1.0:
        assert 0.2 < float((fused[0] == x).float().mean()) < 0.8  # some elements passed in FP


@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0])
def test_fused_log2_fake_quant_matches_the_reference_graph(keep, scale):
    a = torch.softmax(torch.randn(2, 3, 12, 40, generator=torch.Generator().manual_seed(0)) * 3, -1)
    a[0, 0, 0, :5] = 0.0  # exact zeros flush
    s = torch.tensor(scale)
    fused = grads(lambda v, t: log2_fake_quant(v, t, 2.0, 4, keep_prob=keep), a, s, 3)

    def ref(v, t):
        out = reference_log2(v, t, 2.0, 4)
        return out if keep == 1.0 else dropped(v, out, keep_mask(v, keep))
    expected = grads(ref, a, s, 3)
    assert torch.equal(fused[0], expected[0])
    assert torch.allclose(fused[1], expected[1], atol=1e-5)
    assert torch.allclose(fused[2], expected[2], rtol=1e-4, atol=1e-4)


def test_keep_mask_has_the_asked_probability_for_byte_and_float_paths():
    torch.manual_seed(0)
    x = torch.empty(200_000)
    for p in (0.5, 0.25, 0.3):
        mask = keep_mask(x, p)
        assert set(mask.unique().tolist()) == {0.0, 1.0} and mask.dtype == x.dtype
        assert abs(float(mask.mean()) - p) < 0.01
    assert keep_mask(x, 1.0).all() and not keep_mask(x, 0.0).any()  # the ends exactly (1.0 is 256 of 256 bytes)
    assert torch.equal(mix(torch.zeros(3), torch.ones(3), torch.tensor([1.0, 0.0, 1.0])), torch.tensor([1.0, 0, 1]))
    fp, quantized = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3)) * 1e3
    keep = keep_mask(fp, 0.5)  # lerp with weights 0 and 1 gives its ends exactly, for any finite values
    assert torch.equal(mix(fp, quantized, keep), dropped(fp, quantized, keep))
