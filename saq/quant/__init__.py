"""Fake quantization of SAM: quantizers, observers, quantized modules, quantize()/calibrate(), BIG, export."""

from saq.quant.big import BigResult, apply_big
from saq.quant.config import QuantConfig, QuantizerFactory
from saq.quant.export import export_quantized, load_quantized
from saq.quant.model import (
    CalibrationReport,
    assert_fully_quantized,
    calibrate,
    calibrate_weights,
    iter_quantizers,
    quant_config,
    quant_states,
    quant_summary,
    quantize,
    set_quant_state,
)
from saq.quant.modules import QuantConv2d, QuantLayer, QuantLinear, QuantMatMul
from saq.quant.observers import (
    OBSERVERS,
    AGQObserver,
    AvgMinMaxObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from saq.quant.quantizers import (
    AdaRoundQuantizer,
    Log2AGQQuantizer,
    LSQQuantizer,
    Quantizer,
    QuantState,
    UniformQuantizer,
)

__all__ = [
    "OBSERVERS", "AGQObserver", "AdaRoundQuantizer", "AvgMinMaxObserver", "BigResult", "CalibrationReport",
    "LSQQuantizer", "Log2AGQQuantizer", "MSEObserver", "MinMaxObserver", "Observer", "PercentileObserver",
    "QuantConfig", "QuantConv2d", "QuantLayer", "QuantLinear", "QuantMatMul", "QuantState", "Quantizer",
    "QuantizerFactory", "UniformQuantizer", "apply_big", "assert_fully_quantized", "calibrate", "calibrate_weights",
    "export_quantized", "iter_quantizers", "load_quantized", "make_observer", "quant_config", "quant_states",
    "quant_summary", "quantize", "set_quant_state",
]
