"""MinMax range strategy: the batch's own minimum and maximum, no clipping."""

from __future__ import annotations

import torch

from saq.clipping.base import RangeStrategy, channels_first
from saq.quant.grid import QuantGrid


class MinMaxClipping(RangeStrategy):
    """[min(x), max(x)] per tensor or per channel."""

    name = "minmax"
    union_by_extremes = True

    def batch_range(self, x: torch.Tensor, grid: QuantGrid, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if ch_axis is None:
            return torch.aminmax(x)
        return torch.aminmax(channels_first(x, ch_axis), dim=1)
