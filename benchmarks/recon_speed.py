"""Prints reconstruction speed: iterations/s per unit type, the projected time of the official PAR schedule, peak
memory, and what layer skipping saves per encoder iteration against a forward through the rest of the encoder.

Each unit of the chosen model runs `iters` real iterations of the loop (saq.recon.Reconstructor: QDrop, AdaRound,
LSQ, PAR losses), on `images` random images with `prompts` random boxes each (16 = PAR's cap). The projection is
Σ_units official_iters(kind) / (it/s of its kind), plus the measured per-unit setup (caching inputs and targets).
sam_tiny uses its shipped weights; sam_vit_b random weights (timing only), on CUDA when one exists.
data=ROOT takes the first `images` calibration images of a COCO-format dataset laid out as data/synthetic is
(annotations/instances_train.json, train/images) with their ground-truth boxes instead (capped at 16 prompts).
The projection leaves out best-state restore's two passes over the calibration samples per unit (recon.best_state,
off while timing). Speeds are per CPU second when single-threaded (the machine may
be shared), per wall second otherwise.
Usage: python benchmarks/recon_speed.py [model=sam_tiny] [device=cpu] [threads=1] [iters=20] [images=4] [prompts=16]
                                        [data=ROOT] [quant=w4a4] [recon=par] [calib_images=32]
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quant_overhead import sample, timed
from saq.errors import SaqError, check_device
from saq.quant import calibrate, quantize
from saq.recon import ReconConfig, Reconstructor
from saq.sam.build import build_random_sam, build_sam
from saq.sam.unit_kinds import UNIT_KINDS
from saq.sam.units import build_chain, encode_sample, probe_image_tokens

CONF = Path(__file__).resolve().parent.parent / "conf"
# the instance task's splits in a dataset laid out as data/synthetic is
VAL = {"ann_file": "annotations/instances_val.json", "img_dir": "val/images"}
TRAIN = {"ann_file": "annotations/instances_train.json", "img_dir": "train/images"}


def require_layout(root: str, data: Mapping, calib: Mapping, knob: str) -> None:
    """SaqError naming this script's own knob (`knob`=ROOT) when root lacks a split the instance task reads (its
    own errors name the main command's task.data.root)."""
    from tasks.base import require_dir, require_file

    if not Path(root).is_dir():
        raise SaqError(f"{knob}={root} is not a folder; give a COCO-format dataset root (data/synthetic is generated "
                       "when missing)")
    key = f"{knob}=ROOT, laid out as data/synthetic"
    for split in (data, calib):
        require_file(Path(root) / split["ann_file"], "COCO annotation file", key)
        require_dir(Path(root) / split["img_dir"], "image", key)


def instance_task(root: str, knob: str):
    """The instance task on a dataset root laid out as data/synthetic is; data/synthetic itself is the instance
    task's own synthetic set, generated when missing."""
    from omegaconf import OmegaConf

    from tasks.instance import InstanceTask

    generate = None  # a real dataset is read, never generated
    if root == "data/synthetic":
        generate = OmegaConf.to_container(OmegaConf.load(CONF / "task" / "instance.yaml").generate)
    else:
        require_layout(root, VAL, TRAIN, knob)
    return InstanceTask({"root": root, **VAL}, TRAIN, generate=generate)


def compose_group(group: str, name: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose(config_name=None, overrides=[f"+{group}={name}"])[group], resolve=True)


def peak_memory(device: str) -> str:
    """GPU memory torch allocated since the last reset, or (CPU) the process's peak resident size since it started
    (model building and calibration included: it cannot be reset)."""
    if device == "cuda":
        return f"peak GPU memory allocated during reconstruction {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return f"peak resident memory of the process {mib:.0f} MiB"


def layer_skipping_saving(model, data, repeats: int = 3) -> tuple[float, float]:
    """ms per forward + backward from stage 0's output: the PAR probe (neck + two-way transformer) against the
    same after the later stages (what a loss through the whole encoder would cost)."""
    chain = build_chain(model, "stage")
    with torch.no_grad():
        x = chain[1].run(model, chain[0].run(model, (), data), data)[0]
    later = [s for s in chain if s.kind == "stage"][1:]

    def skip():
        probe_image_tokens(model, x.detach().requires_grad_(), data).square().mean().backward()

    def full():
        state = (x.detach().requires_grad_(),)
        for step in later:
            state = step.run(model, state, data)
        probe_image_tokens(model, state[0], data).square().mean().backward()

    device = x.device
    learnable = [p for p in model.parameters() if p.requires_grad]
    for p in learnable:  # the FP model is frozen while units learn: only the input's gradient is computed
        p.requires_grad_(False)
    try:
        return timed(skip, repeats, device) * 1000, timed(full, repeats, device) * 1000
    finally:
        for p in learnable:
            p.requires_grad_(True)


