"""The reconstruction loop on toy blocks: it learns, restores the evaluation state, keeps the better state, resumes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from saq.errors import SaqError
from saq.quant import QuantConfig, QuantizerFactory, QuantState, assert_fully_quantized, iter_quantizers
from saq.quant.model import calibrate_weights, set_quant_state
from saq.recon import ReconConfig, Reconstructor, reconstruction_state
from saq.recon.losses import rounding_regularizer
from tests.conftest import flip_tensor_byte


@dataclass
class Batch:
    x: torch.Tensor

    def to(self, device):
        return Batch(self.x.to(device))


class TwoLayers(nn.Module):
    def __init__(self, factory=None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(16, 32), nn.Linear(32, 16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if factory is not None:
            self.lin1, self.lin2 = factory.linear(self.lin1, "encoder"), factory.linear(self.lin2, "encoder")

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


class Feed:
    name, learnable, part = "input", False, "encoder"

    def run(self, model, state, data):
        return (data.x,)


class Block:
    learnable, kind, part, response, compared, channel_dims = True, "block", "encoder", None, (0,), (-1,)

    def __init__(self, name="toy", owns: str | None = None):
        self.name, self.owns = name, owns  # owns: the one layer it learns (None: the whole model)

    def run(self, model, state, data):
        return (model(state[0]),)

    def modules(self, model):
        return [model if self.owns is None else getattr(model, self.owns)]


def toy_models(bits=3, block=None, a_bits=None):
    """An FP block, its calibrated quantized twin and 4 batches of inputs; block: TwoLayers unless given."""
    block = block or TwoLayers
    fp = block().eval()
    qmodel = block(QuantizerFactory(QuantConfig(w_bits=bits, a_bits=a_bits or bits)))
    qmodel.load_state_dict(fp.state_dict(), strict=False)
    for name, q in qmodel.named_modules():
        q.name = name
    data = [Batch(torch.randn(64, fp.lin1.in_features, generator=torch.Generator().manual_seed(i)))
            for i in range(4)]
    set_quant_state(qmodel, QuantState.OBSERVE, kind="act")
    with torch.no_grad():
        for d in data:
            qmodel(d.x)
    calibrate_weights(qmodel)
    set_quant_state(qmodel, QuantState.QUANT)
    return fp, qmodel, data


def recon_cfg(**overrides):
    base = {"name": "qdrop", "loss": "mse", "iters": {"block": 150}, "scale_lr": 0.004, "weight_lr": 0.01,
            "target_input": "fp", "log_every": 10}
    return ReconConfig.from_cfg({**base, **overrides})


def block_error(qmodel, fp, data):
    with torch.no_grad():
        return sum(float((qmodel(d.x) - fp(d.x)).square().sum(-1).mean()) for d in data) / len(data)


@pytest.mark.parametrize("reg", [0.0, 0.01])
def test_reconstruction_lowers_the_block_error_against_round_to_nearest(reg):
    fp, qmodel, data = toy_models()
    nearest = block_error(qmodel, fp, data)
    report = Reconstructor(qmodel, fp, recon_cfg(round_reg={"weight": reg}), seed=0, progress=False,
                           chain=[Feed(), Block()]).run(data=data)
    unit = report.units[0]
    learned = block_error(qmodel, fp, data)
    assert unit.kept == "learned" and unit.eval_before == pytest.approx(nearest, rel=1e-5)
    assert unit.eval_after == pytest.approx(learned, rel=1e-5)
    assert learned < 0.8 * nearest  # AdaRound + LSQ recover a good share of the rounding error
    assert unit.loss_last < unit.loss_first
    assert_fully_quantized(qmodel)  # hardened, nothing dropped, every quantizer on
    assert all(q.mode == "nearest" for q in iter_quantizers(qmodel, "weight"))


class SmallBlock(nn.Module):
    """lin1 (2→3), ReLU, lin2 (3→2): 12 weights, so every hard rounding (2^12) can be scored."""

    def __init__(self, factory=None, seed=3):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin1, self.lin2 = nn.Linear(2, 3), nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        if factory is not None:
            self.lin1, self.lin2 = factory.linear(self.lin1, "encoder"), factory.linear(self.lin2, "encoder")

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


def test_reconstruction_finds_the_best_rounding_of_a_block_small_enough_to_enumerate():
    """With the 2-bit weight steps fixed (scale_lr 0) and nothing dropped, AdaRound chooses floor or ceil per weight;
    scoring all 4096 choices gives the optimum, which nearest rounding misses by 2x and reconstruction reaches."""
    fp, qmodel, data = toy_models(bits=2, block=SmallBlock, a_bits=8)
    nearest = block_error(qmodel, fp, data)
    layers = [qmodel.lin1, qmodel.lin2]
    with torch.no_grad():
        down_up = []  # per layer: every weight rounded down and up on its calibrated grid
        for layer in layers:
            wq = layer.weight_quantizer
            scale, zero, scaled = wq._scaled(layer.weight)
            down_up.append([(torch.clamp(torch.floor(scaled) + up + zero, wq.grid.qmin, wq.grid.qmax) - zero) * scale
                            for up in (0, 1)])
        # all 4096 choices at once (bit k of a choice: weight k, lin1's six then lin2's six, rounded up), through
        # the block's own per-tensor input quantizers
        ups = (torch.arange(1 << 12)[:, None] >> torch.arange(12)) & 1
        w1, w2 = (torch.where(part.reshape(-1, *down.shape).bool(), up, down)
                  for (down, up), part in zip(down_up, ups.split(6, dim=1)))
        x = torch.cat([d.x for d in data])
        hidden = torch.relu(layers[0].input_quantizer(x) @ w1.transpose(1, 2) + layers[0].bias)
        out = layers[1].input_quantizer(hidden) @ w2.transpose(1, 2) + layers[1].bias
        errors = (out - fp(x)).square().sum(-1).mean(-1)
        best = float(errors.min())
        rounded = torch.cat([(layer.weight_quantizer(layer.weight) == up).flatten() for layer, (_, up)
                             in zip(layers, down_up)]).long()
        assert float(errors[(rounded << torch.arange(12)).sum()]) == pytest.approx(nearest, rel=1e-5)  # same scoring
    assert nearest > 1.9 * best  # round-to-nearest is far from the best rounding here
    cfg = recon_cfg(iters={"block": 1000}, scale_lr=0.0, drop_prob=1.0, round_reg={"weight": 0.01})
    report = Reconstructor(qmodel, fp, cfg, seed=0, progress=False, chain=[Feed(), Block()]).run(data=data)
    assert report.units[0].kept == "learned"
    assert block_error(qmodel, fp, data) == pytest.approx(best, rel=1e-6)


def test_each_unit_keeps_a_short_loss_curve_and_the_run_draws_it(tmp_path):
    from saq.plots import reconstruction_curves

    fp, qmodel, data = toy_models()
    report = Reconstructor(qmodel, fp, recon_cfg(iters={"block": 150}), seed=0, progress=False,
                           chain=[Feed(), Block("a"), Block("b")]).run(data=data)
    curve = report.units[0].loss_curve
    assert [it for it, _ in curve] == list(range(10, 151, 10))  # every log_every iterations, up to the last
    assert curve[0][1] == pytest.approx(report.units[0].loss_first) and curve[-1][1] == pytest.approx(
        report.units[0].loss_last)
    many = Reconstructor(*toy_models()[1::-1], recon_cfg(iters={"block": 1001}, log_every=1), seed=0,
                         progress=False, chain=[Feed(), Block()]).run(data=data)
    assert 100 < len(many.units[0].loss_curve) <= 201 and many.units[0].loss_curve[-1][0] == 1001  # ~200 at most
    path = reconstruction_curves(report.as_dict(), tmp_path / "recon_units.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert reconstruction_curves({"method": "none", "units": []}, tmp_path / "none.png") is None


def test_best_state_restore_keeps_the_start_when_learning_hurts():
    fp, qmodel, data = toy_models()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    # a huge step learning rate wrecks the LSQ steps: the unit must come back to where it started
    cfg = recon_cfg(scale_lr=50.0, weight_lr=0.0, iters={"block": 20}, scale_lr_schedule="constant")
    report = Reconstructor(qmodel, fp, cfg, seed=0, progress=False, chain=[Feed(), Block()]).run(data=data)
    assert report.units[0].kept == "start" and report.units[0].eval_after > report.units[0].eval_before
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after and before[k].numel())


def test_a_unit_with_nothing_to_learn_is_not_iterated():
    fp, qmodel, data = toy_models()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    calls = []
    block = Block()
    run = block.run
    block.run = lambda *args: (calls.append(1), run(*args))[1]
    cfg = recon_cfg(scale_lr=0.0, weight_lr=0.0, iters={"block": 40})  # every learning rate 0
    report = Reconstructor(qmodel, fp, cfg, seed=0, progress=False, chain=[Feed(), block]).run(data=data)
    unit = report.units[0]
    assert (unit.iters, unit.kept, unit.seconds) == (0, "nothing to learn", 0.0)
    assert len(calls) == 3 * len(data)  # FP targets, the loss before learning, the outputs handed to the next unit
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())
    assert_fully_quantized(qmodel)


def test_learned_steps_stay_positive():
    from saq.quant.grid import SCALE_EPS
    from saq.quant.quantizers import LSQQuantizer

    fp, qmodel, data = toy_models()
    with torch.no_grad():  # steps far too coarse: learning shrinks them, and Adam's first move is about lr
        for q in iter_quantizers(qmodel, "act"):
            q.scale.mul_(10.0)
    # an lr larger than the steps: that first move takes them past zero, where every value would quantize to the
    # zero point
    cfg = recon_cfg(scale_lr=20.0, weight_lr=0.0, iters={"block": 3}, scale_lr_schedule="constant", best_state=False)
    Reconstructor(qmodel, fp, cfg, seed=0, progress=False, chain=[Feed(), Block()]).run(data=data)
    steps = [float(q.scale.detach().min()) for q in iter_quantizers(qmodel) if isinstance(q, LSQQuantizer)]
    assert steps and min(steps) >= SCALE_EPS


class RecordingBlock(Block):
    """Notes, at every forward, the activation quantizers' drop probability and whether its input is what the
    quantized chain fed it (QDrop input mixing swaps about half the elements for the FP chain's)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def run(self, model, state, data):
        drops = {q.drop_prob for q in iter_quantizers(model, "act")}
        self.calls.append((drops, torch.is_grad_enabled(), state[0]))
        return super().run(model, state, data)


def test_learning_drops_and_mixes_while_scoring_does_neither():
    fp, qmodel, data = toy_models()
    block = RecordingBlock()
    # the second unit's inputs: the first one's quantized outputs, and its FP targets (target_input=fp keeps them)
    cfg = recon_cfg(iters={"block": 6}, target_input="fp", drop_prob=0.5, input_mix=True)
    Reconstructor(qmodel, fp, cfg, seed=0, progress=False, chain=[Feed(), Block("a"), block]).run(data=data)
    learning = [c for c in block.calls if c[1]]
    # the quantized model without grad: best-state scoring before and after, the next unit's inputs (the FP twin's
    # forwards, which have no quantizers, make the targets)
    scoring = [c for c in block.calls if not c[1] and c[0]]
    assert len(learning) == 6 and all(drops == {0.5} for drops, _, _ in learning)
    assert scoring and all(drops == {1.0} for drops, _, _ in scoring)
    quantized_inputs = {float(x.sum()) for _, _, x in scoring}  # scored on the quantized chain's own inputs
    assert not any(float(x.sum()) in quantized_inputs for _, _, x in learning)  # learned on mixed ones
    assert all(q.drop_prob == 1.0 for q in iter_quantizers(qmodel, "act"))


@pytest.mark.parametrize("response_input", ["mixed", "quantized"])
def test_pars_decoder_response_comes_from_the_mixed_or_the_unmixed_quantized_input(response_input):
    fp, qmodel, data = toy_models()
    unit = RecordingBlock()
    unit.response = "downstream"  # a decoder layer: PAR adds what the later FP steps make of its output
    cfg = recon_cfg(name="par", loss="par", iters={"block": 5}, target_input="fp", drop_prob=0.5,
                    response_input=response_input)
    Reconstructor(qmodel, fp, cfg, seed=0, progress=False, chain=[Feed(), Block("a"), unit, Block("b")]).run(data=data)
    quantized_inputs = {float(x.sum()) for drops, grad, x in unit.calls if not grad and drops == {1.0}}
    learning = [float(x.sum()) for _, grad, x in unit.calls if grad]
    mixed = [x for x in learning if x not in quantized_inputs]
    assert len(mixed) == 5  # the unit's own error is always learned on the mixed input
    # the official response (paper.md §4.2) runs the unit once more per iteration, on its quantized input as is
    assert len(learning) - len(mixed) == (5 if response_input == "quantized" else 0)


class DivergingBlock(Block):
    """Block whose training loss is NaN (as after an overflow); evaluation, without gradients, is finite."""

    def run(self, model, state, data):
        out = super().run(model, state, data)
        return (out[0] * float("nan"),) if torch.is_grad_enabled() else out


def test_best_state_restore_keeps_the_start_when_learning_diverges_to_nan():
    fp, qmodel, data = toy_models()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    report = Reconstructor(qmodel, fp, recon_cfg(iters={"block": 5}), seed=0, progress=False,
                           chain=[Feed(), DivergingBlock()]).run(data=data)
    unit = report.units[0]
    assert unit.kept == "start" and math.isnan(unit.eval_after) and math.isfinite(unit.eval_before)
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after and before[k].numel())
    assert math.isfinite(block_error(qmodel, fp, data))
    with pytest.raises(SaqError, match=r"recon\.scale_lr=inf invalid"):
        recon_cfg(scale_lr=float("inf"))
    for p in (float("nan"), 0, 1.5, "0.5", True):  # nan was said as 'expected a finite number >= 0.0'
        with pytest.raises(SaqError, match=r"^recon\.drop_prob=.* invalid; expected 0 < p <= 1 \(QDrop: 0\.5"):
            recon_cfg(drop_prob=p)


