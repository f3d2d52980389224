"""Every option of every config group composes, and the composed task/prompt configs instantiate."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import REPO

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def assert_keys_land(own: dict, composed: dict, where) -> None:
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(composed.get(key), dict):
            assert_keys_land(value, composed[key], (*where, key))  # a preset sets some keys of another group
        else:
            assert composed[key] == value, (*where, key)


# what the composition test below is parametrised with, read from conf/: a moved or renamed folder would otherwise
# drop its options from the test silently (a new option is added here as well)
EXPECTED_OPTIONS = {
    "clip": ["minmax", "mse", "pcc", "percentile"],
    "logger": ["none", "wandb"],
    "method": ["minmax", "ptq4sam_l", "ptq4sam_s", "qdrop", "saq_sam", "saq_sam_star"],
    "model": ["sam_tiny", "sam_tiny_outliers", "sam_vit_b", "sam_vit_h", "sam_vit_l"],
    "prompts": ["detections", "gt", "jittered"],
    "quant": ["fp", "w4a4", "w6a6", "w8a8"],
    "recon": ["none", "par", "qdrop"],
    "task": ["instance", "oriented", "semantic"],
}


def test_the_groups_and_options_read_from_conf_are_the_expected_ones():
    assert {g: options(g) for g in GROUPS} == EXPECTED_OPTIONS
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").defaults)
    selected = {key for item in defaults if isinstance(item, dict) for key in item if "/" not in key}
    assert selected == set(GROUPS)  # the groups the root config selects (hydra/... aside) are the ones tested


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
    path = CONF / group / f"{option}.yaml"
    own = OmegaConf.load(path)  # the option's own keys land in the composed group (or the root: a _global_ preset)
    own.pop("defaults", None)
    is_global = path.read_text().startswith("# @package _global_")
    composed = OmegaConf.to_container(cfg if is_global else cfg[group], resolve=False)
    assert_keys_land(OmegaConf.to_container(own, resolve=False), composed, (group, option))
    OmegaConf.resolve(cfg)  # interpolations must resolve too
    for key in ("model", "task", "prompts", "quant", "logger", "seed"):
        assert key in cfg


def test_default_is_embedded_sam_tiny_instance_gt():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.model.name == "sam_tiny"
    assert cfg.task._target_ == "tasks.instance.InstanceTask"
    assert cfg.prompts._target_ == "tasks.prompts.GroundTruthBoxes"
    assert cfg.quant.name == "fp"
    assert cfg.hydra.job.chdir is False


def test_unknown_option_is_rejected():
    from hydra.errors import MissingConfigException

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        with pytest.raises(MissingConfigException):
            compose(config_name="config", overrides=["model=sam_vit_x"])


def preset_group_defaults(path) -> list[tuple[str, str]]:
    """(group, option) pairs a sweep preset selects in its defaults list (`- override /clip: pcc`)."""
    pairs = []
    for item in OmegaConf.load(path).get("defaults") or []:
        for key, option in dict(item).items():
            pairs.append((key.replace("override", "").strip().lstrip("/"), str(option)))
    return pairs


def sweep_jobs() -> list[tuple[str, list[str]]]:
    """Every job (override list) each sweep preset in sweeps/ launches, expanded by Hydra's own override parser."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    jobs = []
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        params = OmegaConf.to_container(OmegaConf.load(path).hydra.sweeper.params)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
        axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                else [o.input_line] for o in overrides]
        jobs += [(path.stem, list(choice)) for choice in itertools.product(*axes)]
    return jobs


def missing_option(sweep: str, overrides: list[str]) -> str | None:
    """The first group option a job names that has no YAML in conf/ (None when every one exists)."""
    plain_keys = set(OmegaConf.load(CONF / "config.yaml")) - {"defaults", "hydra"}
    pairs = preset_group_defaults(REPO / "sweeps" / f"{sweep}.yaml") + [tuple(o.split("=", 1)) for o in overrides]
    for group, option in pairs:
        if "." in group or group in plain_keys:  # a value override (clip.theta=0.3, seed=1), not a group choice
            continue
        if not (CONF / group / f"{option}.yaml").is_file():
            return f"conf/{group}/{option}.yaml"
    return None


def test_every_sweep_file_launches_jobs():
    counts = {}
    for sweep, _ in sweep_jobs():
        counts[sweep] = counts.get(sweep, 0) + 1
    assert counts == {"bits": 9, "clip_ablation": 16, "quant_baselines": 9, "recon_ablation": 6, "seeds": 3,
                      "table_instance": 24, "table_oriented": 24, "table_semantic": 12, "theta": 10}


