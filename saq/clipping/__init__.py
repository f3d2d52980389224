"""Clip-range strategies (minmax | percentile | mse | pcc) and building one from the `clip` config."""

from __future__ import annotations

from collections.abc import Mapping

from saq.clipping.base import RangeStrategy, WeightedValues, error_sample
from saq.clipping.minmax import MinMaxClipping
from saq.clipping.mse import MSEClipping
from saq.clipping.pcc import PerceptualConsistencyClipping
from saq.clipping.percentile import PercentileClipping
from saq.errors import SaqError, check_settings_taken

CLIPPING = {"minmax": MinMaxClipping, "percentile": PercentileClipping, "mse": MSEClipping,
            "pcc": PerceptualConsistencyClipping}
REDUCTIONS = ("mean", "extreme")

__all__ = ["CLIPPING", "MSEClipping", "MinMaxClipping", "PercentileClipping", "PerceptualConsistencyClipping",
           "RangeStrategy", "WeightedValues",
           "build_range_strategy", "error_sample"]


def build_range_strategy(clip_cfg) -> RangeStrategy | None:
    """A RangeStrategy from the `clip` config (`_target_` + its knobs, or `name` + knobs); None passes through.

    `name` only labels the run; it is not passed to the class.
    """
    if clip_cfg is None or isinstance(clip_cfg, RangeStrategy):
        return clip_cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(clip_cfg, DictConfig):
            clip_cfg = OmegaConf.to_container(clip_cfg, resolve=True)
    except ImportError:  # omegaconf is a dependency of the entry point only
        pass
    if isinstance(clip_cfg, str):
        clip_cfg = {"name": clip_cfg}
    if not isinstance(clip_cfg, Mapping):
        raise SaqError(f"clip config must be a mapping with _target_ or name, got {type(clip_cfg).__name__}")
    kwargs = dict(clip_cfg)
    name = kwargs.pop("name", None)
    target = kwargs.pop("_target_", None)
    reduction = kwargs.pop("reduction", RangeStrategy.reduction)
    if reduction not in REDUCTIONS:
        raise SaqError(f"clip.reduction={reduction!r} is unknown; expected one of {list(REDUCTIONS)}")
    if target is None:
        if name not in CLIPPING:
            raise SaqError(f"clip.name={name!r} is unknown; expected one of {sorted(CLIPPING)}")
        cls = CLIPPING[name]
    else:
        cls = _resolve_target(target)
        if name in CLIPPING and CLIPPING[name] is not cls:  # clip=mse clip.name=pcc: MSE reported as PCC
            raise SaqError(f"clip.name={name!r} labels the run as {CLIPPING[name].__name__}, but clip._target_ "
                           f"builds {cls.__name__}: choose the preset with clip={name} rather than renaming one")
    check_settings_taken(cls, kwargs, "clip", cls.__name__, also=("reduction",))
    strategy = cls(**kwargs)
    strategy.reduction = reduction
    return strategy


def _resolve_target(target: str) -> type[RangeStrategy]:
    import importlib

    module_name, _, attr = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise SaqError(f"clip._target_={target!r} cannot be imported; expected e.g. saq.clipping.MSEClipping") from None
    if not (isinstance(cls, type) and issubclass(cls, RangeStrategy)):
        raise SaqError(f"clip._target_={target!r} is not a range strategy (a saq.clipping.RangeStrategy subclass)")
    return cls
