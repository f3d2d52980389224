"""Model registry: sizes build from segment_anything classes; checkpoint errors are clear and name the problem."""

from __future__ import annotations

import re

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, TwoWayTransformer

from saq.errors import SaqError
from saq.sam.build import ARCHITECTURES, TINY_CHECKPOINT, build_random_sam, build_sam
from tests.conftest import flip_tensor_byte


def test_sam_tiny_has_the_real_encoder_shape_in_small():
    sam = build_random_sam("sam_tiny")
    enc = sam.image_encoder
    assert isinstance(enc, ImageEncoderViT)
    assert isinstance(sam.mask_decoder, MaskDecoder)
    assert isinstance(sam.mask_decoder.transformer, TwoWayTransformer)
    assert sam.mask_decoder.transformer.depth == 2
    windows = [blk.window_size for blk in enc.blocks]
    assert windows.count(0) >= 2, "at least two global-attention blocks close the stages"
    assert windows[-1] == 0 and windows[0] > 0
    assert all(blk.attn.use_rel_pos for blk in enc.blocks)
    assert hasattr(enc, "neck")


def test_shipped_tiny_checkpoint_loads():
    assert TINY_CHECKPOINT.is_file()
    sam = build_sam("sam_tiny")
    assert not sam.training
    shipped = torch.load(TINY_CHECKPOINT, map_location="cpu", weights_only=True)
    loaded = sam.state_dict()
    assert loaded.keys() == shipped.keys() and all(torch.equal(loaded[k], v) for k, v in shipped.items())


@pytest.mark.parametrize("wrap", [lambda sd: {"model": sd}, lambda sd: {"state_dict": sd, "epoch": 3},
                                  lambda sd: {f"module.{k}": v for k, v in sd.items()},
                                  # a Lightning module holding SAM as `model`, or a wrapper's `sam.`
                                  lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
                                  lambda sd: {f"sam.{k}": v for k, v in sd.items()},
                                  # the PyTorch tutorial's layout, and a wrapper twice
                                  lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}},
                                  lambda sd: {"state_dict": {"model": sd}},
                                  # "model" a config beside the weights: not opened for lacking SAM's tensors
                                  lambda sd: {"model": {"type": "sam_tiny", "depth": 6}, "state_dict": sd}])
def test_training_script_checkpoints_load_as_the_plain_state_dict(tmp_path, wrap):
    # what fine-tuning scripts save: the weights under "model" or "state_dict", or with DDP's "module." prefix
    plain = build_random_sam("sam_tiny", seed=7).state_dict()  # not the shipped weights: this file is what loads
    torch.save(wrap(plain), tmp_path / "ft.pth")
    loaded = build_sam("sam_tiny", tmp_path / "ft.pth").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in plain.items())


def test_a_checkpoint_whose_weights_cannot_be_told_names_its_keys(tmp_path):
    plain = build_random_sam("sam_tiny", seed=7).state_dict()
    torch.save({"ema": plain, "student": plain, "epoch": 3}, tmp_path / "two.pth")
    with pytest.raises(SaqError, match=r"two\.pth holds ema, student, epoch \(SAM's weights under each of ema, "
                                       r"student\); re-save the ones to evaluate alone"):
        build_sam("sam_tiny", tmp_path / "two.pth")
    # "model" or "state_dict" beside another key with SAM's weights is no more telling (it loaded "model" silently)
    torch.save({"model": plain, "model_ema": plain}, tmp_path / "ema.pth")
    with pytest.raises(SaqError, match=r"ema\.pth holds model, model_ema \(SAM's weights under each of model, "
                                       r"model_ema\); re-save the ones to evaluate alone: torch\.save\(torch\.load\("
                                       r"PATH\)\['model'\], 'sam\.pth'\) or torch\.save\(torch\.load\(PATH\)"
                                       r"\['model_ema'\], 'sam\.pth'\)$"):
        build_sam("sam_tiny", tmp_path / "ema.pth")
    # per-parameter settings keyed like SAM's weights are no second copy of them
    lrs = {k: 0.1 for k in plain}
    torch.save({"model": plain, "lr_scale": lrs}, tmp_path / "lrs.pth")
    assert build_sam("sam_tiny", tmp_path / "lrs.pth").state_dict().keys() == plain.keys()
    torch.save({**plain, "epoch": 3}, tmp_path / "mixed.pth")  # SAM's keys with a number beside them
    with pytest.raises(SaqError, match=r"mixed\.pth is not a state dict of tensors \('epoch' is int, not a tensor\)"):
        build_sam("sam_tiny", tmp_path / "mixed.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "none.pth")
    with pytest.raises(SaqError, match=r"none\.pth holds epoch, optimizer \(no SAM weights found\)"):
        build_sam("sam_tiny", tmp_path / "none.pth")


def test_missing_checkpoint_names_the_config_key(tmp_path):
    with pytest.raises(SaqError, match=r"checkpoint not found: .*nope\.pth.*model\.checkpoint"):
        build_sam("sam_vit_b", tmp_path / "nope.pth")
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "sam_vit_b_01ec64.pth").write_bytes(b"")
    with pytest.raises(SaqError, match=r"checkpoint .*ckpts is a folder; set model\.checkpoint to the SAM \.pth file "
                                       r"in it \(sam_vit_b_01ec64\.pth\)$"):
        build_sam("sam_vit_b", tmp_path / "ckpts")


