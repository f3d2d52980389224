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


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
    own = OmegaConf.load(CONF / group / f"{option}.yaml")  # the option's own keys land in the composed group
    own.pop("defaults", None)
    composed = OmegaConf.to_container(cfg[group], resolve=False)
    for key, value in OmegaConf.to_container(own, resolve=False).items():
        assert composed[key] == value, (group, option, key)
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


def sweep_combinations() -> list[tuple[str, list[str]]]:
    """Every override list that each sweep preset in sweeps/ expands to (cartesian product of its params)."""
    import itertools

    combos = []
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        params = OmegaConf.load(path).hydra.sweeper.params
        keys = list(params)
        values = [str(params[k]).split(",") for k in keys]
        for choice in itertools.product(*values):
            combos.append((path.stem, [f"{k}={v}" for k, v in zip(keys, choice)]))
    return combos


@pytest.mark.parametrize("sweep,overrides", sweep_combinations())
def test_every_sweep_combination_composes(sweep, overrides, monkeypatch):
    monkeypatch.chdir(REPO)  # sweep presets are found through the repo-root search path
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"+sweeps={sweep}", *overrides])
    for override in overrides:
        group, option = override.split("=")
        assert cfg[group].name == option
