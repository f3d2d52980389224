"""Quantized modules: QuantLinear and QuantConv2d (weight + input quantizers) and QuantMatMul (both operands)."""

from __future__ import annotations

import torch
from torch import nn

from saq.quant.quantizers import Quantizer


class QuantLayer:
    """A weight layer with a weight quantizer and an input-activation quantizer (paper.md §2.1: activations are
    quantized only where they enter a linear, conv or matmul)."""

    weight: nn.Parameter
    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def harden_weight(self) -> None:
        """Write AdaRound's hard-rounded weight into the layer (after reconstruction)."""
        self.weight.copy_(self.weight_quantizer.harden(self.weight))


class QuantLinear(nn.Linear, QuantLayer):
    """nn.Linear whose input and weight pass through quantizers; with both off it is F.linear exactly."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> QuantLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias  # the same Parameters: state-dict keys do not change
        layer.weight_quantizer, layer.input_quantizer = weight_quantizer, input_quantizer
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d, QuantLayer):
    """nn.Conv2d whose input and weight pass through quantizers; with both off it is the FP convolution exactly."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> QuantConv2d:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(layer, attr, getattr(conv, attr))
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.weight_quantizer, layer.input_quantizer = weight_quantizer, input_quantizer
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantMatMul(nn.Module):
    """a @ b with each operand quantized; the a-quantizer may need b while observing (AGQ scores Â·V)."""

    def __init__(self, a_quantizer: Quantizer, b_quantizer: Quantizer):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a_q = self.a_quantizer(a, b) if self.a_quantizer.uses_partner else self.a_quantizer(a)
        return a_q @ self.b_quantizer(b)
