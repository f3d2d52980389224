"""The Segmenter's masks equal segment_anything.SamPredictor's for the same image and prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from saq.errors import SaqError
from saq.sam.build import build_random_sam, build_sam
from saq.sam.segmenter import ScoreSwapSegmenter, Segmenter
from tasks.synthetic import render_scene
from tests.conftest import random_vit_b


def reference(sam, image, boxes=None, points=None, labels=None, multimask=False):
    pred = SamPredictor(sam)
    pred.set_image(image)
    b = None if boxes is None else pred.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
    c = None if points is None else pred.transform.apply_coords_torch(torch.as_tensor(points), image.shape[:2])
    lab = None if labels is None else torch.as_tensor(labels)
    masks, iou, low = pred.predict_torch(c, lab, b, multimask_output=multimask)
    return masks, iou, low


@pytest.fixture(scope="module")
def scene():
    s = render_scene(0, "val", 3)
    ys, xs = np.nonzero(s.masks[0])
    boxes = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]] * 2, np.float32)
    boxes[1] += [3, -2, 5, 1]
    return s.image, boxes


def test_matches_sam_predictor_on_sam_tiny_boxes_and_points(scene):
    image, boxes = scene
    sam = build_sam("sam_tiny")
    seg = Segmenter(sam, decode_batch_size=1)  # chunking must not change results
    seg.set_image(image)
    out = seg.predict(boxes=boxes)
    masks, iou, low = reference(sam, image, boxes=boxes)
    assert out.masks.shape == (2, 1, *image.shape[:2])
    assert torch.equal(out.masks, masks)
    torch.testing.assert_close(out.iou_scores, iou)
    torch.testing.assert_close(out.low_res_logits, low)

    points = np.array([[[60.5, 70.5]], [[120.0, 30.0]], [[10.0, 200.0]]], np.float32)
    labels = np.ones((3, 1), np.int64)
    out = seg.predict(points=points, point_labels=labels, multimask_output=True)
    masks, iou, _ = reference(sam, image, points=points, labels=labels, multimask=True)
    assert out.masks.shape[1] == 3
    assert torch.equal(out.masks, masks)
    torch.testing.assert_close(out.iou_scores, iou)
    assert seg.timings.images == 1 and seg.timings.prompts == 5


def test_matches_sam_predictor_on_a_resized_non_square_image(scene):
    """sam_tiny's input is 256 px like the synthetic images: a 173 x 411 image makes points and boxes go through the
    resize (original size against input size), for prompts and for the automatic-mask path."""
    import cv2

    image = cv2.resize(scene[0], (411, 173), interpolation=cv2.INTER_LINEAR)
    sam = build_sam("sam_tiny")
    seg = Segmenter(sam, decode_batch_size=2)
    seg.set_image(image)
    points = np.array([[[100.5, 60.5]], [[300.0, 30.0]], [[20.0, 150.0]]], np.float32)
    labels = np.ones((3, 1), np.int64)
    out = seg.predict(points=points, point_labels=labels, multimask_output=True)
    masks, iou, _ = reference(sam, image, points=points, labels=labels, multimask=True)
    assert out.masks.shape == (3, 3, 173, 411) and torch.equal(out.masks, masks)
    torch.testing.assert_close(out.iou_scores, iou)
    boxes = np.array([[30, 20, 200, 150], [250, 10, 400, 120]], np.float32)
    assert torch.equal(seg.predict(boxes=boxes).masks, reference(sam, image, boxes=boxes)[0])
    (auto,) = seg.predict_above_iou(points, labels, 0.0, batch_size=3)  # every output kept, as logits at full size
    _, _, low = reference(sam, image, points=points, labels=labels, multimask=True)
    assert auto.logits.shape == (9, 173, 411)
    expected = sam.postprocess_masks(low, seg._input_size, image.shape[:2]).reshape(9, 173, 411)
    torch.testing.assert_close(auto.logits, expected, atol=1e-4, rtol=0)


def test_matches_sam_predictor_on_random_vit_b():
    sam = random_vit_b()  # ViT-B's encoder (16-px patches, padded 14-token windows) and decoder, at a 256-px input
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)  # non-square: exercises resize and crop
    boxes = np.array([[10, 20, 200, 180], [50, 5, 310, 230]], np.float32)
    seg = Segmenter(sam)
    seg.set_image(image)
    out = seg.predict(boxes=boxes)
    masks, iou, low = reference(sam, image, boxes=boxes)
    assert out.masks.shape == (2, 1, 240, 320)
    assert torch.equal(out.masks, masks)
    for mask in out.masks:  # random weights: masks that are neither empty nor full, or equal masks would prove little
        assert 0.02 < float(mask.float().mean()) < 0.98
    torch.testing.assert_close(out.low_res_logits, low)
    torch.testing.assert_close(out.iou_scores, iou)


def test_score_swap_takes_masks_from_one_sam_and_iou_scores_from_the_other(scene):
    image, boxes = scene
    masker, scorer = build_random_sam("sam_tiny", seed=3), build_sam("sam_tiny")  # trained IoUs: a positive threshold
    swap = ScoreSwapSegmenter(masker, scorer, decode_batch_size=1)  # chunk by chunk, the two stay aligned
    swap.set_image(image)
    own, other = Segmenter(masker, decode_batch_size=1), Segmenter(scorer, decode_batch_size=1)
    for seg in (own, other):
        seg.set_image(image)
    got, want_masks, want_scores = swap.predict(boxes=boxes), own.predict(boxes=boxes), other.predict(boxes=boxes)
    assert torch.equal(got.masks, want_masks.masks) and torch.equal(got.low_res_logits, want_masks.low_res_logits)
    assert torch.equal(got.iou_scores, want_scores.iou_scores)
    assert not torch.allclose(want_masks.iou_scores, want_scores.iou_scores)  # the two SAMs do score differently

    # automatic masks: the scorer's IoU decides which of the masker's outputs pass
    points, labels = np.array([[[60.5, 70.5]], [[120.0, 30.0]], [[10.0, 200.0]]], np.float32), np.ones((3, 1), np.int64)
    every = [list(seg.predict_above_iou(points, labels, 0.0, batch_size=3)) for seg in (own, other)]
    threshold = float(every[1][0].iou_scores.median())
    (chunk,) = swap.predict_above_iou(points, labels, threshold, batch_size=3)
    keep = every[1][0].iou_scores > threshold
    assert 0 < int(keep.sum()) < len(keep)
    assert torch.equal(chunk.iou_scores, every[1][0].iou_scores[keep])
    assert torch.equal(chunk.logits, every[0][0].logits[keep])
    assert torch.equal(chunk.output_index, every[0][0].output_index[keep])


def test_predict_before_set_image_and_bad_prompts():
    seg = Segmenter(build_random_sam("sam_tiny"))
    with pytest.raises(SaqError, match="set_image"):
        seg.predict(boxes=np.zeros((1, 4)))
    seg.set_image(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(SaqError, match="box or point"):
        seg.predict()
    none = seg.predict(boxes=np.zeros((0, 4)), multimask_output=True)  # no prompts: empty, of the usual shapes
    some = seg.predict(boxes=np.array([[2, 2, 20, 20]]), multimask_output=True)
    for empty, full in zip((none.masks, none.iou_scores, none.low_res_logits),
                           (some.masks, some.iou_scores, some.low_res_logits)):
        assert empty.shape == (0, *full.shape[1:]) and empty.dtype == full.dtype
    with pytest.raises(SaqError, match="H x W x 3"):
        seg.set_image(np.zeros((32, 48), np.uint8))
    with pytest.raises(SaqError, match="expects uint8 pixels"):  # a float 0..255 image would be rescaled into garbage
        seg.set_image(np.zeros((40, 40, 3), np.float32))
    encoder = seg.sam.image_encoder.forward
    seg.sam.image_encoder.forward = lambda x: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        seg.set_image(np.zeros((64, 20, 3), np.uint8))
    seg.sam.image_encoder.forward = encoder
    with pytest.raises(SaqError, match="set_image"):  # the failed image's size is not paired with the old features
        seg.predict(boxes=np.zeros((1, 4)))
    seg.set_image(np.zeros((32, 48, 3), np.uint8))
    for kwargs, message in (({"boxes": np.zeros(5)}, r"boxes must be B x 4 .*shape \(5,\)"),
                            ({"points": np.zeros((2, 2)), "point_labels": np.ones(3)},
                             r"points must be P x N x 2 .*points \(2, 2\) and point_labels \(3,\)"),
                            ({"points": np.zeros((2, 3, 2)), "point_labels": np.ones((3, 2))},
                             r"point_labels \(3, 2\)")):
        with pytest.raises(SaqError, match=message):
            seg.predict(**kwargs)


def test_token_to_image_by_head_is_the_stock_attention_bit_for_bit():
    from segment_anything.modeling.transformer import Attention

    from saq.sam.attention import decoder_attentions, token_to_image_by_head_forward

    sam = build_sam("sam_tiny")
    transformer = sam.mask_decoder.transformer
    torch.manual_seed(0)
    tokens, image = torch.randn(5, 7, 128), torch.randn(5, 1024, 128)
    with torch.no_grad():
        for attn, keys in ((transformer.layers[1].cross_attn_token_to_image, image),  # a prompt's own image tokens
                           (transformer.final_attn_token_to_image, image[:1])):  # image tokens shared by all prompts
            stock = attn(tokens, keys, keys)
            with token_to_image_by_head_forward(sam):
                patched = [n for n, a in decoder_attentions(sam).items() if "forward" in vars(a)]
                by_head = attn(tokens, keys, keys)
            assert torch.equal(by_head, stock)
            assert patched == ["layers.0.cross_attn_token_to_image", "layers.1.cross_attn_token_to_image",
                               "final_attn_token_to_image"]
    assert not any("forward" in vars(a) for a in decoder_attentions(sam).values())  # restored on leaving
    assert all(type(a) is Attention for a in decoder_attentions(sam).values())


def test_non_finite_iou_scores_are_counted_and_said_once(capsys):
    sam = build_random_sam("sam_tiny")
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(float("nan"))  # as a model that overflows
    seg = Segmenter(sam, decode_batch_size=1)
    seg.set_image(np.zeros((32, 48, 3), np.uint8))
    seg.predict(boxes=np.array([[2, 2, 20, 20], [4, 4, 30, 30]], np.float32))
    assert seg.nonfinite_scores == 2
    err = capsys.readouterr().err
    assert err.count("warning: the model predicted 1 non-finite IoU scores (NaN or inf) on image 1") == 1