def test_weight_lr_0_learns_steps_against_the_round_to_nearest_weights():
    fp, qmodel, data = toy_models()
    nearest = {k: v.clone() for k, v in qmodel.state_dict().items() if k.endswith("weight")}

    class RecordingBlock(Block):
        seen: list = []

        def run(self, model, state, data):
            self.seen += [q.mode for q in iter_quantizers(model, "weight")]
            return super().run(model, state, data)

    Reconstructor(qmodel, fp, recon_cfg(weight_lr=0.0, iters={"block": 3}, best_state=False), seed=0, progress=False,
                  chain=[Feed(), RecordingBlock()]).run(data=data)
    assert RecordingBlock.seen and set(RecordingBlock.seen) == {"nearest"}
    assert all(torch.equal(v, qmodel.state_dict()[k]) for k, v in nearest.items())


def test_reconstruction_leaves_the_global_rng_as_it_found_it():
    # a paper-compat evaluation draws its dropping masks from it: a resumed run must draw the same ones
    fp, qmodel, data = toy_models()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    Reconstructor(qmodel, fp, recon_cfg(iters={"block": 3}), seed=0, progress=False,
                  chain=[Feed(), Block()]).run(data=data)
    assert torch.equal(torch.rand(4), expected)


def test_the_context_manager_restores_the_evaluation_state_after_an_exception():
    fp, qmodel, data = toy_models()
    with pytest.raises(RuntimeError, match="boom"), reconstruction_state(qmodel, fp):
        qmodel.lin1.weight_quantizer.init_soft(qmodel.lin1.weight)
        for q in iter_quantizers(qmodel, "act"):
            q.drop_prob = 0.5
        with pytest.raises(SaqError, match="soft"):
            assert_fully_quantized(qmodel, allow_dropped_inputs=True)
        raise RuntimeError("boom")
    assert_fully_quantized(qmodel)
    assert qmodel.lin1.weight.requires_grad and fp.lin1.weight.requires_grad


