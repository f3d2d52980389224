"""SAM's reconstruction units: the chain of steps, the per-image prompt data, and PAR's probe (layer skipping).

Steps: encoder stages / layers / blocks, the neck, decoder layers / blocks, the final token→image attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from saq.errors import SaqError
from saq.sam.segmenter import PromptedImage, decode_token_masks, decoder_queries, encoder_input, prompt_tensors
from saq.sam.unit_kinds import GRANULARITIES

State = tuple  # the tensors flowing between steps: (x,) in the encoder, (embedding,) after the neck, (queries, keys)


def move(t: torch.Tensor, device) -> torch.Tensor:
    """t on device; asynchronous only towards a GPU (a copy to host memory must be complete before the CPU reads it)."""
    return t.to(device, non_blocking=torch.device(device).type == "cuda")


@dataclass
class SampleData:
    """One calibration image as the reconstruction chain consumes it (prompts already encoded, at most max_prompts)."""

    image: torch.Tensor  # 1 x 3 x S x S, normalised and padded (the encoder input)
    tokens: torch.Tensor  # P x N x C: IoU + mask tokens + sparse prompt embeddings (the decoder's queries and query PE)
    dense: torch.Tensor  # P x C x h x w, or 1 x C x h x w when every prompt has the same dense embedding (no masks)
    key_pe: torch.Tensor  # 1 x hw x C: the dense positional encoding as token rows

    def to(self, device) -> SampleData:
        return SampleData(*(move(t, device) for t in (self.image, self.tokens, self.dense, self.key_pe)))


@torch.no_grad()
def encode_sample(sam: Sam, sample: PromptedImage, max_prompts: int, generator: torch.Generator) -> SampleData:
    """Preprocess the image and encode its prompts with the FP prompt encoder (at most max_prompts, drawn at random
    with `generator` when there are more, as SAQ-SAM's save_sam_inputs does)."""
    if sample.num_prompts == 0:
        raise SaqError(f"calibration image {sample.image_id} has no prompts; reconstruction needs prompted images")
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    image = encoder_input(sam, transform, sample.image)
    boxes, coords, labels = prompt_tensors(transform, sample.image.shape[:2], sam.device, sample.boxes, sample.points,
                                           sample.point_labels)
    keep = torch.arange(sample.num_prompts)
    if sample.num_prompts > max_prompts:
        keep = torch.randperm(sample.num_prompts, generator=generator)[:max_prompts].sort().values
    keep = keep.to(sam.device)
    sparse, dense = sam.prompt_encoder(points=None if coords is None else (coords[keep], labels[keep]),
                                       boxes=None if boxes is None else boxes[keep], masks=None)
    tokens = decoder_queries(sam.mask_decoder, sparse)
    if bool((dense == dense[:1]).all()):
        dense = dense[:1]  # one shared dense embedding: the probe computes the image side of layer 0 once
    key_pe = sam.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
    return SampleData(image, tokens.contiguous(), dense.contiguous(), key_pe.contiguous())


class Step:
    """One link of the chain: maps a state to the next state in a given SAM (the quantized or the FP one).

    Learnable steps are reconstruction units: `modules(sam)` hold their quantizers. `kind` names the unit type (the
    iteration budget and the loss are chosen by kind); `compared` lists the outputs a unit-output loss compares and
    `channel_dims` each output's channel axis. `response` says what PAR looks at downstream: 'probe' (the FP neck
    and two-way transformer, skipping later encoder steps), 'downstream' (the later FP decoder steps), 'masks' (only
    the FP mask head, when recon.par_loss.mask_weight > 0) or None.
    """

    learnable = True
    kind = ""
    part = "encoder"
    response: str | None = None
    compared: tuple[int, ...] = (0,)
    channel_dims: tuple[int, ...] = (-1,)

    def __init__(self, name: str):
        self.name = name

    def run(self, sam: Sam, state: State, data: SampleData) -> State:
        raise NotImplementedError

    def modules(self, sam: Sam) -> list[nn.Module]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class PatchEmbed(Step):
    """Image → tokens (patch embedding + absolute position embedding; FP, nothing to learn)."""

    learnable = False

    def run(self, sam, state, data):
        encoder = sam.image_encoder
        x = encoder.patch_embed(data.image)
        return (x + encoder.pos_embed,) if encoder.pos_embed is not None else (x,)


class EncoderBlocks(Step):
    """Consecutive ViT blocks: a stage (closed by a global-attention block) or one layer."""

    response = "probe"

    def __init__(self, name: str, kind: str, indices: range):
        super().__init__(name)
        self.kind, self.indices = kind, indices

    def run(self, sam, state, data):
        x = state[0]
        for index in self.indices:
            x = sam.image_encoder.blocks[index](x)
        return (x,)

    def modules(self, sam):
        return [sam.image_encoder.blocks[i] for i in self.indices]


class EncoderSubBlock(Step):
    """Half a ViT block (QDrop / PTQ4SAM-L's unit): 'attn' = x + attn(norm1(x)) with window partition, or
    'mlp' = x + mlp(norm2(x)); together they are segment_anything's Block.forward."""

    kind = "block"
    response = "probe"

    def __init__(self, name: str, index: int, half: str):
        super().__init__(name)
        self.index, self.half = index, half

    def run(self, sam, state, data):
        block, x = sam.image_encoder.blocks[self.index], state[0]
        if self.half == "mlp":
            return (x + block.mlp(block.norm2(x)),)
        y = block.norm1(x)
        if block.window_size > 0:
            height, width = y.shape[1], y.shape[2]
            y, pad_hw = window_partition(y, block.window_size)
            y = window_unpartition(block.attn(y), block.window_size, pad_hw, (height, width))
        else:
            y = block.attn(y)
        return (x + y,)

    def modules(self, sam):
        block = sam.image_encoder.blocks[self.index]
        return [block.mlp if self.half == "mlp" else block.attn]


class Neck(Step):
    """The encoder neck (conv 1x1, LN, conv 3x3, LN): tokens B x h x w x C → image embedding B x C x h x w."""

    kind = "neck"
    channel_dims = (1,)

    def run(self, sam, state, data):
        return (sam.image_encoder.neck(state[0].permute(0, 3, 1, 2)),)

    def modules(self, sam):
        return [sam.image_encoder.neck]


class ToDecoder(Step):
    """Image embedding → the two-way transformer's inputs: queries = tokens, keys = (embedding + dense) as rows."""

    learnable = False

    def run(self, sam, state, data):
        keys = (state[0] + data.dense).flatten(2).permute(0, 2, 1)
        return data.tokens, keys.expand(data.tokens.shape[0], -1, -1).contiguous()


class DecoderLayer(Step):
    """One TwoWayAttentionBlock: (queries, keys) → (queries, keys)."""

    kind = "decoder_layer"
    part = "decoder"
    response = "downstream"
    compared = (0, 1)
    channel_dims = (-1, -1)

    def __init__(self, name: str, index: int):
        super().__init__(name)
        self.index = index

    def run(self, sam, state, data):
        layer = sam.mask_decoder.transformer.layers[self.index]
        return layer(queries=state[0], keys=state[1], query_pe=data.tokens, key_pe=data.key_pe)

    def modules(self, sam):
        return [sam.mask_decoder.transformer.layers[self.index]]


class DecoderSubBlock(Step):
    """One quarter of a TwoWayAttentionBlock (PTQ4SAM-L's decoder unit): 'self_attn', 'token_to_image', 'mlp' or
    'image_to_token', each with its residual and norm, in segment_anything's order."""

    kind = "decoder_block"
    part = "decoder"
    response = "downstream"
    channel_dims = (-1, -1)

    def __init__(self, name: str, index: int, quarter: str):
        super().__init__(name)
        self.index, self.quarter = index, quarter
        self.compared = (1,) if quarter == "image_to_token" else (0,)

    def run(self, sam, state, data):
        layer = sam.mask_decoder.transformer.layers[self.index]
        queries, keys = state
        qpe, kpe = data.tokens, data.key_pe
        if self.quarter == "self_attn":
            if layer.skip_first_layer_pe:
                return layer.norm1(layer.self_attn(q=queries, k=queries, v=queries)), keys
            q = queries + qpe
            return layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries)), keys
        if self.quarter == "token_to_image":
            out = layer.cross_attn_token_to_image(q=queries + qpe, k=keys + kpe, v=keys)
            return layer.norm2(queries + out), keys
        if self.quarter == "mlp":
            return layer.norm3(queries + layer.mlp(queries)), keys
        out = layer.cross_attn_image_to_token(q=keys + kpe, k=queries + qpe, v=queries)
        return queries, layer.norm4(keys + out)

    def modules(self, sam):
        layer = sam.mask_decoder.transformer.layers[self.index]
        return [{"self_attn": layer.self_attn, "token_to_image": layer.cross_attn_token_to_image,
                 "mlp": layer.mlp, "image_to_token": layer.cross_attn_image_to_token}[self.quarter]]


