"""`python -m saq`: the Hydra entry point; user errors print as one line, without a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saq.errors import SaqError


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from saq.pipeline import run

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except SaqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
