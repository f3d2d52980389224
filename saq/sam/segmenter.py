"""Prompt → mask inference: one image embedding, any number of box/point prompts decoded in memory-bounded chunks."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.utils.transforms import ResizeLongestSide

from saq.errors import SaqError
from saq.sam.attention import token_to_image_by_head_forward


@dataclass
class PromptedImage:
    """An RGB image with its prompts in original pixel coordinates: what calibration and evaluation feed SAM."""

    image: np.ndarray  # H x W x 3 uint8, RGB
    boxes: np.ndarray | None = None  # N x 4, xyxy
    points: np.ndarray | None = None  # N x K x 2, xy
    point_labels: np.ndarray | None = None  # N x K, 1 foreground / 0 background
    image_id: object = None

    @property
    def num_prompts(self) -> int:
        if self.boxes is not None:
            return len(self.boxes)
        return 0 if self.points is None else len(self.points)


@dataclass
class Prediction:
    """Decoder output for a chunk of prompts, masks at the original image resolution."""

    masks: torch.Tensor  # N x C x H x W bool (or float logits when asked for)
    iou_scores: torch.Tensor  # N x C
    low_res_logits: torch.Tensor  # N x C x h x w


@dataclass
class Timings:
    """Wall time spent in the image encoder and in prompt decoding, for the encoder-vs-decoder cost split."""

    encoder_s: float = 0.0
    decoder_s: float = 0.0
    images: int = 0
    prompts: int = 0

    @staticmethod
    def clock(device: torch.device) -> float:
        """Wall time after the device's queued work is done (CUDA kernels run asynchronously)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def as_dict(self) -> dict:
        return {"encoder_s": self.encoder_s, "decoder_s": self.decoder_s, "images": self.images,
                "prompts": self.prompts}


def decode_prompts(
    sam: Sam,
    image_embeddings: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    image_index: torch.Tensor | None = None,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode prompts (low-res logits and IoU scores); with image_index, prompts of many images in one call.

    segment_anything's decoder repeats one image embedding for every prompt. Passing a zero embedding and folding
    each prompt's own image embedding into its dense embedding gives the same sum, for prompts of many images.
    """
    if image_index is None:
        return sam.mask_decoder(image_embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)
    per_prompt = image_embeddings[image_index] + dense
    zero = torch.zeros_like(image_embeddings[:1])
    return sam.mask_decoder(zero, sam.prompt_encoder.get_dense_pe(), sparse, per_prompt, multimask_output)


def passes_iou(iou: torch.Tensor, pred_iou_thresh: float) -> torch.Tensor:
    """Which masks the predicted-IoU filter keeps: those above the threshold, every one when it is <= 0."""
    return iou > pred_iou_thresh if pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)


@dataclass
class AutoMasks:
    """Multimask outputs of point prompts that passed the predicted-IoU filter, as logits at the original resolution."""

    logits: torch.Tensor  # K x H x W float
    iou_scores: torch.Tensor  # K
    prompt_index: torch.Tensor  # K: which prompt of the chunk each mask came from
    output_index: torch.Tensor  # K: which of the three multimask outputs (0..2)


def decoder_queries(decoder: MaskDecoder, sparse: torch.Tensor) -> torch.Tensor:
    """The two-way transformer's queries (P x N x C): the IoU and mask tokens, then each prompt's sparse embeddings."""
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    return torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)


def encoder_input(sam: Sam, transform: ResizeLongestSide, image: np.ndarray) -> torch.Tensor:
    """The image encoder's input for an H x W x 3 uint8 RGB image: resized to the longest side, normalised, padded."""
    resized = transform.apply_image(image)
    return sam.preprocess(torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None])


