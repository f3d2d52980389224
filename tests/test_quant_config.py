"""The quant/clip configs: presets compose and parse, overrides apply, bad values give one clear SaqError line."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from saq.errors import SaqError
from saq.quant import QuantConfig, quantize
from saq.sam.build import build_random_sam
from tests.conftest import REPO

torch.set_num_threads(1)


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name=None, overrides=list(overrides))


@pytest.mark.parametrize("preset,bits", [("w8a8", 8), ("w6a6", 6), ("w4a4", 4)])
def test_presets_compose_and_parse(preset, bits):
    cfg = QuantConfig.from_cfg(_compose(f"+quant={preset}").quant)
    assert cfg.name == preset and cfg.w_bits == bits and cfg.a_bits == bits
    assert cfg == QuantConfig(name=preset, w_bits=bits, a_bits=bits)  # the YAML states the code's defaults
    assert cfg.calib_images == 32 and cfg.big and cfg.agq and cfg.agq_taus == (1, 2, 4)
    for part in ("encoder", "decoder"):
        assert cfg.bits(part, "weight") == bits and cfg.bits(part, "act") == bits


def test_overrides_reach_both_parts_and_parts_can_differ():
    cfg = QuantConfig.from_cfg(_compose("+quant=w4a4", "quant.w_bits=3", "quant.decoder.a_bits=6").quant)
    assert cfg.bits("encoder", "weight") == cfg.bits("decoder", "weight") == 3
    assert cfg.bits("encoder", "act") == 4 and cfg.bits("decoder", "act") == 6
    assert QuantConfig.from_cfg(cfg.to_dict()) == cfg  # the JSON recipe round-trips


@pytest.mark.parametrize("option", ["minmax", "percentile", "mse"])
def test_clip_options_build(option):
    from saq.clipping import CLIPPING, build_range_strategy

    cfg = _compose(f"+clip={option}").clip
    assert cfg.name == option and isinstance(build_range_strategy(cfg), CLIPPING[option])


def _error(cfg) -> str:
    with pytest.raises(SaqError) as info:
        QuantConfig.from_cfg(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("bits", [0, 1, 9, 17, 4.0, "8", True])
def test_bad_bits(bits):
    message = _error({"w_bits": bits})
    assert message.startswith(f"quant.w_bits={bits!r} is not allowed") and "2 to 8" in message
    assert "quant.decoder.a_bits" in _error({"decoder": {"a_bits": bits}})


def test_unknown_observer_quantizer_granularity_and_key():
    message = _error({"encoder": {"act": {"observer": "kl_divergence"}}})
    assert "quant.encoder.act.observer='kl_divergence' is unknown" in message
    assert "['avg_minmax', 'minmax', 'mse', 'percentile']" in message
    assert "quant.decoder.weight.quantizer='brecq'" in _error({"decoder": {"weight": {"quantizer": "brecq"}}})
    assert "quant.encoder.act.quantizer='adaround'" in _error({"encoder": {"act": {"quantizer": "adaround"}}})
    assert "per_group" in _error({"encoder": {"weight": {"granularity": "per_group"}}})
    assert "quant.w_bit is not a known key" in _error({"w_bit": 4})
    assert "quant.encoder.weight.obsrver is not a known key" in _error({"encoder": {"weight": {"obsrver": "mse"}}})
    assert "quant.big='yes'" in _error({"big": "yes"})
    assert "quant.agq_taus" in _error({"agq_taus": [0, 2]})
    assert "quant=fp means no quantization" in _error({"name": "fp"})


def test_weight_channel_axis_is_output_or_input_channels():
    # the encoder's linears (out, in) and neck convs (out, in, kh, kw) share the spec: -1 would be a linear's input
    # channels but a conv's kernel width
    for axis in (2, -1, 5):
        assert _error({"encoder": {"weight": {"ch_axis": axis}}}).startswith(
            f"quant.encoder.weight.ch_axis={axis} invalid; expected 0 (output channels) or 1 (input channels)")
    qmodel = quantize(build_random_sam("sam_tiny", 0), {"encoder": {"weight": {"ch_axis": 1}}})
    assert qmodel.image_encoder.neck[0].weight_quantizer.ch_axis == 1
    assert qmodel.image_encoder.blocks[0].attn.qkv.weight_quantizer.ch_axis == 1


def test_choices_given_as_lists_or_nothing_and_a_model_that_quantizes_nothing_are_one_line():
    assert _error({"encoder": {"weight": {"quantizer": ["adaround"]}}}) == (
        "quant.encoder.weight.quantizer=['adaround'] invalid; expected a name")
    assert _error({"decoder": {"act": {"granularity": ["per_tensor"]}}}).startswith("quant.decoder.act.granularity=")
    assert _error({"decoder": {"weight": {"observer": None}}}).startswith(
        "quant.decoder.weight.observer=None invalid; expected one of")  # not the activations' default, silently
    assert _error({"encoder": {"enabled": False}, "decoder": {"enabled": False}}).startswith(
        "quant.encoder.enabled and quant.decoder.enabled are both false: nothing would be quantized")


def test_calibrate_refuses_a_config_other_than_the_models():
    from saq.quant import calibrate, set_quant_state

    qmodel = quantize(build_random_sam("sam_tiny", 0), {"name": "w8a8"})
    with pytest.raises(SaqError, match=r"calibrate\(\): quant_cfg sets quant.w_bits=4, but the model was quantized "
                                       r"with 8; pass that config"):
        calibrate(qmodel, [], {"name": "w4a4", "w_bits": 4, "a_bits": 8}, None, progress=False)
    # the label and the calibration data's size and batching change no quantizer: accepted (then no samples)
    with pytest.raises(SaqError, match="calibration needs at least one sample"):
        calibrate(qmodel, [], {"name": "mine", "calib_decode_batch": 8, "calib_images": 4}, None, progress=False)
    # a config built by hand is checked like a mapping
    from saq.quant.config import PartSpec, TensorSpec

    axis = QuantConfig(encoder=PartSpec(weight=TensorSpec("adaround", "per_channel", -1, False, "mse")))
    with pytest.raises(SaqError, match=r"quant.encoder.weight.ch_axis=-1 invalid"):
        quantize(build_random_sam("sam_tiny", 0), axis)
    with pytest.raises(SaqError, match=r"quantizer state 'on' unknown; expected one of \['off', 'observe', 'quant'\]"):
        set_quant_state(qmodel, "on")


@pytest.mark.parametrize("axis", [0, 1, 5])
def test_an_activation_channel_axis_other_than_the_last_is_refused_up_front(axis):
    # a decoder linear input is (prompts, tokens, channels): axis 0 would quantize per prompt and fail on another count
    sam = build_random_sam("sam_tiny", 0)
    with pytest.raises(SaqError) as info:
        quantize(sam, {"big": False, "decoder": {"act": {"granularity": "per_channel", "ch_axis": axis}}})
    message = str(info.value)
    assert message.startswith(f"quant.decoder.act.ch_axis={axis} invalid; expected -1")
    assert "\n" not in message
    quantize(sam, {"big": False, "decoder": {"act": {"ch_axis": axis}}})  # per tensor the axis is unused: allowed