def main(args: dict) -> None:
    model_name = args.get("model", "sam_tiny")
    device = check_device(args.get("device", "cuda" if model_name != "sam_tiny" and torch.cuda.is_available()
                                   else "cpu"), "device")
    if "data" in args and "prompts" in args:
        raise SaqError("prompts= sets the random images' box count; with data= the images bring their own boxes")
    torch.set_num_threads(int(args.get("threads", 1)))
    iters, images, prompts = int(args.get("iters", 20)), int(args.get("images", 4)), int(args.get("prompts", 16))
    if prompts > 16:
        raise SaqError(f"prompts={prompts}: reconstruction keeps at most 16 prompts per image (PAR's cap, "
                       "recon.max_prompts); give 1..16")
    model = (build_sam(model_name) if model_name == "sam_tiny" else build_random_sam(model_name)).to(device)
    size = model.image_encoder.img_size
    if "data" in args:
        samples = instance_task(args["data"], "data").calibration_samples(images, "images")
        described = f"{images} images of {args['data']} (mean {np.mean([s.num_prompts for s in samples]):.1f} boxes)"
    else:
        samples = [sample(size, prompts, seed) for seed in range(images)]
        described = f"{images} random images x {prompts} boxes"
    quant = compose_group("quant", args.get("quant", "w4a4"))
    qmodel = quantize(model, quant)
    calibrate(qmodel, samples[:1], quant, progress=False)
    recon = compose_group("recon", args.get("recon", "par"))
    official = ReconConfig.from_cfg(recon)
    cfg = ReconConfig.from_cfg({**recon, "best_state": False,
                                "iters": {k: iters for k in UNIT_KINDS}})
    # one untimed iteration per unit first, on a copy: the first call of each kernel (most of all on CUDA) is slow
    warm_up = ReconConfig.from_cfg({**recon, "best_state": False,
                                    "iters": {k: 1 for k in UNIT_KINDS}})
    Reconstructor(copy.deepcopy(qmodel), model, warm_up, seed=0, progress=False).run(samples)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak of the timed reconstruction, not of building/calibrating
    start = time.perf_counter()
    report = Reconstructor(qmodel, model, cfg, seed=0, progress=False).run(samples)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    learned = sum(u.seconds for u in report.units)
    setup_per_unit = (wall - learned) / len(report.units) / images * int(args.get("calib_images", 32))
    units = [s for s in build_chain(model, official.granularity) if s.learnable]
    reference = [s.kind for s in build_chain(model, "stage") if s.learnable]
    schedule = dict(zip((s.name for s in units), official.unit_iters([s.kind for s in units], reference)))
    single = torch.get_num_threads() == 1 and device == "cpu"
    clock = "CPU" if single else "wall"
    per_kind: dict[str, list] = {}
    for unit in report.units:
        per_kind.setdefault(unit.kind, []).append(unit)
    print(f"{model_name} on {device}, {torch.get_num_threads()} thread(s), recon={official.name}, {described}, "
          f"{iters} iterations per unit, {clock} time")
    print(f"{'unit kind':<15}{'units':>6}{'it/s':>9}{'ms/it':>9}{'official iters':>16}{'projected s':>13}")
    total = 0.0
    for kind, members in per_kind.items():
        spent = [(u.cpu_seconds if single else u.seconds) / u.iters for u in members]  # seconds per iteration
        n_iters = sum(schedule[u.name] for u in members)
        seconds = sum(schedule[u.name] * t for u, t in zip(members, spent))  # each unit at its own speed
        total += seconds
        rate = len(members) / sum(spent)  # iterations per second, averaged over the kind's units
        print(f"{kind:<15}{len(members):>6}{rate:>9.2f}{1000 / rate:>9.1f}{n_iters:>16}{seconds:>13.0f}")
    setup = setup_per_unit * len(units)
    print(f"projected official schedule: {total:.0f} s learning ({clock} time) + {setup:.0f} s caching (wall time, "
          f"{args.get('calib_images', 32)} images) = {(total + setup) / 60:.1f} min; {peak_memory(device)}")
    data = encode_sample(model, max(samples, key=lambda s: s.num_prompts), 16, torch.Generator().manual_seed(0))
    skip, full = layer_skipping_saving(model, data)
    print(f"layer skipping, the loss path of a stage-0 iteration after the stage itself (fwd+bwd): neck + two-way "
          f"transformer {skip:.1f} ms, against {full:.1f} ms through the later stages and them ({full / skip:.1f}x; "
          "the stage's own fwd+bwd, in the stage rows above, is paid either way)")


if __name__ == "__main__":
    from saq.cli import run_script

    kinds = {"model": ("sam_tiny", "sam_vit_b", "sam_vit_l", "sam_vit_h"), "device": ("cpu", "cuda"), "threads": int,
             "iters": int, "images": int, "prompts": int, "data": str, "quant": ("w8a8", "w6a6", "w4a4"),
             "recon": ("par", "qdrop"), "calib_images": int}
    sys.exit(run_script(main, __doc__, kinds))