class FinalAttention(Step):
    """The final token→image attention with its residual and norm: (queries, keys) → (tokens hs, keys unchanged).
    Learned against hs, what the mask head reads, not the attention's raw output as the official code does (README:
    73.76 vs 73.19). Its response ('masks') is the mask head's output, used when recon.par_loss.mask_weight > 0."""

    kind = "final_attn"
    part = "decoder"
    response = "masks"
    channel_dims = (-1, -1)

    def run(self, sam, state, data):
        transformer = sam.mask_decoder.transformer
        queries, keys = state
        out = transformer.final_attn_token_to_image(q=queries + data.tokens, k=keys + data.key_pe, v=keys)
        return transformer.norm_final_attn(queries + out), keys

    def modules(self, sam):
        return [sam.mask_decoder.transformer.final_attn_token_to_image]


def mask_probabilities(sam: Sam, state: State, data: SampleData) -> torch.Tensor:
    """The mask head on the two-way transformer's output (tokens hs, image tokens): the first mask output's
    probabilities, the mask a box prompt decodes (multimask_output=False), as P x pixels x 1. The same numbers as
    segment_anything's MaskDecoder.predict_masks (its low-resolution logits, mask 0) through a sigmoid."""
    hs, keys = state
    height, width = data.dense.shape[-2:]
    src = keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], height, width)
    # token 0 of hs is the IoU token, the mask tokens follow
    return decode_token_masks(sam.mask_decoder, hs[:, 1:], src, count=1).sigmoid().flatten(2).transpose(1, 2)


