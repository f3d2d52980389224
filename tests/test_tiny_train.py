"""The sam_tiny trainer: a short run writes a loadable checkpoint and card; earlier rounds' weights are refitted."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from saq.errors import SaqError
from saq.sam.build import ARCHITECTURES, SamArchitecture, build_sam, make_sam
from saq.sam.tiny.train import jitter_boxes, resized_state_dict, train
from tests.conftest import REPO


@pytest.mark.parametrize("override,message", [
    ("eval_every=0", "eval_every=0 invalid; expected an integer >= 1"),
    ("point_every=0", "point_every=0 invalid"),
    ("threads=null", "threads=None invalid"),
    ("seed=-1", "seed=-1 invalid"),
    ("batch_size=9", "batch_size=9 is more than the 8 training images with an object (of 8); lower batch_size or "
                     "raise data.n_train"),
    ("output=null", "output=None invalid; give the checkpoint path to write"),  # would overwrite the shipped weights
    ("output=x.json", "invalid; give a checkpoint file name ending in .pt or .pth"),  # its card would overwrite it
    ("lr=0", "lr=0 invalid; expected a finite number > 0"),
    ("box_noise=-0.1", "box_noise=-0.1 invalid; expected a finite number >= 0"),
    ("min_lr_ratio=2", "min_lr_ratio=2 invalid; expected a finite number in [0, 1]"),
    ("grad_clip=0", "grad_clip=0 invalid; expected a finite number > 0"),  # clipping to 0 zeroes every gradient
    ("warmup_steps=200", "warmup_steps=200 is more than steps=100"),  # the lr would never reach its peak
    ("init_checkpoint=/nope/round1.pt", "init_checkpoint=/nope/round1.pt not found"),
    ("output=saq/sam/tiny/sam_tiny.pth", "its card would be the shipped sam_tiny.json"),
    ("+stpes=100", "stpes is not a training setting; expected one of the keys of conf/train_tiny.yaml"),  # a typo
    ("+data.n_trian=5", "data.n_trian is not a training setting"),
    ("init_checkpoint=5", "init_checkpoint=5 invalid; expected null or the path of an earlier round's checkpoint"),
    # were TypeError / AttributeError tracebacks
    ("data.root=5", "data.root=5 invalid; expected a path"),
    ("data.train_ann=null", "data.train_ann=None invalid; expected a path (relative to data.root)"),
    ("data=/data/coco", "data='/data/coco' invalid; expected the mapping of conf/train_tiny.yaml's data (a dataset "
                        "folder is data.root=...)"),
])
def test_bad_training_knobs_are_one_line_naming_the_knob(override, message, synthetic_root, tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train_tiny", overrides=[f"data.root={synthetic_root}", f"output={tmp_path / 'x.pt'}",
                                                            "data.n_val=2", "steps=100", "warmup_steps=10", override])
    with pytest.raises(SaqError, match=re.escape(message)):
        train(cfg)
    assert not (tmp_path / "x.pt").exists()


def test_a_batch_counts_only_the_training_images_with_an_object(synthetic_root, tmp_path):
    import json

    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    for name in ("train", "val"):
        (root / name).symlink_to(synthetic_root / name)
    (root / "annotations" / "instances_val.json").symlink_to(synthetic_root / "annotations" / "instances_val.json")
    coco = json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != coco["images"][0]["id"]]
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))  # one image without objects
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train_tiny", overrides=[f"data.root={root}", f"output={tmp_path / 'x.pt'}",
                                                            "data.n_val=2", "steps=100", "warmup_steps=10",
                                                            "batch_size=8"])
    with pytest.raises(SaqError, match=re.escape("batch_size=8 is more than the 7 training images with an object "
                                                 "(of 8)")):
        train(cfg)


def test_bad_training_data_is_one_line_before_any_step(synthetic_root, tmp_path):
    import json

    import cv2

    def dataset(name, edit_val=None, edit_image=None):
        root = tmp_path / name
        (root / "annotations").mkdir(parents=True)
        for split in ("train", "val"):
            (root / split).symlink_to(synthetic_root / split)
        (root / "annotations" / "instances_train.json").symlink_to(
            synthetic_root / "annotations" / "instances_train.json")
        coco = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
        if edit_val is not None:
            edit_val(coco)
        (root / "annotations" / "instances_val.json").write_text(json.dumps(coco) if coco else "{ cut")
        if edit_image is not None:  # the val images, copied so that one can change
            (root / "val").unlink()
            (root / "val").mkdir()
            images = root / "val" / "images"
            images.mkdir(parents=True)
            for image in coco["images"][:2]:
                (images / image["file_name"]).write_bytes((synthetic_root / "val/images" / image["file_name"]).read_bytes())
            edit_image(images / coco["images"][0]["file_name"], coco)
            (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
        return root

    def upscale(path, coco):  # a val image at twice the size, its entry and annotations saying so: a 256 px model
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (512, 512)))  # scored it as 0 mIoU before
        coco["images"][0].update(width=512, height=512)
        for ann in coco["annotations"]:
            if ann["image_id"] == coco["images"][0]["id"]:
                ann["segmentation"] = [[2 * v for v in poly] for poly in ann["segmentation"]] \
                    if isinstance(ann["segmentation"], list) else ann["segmentation"]

    def shrink(path, coco):  # an image that is not the size its entry says (was an IndexError in the masks)
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (128, 128)))

    cases = {
        "no_objects": (dataset("no_objects", lambda c: c.update(annotations=[])),
                       r"val images of .* hold no objects: the box-prompt mIoU curve needs some"),  # was a crash at
        # the first evaluation, eval_every steps in
        "cut_json": (dataset("cut_json", lambda c: c.clear()),
                     r"annotation file .*instances_val\.json is not a COCO annotation file \(JSONDecodeError"),
        "other_size": (dataset("other_size", edit_image=upscale),
                       r"sam_tiny trains on 256px square images; .* is 512x512"),
        "entry_size": (dataset("entry_size", edit_image=shrink), r"is 128x128 \(w x h\), its entry in .* says 256x256"),
    }
    for root, message in cases.values():
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            cfg = compose(config_name="train_tiny", overrides=[f"data.root={root}", f"output={tmp_path / 'x.pt'}",
                                                                "data.n_val=2", "steps=100", "warmup_steps=10"])
        with pytest.raises(SaqError, match=message):
            train(cfg)
    assert not (tmp_path / "x.pt").exists()


def test_a_round_never_writes_over_an_earlier_rounds_checkpoint(synthetic_root, tmp_path):
    (tmp_path / "round1.pt").write_bytes(b"weights")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train_tiny", overrides=[f"data.root={synthetic_root}", "data.n_val=2",
                                                            f"output={tmp_path / 'round1.pt'}"])
    with pytest.raises(SaqError, match=r"round1\.pt already holds a checkpoint .*give this round a file of its own"):
        train(cfg)
    assert (tmp_path / "round1.pt").read_bytes() == b"weights"


def test_home_paths_are_expanded_once_for_every_later_use(synthetic_root, tmp_path, monkeypatch):
    from saq.sam.tiny.train import check_train_knobs

    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted '~/...' or a sweep file reaches Python unexpanded
    (tmp_path / "round1.pt").write_bytes(b"weights")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train_tiny", overrides=[f"data.root={synthetic_root}", "data.n_val=2",
                                                            "output='~/round2.pt'", "init_checkpoint='~/round1.pt'"])
    check_train_knobs(cfg)
    assert cfg.output == str(tmp_path / "round2.pt") and cfg.init_checkpoint == str(tmp_path / "round1.pt")


def test_the_training_command_prints_a_user_error_as_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "saq.sam.tiny.train", f"data.root={tmp_path / 'none'}",
                           f"hydra.run.dir={tmp_path / 'run'}", f"output={tmp_path / 'x.pt'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: annotation file not found"), proc.stderr[-2000:]


def test_short_training_run_writes_checkpoint_and_card(synthetic_root, tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    # an evaluation of the weights this run replaces must not survive into the new card
    out.with_suffix(".json").write_text(json.dumps({"evaluation": {"metrics": {"mIoU": 0.9}}}))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train_tiny", overrides=[
            f"data.root={synthetic_root}", f"output={out}", "steps=2", "batch_size=2", "prompts_per_image=2",
            "point_every=2", "eval_every=1", "data.n_val=2", "warmup_steps=1"])
    card = train(cfg)
    assert f"training on 8 train scenes of {synthetic_root} (2 val scenes" in capsys.readouterr().out
    assert [h["step"] for h in card["history"]] == [1, 2]
    assert all(0.0 <= h["val_box_mIoU"] <= 1.0 for h in card["history"])
    # the recorded metric is the written checkpoint's own: re-measure it independently of the training loop
    from saq.sam.tiny.train import box_prompt_miou, load_coco_split

    val = load_coco_split(synthetic_root, cfg.data.val_ann, cfg.data.val_img_dir, 2)
    assert card["history"][-1]["val_box_mIoU"] == round(box_prompt_miou(build_sam("sam_tiny", out), val), 4)
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["steps_done"] == 2 and "evaluation" not in written
    assert written["training"]["warmup_steps"] == 1 and written["training"]["eval_every"] == 1  # every knob kept
    assert written["train_images"] == 8  # data.n_train=null: every scene of the fixture's train split
    # which generated set it trained on, not only where it was (another --seed or generator version is other data)
    meta = json.loads((synthetic_root / "meta.json").read_text())
    assert written["dataset"] == {"seed": 0, "generator_version": meta["generator_version"], "n_train": 8, "n_val": 6}
    trained = build_sam("sam_tiny", out)  # validated against the registered architecture
    assert not torch.equal(trained.image_encoder.pos_embed, make_sam(ARCHITECTURES["sam_tiny"]).image_encoder.pos_embed)


def coarser_grid() -> SamArchitecture:
    """sam_tiny with twice the patch size: the grid an earlier round may have been trained on."""
    arch = ARCHITECTURES["sam_tiny"]
    return dataclasses.replace(arch, patch_size=arch.patch_size * 2, window_size=max(2, arch.window_size // 2))


def test_weights_of_a_coarser_patch_grid_are_refitted():
    torch.manual_seed(0)
    old = make_sam(coarser_grid()).state_dict()
    _, side, _, width = old["image_encoder.pos_embed"].shape
    ramp = torch.linspace(-1, 1, side)
    old["image_encoder.pos_embed"] = (ramp[:, None, None] + 2 * ramp[None, :, None]).expand(1, side, side, width).clone()
    new_model = make_sam(ARCHITECTURES["sam_tiny"])
    fitted = resized_state_dict(old, new_model.state_dict())
    new_model.load_state_dict(fitted)
    assert torch.equal(fitted["mask_decoder.iou_token.weight"], old["mask_decoder.iou_token.weight"])
    # On a flat image region a token must see what the coarser token saw: the kernel keeps its total weight.
    k_old, k_new = old["image_encoder.patch_embed.proj.weight"], fitted["image_encoder.patch_embed.proj.weight"]
    assert k_new.shape[-1] * 2 == k_old.shape[-1]
    assert torch.allclose(k_new.sum((-2, -1)), k_old.sum((-2, -1)), atol=1e-5)
    # The position grid is the old one resampled: pooling it back gives the old grid (exactly, inside, for a ramp).
    pooled = F.avg_pool2d(fitted["image_encoder.pos_embed"].permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert torch.allclose(pooled[:, 1:-1, 1:-1], old["image_encoder.pos_embed"][:, 1:-1, 1:-1], atol=1e-5)
    rel = fitted["image_encoder.blocks.0.attn.rel_pos_h"]
    assert rel.shape[0] == 2 * ARCHITECTURES["sam_tiny"].window_size - 1
    assert torch.allclose(rel[[0, -1]], old["image_encoder.blocks.0.attn.rel_pos_h"][[0, -1]])


def test_refit_refuses_other_mismatches():
    old = make_sam(dataclasses.replace(ARCHITECTURES["sam_tiny"], encoder_embed_dim=64)).state_dict()
    with pytest.raises(SaqError, match="only the patch grid may differ"):
        resized_state_dict(old, make_sam(ARCHITECTURES["sam_tiny"]).state_dict())
    with pytest.raises(SaqError, match="not a sam_tiny checkpoint"):
        resized_state_dict({}, make_sam(ARCHITECTURES["sam_tiny"]).state_dict())
    deeper = make_sam(dataclasses.replace(ARCHITECTURES["sam_tiny"], decoder_depth=3)).state_dict()
    with pytest.raises(SaqError, match="that sam_tiny lacks: it is another architecture"):  # its tensors were dropped
        resized_state_dict(deeper, make_sam(ARCHITECTURES["sam_tiny"]).state_dict())
    window = make_sam(dataclasses.replace(ARCHITECTURES["sam_tiny"], window_size=4)).state_dict()
    with pytest.raises(SaqError, match="with the same patch grid"):  # tables resized although the grid is the same
        resized_state_dict(window, make_sam(ARCHITECTURES["sam_tiny"]).state_dict())


def test_box_jitter_scales_with_the_box_and_respects_the_cap():
    small = torch.tensor([[100.0, 100.0, 120.0, 140.0]]).repeat(4000, 1)  # 20 x 40 px: noise 2 / 4 px at 0.1
    large = torch.tensor([[28.0, 28.0, 228.0, 228.0]]).repeat(4000, 1)  # 200 px: 20 px at 0.1, capped at 5
    noise = jitter_boxes(small, torch.Generator().manual_seed(0), 256, scale=0.1, max_px=10) - small
    assert torch.allclose(noise.std(0), torch.tensor([2.0, 4.0, 2.0, 4.0]), rtol=0.1)
    capped = jitter_boxes(large, torch.Generator().manual_seed(0), 256, scale=0.1, max_px=5) - large
    assert torch.allclose(capped.std(0), torch.full((4,), 5.0), rtol=0.1)
    edge = jitter_boxes(torch.tensor([[0.0, 0.0, 256.0, 256.0]]).repeat(100, 1), torch.Generator(), 256)
    assert edge.min() >= 0 and edge.max() <= 256  # clamped to the image
    assert torch.equal(jitter_boxes(small, torch.Generator(), 256, scale=0.0), small)


def whole_val_run() -> dict:
    """A results.json of the shipped sam_tiny on all of the shipped synthetic val split, as the card needs."""
    from saq.sam.build import checkpoint_digest

    return {"model": "sam_tiny", "checkpoint_sha256": checkpoint_digest("sam_tiny", None), "task": "instance",
            "prompts": "gt",
            "metrics": {"fp": {"mask_AP": 0.5, "images": 500}},
            "config": {"model": {"checkpoint": None},
                       "task": {"max_images": None, "generate": {"n_train": 64, "n_val": 500, "seed": 0},
                                "data": {"root": "data/synthetic", "ann_file": "annotations/instances_val.json",
                                         "img_dir": "val/images"}}}}


def test_the_card_takes_only_a_whole_val_evaluation_of_the_shipped_checkpoint(tmp_path):
    from saq.sam.build import TINY_CHECKPOINT
    from saq.sam.tiny.card import record_evaluation

    shipped_card = TINY_CHECKPOINT.with_suffix(".json")
    before = shipped_card.read_bytes()
    card = tmp_path / "card.json"  # a copy: the shipped card is never written by tests
    card.write_bytes(before)

    def record(run):
        (tmp_path / "results.json").write_text(json.dumps(run))
        return record_evaluation(tmp_path / "results.json", card)

    run = whole_val_run()
    run["config"]["task"]["max_images"] = 2
    with pytest.raises(SystemExit, match="another checkpoint or a subset"):
        record(run)
    # a whole-val run of other data: a 3-image dataset elsewhere, or fewer images than the shipped val split
    run = whole_val_run()
    run["config"]["task"]["data"]["root"] = str(tmp_path / "tiny_data")
    with pytest.raises(SystemExit, match=r"task\.data\.root=.*tiny_data; the card's data is data/synthetic"):
        record(run)
    run = whole_val_run()
    run["config"]["task"]["generate"]["n_val"] = 3
    run["metrics"]["fp"]["images"] = 3
    with pytest.raises(SystemExit, match=r"task\.generate\.n_val=3; the shipped synthetic data has n_val=500"):
        record(run)
    for sha in ("0" * 64, None):  # a run of earlier weights (before a retraining), or of a version without the hash
        run = whole_val_run()
        run["checkpoint_sha256"] = sha
        with pytest.raises(SystemExit, match="evaluated other weights than today's shipped sam_tiny checkpoint"):
            record(run)
    run = whole_val_run()
    run["prompts"] = "jittered"
    with pytest.raises(SystemExit, match=r"prompted with 'jittered' boxes; the card records ground-truth boxes"):
        record(run)
    run = whole_val_run()
    run["metrics"]["fp"]["images"] = 3
    with pytest.raises(SystemExit, match=r"evaluated 3 images \(metrics\.fp\.images\); .* has 500"):
        record(run)
    run = whole_val_run()
    run["config"]["task"]["data"]["ann_file"] = "annotations/instances_train.json"
    with pytest.raises(SystemExit, match=r"task\.data\.ann_file=annotations/instances_train\.json; the card's"):
        record(run)
    # an oriented or semantic run has no ann_file: one line, not a KeyError
    run = whole_val_run()
    run["task"] = "semantic"
    run["config"]["task"]["data"] = {"root": "data/synthetic", "img_dir": "val/images"}
    with pytest.raises(SystemExit, match=r"a run of task 'semantic'; the card records the instance task"):
        record(run)
    # missing, corrupt and non-object files: one line each
    with pytest.raises(SystemExit, match=r"nope\.json: no such file"):
        record_evaluation(tmp_path / "nope.json", card)
    (tmp_path / "bad.json").write_text("{ half")
    with pytest.raises(SystemExit, match=r"bad\.json is not readable JSON \(JSONDecodeError"):
        record_evaluation(tmp_path / "bad.json", card)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"list\.json is not a saq run record \(a JSON list, not an object\)"):
        record_evaluation(tmp_path / "list.json", card)
    assert json.loads(card.read_bytes()) == json.loads(before)  # nothing refused was written
    assert record(whole_val_run())["evaluation"]["metrics"] == {"mask_AP": 0.5, "images": 500}
    assert json.loads(card.read_text())["training"] == json.loads(before)["training"]  # the rest of the card kept
    assert shipped_card.read_bytes() == before


def test_a_default_training_round_never_writes_over_the_shipped_checkpoint():
    from saq.sam.build import TINY_CHECKPOINT

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train_tiny")
    assert cfg.output and Path(cfg.output).resolve() != TINY_CHECKPOINT.resolve()
    assert Path(cfg.output).parts[0] == "outputs"  # git-ignored: a retrained round is the user's to ship or not
