"""int8 deployment of a calibrated W8A8 model: ONNX encoder and decoder with saq's own Q/DQ parameters, and a runner.

`python -m saq.deploy RUN_DIR` reads the quantized model a run saved (quant.save), writes RUN_DIR/deployed/
{image_encoder,mask_decoder}.onnx and deploy.json, and prints which operators ONNX Runtime runs in int8.

How the graph is made: every activation quantizer becomes a QuantizeLinear/DequantizeLinear pair with its calibrated
scale and zero-point (per tensor, uint8), every weight an int8 initializer (codes shifted by 128 from saq's
asymmetric [0, 255] grid, zero-points too, so the dequantized values are unchanged) behind a per-channel
DequantizeLinear. ONNX Runtime's graph optimizer then fuses DQ -> MatMul into MatMulIntegerToFloat (u8 x s8 int8
GEMM). What stays float: everything saq does not quantize (norms, softmax, GELU, patch embedding, upscaling, heads),
the neck's convolutions (ONNX Runtime has no int8 convolution with a float output), and softmax * V, whose
post-softmax operand uses AGQ's log2 codes: they have no ONNX int8 operator, so that matmul runs in float, its
post-softmax operand left unquantized (default) or log2-rounded in float ops (softmax=log2; see SOFTMAX_MODES).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saq.errors import SaqError
from saq.log import DEPLOY_DIR, RunDirHeld, claim_run_dir, folder_write_problem, write_json_atomic
from saq.quant.config import QuantConfig
from saq.quant.model import assert_fully_quantized, iter_quantizers, quant_config
from saq.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from saq.quant.quantizers import Log2AGQQuantizer, Quantizer, UniformQuantizer
from saq.saved import EXPORT_ID_ATTR
from saq.sweep import one_line

ENCODER_FILE, DECODER_FILE, REPORT_FILE = "image_encoder.onnx", "mask_decoder.onnx", "deploy.json"
DEPLOY_LOCK = ".deploy.lock"  # in the deployment folder: one export at a time moves files into it
# how far saq's fake-quantized weight may sit from an int8 code (in steps) and still be that code: float rounding of
# ŵ / s is ~1e-5 steps, while soft AdaRound rounding puts weights anywhere between two codes
GRID_TOLERANCE = 1e-3
OPSET = 17
# Optimized-graph operators that compute in integers, and float operators that do the heavy work.
INT8_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger", "QGemm",
            "DynamicQuantizeMatMul", "QAttention", "QLinearAdd"}
FLOAT_COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedGemm", "FusedConv", "Einsum",
                     "NchwcConv"}
# ONNX Runtime fuses MatMul + Add into Gemm before its QDQ fusion sees the MatMul; with it on, no linear goes int8.
DISABLED_OPTIMIZERS = ["MatMulAddFusion"]
# What becomes of softmax * V's post-softmax operand, whose AGQ log2 codes no ONNX int8 operator takes:
# float: left unquantized (the fast choice; the deployed model is then slightly closer to FP than saq's W8A8);
# log2: saq's log2 rounding computed in float ops (saq's fake-quant formula; costs a pass of 10 ops over
# every attention map, which on ViT-B's global attention is slower than the int8 GEMMs save).
SOFTMAX_MODES = ("float", "log2")


# -- export modules: the calibrated quantizers, written so that torch.onnx emits Q/DQ ----------------------------------
class _QuantDequant(torch.autograd.Function):
    """x -> DequantizeLinear(QuantizeLinear(x)), per tensor; forward computes the same (x / s, as ONNX does)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        info = torch.iinfo(zero_point.dtype)
        z = zero_point.float()
        return (torch.clamp(torch.round(x / scale) + z, info.min, info.max) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class _Dequant(torch.autograd.Function):
    """int8 codes -> DequantizeLinear along `axis` (per channel) or per tensor."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):
        shape = [1] * codes.ndim
        if scale.ndim:
            shape[axis] = -1
        return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


def _int8_codes(quantizer: UniformQuantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """saq's weight codes as int8 (and per-channel scale and int8 zero-point), from the quantizer's own output.

    Reading the codes back from ŵ covers every rounding saq has (nearest, AdaRound's learned, LSQ's step).
    """
    axis = quantizer.axis_for(weight)
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    scale = quantizer.scale.detach().float().reshape(shape)
    zero_point = quantizer.zero_point.detach().float().reshape(shape)
    with torch.no_grad():
        exact = quantizer.quantize(weight.detach()) / scale + zero_point
    codes = torch.round(exact)
    off = float((exact - codes).abs().max()) if codes.numel() else 0.0
    if off > GRID_TOLERANCE:  # rounding them here would deploy another model than the one saq evaluates
        raise SaqError(f"cannot deploy {quantizer.name}: its weights are not on the int8 grid (soft AdaRound rounding?): "
                       f"up to {off:.3g} of a step off; harden the rounding first")
    shift = 0 if quantizer.grid.symmetric else 128  # [0, 255] -> [-128, 127]; (q - z) is unchanged
    codes, zero_point = codes - shift, zero_point - shift
    if codes.min() < -128 or codes.max() > 127:
        raise SaqError(f"cannot deploy {quantizer.name}: its weight codes do not fit int8")
    return codes.to(torch.int8), scale.flatten() if axis is not None else scale.reshape(()), \
        zero_point.flatten().to(torch.int8) if axis is not None else zero_point.reshape(()).to(torch.int8)


class QDQ(nn.Module):
    """A calibrated per-tensor 8-bit activation quantizer as a QuantizeLinear/DequantizeLinear pair."""

    uses_partner = False

    def __init__(self, quantizer: UniformQuantizer):
        super().__init__()
        dtype = torch.int8 if quantizer.grid.symmetric else torch.uint8
        self.register_buffer("scale", quantizer.scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().reshape(()).to(dtype).clone())

    def forward(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> torch.Tensor:
        return _QuantDequant.apply(x, self.scale, self.zero_point)


class Log2Float(nn.Module):
    """AGQ's log2 quantizer in float ops (ONNX has no log2-coded int8 operator): saq's fake-quant formula."""

    uses_partner = False

    def __init__(self, quantizer: Log2AGQQuantizer):
        super().__init__()
        self.register_buffer("scale", quantizer.scale.detach().float().reshape(()).clone())
        self.tau, self.levels = float(quantizer.tau_value), 2**quantizer.bits

    def forward(self, a: torch.Tensor, partner: torch.Tensor | None = None) -> torch.Tensor:
        tiny = torch.finfo(torch.float32).tiny
        code = torch.round(torch.log(torch.clamp(a, min=tiny) / self.scale) * (-self.tau / math.log(2.0)))
        a_hat = self.scale * torch.pow(2.0, torch.clamp(code, 0, self.levels - 1) / -self.tau)
        return torch.where(code < self.levels, a_hat, torch.zeros_like(a_hat))


class Unquantized(nn.Module):
    """An operand the deployed graph leaves in float."""

    uses_partner = False

    def forward(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> torch.Tensor:
        return x


class DeployLinear(nn.Module):
    """QuantLinear as DQ(x) @ DQ(int8 Wᵀ) + b: the pattern ONNX Runtime turns into MatMulIntegerToFloat."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        codes, scale, zero_point = _int8_codes(layer.weight_quantizer, layer.weight)
        self.register_buffer("codes_t", codes.t().contiguous())  # in x out: per-channel axis 1
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.input_quantizer = export_quantizer(layer.input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(self.input_quantizer(x), _Dequant.apply(self.codes_t, self.scale, self.zero_point, 1))
        return out if self.bias is None else out + self.bias


class DeployConv2d(nn.Module):
    """QuantConv2d as conv(DQ(x), DQ(int8 W)); ONNX Runtime keeps it float (no int8 conv with a float output)."""

    def __init__(self, layer: QuantConv2d):
        super().__init__()
        codes, scale, zero_point = _int8_codes(layer.weight_quantizer, layer.weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.input_quantizer = export_quantizer(layer.input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _Dequant.apply(self.codes, self.scale, self.zero_point, 0)
        return nn.functional.conv2d(self.input_quantizer(x), weight, self.bias, self.stride, self.padding,
                                    self.dilation, self.groups)


def export_quantizer(quantizer: Quantizer, softmax: str = "float") -> nn.Module:
    if isinstance(quantizer, Log2AGQQuantizer):
        return Log2Float(quantizer) if softmax == "log2" else Unquantized()
    if isinstance(quantizer, UniformQuantizer) and quantizer.ch_axis is None:
        return QDQ(quantizer)
    raise SaqError(f"cannot deploy {quantizer.name}: only per-tensor uniform activation quantizers map onto "
                   "ONNX QuantizeLinear here (set quant.*.act.granularity=per_tensor)")


def require_onnx(what: str) -> None:
    """SaqError unless onnx and onnxruntime import: said before any compute, not when the export starts."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise SaqError(f"{what} needs onnx and onnxruntime ({exc}); install the project (make setup)") from None


def check_deploy_config(quant_cfg) -> None:
    """SaqError (one line) unless a quant config (QuantConfig or the `quant` mapping; None for FP) is W8A8."""
    if quant_cfg is None:
        raise SaqError("deploy=true needs a quantized W8A8 model: set quant=w8a8 (or quant.load=RUN_DIR of one)")
    cfg = QuantConfig.from_cfg(quant_cfg)
    for part in ("encoder", "decoder"):
        weight = cfg.part(part).weight
        if cfg.part(part).enabled and weight.granularity == "per_channel" and weight.ch_axis != 0:
            # the int8 layers dequantize per output channel (axis 0); another axis would need other kernels
            raise SaqError(f"cannot deploy: quant.{part}.weight.ch_axis={weight.ch_axis}; int8 export needs per-output-"
                           "channel weights (ch_axis=0) or per_tensor")
        act = cfg.part(part).act
        if cfg.part(part).enabled and act.granularity != "per_tensor":
            raise SaqError(f"cannot deploy: quant.{part}.act.granularity={act.granularity}; ONNX QuantizeLinear "
                           f"takes per-tensor activations here (set quant.{part}.act.granularity=per_tensor)")
        if cfg.part(part).enabled and act.symmetric:  # measured: 14 of the decoder's 39 linears then stay float
            raise SaqError(f"cannot deploy: quant.{part}.act.symmetric=true; ONNX Runtime fuses its int8 GEMMs for "
                           f"uint8 (asymmetric) activations only (set quant.{part}.act.symmetric=false)")
        if cfg.part(part).enabled and (cfg.bits(part, "act") != 8 or cfg.bits(part, "weight") != 8):
            raise SaqError(f"cannot deploy: int8 kernels need W8A8, the {part} is W{cfg.bits(part, 'weight')}"
                           f"A{cfg.bits(part, 'act')} (quant=w8a8)")


def check_deployable(qmodel: nn.Module) -> None:
    """SaqError (one line) unless the model is a calibrated W8A8 saq model that quantizes fully: every quantizer on,
    rounding hard and quantizing every element, as the exported graph does."""
    check_deploy_config(quant_config(qmodel))
    never = [q.name for q in iter_quantizers(qmodel) if not bool(q.calibrated)]
    if never:
        raise SaqError(f"cannot deploy: {len(never)} quantizers were never calibrated (first: {never[0]}); deploy a "
                       "calibrated run's saved model")
    try:  # the graph quantizes everything: a quantizer off or dropping would make it another model than saq's
        assert_fully_quantized(qmodel)
    except SaqError as exc:
        raise SaqError(f"cannot deploy: {exc}") from None


def export_graph_modules(qmodel: nn.Module, softmax: str = "float") -> nn.Module:
    """A copy of the calibrated model whose quantized layers and quantizers emit Q/DQ when exported."""
    if softmax not in SOFTMAX_MODES:
        raise SaqError(f"softmax={softmax!r} unknown; expected one of {list(SOFTMAX_MODES)}")
    check_deployable(qmodel)
    model = copy.deepcopy(qmodel).cpu().eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                setattr(parent, name, DeployLinear(child))
            elif isinstance(child, QuantConv2d):
                setattr(parent, name, DeployConv2d(child))
            elif isinstance(child, QuantMatMul):
                child.a_quantizer = export_quantizer(child.a_quantizer, softmax)
                child.b_quantizer = export_quantizer(child.b_quantizer, softmax)
    return model


class _DecoderGraph(nn.Module):
    """The mask decoder as one graph: all four mask outputs and IoU predictions for a batch of prompts."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings, image_pe, sparse, dense):
        return self.decoder.predict_masks(image_embeddings, image_pe, sparse, dense)


def _export(module: nn.Module, inputs: tuple, path: Path, names: list[str], outputs: list[str], dynamic: dict) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, inputs, str(path), opset_version=OPSET, input_names=names, output_names=outputs,
                          dynamic_axes=dynamic, do_constant_folding=True, dynamo=False)


def export_graphs(model: nn.Module, directory: str | Path) -> None:
    """Write a SAM's image encoder and mask decoder as ONNX (float, or int8 after export_graph_modules)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = model.image_encoder.img_size
    emb = model.prompt_encoder.image_embedding_size
    dim = model.prompt_encoder.embed_dim
    _export(model.image_encoder, (torch.zeros(1, 3, size, size),), directory / ENCODER_FILE, ["image"],
            ["image_embeddings"], {})
    prompts = 3
    decoder_inputs = (torch.zeros(1, dim, *emb), torch.zeros(1, dim, *emb), torch.zeros(prompts, 2, dim),
                      torch.zeros(prompts, dim, *emb))
    _export(_DecoderGraph(model.mask_decoder), decoder_inputs, directory / DECODER_FILE,
            ["image_embeddings", "image_pe", "sparse", "dense"], ["masks", "iou_predictions"],
            {"sparse": {0: "prompts", 1: "tokens"}, "dense": {0: "prompts"}, "masks": {0: "prompts"},
             "iou_predictions": {0: "prompts"}})


def deploy_folder(directory: str | Path, knob: str | None = None) -> Path:
    """The absolute folder an export writes into, or SaqError when it cannot be one (checked before any work).
    knob: the setting that gave it (saq.deploy's out), named in the error."""
    directory = Path(os.path.abspath(directory))  # out=. or out=a/.. name the folder they mean
    if not directory.name:  # the file system root: never a deployment's own folder
        raise SaqError(f"cannot deploy into {directory}: a folder without a name (the file system root); give a "
                       f"folder inside it, e.g. out={directory / DEPLOY_DIR}")
    problem = folder_write_problem(directory)  # a file in the way is said now, not as mkdir's errno after the export
    if problem:
        named = f"{knob}={directory}" if knob else str(directory)
        raise SaqError(f"cannot deploy into {named} ({problem}); give a writable folder")
    return directory


def export_onnx(qmodel: nn.Module, directory: str | Path, softmax: str = "float") -> dict:
    """Write the int8 ONNX encoder and decoder of a calibrated model into `directory`; returns the operator report."""
    from saq.log import file_lock, set_aside, set_aside_stamp

    directory = deploy_folder(directory)
    model = export_graph_modules(qmodel, softmax)
    with contextlib.ExitStack() as stack:
        lock = directory / DEPLOY_LOCK
        try:
            held = stack.enter_context(file_lock(lock, wait=False))
        except BlockingIOError:
            raise SaqError(f"another process is deploying into {directory} (it holds {lock}); wait for it to "
                           "finish, or give this one another folder (out=...)") from None
        if held:  # every export stages under this lock, so a staging folder found now is a killed export's
            _remove_leftover_staging(directory)
        # built whole in a folder of its own, then moved in: a failed or killed export leaves the earlier deployment
        # as it was, never a new encoder beside an old decoder. Inside the target: the moves are renames on one
        # file system (a target linked to another one, or in a folder this process cannot write, would fail them
        # after the earlier deployment was set aside)
        staging = directory / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}.partial"
        staging.mkdir(parents=True)
        stack.callback(shutil.rmtree, staging, ignore_errors=True)
        start = time.perf_counter()
        export_graphs(model, staging)
        uses_agq = any(isinstance(q, Log2AGQQuantizer) for q in iter_quantizers(qmodel))
        # without AGQ (quant.agq=false) the post-softmax operand has a uniform quantizer and goes int8 like the rest
        report = {"export_s": round(time.perf_counter() - start, 1), "opset": OPSET,
                  "softmax": softmax if uses_agq else "uniform",
                  # the saved model it was made from (None: one never saved), which deployed_sam checks
                  "export_id": getattr(qmodel, EXPORT_ID_ATTR, None)}
        for key, name in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
            report[key] = operator_report(staging / name, directory / name)
        write_json_atomic(staging / REPORT_FILE, report)
        directory.mkdir(parents=True, exist_ok=True)
        # deploy.json marks a whole deployment: the earlier one's leaves first and the new one comes in last, so a
        # move cut short leaves a folder deployed_sam refuses, not new graphs under an old report or the reverse
        moves = sorted(staging.iterdir(), key=lambda p: (p.name == REPORT_FILE, p.name))
        stamp = set_aside_stamp()  # one for all the earlier deployment's files: a second ticking over
        for name in dict.fromkeys([REPORT_FILE, *(b.name for b in moves)]):  # must not part them; kept, not replaced
            if (directory / name).exists():
                kept = set_aside(directory / name, "previous", stamp)
                print(f"{directory / name} held an earlier deployment; kept as {kept}")
        for built in moves:
            built.replace(directory / built.name)
    return report


STAGING_PREFIX = ".export."  # + 8 hex digits + ".partial": an export's staging folder inside its target


def _remove_leftover_staging(directory: Path) -> None:
    """Remove the staging folders that exports into `directory` killed midway left: inside it, and beside it
    (.<name>.<id>.partial), where exports staged before 2026-12-03."""
    places = ((directory, re.compile(rf"{re.escape(STAGING_PREFIX)}[0-9a-f]{{8}}\.partial")),
              (directory.parent, re.compile(rf"\.{re.escape(directory.name)}\.[0-9a-f]{{8}}\.partial")))
    for folder, pattern in places:
        try:
            found = [p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
        except OSError:  # a parent this process may not list: nothing of this export's can be there
            continue
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by an export into {directory} that was killed")


def _onnx_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime (none of whose exceptions is a RuntimeError) and onnx.load (protobuf) raise on a bad graph."""
    from google.protobuf.message import Error as ProtobufError
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return (RuntimeError, ProtobufError,
            *(c for c in vars(ort_state).values() if isinstance(c, type) and issubclass(c, Exception)))


def session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None,
            int8: bool = True, shown: str | Path | None = None):
    """An ONNX Runtime CPU session with every graph optimization; for an int8 (QDQ) graph MatMul + Add fusion is off
    (see DISABLED_OPTIMIZERS), for an FP32 one (int8=False) it stays on, so FP32 is timed at its best. A graph ONNX
    Runtime refuses is a SaqError naming `shown` (default `path`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # idle pool threads sleep instead of spinning: torch's OpenMP pool shares the process and its cores, and
    # spinning ONNX Runtime threads would slow it (and the timings of whichever runs next)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=DISABLED_OPTIMIZERS if int8 else [])
    except _onnx_errors() as exc:
        raise SaqError(f"ONNX Runtime cannot load {shown or path}: {one_line(exc)}") from None


def _layer_of(node_name: str) -> str:
    """'/blocks.0/attn/qkv/MatMul' -> 'attn.qkv'-like label: the module path without indices and the op."""
    parts = [p for p in node_name.strip("/").split("/")[:-1] if not p.replace(".", "").isdigit()]
    parts = [p.split(".")[0] if p.split(".")[-1].isdigit() else p for p in parts]
    return ".".join(parts[-2:]) or node_name


def operator_report(path: Path, shown: Path | None = None) -> dict:
    """Which compute operators ONNX Runtime runs in int8 and which stay float, from its optimized graph (errors name
    `shown`, default `path`: the file a staged graph is written to)."""
    import onnx

    optimized = path.with_suffix(".optimized.onnx")
    session(path, 1, optimized, shown=shown)
    try:
        graph = onnx.load(str(optimized), load_external_data=False).graph
    except _onnx_errors() as exc:
        raise SaqError(f"cannot read ONNX Runtime's optimized graph of {shown or path}: {one_line(exc)}") from None
    int8 = Counter(n.op_type for n in graph.node if n.op_type in INT8_OPS)
    floats = Counter(f"{_layer_of(n.name)} ({n.op_type})" for n in graph.node if n.op_type in FLOAT_COMPUTE_OPS)
    optimized.unlink()
    for extra in path.parent.glob(optimized.name + "*"):
        extra.unlink()
    return {"int8_ops": dict(int8), "float_ops": dict(floats)}


def format_report(report: dict) -> str:
    how = {"float": "float MatMul, post-softmax operand left float (AGQ's log2 codes have no ONNX int8 operator)",
           "log2": "float MatMul, post-softmax operand log2-rounded in float ops (saq's AGQ values; no ONNX int8 "
                   "operator)",
           "uniform": "post-softmax operand uniformly quantized like the other operands (quant.agq=false)"}
    lines = [f"softmax * V: {how[report.get('softmax', 'float')]}"]
    for part in ("encoder", "decoder"):
        r = report[part]
        int8 = ", ".join(f"{n} {op}" for op, n in sorted(r["int8_ops"].items())) or "none"
        floats = ", ".join(f"{n} {op}" for op, n in sorted(r["float_ops"].items())) or "none"
        lines.append(f"{part}: int8 kernels: {int8}")
        lines.append(f"{part}: float compute left: {floats}")
    return "\n".join(lines)


# -- the runner: a Sam whose encoder and decoder are ONNX Runtime sessions ----------------------------------------------
class OnnxImageEncoder(nn.Module):
    """Stands in for sam.image_encoder: preprocessed 1 x 3 x S x S image -> embedding, through ONNX Runtime."""

    def __init__(self, path: str | Path, img_size: int, threads: int | None = None, int8: bool = True):
        super().__init__()
        self.session, self.img_size = session(path, threads, int8=int8), img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"image": x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class OnnxMaskDecoder(nn.Module):
    """Stands in for sam.mask_decoder (forward and predict_masks), through ONNX Runtime."""

    def __init__(self, path: str | Path, num_mask_tokens: int, threads: int | None = None, int8: bool = True):
        super().__init__()
        self.session, self.num_mask_tokens = session(path, threads, int8=int8), num_mask_tokens

    def predict_masks(self, image_embeddings, image_pe, sparse, dense):
        feed = {"image_embeddings": image_embeddings, "image_pe": image_pe, "sparse": sparse, "dense": dense}
        masks, iou = self.session.run(None, {k: np.ascontiguousarray(v.detach().cpu().float().numpy())
                                             for k, v in feed.items()})
        return torch.from_numpy(masks).to(dense.device), torch.from_numpy(iou).to(dense.device)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output: bool):
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        keep = slice(1, None) if multimask_output else slice(0, 1)  # as segment_anything's MaskDecoder.forward
        return masks[:, keep], iou[:, keep]


def deployed_sam(qmodel: nn.Module, directory: str | Path, threads: int | None = None) -> nn.Module:
    """The quantized model with its encoder and decoder replaced by the ONNX sessions in `directory`: a Segmenter
    runs it like any SAM (prompt encoder, pre- and post-processing stay the model's own). A model saved or loaded by
    saq.saved must be the one the folder was deployed from (deploy.json's export_id)."""
    directory = Path(directory)
    for name in (ENCODER_FILE, DECODER_FILE, REPORT_FILE):  # deploy.json is written last: without it, not whole
        if not (directory / name).is_file():
            raise SaqError(f"{directory / name} is missing; run python -m saq.deploy on the run first")
    try:
        report = json.loads((directory / REPORT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaqError(f"{directory / REPORT_FILE} cannot be read ({one_line(exc)}); deploy the model again") from None
    made_from = report.get("export_id") if isinstance(report, dict) else None
    model_id = getattr(qmodel, EXPORT_ID_ATTR, None)
    # an in-memory model never saved has no id to compare; a saved one must not run another export's graphs (a
    # deployment left beside a model saved since)
    if model_id is not None and made_from != model_id:
        source = f"export_id {made_from}" if made_from else "no export_id recorded: an unsaved model or an older saq"
        raise SaqError(f"{directory} was deployed from another model ({source}) than this saved one (export_id "
                       f"{model_id}); deploy this one again (python -m saq.deploy RUN_DIR)")
    sam = copy.copy(qmodel)  # shallow: shares the FP prompt encoder and buffers; swaps two submodules
    sam._modules = dict(qmodel._modules)
    sam.image_encoder = OnnxImageEncoder(directory / ENCODER_FILE, qmodel.image_encoder.img_size, threads)
    sam.mask_decoder = OnnxMaskDecoder(directory / DECODER_FILE, qmodel.mask_decoder.num_mask_tokens, threads)
    return sam


def evaluate_deployed(qmodel: nn.Module, run_dir: str | Path, task, decode_batch_size: int,
                      progress: bool = True) -> dict:
    """Export the calibrated model into <run_dir>/deployed and evaluate the ONNX models through the task."""
    from saq.sam.segmenter import Segmenter

    directory = Path(run_dir) / DEPLOY_DIR
    report = export_onnx(qmodel, directory)
    print(format_report(report))
    metrics = task.evaluate(Segmenter(deployed_sam(qmodel, directory), decode_batch_size), progress=progress)
    return {**metrics, "onnx_ops": report}


def main(argv: list[str] | None = None) -> int:
    from saq.cli import tool_args
    from saq.sam.build import VARIANTS, build_random_sam
    from saq.saved import SAVED_DIR, load_saved, read_recipe, saved_dir

    try:
        run_dir, options = tool_args(
            sys.argv[1:] if argv is None else argv,
            "python -m saq.deploy RUN_DIR [out=DIR] [softmax=float|log2]  (RUN_DIR: a run that saved its quantized "
            "model; out: default RUN_DIR/deployed; softmax: softmax*V's operand, float (fast) or log2 (saq's values))",
            {"out": None, "softmax": tuple(SOFTMAX_MODES)}, about=__doc__)
        require_onnx("saq.deploy")
        directory = saved_dir(run_dir, "RUN_DIR ")
        # the run's folder is held while its model is read: a run into it would set the model aside mid-read
        # (RUN_DIR may name the saved model's own folder; the run is the folder around it)
        run_folder = directory.parent if directory.name == SAVED_DIR else Path(run_dir)
        out = Path(options["out"]) if "out" in options else run_folder / DEPLOY_DIR  # beside the run's model
        out = deploy_folder(out, "out")  # before the model is read and built
        with claim_run_dir(run_folder) if run_folder.is_dir() else nullcontext():
            recipe = read_recipe(directory)
            check_deploy_config(recipe["quant"])  # a W4A4 model is refused before it is built and loaded
            extra = recipe.get("extra", {})
            if not isinstance(extra.get("model"), str):  # absent, or a hand edit's list
                found = f" (it holds {extra['model']!r})" if "model" in extra else ""
                raise SaqError(f"{directory} does not say which model it quantized (recipe extra.model, a model name"
                               f"{found})")
            # the export holds every tensor (loaded strictly), so the FP checkpoint is not needed: a random model of
            # the same architecture is only the frame the saved weights go into; tagged with its export_id
            qmodel = load_saved(build_random_sam(VARIANTS.get(extra["model"], extra["model"])), directory)
            report = export_onnx(qmodel, out, options.get("softmax", "float"))
    except RunDirHeld as exc:  # a run writing its model there, or another export or analysis of it
        print(f"error: another saq process is writing into {exc.folder}; wait for it to finish, then deploy again",
              file=sys.stderr)
        return 1
    except SaqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an out= folder that cannot be written
        print(f"error: cannot write the ONNX models: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # torch.onnx refusing the model (ONNX Runtime's refusals are SaqErrors)
        print(f"error: the ONNX export into {out} failed: {one_line(exc)}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {out / ENCODER_FILE}, {out / DECODER_FILE} and {out / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