def test_assert_fully_quantized_names_soft_rounding_and_allows_only_dropped_linear_inputs():
    fp, qmodel, data = toy_models()
    qmodel.lin2.weight_quantizer.init_soft(qmodel.lin2.weight)
    with pytest.raises(SaqError, match="soft"):
        assert_fully_quantized(qmodel)
    qmodel.lin2.weight_quantizer.set_mode("nearest")
    qmodel.lin1.input_quantizer.drop_prob = 0.5
    with pytest.raises(SaqError, match="lin1.input_quantizer"):
        assert_fully_quantized(qmodel)
    assert_fully_quantized(qmodel, allow_dropped_inputs=True)


@pytest.mark.parametrize("prob", [0.25, 0.5])  # 0.25 tells p (quantized) from 1 - p (left FP)
def test_dropping_quantizes_the_asked_share_of_the_elements_and_only_when_asked(prob):
    fp, qmodel, data = toy_models()
    q, x = qmodel.lin1.input_quantizer, data[0].x
    full = q(x)
    q.drop_prob = prob
    torch.manual_seed(0)
    dropped = q(x)
    quantized_here = (dropped == full) & (full != x)
    kept_fp = dropped == x
    assert torch.all(quantized_here | kept_fp)
    changed = (full != x).float().mean()
    assert prob - 0.05 < float((quantized_here.float().mean()) / changed) < prob + 0.05
    # the log2 (AGQ) and AdaRound paths drop the same way
    a = torch.softmax(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), -1)
    from saq.quant.quantizers import Log2AGQQuantizer

    agq = Log2AGQQuantizer(3)
    agq.scale.data.fill_(float(a.max()))
    agq.calibrated.fill_(True)
    agq.set_state("quant")
    full = agq(a)
    agq.drop_prob = prob
    torch.manual_seed(0)
    share = float(((agq(a) == full) & (full != a)).float().mean() / (full != a).float().mean())
    assert prob - 0.05 < share < prob + 0.05