def test_official_model_without_checkpoint_is_an_error():
    with pytest.raises(SaqError, match="needs a checkpoint"):
        build_sam("sam_vit_l", None)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(SaqError, match="not a readable PyTorch file"):
        build_sam("sam_tiny", bad)


def test_a_checkpoint_with_a_flipped_byte_is_named_not_loaded(tmp_path):
    # torch.load reads a bad copy's bytes as a weight without a word: the run would quantize another model
    path = tmp_path / "sam_tiny_copy.pt"
    path.write_bytes(TINY_CHECKPOINT.read_bytes())
    record = flip_tensor_byte(path)
    with pytest.raises(SaqError, match=rf"checkpoint {path} is damaged: its record {record} does not match the "
                                       r"checksum the file stores \(a broken copy or download\)"):
        build_sam("sam_tiny", path)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(SaqError, match="not a state dict"):
        build_sam("sam_tiny", path)


def test_checkpoint_of_another_size_names_expected_and_found_shapes(tmp_path):
    # A ViT-L file for sam_vit_b: the first tensor that differs is the positional embedding's width.
    arch_l = ARCHITECTURES["sam_vit_l"]
    state = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, arch_l.encoder_embed_dim)}
    path = tmp_path / "weights.pth"  # a name that does not give the size away
    torch.save(state, path)
    with pytest.raises(SaqError) as err:
        build_sam("sam_vit_b", path)
    msg = str(err.value)
    assert "(1, 64, 64, 768)" in msg and "(1, 64, 64, 1024)" in msg and "It looks like a sam_vit_l checkpoint" in msg


def test_tiny_checkpoint_for_vit_b_is_rejected(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_random_sam("sam_tiny").state_dict(), path)
    with pytest.raises(SaqError, match="does not fit sam_vit_b.*sam_tiny checkpoint"):
        build_sam("sam_vit_b", path)


def test_unknown_model_name():
    with pytest.raises(SaqError, match="unknown model 'sam_vit_x'"):
        build_sam("sam_vit_x", None)


