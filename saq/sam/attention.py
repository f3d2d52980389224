"""Quantizable SAM attention (q·kᵀ and softmax·v as explicit quantization points) and the map of what gets quantized."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling import image_encoder as sam_encoder
from segment_anything.modeling import transformer as sam_transformer
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos
from torch import nn

from saq.errors import SaqError
from saq.quant.quantizers import Quantizer


class QuantEncoderAttention(sam_encoder.Attention):
    """segment_anything's ViT attention with qkv/proj quantized and both matmuls explicit.

    q, k, v (after the projection) are quantized as operands of qk_matmul / av_matmul; the relative-position bias is
    computed from the unquantized q, as SAQ-SAM does. With every quantizer off this computes exactly what the FP
    module computes (same operations in the same order).
    """

    @classmethod
    def from_float(cls, attn: sam_encoder.Attention, factory, part: str = "encoder") -> QuantEncoderAttention:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.num_heads, module.scale, module.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        if attn.use_rel_pos:
            module.rel_pos_h, module.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        module.qkv = factory.linear(attn.qkv, part)
        module.proj = factory.linear(attn.proj, part)
        module.qk_matmul = factory.matmul(part)
        module.av_matmul = factory.softmax_matmul(part)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        attn = attn.softmax(dim=-1)
        x = self.av_matmul(attn, v).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


class QuantDecoderAttention(sam_transformer.Attention):
    """segment_anything's two-way-transformer attention with q/k/v/out projections quantized and both matmuls
    explicit. big_sign_fold marks the token→image attentions, where BIG may flip q/k channel signs."""

    @classmethod
    def from_float(cls, attn: sam_transformer.Attention, factory, part: str = "decoder",
                   big_sign_fold: bool = False) -> QuantDecoderAttention:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.embedding_dim, module.internal_dim, module.num_heads = \
            attn.embedding_dim, attn.internal_dim, attn.num_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(module, name, factory.linear(getattr(attn, name), part))
        module.qk_matmul = factory.matmul(part)
        module.av_matmul = factory.softmax_matmul(part)
        module.big_sign_fold = big_sign_fold
        return module

    def sign_fold_pair(self) -> tuple[nn.Linear, nn.Linear]:
        """The (query, key) projections whose output channels BIG may flip together."""
        return self.q_proj, self.k_proj

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√d) per head, (B, heads, Nq, Nk), through the q/k quantizers as they are set: the map the
        clipping search compares with FP."""
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        _, _, _, c_per_head = q.shape
        attn = self.qk_matmul(q, k.permute(0, 1, 3, 2))
        attn = attn / math.sqrt(c_per_head)
        return torch.softmax(attn, dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = self.attention_probs(q, k)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        out = self._recombine_heads(self.av_matmul(attn, v))
        return self.out_proj(out)

    def qk_points(self) -> dict[str, Quantizer]:
        """The quantization points on the q·kᵀ path, in the order the clipping search visits them (paper.md §3.3):
        the inputs of the q and k projections, then their outputs (the operands of q·kᵀ)."""
        return {"q_in": self.q_proj.input_quantizer, "k_in": self.k_proj.input_quantizer,
                "q_out": self.qk_matmul.a_quantizer, "k_out": self.qk_matmul.b_quantizer}


DECODER_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")


def decoder_attentions(sam: Sam) -> dict[str, nn.Module]:
    """The two-way transformer's attentions in forward order, named by their path inside it (layers.0.self_attn, ...,
    final_attn_token_to_image): 7 for every SAM size."""
    transformer = sam.mask_decoder.transformer
    out = {}
    for i, layer in enumerate(transformer.layers):
        for name in DECODER_ATTENTIONS:
            out[f"layers.{i}.{name}"] = getattr(layer, name)
    out["final_attn_token_to_image"] = transformer.final_attn_token_to_image
    return out


def token_to_image_by_head(attn: sam_transformer.Attention, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor) -> torch.Tensor:
    """segment_anything's decoder Attention.forward computed one head at a time, for the token→image attentions.

    Each head's q·kᵀ, softmax and softmax·v are the same products over the same operands, so the values match the
    stock forward bit for bit (tests/test_segmenter.py checks it), but the image-side keys and values are used as
    strided slices instead of being copied into head-major layout: on a CPU that copy of thousands of image tokens
    per prompt costs more than the matmuls. (Taking the image→token attention this way changes its float rounding,
    so it keeps the stock forward.)
    """
    q, k, v = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    width = q.shape[-1] // attn.num_heads
    scale = math.sqrt(width)
    heads = []
    for h in range(attn.num_heads):
        cols = slice(h * width, (h + 1) * width)
        weights = torch.softmax(torch.matmul(q[..., cols], k[..., cols].transpose(-1, -2)) / scale, dim=-1)
        heads.append(torch.matmul(weights, v[..., cols]))
    return attn.out_proj(torch.cat(heads, dim=-1))


@contextlib.contextmanager
def token_to_image_by_head_forward(sam: Sam) -> Iterator[None]:
    """Within the block, the FP two-way transformer's token→image attentions run token_to_image_by_head (automatic
    mask decoding, Segmenter.predict_above_iou, runs under it; segment_anything's predictor and generator keep the
    stock forward). Quantized attentions are left alone: their quantizers and probes see the operands in
    segment_anything's layout."""
    patched = [a for name, a in decoder_attentions(sam).items()
               if name.endswith("token_to_image") and type(a) is sam_transformer.Attention]
    for attn in patched:
        attn.forward = token_to_image_by_head.__get__(attn)
    try:
        yield
    finally:
        for attn in patched:
            del attn.forward


def decoder_attention_names(sam: Sam) -> list[str]:
    return list(decoder_attentions(sam))


def quantize_sam_modules(sam: Sam, factory) -> None:
    """Replace, in place, what paper.md §2.1 quantizes; everything else stays FP.

    Encoder (part 'encoder'): every block's attention (qkv, proj, q·kᵀ, softmax·v) and MLP lin1/lin2, and the neck's
    two convs. Decoder (part 'decoder'): the two-way transformer's 7 attentions and its 2 MLPs. Kept FP: patch
    embedding, positional embedding, norms, prompt encoder, output upscaling, hypernetwork MLPs and IoU head.
    """
    if not isinstance(sam, Sam):
        raise SaqError(f"quantize() expects a segment_anything Sam model, got {type(sam).__name__}")
    encoder = sam.image_encoder
    if factory.enabled("encoder"):
        for block in encoder.blocks:
            block.attn = QuantEncoderAttention.from_float(block.attn, factory)
            block.mlp.lin1 = factory.linear(block.mlp.lin1, "encoder")
            block.mlp.lin2 = factory.linear(block.mlp.lin2, "encoder")
        for index, layer in enumerate(encoder.neck):
            if isinstance(layer, nn.Conv2d):
                encoder.neck[index] = factory.conv(layer, "encoder")
    if factory.enabled("decoder"):
        transformer = sam.mask_decoder.transformer
        for layer in transformer.layers:
            for name in DECODER_ATTENTIONS:
                setattr(layer, name, QuantDecoderAttention.from_float(
                    getattr(layer, name), factory, big_sign_fold=(name == "cross_attn_token_to_image")))
            layer.mlp.lin1 = factory.linear(layer.mlp.lin1, "decoder")
            layer.mlp.lin2 = factory.linear(layer.mlp.lin2, "decoder")
        transformer.final_attn_token_to_image = QuantDecoderAttention.from_float(
            transformer.final_attn_token_to_image, factory, big_sign_fold=True)


class AttentionRecording:
    """What one decoder attention saw during forwards: its (q, k) inputs and its softmax maps, one entry per call."""

    def __init__(self):
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.maps: list[torch.Tensor] = []


class AttentionProbe:
    """One decoder attention as the clipping search sees it: a name, its q·kᵀ quantization points, recording of its
    inputs and maps during a forward, and its map recomputed from recorded inputs. The search needs nothing else of
    SAM."""

    def __init__(self, name: str, module: QuantDecoderAttention):
        self.name = name
        self.module = module

    @property
    def points(self) -> dict[str, Quantizer]:
        return self.module.qk_points()

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.module.attention_probs(q, k)

    def record(self):
        """A context manager yielding an AttentionRecording filled by the forwards run inside it."""
        from contextlib import contextmanager

        @contextmanager
        def recording():
            rec = AttentionRecording()

            def keep_inputs(module, args, kwargs):
                q = kwargs["q"] if "q" in kwargs else args[0]
                k = kwargs["k"] if "k" in kwargs else args[1]
                rec.inputs.append((q.detach(), k.detach()))

            def keep_map(module, args):
                rec.maps.append(args[0].detach())

            handles = [self.module.register_forward_pre_hook(keep_inputs, with_kwargs=True),
                       self.module.av_matmul.register_forward_pre_hook(keep_map)]
            try:
                yield rec
            finally:
                for handle in handles:
                    handle.remove()

        return recording()


def decoder_attention_probes(sam: Sam) -> list[AttentionProbe]:
    """Probes of the quantized decoder attentions, in forward order (the order a greedy search visits them)."""
    probes = [AttentionProbe(name, m) for name, m in decoder_attentions(sam).items()]
    if not all(isinstance(p.module, QuantDecoderAttention) for p in probes):
        raise SaqError("the mask decoder is not quantized (quant.decoder.enabled=false?); the clipping search needs it")
    return probes
