"""`python -m saq`: the Hydra entry point; user errors print as one line, without a traceback."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from saq.errors import SaqError
from saq.log import RUN_LOG, RunDirHeld, claim_run_dir, tee_run_log, write_text_atomic

HYDRA_RECORD_DIR = ".hydra"  # where Hydra itself would keep a run's composed config, hydra config and overrides


def write_hydra_record(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """Hydra's record of the run, written once saq holds the folder: Hydra's own (hydra.output_subdir, off in
    conf/config.yaml) is written before the job starts, so a run turned away would overwrite the holder's."""
    record = run_dir / HYDRA_RECORD_DIR
    record.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        write_text_atomic(record / name, OmegaConf.to_yaml(node))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from saq.pipeline import run
    from saq.sweep import RUNNING_FILE, check_preset_found, check_single_run_of_a_sweep, run_sweep_job, write_failure

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # a sweep job's log names the job's own overrides, not the whole sweep's command line
    arguments = list(hydra_cfg.overrides.task) if multirun else sys.argv[1:]
    with ExitStack() as stack:
        try:  # the folder first: a run turned away must not write into another one's log
            stack.enter_context(claim_run_dir(run_dir))
        except RunDirHeld as exc:
            if not multirun:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)
            if (run_dir / RUNNING_FILE).exists():  # another multirun into the sweep folder computes this job
                print(f"skipped: {run_dir} is being computed by another sweep's process")
            else:  # held by a tool (sensitivity, deploy): this job's failure, and the sweep goes on
                write_failure(run_dir, cfg, exc, list(hydra_cfg.overrides.task))
                print(f"error: {exc}", file=sys.stderr)
            return
        write_hydra_record(run_dir, cfg, hydra_cfg)
        stack.enter_context(tee_run_log(run_dir / RUN_LOG, command=" ".join(["python -m saq", *arguments])))
        try:
            check_preset_found(cfg)
            if multirun:  # resume, and a failed job recorded without stopping the others
                run_sweep_job(cfg, run_dir, run, list(hydra_cfg.overrides.task))
            else:
                check_single_run_of_a_sweep(hydra_cfg)
                run(cfg, run_dir)
        except SaqError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