def test_a_checkpoint_with_python_objects_names_them_and_how_to_resave(tmp_path):
    import argparse

    path = tmp_path / "ft.pth"
    torch.save({"model": build_random_sam("sam_tiny").state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(SaqError, match=r"ft\.pth holds Python objects beside its tensors \(argparse\.Namespace\), "
                                       r"which saq does not unpickle .*re-save its weights alone"):
        build_sam("sam_tiny", path)
    torch.save(build_random_sam("sam_tiny"), path)  # a whole pickled model has no key: its state_dict() is it
    with pytest.raises(SaqError, match=re.escape("re-save its weights alone: torch.save(torch.load(PATH, "
                                                 "weights_only=False).state_dict(), 'sam.pth')")):
        build_sam("sam_tiny", path)


def test_a_state_dict_with_keys_of_mixed_types_is_one_line(tmp_path):
    torch.save({0: torch.zeros(1), "conv.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(SaqError, match=r"odd\.pth is not a SAM checkpoint: none of its 2 tensors"):
        build_sam("sam_tiny", tmp_path / "odd.pth")


def test_a_state_dict_that_is_not_sams_or_a_quantized_export_is_named(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, path)
    with pytest.raises(SaqError, match=r"resnet\.pth is not a SAM checkpoint: none of its 2 tensors is one of "
                                       r"sam_tiny's \(e\.g\. conv1\.weight\)"):
        build_sam("sam_tiny", path)
    state = build_random_sam("sam_tiny").state_dict()
    torch.save({**state, "image_encoder.blocks.0.attn.qkv.input_quantizer.scale": torch.ones(())}, path)
    with pytest.raises(SaqError, match=r"is a saq quantized model .*quant\.load=RUN_DIR"):
        build_sam("sam_tiny", path)
    torch.save({**state, "extra.weight": torch.ones(())}, path)  # one tensor too many: named, without "(and 0 more)"
    with pytest.raises(SaqError, match=r"unexpected tensor extra\.weight\. Every SAM tensor is there: re-save SAM's "
                                       r"weights alone, "):
        build_sam("sam_tiny", path)
    # an EMA of a DDP model: SAM's tensors lose the prefix, the counter beside them is what is named
    torch.save({**{f"module.{k}": v for k, v in state.items()}, "n_averaged": torch.tensor(3)}, path)
    with pytest.raises(SaqError, match=r"unexpected tensor n_averaged\. Every SAM tensor is there"):
        build_sam("sam_tiny", path)
    # a tensor inside SAM's modules (an adapter) makes another model: no advice to drop it
    torch.save({**state, "mask_decoder.adapter.weight": torch.ones(())}, path)
    with pytest.raises(SaqError, match=r"unexpected tensor mask_decoder\.adapter\.weight\.$"):
        build_sam("sam_tiny", path)
    # damaged weights load without a word and score 0: NaN / inf, and integers cast on loading
    damaged = dict(state)
    damaged["image_encoder.blocks.1.mlp.lin1.weight"] = state["image_encoder.blocks.1.mlp.lin1.weight"].clone()
    damaged["image_encoder.blocks.1.mlp.lin1.weight"][0, :2] = torch.tensor([float("nan"), float("inf")])
    torch.save(damaged, path)
    with pytest.raises(SaqError, match=r"tensor image_encoder\.blocks\.1\.mlp\.lin1\.weight holds 2 NaN or infinite "
                                       r"values; the weights are damaged"):
        build_sam("sam_tiny", path)
    torch.save({**state, "mask_decoder.iou_token.weight": state["mask_decoder.iou_token.weight"].long()}, path)
    with pytest.raises(SaqError, match=r"tensor mask_decoder\.iou_token\.weight is int64, not floating point"):
        build_sam("sam_tiny", path)
    torch.save({k: v.half() for k, v in state.items()}, path)  # half precision is fine
    build_sam("sam_tiny", path)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(SaqError, match=r"tensor mask_decoder\.iou_token\.weight is missing"):
        build_sam("sam_tiny", path)


def test_a_checkpoint_is_hashed_once_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from saq.sam.build import checkpoint_digest

    path = tmp_path / "w.pth"
    path.write_bytes(b"first")
    reads = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    assert checkpoint_digest("sam_vit_b", str(path)) == real(b"first").hexdigest()
    assert checkpoint_digest("sam_vit_b", str(path)) == real(b"first").hexdigest() and len(reads) == 1
    path.write_bytes(b"other")  # retrained in place: same size, a later modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert checkpoint_digest("sam_vit_b", str(path)) == real(b"other").hexdigest() and len(reads) == 2


def test_checkpoint_file_is_what_a_sweep_asks_of_every_job_before_the_first():
    from saq.sam.build import checkpoint_file

    assert checkpoint_file("sam_tiny", None) == TINY_CHECKPOINT == checkpoint_file("sam_tiny_outliers", "")
    for name, checkpoint, message in (
            ("sam_vit_b", None, "model sam_vit_b needs a checkpoint: set model.checkpoint=/path/to/sam_vit_b.pth"),
            ("sam_vit_b", "/nonexistent.pth", "checkpoint not found: /nonexistent.pth (set model.checkpoint to the "
                                              "path of a SAM .pth file)"),
            ("sam_vit_x", None, "unknown model 'sam_vit_x'; expected one of")):
        with pytest.raises(SaqError) as err:
            checkpoint_file(name, checkpoint)
        assert str(err.value).startswith(message)