@pytest.mark.parametrize("sweep,overrides", sweep_jobs())
def test_every_sweep_job_composes(sweep, overrides, monkeypatch):
    """A dry run of every job every sweep file launches; each option a sweep names must exist in conf/."""
    assert missing_option(sweep, overrides) is None
    monkeypatch.chdir(REPO)  # sweep presets are found through the repo-root search path
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"+sweeps={sweep}", *overrides], return_hydra_config=True)
    for override in overrides:
        key, value = override.split("=", 1)
        node = OmegaConf.select(cfg, key)
        if (CONF / key).is_dir() and not isinstance(node, str):
            assert node.name == value, override
        elif (CONF / key).is_dir():  # a _global_ preset group (method) records its option as a root label
            assert node == value, override
        else:
            assert str(node) == value, override
    assert cfg.hydra.sweep.dir == f"outputs/sweeps/{sweep}"  # deterministic: a rerun resumes
    assert cfg.logger.group == sweep
    OmegaConf.resolve(cfg.model)
    OmegaConf.resolve(cfg.task)
    assert cfg.quant.name != "fp" and "calib_images" in cfg.quant
    if sweep == "recon_ablation":  # granularities compare at one cost; official per-unit iters are hours on a CPU
        assert cfg.recon.budget == "equal"
    if sweep == "seeds":  # its default cell must be one that varies with the seed: a learned method
        assert cfg.recon.name != "none" and cfg.method == "saq_sam"
    from saq.pipeline import validate

    validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))  # what a run checks before computing


@pytest.mark.parametrize("sweep", ["table_instance", "table_oriented", "table_semantic", "quant_baselines"])
@pytest.mark.parametrize("knob", ["recon.budget=equal", "recon.resume=true"])
def test_sweep_wide_recon_knobs_reach_every_job(sweep, knob, monkeypatch):
    # ARGS='recon.budget=equal' (the CPU tables' budget) and ARGS='recon.resume=true' (continue a killed job) reach
    # every job, those that learn nothing included
    from saq.pipeline import check_config

    monkeypatch.chdir(REPO)
    key, value = knob.split("=")
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for _, overrides in [job for job in sweep_jobs() if job[0] == sweep]:
            cfg = compose(config_name="config", overrides=[f"+sweeps={sweep}", *overrides, knob],
                          return_hydra_config=True)
            choices = dict(cfg.hydra.runtime.choices)
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            assert str(OmegaConf.select(cfg, key)).lower() == value
            check_config(cfg, choices, overrides=[])


def test_sweep_dir_and_any_key_can_be_overridden(monkeypatch):
    monkeypatch.chdir(REPO)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["+sweeps=clip_ablation", "hydra.sweep.dir=/tmp/elsewhere", "quant.calib_images=4"])
    assert cfg.hydra.sweep.dir == "/tmp/elsewhere" and cfg.quant.calib_images == 4


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "submitit_slurm", "slurm"])
def test_launchers_compose(launcher, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides = ["+sweeps=bits", f"hydra/launcher={launcher}"]
    if launcher in ("slurm", "submitit_slurm"):
        overrides += ["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=600",
                      "hydra.launcher.array_parallelism=8"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.startswith("hydra_plugins.hydra_")
    if launcher in ("slurm", "submitit_slurm"):
        assert launcher_cfg._target_.endswith("SlurmLauncher")
        assert (launcher_cfg.partition, launcher_cfg.gpus_per_node, launcher_cfg.timeout_min,
                launcher_cfg.array_parallelism) == ("gpu", 2, 600, 8)
    if launcher == "slurm":  # saq's defaults on top of the plugin's
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            plain = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        assert (plain.hydra.launcher.gpus_per_node, plain.hydra.launcher.cpus_per_task) == (1, 8)


def test_wandb_sweep_files_launch_the_same_jobs_as_the_hydra_presets():
    import itertools

    hydra_jobs: dict[str, set] = {}
    for sweep, overrides in sweep_jobs():
        hydra_jobs.setdefault(sweep, set()).add(frozenset(overrides))
    for sweep, jobs in hydra_jobs.items():
        spec = OmegaConf.to_container(OmegaConf.load(REPO / "sweeps" / "wandb" / f"{sweep}.yaml"))
        assert spec["method"] == "grid" and f"+sweeps={sweep}" in spec["command"]
        assert spec["command"][-1] == "${args_no_hyphens}"
        keys = list(spec["parameters"])
        wandb_jobs = {frozenset(f"{k}={v}" for k, v in zip(keys, combo))
                      for combo in itertools.product(*(spec["parameters"][k]["values"] for k in keys))}
        assert wandb_jobs == jobs, sweep
    assert sorted(p.stem for p in (REPO / "sweeps" / "wandb").glob("*.yaml")) == sorted(hydra_jobs)


def test_fp_runs_compare_their_clip_with_the_root_configs_default():
    from saq.pipeline import DEFAULT_CLIP

    assert {"clip": DEFAULT_CLIP} in OmegaConf.load(CONF / "config.yaml").defaults


def test_slurm_options_that_exclude_each_other_are_found_before_submitting(monkeypatch):
    # the comments' "alternative" keys beside saq's defaults (mem_gb=64, ...) would put both flags in the sbatch script
    from saq.sweep import slurm_conflicts

    monkeypatch.chdir(REPO)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        plain = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        both = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.mem_per_gpu=32G",
                                                        "hydra.launcher.gres=gpu:a100:1"], return_hydra_config=True)
        chosen = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.mem_per_gpu=32G",
                                                          "hydra.launcher.mem_gb=null"], return_hydra_config=True)
        other = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.gres=nvme:1"],
                        return_hydra_config=True)
    assert slurm_conflicts(plain) == [] and slurm_conflicts(chosen) == [] and slurm_conflicts(other) == []
    assert slurm_conflicts(both) == [("mem_gb", "mem_per_gpu"), ("gpus_per_node", "gres")]