def test_a_dropping_quantizer_switched_off_leaves_the_later_masks_as_they_were():
    # the paper-compatible evaluation drops inputs at random; a sensitivity row puts one part in FP, and the parts
    # after it must still draw the masks they draw in the fully quantized row (same seed)
    fp, qmodel, data = toy_models()
    for layer in (qmodel.lin1, qmodel.lin2):
        layer.input_quantizer.drop_prob = 0.5
    states = []
    hook = qmodel.lin2.input_quantizer.register_forward_pre_hook(lambda *_: states.append(torch.get_rng_state()))
    for lin1_state in ("quant", "off"):
        qmodel.lin1.input_quantizer.set_state(lin1_state)
        torch.manual_seed(0)
        with torch.no_grad():
            qmodel(data[0].x)
    hook.remove()
    assert torch.equal(states[0], states[1])


def test_rounding_regularizer_is_off_in_warm_up_then_anneals():
    fp, qmodel, data = toy_models()
    ada = qmodel.lin1.weight_quantizer
    ada.init_soft(qmodel.lin1.weight)
    reg = ReconConfig.from_cfg({"round_reg": {"weight": 0.01, "b_start": 20, "b_end": 2, "warm_up": 0.2}}).round_reg
    assert rounding_regularizer([ada], reg, 19, 100) is None
    h = ada.rectified_sigmoid().detach()
    start = rounding_regularizer([ada], reg, 20, 100).detach()
    end = rounding_regularizer([ada], reg, 100, 100).detach()
    assert float(start) == pytest.approx(0.01 * float((1 - (2 * h - 1).abs().pow(20)).sum()), rel=1e-5)
    assert float(end) == pytest.approx(0.01 * float((1 - (2 * h - 1).abs().pow(2)).sum()), rel=1e-5)
    zero = ReconConfig.from_cfg({"round_reg": {"weight": 0.0}}).round_reg
    assert rounding_regularizer([ada], zero, 50, 100) is None


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = recon_cfg(iters={"block": 30})
    # each unit learns its own layer and both keep what they learned, so the final state holds the resumed run's
    # second unit: a resume that learned it differently (other seed, other data order) would differ
    chain = lambda: [Feed(), Block("first", "lin1"), Block("second", "lin2")]  # noqa: E731
    fp, whole, data = toy_models()
    uninterrupted = Reconstructor(whole, fp, cfg, seed=0, progress=False, chain=chain()).run(data=data)
    assert [u.kept for u in uninterrupted.units] == ["learned", "learned"]

    fp, crashed, data = toy_models()
    checkpoint = tmp_path / "recon.pt"
    original = Reconstructor._save

    def save_then_crash(self, index, report):
        original(self, index, report)
        raise KeyboardInterrupt  # killed right after the first unit was saved

    monkeypatch.setattr(Reconstructor, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        Reconstructor(crashed, fp, cfg, seed=0, progress=False, checkpoint=checkpoint, chain=chain()).run(data=data)
    monkeypatch.setattr(Reconstructor, "_save", original)
    assert checkpoint.is_file()

    fp, resumed, data = toy_models()
    resume_cfg = recon_cfg(iters={"block": 30}, resume=True)
    reconstructor = Reconstructor(resumed, fp, resume_cfg, seed=0, progress=False, checkpoint=checkpoint,
                                  chain=chain())
    report = reconstructor.run(data=data)
    # the taken-over unit counts as learned too (the paper-compatible evaluation drops its inputs as well)
    assert reconstructor.learned_modules == [resumed.lin1, resumed.lin2]
    assert [u.name for u in report.units] == ["first", "second"]
    # the resumed unit keeps what the killed run recorded of it (kept, losses) and is marked, its iterations not
    # counted as this run's
    assert [u.resumed for u in report.units] == [True, False]
    assert [u.kept for u in report.units] == [u.kept for u in uninterrupted.units]
    assert report.units[0].eval_after == uninterrupted.units[0].eval_after
    assert report.as_dict()["iters"] == report.units[1].iters
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_damaged_checkpoint_is_learned_again_not_a_crash(tmp_path, capsys):
    cfg = recon_cfg(iters={"block": 5}, resume=True)
    chain = lambda: [Feed(), Block("first", "lin1"), Block("second", "lin2")]  # noqa: E731
    fp, fresh, data = toy_models()
    expected = Reconstructor(fresh, fp, recon_cfg(iters={"block": 5}), seed=0, progress=False,
                             chain=chain()).run(data=data)
    checkpoint = tmp_path / "recon.pt"
    checkpoint.write_bytes(b"PK\x03\x04 half a file")  # a kill mid-write of another process's file
    fp, qmodel, data = toy_models()
    report = Reconstructor(qmodel, fp, cfg, seed=0, progress=False, checkpoint=checkpoint, chain=chain()).run(data=data)
    assert "cannot resume from" in capsys.readouterr().err
    assert [u.resumed for u in report.units] == [False, False]
    assert [u.eval_after for u in report.units] == [u.eval_after for u in expected.units]
    # the checkpoint is whole again, written through a temporary file of its own that is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon.pt"]
    assert torch.load(checkpoint, weights_only=True)["done"] == 2
    # a bad copy (one byte of a tensor flipped) loads in torch without a word: its checksum refuses it
    intact = checkpoint.read_bytes()
    flip_tensor_byte(checkpoint)
    fp, qmodel, data = toy_models()
    report = Reconstructor(qmodel, fp, cfg, seed=0, progress=False, checkpoint=checkpoint, chain=chain()).run(data=data)
    assert "does not match its checksum); learning every unit again" in capsys.readouterr().err
    assert [u.resumed for u in report.units] == [False, False]
    assert [u.eval_after for u in report.units] == [u.eval_after for u in expected.units]
    checkpoint.write_bytes(intact)
    # a checkpoint of another layout (a tensor missing) is refused before anything of it is loaded
    saved = torch.load(checkpoint, weights_only=True)
    saved["model"].pop(next(iter(saved["model"])))
    torch.save(saved, checkpoint)
    fp, qmodel, data = toy_models()
    report = Reconstructor(qmodel, fp, cfg, seed=0, progress=False, checkpoint=checkpoint, chain=chain()).run(data=data)
    assert "cannot resume from" in capsys.readouterr().err
    assert [u.eval_after for u in report.units] == [u.eval_after for u in expected.units]


def test_units_that_cannot_be_saved_warn_once_and_learning_goes_on(tmp_path, capsys):
    # the run's checks found recon.state_dir writable; a full disk or a folder gone since must not cost the learning
    chain = lambda: [Feed(), Block("first", "lin1"), Block("second", "lin2")]  # noqa: E731
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fp, qmodel, data = toy_models()
    report = Reconstructor(qmodel, fp, recon_cfg(iters={"block": 5}), seed=0, progress=False,
                           checkpoint=blocker / "recon.pt", chain=chain()).run(data=data)
    assert [u.kept for u in report.units] == ["learned", "learned"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"recon: warning: cannot save finished units to {blocker}/recon.pt (File exists: {blocker}); "
                   "this run cannot be resumed"]


def test_the_resume_key_ignores_only_what_does_not_change_the_learned_model():
    from saq.recon import checkpoint_path

    base = checkpoint_path(recon_cfg(), "model|data")
    assert checkpoint_path(recon_cfg(resume=True, paper_eval_compat=True, log_every=3), "model|data") == base
    assert checkpoint_path(recon_cfg(drop_prob=0.25), "model|data") != base
    assert checkpoint_path(recon_cfg(), "model|other-data") != base


def test_a_recon_checkpoint_saved_before_a_knob_existed_still_resumes():
    import hashlib
    import json

    from saq.recon import checkpoint_path

    cfg = recon_cfg(name="par", loss="par")
    before = {k: v for k, v in vars(cfg).items()  # the key as it was made before response_input and mse_sum
              if k not in ("resume", "log_every", "paper_eval_compat", "state_dir", "cache_device", "response_input",
                           "mse_sum")}
    digest = hashlib.sha256(f"m|{json.dumps(before, sort_keys=True, default=str)}".encode()).hexdigest()[:24]
    assert checkpoint_path(cfg, "m").name == f"{digest}.pt"
    assert checkpoint_path(recon_cfg(name="par", loss="par", response_input="quantized"), "m").name != f"{digest}.pt"
    # where the cached tensors live does not change what is learned: a killed run resumes on another cache device
    assert checkpoint_path(recon_cfg(name="par", loss="par", cache_device="cpu"), "m").name == f"{digest}.pt"


def test_pars_decoder_loss_is_a_hundredth_of_the_queries_plus_the_keys_plus_the_tokens():
    from types import SimpleNamespace

    from saq.recon.losses import unit_loss

    step = SimpleNamespace(compared=(0, 1), channel_dims=(-1, -1), response="downstream")  # a two-way layer
    hs = torch.tensor([[3.0, 0.0]])
    loss = unit_loss(ReconConfig.from_cfg({"name": "par"}), step, None, lambda out, data: (out[0] * 0 + hs,))
    queries, keys = torch.zeros(1, 2), torch.zeros(1, 2)
    out = (queries + torch.tensor([[2.0, 0.0]]), keys + torch.tensor([[0.0, 1.0]]))  # errors 4 (queries), 1 (keys)
    value = loss(out, (queries, keys), None, (torch.zeros(1, 2),))  # hs error 9
    assert float(value) == pytest.approx(0.01 * 4 + 1.0 * 1 + 1.0 * 9)


def test_beta_weighs_the_decoder_unit_terms_and_not_the_encoder_output_term():
    from types import SimpleNamespace

    from saq.recon.losses import unit_loss

    cfg = ReconConfig.from_cfg({"name": "par", "par_loss": {"beta": 3.0, "encoder_output_weight": 0.5}})
    zero, one = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    layer = SimpleNamespace(compared=(0, 1), channel_dims=(-1, -1), response="downstream")
    decoder = unit_loss(cfg, layer, None, lambda out, data: (zero,))
    assert float(decoder((zero, one), (zero, zero), None, (zero,))) == pytest.approx(3.0 * 1.0)  # β·key error
    stage = SimpleNamespace(compared=(0,), channel_dims=(-1,), response="probe")
    encoder = unit_loss(cfg, stage, lambda out, data: (zero,), None)
    assert float(encoder((one,), (zero,), None, (zero,))) == pytest.approx(0.5 * 1.0)  # the official code has no β here


def test_mse_sums_over_the_channels_or_like_qdrops_official_loss_over_dim_1():
    from types import SimpleNamespace

    from saq.recon.losses import unit_loss

    step = SimpleNamespace(compared=(0,), channel_dims=(-1,), response=None)  # a ViT half-block: 1 x rows x cols x C
    out, target = (torch.ones(1, 3, 5, 4),), (torch.zeros(1, 3, 5, 4),)
    channels = unit_loss(recon_cfg(), step, None, None)
    official = unit_loss(recon_cfg(mse_sum="dim1"), step, None, None)
    assert float(channels(out, target, None, None)) == 4.0  # summed over the 4 channels
    assert float(official(out, target, None, None)) == 3.0  # summed over the 3 rows, as QDrop's lp_loss does
    with pytest.raises(SaqError, match="recon.mse_sum"):
        recon_cfg(mse_sum="rows")


def test_the_response_is_computed_from_response_from_when_given():
    from types import SimpleNamespace

    from saq.recon.losses import unit_loss

    step = SimpleNamespace(compared=(0, 1), channel_dims=(-1, -1), response="downstream")
    loss = unit_loss(ReconConfig.from_cfg({"name": "par"}), step, None, lambda out, data: (out[0],))
    zero = torch.zeros(1, 2)
    out = (zero, zero)  # no unit error; the response (here the queries themselves) decides the loss
    unmixed = (torch.tensor([[0.0, 2.0]]), zero)
    assert float(loss(out, (zero, zero), None, (zero,))) == 0.0
    assert float(loss(out, (zero, zero), None, (zero,), unmixed)) == 4.0  # hs error of the unmixed pass


def test_cached_tensors_move_asynchronously_only_towards_a_gpu():
    from saq.sam.units import move

    class Recorder:  # records how .to() was asked (a real host copy cannot show the race without a GPU)
        def to(self, device, non_blocking=False):
            self.device, self.non_blocking = torch.device(device), non_blocking
            return self

    # a non-blocking copy to the host may be read by the CPU before it is complete
    assert move(Recorder(), "cpu").non_blocking is False
    assert move(Recorder(), torch.device("cuda", 0)).non_blocking is True
    # the loop's cached states and per-image data move through it
    from saq.recon.loop import _to
    from saq.sam.units import SampleData

    moved = _to((Recorder(), Recorder()), "cpu") + tuple(vars(SampleData(*(Recorder() for _ in range(4))).to("cpu"))
                                                        .values())
    assert len(moved) == 6 and all(r.non_blocking is False and r.device.type == "cpu" for r in moved)