def prompt_tensors(transform: ResizeLongestSide, original_size: tuple[int, int], device, boxes=None, points=None,
                   point_labels=None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Box (B x 4) and point (P x N x 2, labels P x N) prompts of an image of original_size, in the encoder input's
    coordinates as tensors (None where not given); a SaqError names what does not fit. Points given as P x 2 (labels
    P) are P prompts of one point each, not SamPredictor's one prompt of P points."""
    boxes_t = coords_t = labels_t = None
    if boxes is not None:
        boxes = np.asarray(boxes, np.float32)
        if boxes.shape[-1:] != (4,) or boxes.ndim > 2:
            raise SaqError(f"boxes must be B x 4 (x1, y1, x2, y2), got shape {boxes.shape}")
        boxes_t = torch.as_tensor(boxes.reshape(-1, 4), device=device)
        boxes_t = transform.apply_boxes_torch(boxes_t, original_size)
    if points is not None:
        if point_labels is None:
            raise SaqError("points were given without point_labels")
        coords = np.asarray(points, np.float64)
        if coords.ndim == 2:
            coords = coords[:, None]
        labels = np.asarray(point_labels)
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.size != coords.shape[0] * coords.shape[1] or (
                labels.ndim > 1 and labels.shape != tuple(coords.shape[:2])):
            raise SaqError(f"points must be P x N x 2 (or P x 2) with point_labels P x N (or P), got points "
                           f"{tuple(np.shape(points))} and point_labels {labels.shape}")
        # in float64 up to the prompt encoder's own cast, as SamAutomaticMaskGenerator passes its grid: a float32
        # copy first rounds the coordinates of images whose side does not scale exactly to the input size
        coords_t = torch.as_tensor(transform.apply_coords(coords, original_size), device=device)
        labels_t = torch.as_tensor(labels, device=device).reshape(coords_t.shape[:2])
    if boxes_t is None and coords_t is None:
        raise SaqError("predict needs box or point prompts")
    if boxes_t is not None and coords_t is not None and len(boxes_t) != len(coords_t):
        raise SaqError(f"{len(boxes_t)} boxes but {len(coords_t)} point sets: one of each per prompt")
    return boxes_t, coords_t, labels_t


def decode_tokens(decoder: MaskDecoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                  dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of MaskDecoder.predict_masks: the two-way transformer and the IoU head.

    Returns the mask-token outputs, the updated image tokens (B x C x h x w) and the IoU predictions of all outputs;
    decode_token_masks turns the first two into masks, for any subset of the prompts.
    """
    tokens = decoder_queries(decoder, sparse)
    # a quantizer left dropping (the paper-compatible evaluation) draws a mask per element: shared image tokens would
    # share it across the prompts, where segment_anything's decoder, repeating them, draws one per prompt
    dropping = any(getattr(m, "drop_prob", 1.0) < 1.0 for m in decoder.transformer.modules())
    if image_embeddings.shape[0] == 1 and dense.stride(0) == 0 and not dropping:
        # Without mask prompts every prompt's dense embedding is the same (an expanded view): the image tokens enter
        # the transformer identical for all prompts. Passed once, the first block's image-side projections run once
        # and broadcast against the prompts' tokens; the image->token attention makes them per prompt. Channels-last,
        # the transformer's flatten + permute gives contiguous tokens, so the per-prompt image tokens the first block
        # makes are contiguous too (otherwise each block's layer norm copies them): same values, less memory traffic.
        src = (image_embeddings + dense[:1]).contiguous(memory_format=torch.channels_last)
        pos_src = image_pe.contiguous(memory_format=torch.channels_last)
    else:
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0) + dense
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_pred = decoder.iou_prediction_head(hs[:, 0, :])
    return hs[:, 1:(1 + decoder.num_mask_tokens), :], src.transpose(1, 2).view(-1, c, h, w), iou_pred


def decode_token_masks(decoder: MaskDecoder, mask_tokens_out: torch.Tensor, src: torch.Tensor,
                       count: int | None = None) -> torch.Tensor:
    """The second half of MaskDecoder.predict_masks: upscale the image tokens, low-res logits of every mask token
    (or of the first `count`: 1 is the mask a single-mask prompt decodes)."""
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                            for i in range(count or decoder.num_mask_tokens)], dim=1)
    b, c, h, w = upscaled.shape
    return (hyper_in @ upscaled.view(b, c, h * w)).view(b, hyper_in.shape[1], h, w)


class Segmenter:
    """Wraps a (possibly quantized) SAM: set_image() once, then predict() any number of prompts in chunks.

    Masks equal segment_anything.SamPredictor's for the same image and prompts.
    """

    def __init__(self, sam: Sam, decode_batch_size: int = 64, mask_threshold: float | None = None):
        if decode_batch_size < 1:
            raise SaqError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        self.sam = sam
        self.decode_batch_size = decode_batch_size
        self.mask_threshold = sam.mask_threshold if mask_threshold is None else mask_threshold
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.nonfinite_scores = 0  # predicted IoUs that came out NaN or inf (a model that overflows)
        self.timings = Timings()
        self._features: torch.Tensor | None = None
        self._original_size: tuple[int, int] | None = None
        self._input_size: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """Compute the image embedding once; image is H x W x 3 uint8 RGB."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise SaqError(f"set_image expects an H x W x 3 RGB array, got shape {shape}")
        if image.dtype != np.uint8:  # torchvision's resize would scale a float 0..255 image by 255 and wrap it
            raise SaqError(f"set_image expects uint8 pixels (0..255), got {image.dtype}")
        start = self.timings.clock(self.device)
        self._features = None  # a failure below must not leave the previous image's features for the new size
        self._original_size = image.shape[:2]
        self._input_size = self.transform.get_preprocess_shape(*image.shape[:2], self.transform.target_length)
        self._features = self.sam.image_encoder(encoder_input(self.sam, self.transform, image))
        self.timings.encoder_s += self.timings.clock(self.device) - start
        self.timings.images += 1

    @torch.no_grad()
    def predict_chunks(self, boxes=None, points=None, point_labels=None, multimask_output: bool = False,
                       return_logits: bool = False) -> Iterator[Prediction]:
        """Decode prompts chunk by chunk (decode_batch_size at a time), so memory stays bounded."""
        if self._features is None:
            raise SaqError("call set_image() before predict()")
        boxes_t, coords_t, labels_t = prompt_tensors(self.transform, self._original_size, self.device, boxes, points,
                                                     point_labels)
        n = len(boxes_t) if boxes_t is not None else len(coords_t)
        for start in range(0, n, self.decode_batch_size):
            sl = slice(start, start + self.decode_batch_size)
            t0 = self.timings.clock(self.device)
            pts = None if coords_t is None else (coords_t[sl], labels_t[sl])
            sparse, dense = self.sam.prompt_encoder(points=pts, boxes=None if boxes_t is None else boxes_t[sl],
                                                    masks=None)
            low_res, iou = decode_prompts(self.sam, self._features, sparse, dense,
                                          multimask_output=multimask_output)
            masks = self.sam.postprocess_masks(low_res, self._input_size, self._original_size)
            if not return_logits:
                masks = masks > self.mask_threshold
            self.timings.decoder_s += self.timings.clock(self.device) - t0
            self.timings.prompts += sparse.shape[0]
            self._check_scores(iou)
            yield Prediction(masks, iou, low_res)

    @torch.no_grad()
    def predict_above_iou(self, points, point_labels, pred_iou_thresh: float,
                          batch_size: int | None = None) -> Iterator[AutoMasks]:
        """Automatic-mask decoding: the three multimask outputs of each point prompt, only those whose predicted IoU
        is above pred_iou_thresh (all when it is <= 0), upscaled to the original resolution as logits.

        The same logits as predict_chunks(multimask_output=True, return_logits=True) followed by the filter, without
        upscaling or upsampling the masks the filter drops (the IoU head does not need them). batch_size prompts
        per decoder call (default decode_batch_size): on a CPU small batches keep the image tokens in cache.
        """
        if self._features is None:
            raise SaqError("call set_image() before predict()")
        _, coords_t, labels_t = prompt_tensors(self.transform, self._original_size, self.device, None, points,
                                               point_labels)
        batch_size = batch_size or self.decode_batch_size
        if batch_size < 1:
            raise SaqError(f"batch_size must be >= 1, got {batch_size}")
        decoder = self.sam.mask_decoder
        for start in range(0, len(coords_t), batch_size):
            sl = slice(start, start + batch_size)
            t0 = self.timings.clock(self.device)
            sparse, dense = self.sam.prompt_encoder(points=(coords_t[sl], labels_t[sl]), boxes=None, masks=None)
            image_pe = self.sam.prompt_encoder.get_dense_pe()
            if isinstance(decoder, MaskDecoder):
                with token_to_image_by_head_forward(self.sam):
                    mask_tokens, src, iou = decode_tokens(decoder, self._features, image_pe, sparse, dense)
                keep = passes_iou(iou[:, 1:], pred_iou_thresh)
                rows = keep.any(1)
                low_res = decode_token_masks(decoder, mask_tokens[rows], src[rows])[:, 1:][keep[rows]]
            else:  # a decoder that only offers the whole forward (e.g. a deployed ONNX one)
                low_res, iou = decoder.predict_masks(self._features, image_pe, sparse, dense)
                keep = passes_iou(iou[:, 1:], pred_iou_thresh)
                low_res = low_res[:, 1:][keep]
            prompt_index, output_index = keep.nonzero(as_tuple=True)
            if len(low_res):
                logits = self.sam.postprocess_masks(low_res[:, None], self._input_size, self._original_size)[:, 0]
            else:
                logits = low_res.new_zeros((0, *self._original_size))
            self.timings.decoder_s += self.timings.clock(self.device) - t0
            self.timings.prompts += sparse.shape[0]
            self._check_scores(iou[:, 1:])  # output 0 (the single-mask one) is never used here
            yield AutoMasks(logits, iou[:, 1:][keep], prompt_index + start, output_index)

    def _check_scores(self, iou: torch.Tensor) -> None:
        """Count non-finite predicted IoUs and say so once: they rank masks in mAP (NaN last) and filter automatic
        masks (NaN never passes), so a model that overflows would otherwise score low without a word why."""
        bad = int((~torch.isfinite(iou)).sum())
        if bad and not self.nonfinite_scores:
            print(f"warning: the model predicted {bad} non-finite IoU scores (NaN or inf) on image {self.timings.images}"
                  "; it overflows somewhere (such masks rank last, or are dropped by IoU filters)", file=sys.stderr)
        self.nonfinite_scores += bad

    def predict(self, boxes=None, points=None, point_labels=None, multimask_output: bool = False,
                return_logits: bool = False) -> Prediction:
        """All prompts at once (concatenated chunks); no prompts give empty tensors of the usual shapes."""
        parts = list(self.predict_chunks(boxes, points, point_labels, multimask_output, return_logits))
        if not parts:  # predict_chunks has checked that set_image ran
            c, device = 3 if multimask_output else 1, self.sam.device
            low = self.sam.prompt_encoder.mask_input_size
            return Prediction(torch.zeros((0, c, *self._original_size), dtype=torch.float32 if return_logits else
                                          torch.bool, device=device),
                              torch.zeros((0, c), device=device), torch.zeros((0, c, *low), device=device))
        return Prediction(*(torch.cat([getattr(p, f) for p in parts]) for f in ("masks", "iou_scores",
                                                                                 "low_res_logits")))

    def run(self, sample: PromptedImage, multimask_output: bool = False) -> Prediction | None:
        """set_image + predict for one prompted image (None when it has no prompts)."""
        self.set_image(sample.image)
        if sample.num_prompts == 0:
            return None
        return self.predict(sample.boxes, sample.points, sample.point_labels, multimask_output)


class ScoreSwapSegmenter(Segmenter):
    """Masks from one SAM, predicted IoU scores from another: with a quantized SAM's masks and the FP SAM's scores,
    a task's metric shows what the quantized model's IoU predictions cost apart from its masks (saq.sensitivity's
    `iou_scores` part; instance and oriented mAP rank masks by these scores, the semantic task filters by them)."""

    def __init__(self, sam: Sam, scorer: Sam, decode_batch_size: int = 64, mask_threshold: float | None = None):
        super().__init__(sam, decode_batch_size, mask_threshold)
        self.scorer = Segmenter(scorer, decode_batch_size, self.mask_threshold)

    def set_image(self, image: np.ndarray) -> None:
        super().set_image(image)
        self.scorer.set_image(image)

    def predict_chunks(self, boxes=None, points=None, point_labels=None, multimask_output: bool = False,
                       return_logits: bool = False) -> Iterator[Prediction]:
        # the same prompts in the same chunks: chunk k of one is chunk k of the other
        scored = self.scorer.predict_chunks(boxes, points, point_labels, multimask_output)
        for own, other in zip(super().predict_chunks(boxes, points, point_labels, multimask_output, return_logits),
                              scored, strict=True):
            yield Prediction(own.masks, other.iou_scores, own.low_res_logits)

    def predict_above_iou(self, points, point_labels, pred_iou_thresh: float,
                          batch_size: int | None = None) -> Iterator[AutoMasks]:
        # both keep every output (threshold 0: prompt-major, output-minor order), then the scorer's IoU filters
        scored = self.scorer.predict_above_iou(points, point_labels, 0.0, batch_size)
        for own, other in zip(super().predict_above_iou(points, point_labels, 0.0, batch_size), scored, strict=True):
            keep = passes_iou(other.iou_scores, pred_iou_thresh)
            yield AutoMasks(own.logits[keep], other.iou_scores[keep], own.prompt_index[keep], own.output_index[keep])