def encoder_stages(sam: Sam) -> list[range]:
    """Block index ranges of the encoder stages: each closes at a global-attention block (paper.md §4.1)."""
    encoder = sam.image_encoder
    ends = sorted(i for i, block in enumerate(encoder.blocks) if block.window_size == 0)
    depth = len(encoder.blocks)
    if not ends or ends[-1] != depth - 1:
        ends.append(depth - 1)  # blocks after the last global one form a last stage
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [range(s, e + 1) for s, e in zip(starts, ends)]


def model_parts(sam: Sam) -> list[str]:
    """Module paths of the parts a sensitivity analysis switches to FP one at a time: the encoder, the decoder, each
    two-way layer and its sub-blocks in forward order (not its norms), the final token→image attention."""
    transformer = "mask_decoder.transformer"
    parts = ["image_encoder", "mask_decoder"]
    for i, layer in enumerate(sam.mask_decoder.transformer.layers):
        parts.append(f"{transformer}.layers.{i}")
        parts += [f"{transformer}.layers.{i}.{name}" for name, _ in layer.named_children() if not name.startswith("norm")]
    return parts + [f"{transformer}.final_attn_token_to_image"]


def build_chain(sam: Sam, granularity: str) -> list[Step]:
    """The steps from image to decoder tokens, with units at `granularity`:
    stage: encoder stages, neck, decoder layers, final attention (SAQ-SAM's PAR);
    layer: every ViT block, neck, decoder layers, final attention;
    block: every attention / MLP half-block of the encoder and quarter of the decoder layers, neck, final attention
    (QDrop / PTQ4SAM-L: 34 units on SAM-B)."""
    if granularity not in GRANULARITIES:
        raise SaqError(f"recon.granularity={granularity!r} unknown; expected one of {list(GRANULARITIES)}")
    chain: list[Step] = [PatchEmbed("patch_embed")]
    if granularity == "stage":
        chain += [EncoderBlocks(f"encoder.stage{k}", "stage", r) for k, r in enumerate(encoder_stages(sam))]
    elif granularity == "layer":
        chain += [EncoderBlocks(f"encoder.blocks.{i}", "layer", range(i, i + 1))
                  for i in range(len(sam.image_encoder.blocks))]
    else:
        chain += [EncoderSubBlock(f"encoder.blocks.{i}.{half}", i, half)
                  for i in range(len(sam.image_encoder.blocks)) for half in ("attn", "mlp")]
    chain += [Neck("encoder.neck"), ToDecoder("to_decoder")]
    for i in range(len(sam.mask_decoder.transformer.layers)):
        if granularity == "block":
            chain += [DecoderSubBlock(f"decoder.layers.{i}.{q}", i, q)
                      for q in ("self_attn", "token_to_image", "mlp", "image_to_token")]
        else:
            chain.append(DecoderLayer(f"decoder.layers.{i}", i))
    chain.append(FinalAttention("decoder.final_attn_token_to_image"))
    return chain


def probe_image_tokens(sam: Sam, x: torch.Tensor, data: SampleData) -> torch.Tensor:
    """PAR's interaction response with layer skipping: encoder tokens x (1 x h x w x C, from any encoder step) →
    neck → two-way transformer with the image's prompts → the image tokens after the last two-way layer (P x hw x C).

    Run it in the FP model: the later encoder blocks are skipped. The final token→image attention only changes the
    tokens, so it is not run. When all prompts share the dense embedding, layer 0 sees the keys once (1 x hw x C) and
    broadcasts them over the prompts: the same numbers at a fraction of the cost.
    """
    embedding = sam.image_encoder.neck(x.permute(0, 3, 1, 2))
    keys = (embedding + data.dense).flatten(2).permute(0, 2, 1)
    queries = data.tokens
    for layer in sam.mask_decoder.transformer.layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=data.tokens, key_pe=data.key_pe)
    if keys.shape[0] != queries.shape[0]:  # a decoder with no layers never broadcast the keys
        keys = keys.expand(queries.shape[0], -1, -1)
    return keys
