"""Saving and loading a calibrated quantized model: a tensors-only state_dict plus a JSON recipe (no pickled modules)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from saq.errors import SaqError
from saq.quant.config import QuantConfig
from saq.quant.model import iter_quantizers, quant_config, quantize
from saq.quant.quantizers import Quantizer, QuantState
from saq.torchfile import damaged_record

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
    from saq.log import atomic_path, write_json_atomic

    directory = Path(directory)
    state = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items()}
    # what set each range (mse, a PCC search point, ...): not in the tensors, and what quant_summary shows
    observers = {name: q.observer.name for name, q in qmodel.named_modules()
                 if isinstance(q, Quantizer) and getattr(q, "observer", None) is not None}
    recipe = {"format": FORMAT_VERSION, "quant": cfg.to_dict(), "extra": extra or {}, "observers": observers,
              "quantizers": quantizer_layout(qmodel)}
    try:
        with atomic_path(directory / STATE_FILE) as tmp:  # a full disk leaves no truncated state file
            torch.save(state, tmp)
        write_json_atomic(directory / RECIPE_FILE, recipe)  # last: a folder with a recipe holds a whole model
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as RuntimeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaqError(f"cannot save the quantized model into {directory}: {reason}") from None
    return directory


def quantizer_layout(qmodel: nn.Module) -> dict[str, dict]:
    """Each quantizer's type, bits and granularity, by module path: what the tensors were made for.

    Loading rebuilds the quantizers from the recipe's config, so a code change in how a config maps to quantizers
    (another channel axis, another quantizer type) would otherwise load the saved tensors into the wrong grid.
    """
    return {q.name: {k: v for k, v in q.describe().items() if k != "observer"} for q in iter_quantizers(qmodel)}


def read_recipe(directory: str | Path) -> dict:
    """directory/recipe.json, checked to be an export's recipe (SaqError naming the file otherwise)."""
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        raise SaqError(f"not a quantized-model export: {path} is missing")
    try:
        recipe = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SaqError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise SaqError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(recipe, dict):
        raise SaqError(f"{path} is not a quantized-model recipe: a JSON {type(recipe).__name__}, not an object")
    if recipe.get("format") != FORMAT_VERSION:
        raise SaqError(f"{path} has format {recipe.get('format')!r}; this version reads {FORMAT_VERSION}")
    if not isinstance(recipe.get("quant"), dict):
        raise SaqError(f"{path} is not a quantized-model recipe: no \"quant\" settings object")
    for key in ("extra", "observers", "quantizers"):  # the last two: absent from exports made before they were kept
        if not isinstance(recipe.get(key, {}), dict):
            raise SaqError(f"{path} is not a quantized-model recipe: \"{key}\" is not an object")
    _read_legacy_weight_axis(recipe["quant"], path)
    try:  # said as the file's, not as if the user had typed a bad quant.* setting
        QuantConfig.from_cfg(recipe["quant"])
    except SaqError as exc:
        raise SaqError(f"{path}: its quant settings are not valid in this version of saq ({exc}); save the model "
                       "again (a run with quant.save)") from None
    return recipe


def _read_legacy_weight_axis(quant: dict, path: Path) -> None:
    """Exports of before 2026-12-02 could have a per-channel weight ch_axis of -1: the decoder's (linears only) meant
    input channels, 1 now; the encoder's also quantized the neck convs per kernel column, which no config makes now."""
    for part in ("encoder", "decoder"):
        spec = quant.get(part)
        weight = spec.get("weight") if isinstance(spec, dict) else None
        if not isinstance(weight, dict) or weight.get("ch_axis") != -1 or weight.get("granularity") != "per_channel":
            continue
        if part == "encoder":
            raise SaqError(f"{path} was saved with quant.encoder.weight.ch_axis=-1, which quantized the neck convs "
                           "per kernel column (no longer allowed: 0 or 1); run it again")
        weight["ch_axis"] = 1


def check_state_file(directory: str | Path) -> Path:
    """directory/quantized_state.pt, checked to exist and to be a whole PyTorch (zip) file whose records match their
    checksums (read once, not loaded)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise SaqError(f"not a quantized-model export: {path} is missing")
    if not zipfile.is_zipfile(path):  # a truncated file has lost the zip directory at its end
        raise SaqError(f"{path} is truncated or not a PyTorch file; save the model again (a run with quant.save)")
    damaged = damaged_record(path)
    if damaged is not None:  # torch.load would read the flipped bytes as weights
        raise SaqError(f"{path} is damaged: its record {damaged} does not match the checksum the file stores; save "
                       "the model again (a run with quant.save)")
    return path


def check_layout(qmodel: nn.Module, saved: dict | None, directory: str | Path) -> None:
    """SaqError naming the first quantizer whose saved type/bits/granularity differs from the one rebuilt here."""
    if saved is None:  # an export made before the layout was recorded: only tensor shapes were checked
        return
    built = quantizer_layout(qmodel)
    for name in sorted(set(saved) | set(built)):
        if saved.get(name) != built.get(name):
            raise SaqError(f"{directory} does not fit this version of saq: quantizer {name} was saved as "
                           f"{saved.get(name, 'absent')} and is built here as {built.get(name, 'absent')}; "
                           "save the model again (a run with quant.save)")


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the quantized model from an FP model of the same architecture and an export; every quantizer on.

    The FP model's weights are not used (the export holds the quantized model's own, e.g. after BIG folding).
    """
    recipe = read_recipe(directory)
    state_path = check_state_file(directory)
    qmodel = quantize(model, recipe["quant"])
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files; all mean the same to the user
        raise SaqError(f"{state_path} is not a readable PyTorch file ({type(exc).__name__}); save the model "
                       "again (a run with quant.save)") from None
    if not isinstance(state, dict):
        raise SaqError(f"{state_path} is not a state dict of tensors (found {type(state).__name__})")
    try:
        missing, unexpected = qmodel.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: an export of another architecture
        raise SaqError(f"{state_path} does not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise SaqError(f"{state_path} does not fit the model: {len(missing)} tensors missing, {len(unexpected)} "
                       f"unexpected (first: {first})")
    check_layout(qmodel, recipe.get("quantizers"), directory)
    device = next(model.parameters()).device
    qmodel.to(device)
    for quantizer in iter_quantizers(qmodel):
        quantizer.set_state(QuantState.QUANT)  # raises for any quantizer the export did not mark calibrated
    modules = dict(qmodel.named_modules())
    for name, label in recipe.get("observers", {}).items():
        observer = getattr(modules.get(name), "observer", None)
        if hasattr(observer, "relabel"):  # AGQ's observer names itself from its searched tau
            observer.relabel(str(label))
    return qmodel
