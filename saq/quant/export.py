"""Saving and loading a calibrated quantized model: a tensors-only state_dict plus a JSON recipe (no pickled modules)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from saq.errors import SaqError
from saq.quant.model import iter_quantizers, quant_config, quantize
from saq.quant.quantizers import QuantState

RECIPE_FILE = "recipe.json"
STATE_FILE = "quantized_state.pt"
FORMAT_VERSION = 1


def export_quantized(qmodel: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write directory/recipe.json (the quant config) and directory/quantized_state.pt (weights + quantizer tensors).

    Only calibrated models can be exported; `extra` (e.g. model name, clip config) is stored in the recipe as is.
    """
    cfg = quant_config(qmodel)
    uncalibrated = [q.name for q in iter_quantizers(qmodel) if not bool(q.calibrated)]
    if uncalibrated:
        raise SaqError(f"cannot export: {len(uncalibrated)} quantizers are not calibrated (first: {uncalibrated[0]})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items()}
    torch.save(state, directory / STATE_FILE)
    recipe = {"format": FORMAT_VERSION, "quant": cfg.to_dict(), "extra": extra or {}}
    (directory / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    return directory


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the quantized model from an FP model of the same architecture and an export; every quantizer on.

    The FP model's weights are not used (the export holds the quantized model's own, e.g. after BIG folding).
    """
    directory = Path(directory)
    recipe_path, state_path = directory / RECIPE_FILE, directory / STATE_FILE
    for path in (recipe_path, state_path):
        if not path.is_file():
            raise SaqError(f"not a quantized-model export: {path} is missing")
    try:
        recipe = json.loads(recipe_path.read_text())
    except json.JSONDecodeError as exc:
        raise SaqError(f"{recipe_path} is not valid JSON: {exc}") from None
    if recipe.get("format") != FORMAT_VERSION:
        raise SaqError(f"{recipe_path} has format {recipe.get('format')!r}; this version reads {FORMAT_VERSION}")
    qmodel = quantize(model, recipe["quant"])
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    try:
        missing, unexpected = qmodel.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: an export of another architecture
        raise SaqError(f"{state_path} does not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise SaqError(f"{state_path} does not fit the model: {len(missing)} tensors missing, {len(unexpected)} "
                       f"unexpected (first: {first})")
    device = next(model.parameters()).device
    qmodel.to(device)
    for quantizer in iter_quantizers(qmodel):
        quantizer.set_state(QuantState.QUANT)  # raises for any quantizer the export did not mark calibrated
    return qmodel
