"""`python -m saq`: the Hydra entry point; user errors print as one line, without a traceback."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from saq import CONF_DIR
from saq.errors import SaqError
from saq.log import (
    RUN_LOG,
    RunDirHeld,
    claim_run_dir,
    discard_pending_record,
    hydra_record_dir,
    os_reason,
    run_folder_error,
    tee_run_log,
    write_text_atomic,
)
from saq.sweep import group_options, preset_not_found

# Hydra flags after which the command line is not a run of conf/config.yaml (another config, completion, help)
OTHER_CONFIG_FLAGS = ("config_path", "config_name", "config_dir", "experimental_rerun", "shell_completion", "help",
                      "hydra_help", "info")


def write_hydra_record(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig, folder_key: str) -> None:
    """Hydra's record of the run, written once saq holds the folder and the run's config passed its checks: Hydra's
    own (hydra.output_subdir, off in conf/config.yaml) is written before the job starts, so a run turned away would
    overwrite the record beside an earlier run's results.json (which keeps its own until this run's results replace
    it: saq.log.hydra_record_dir). folder_key: the knob that places the folder."""
    record = hydra_record_dir(run_dir)
    try:
        record.mkdir(parents=True, exist_ok=True)
        for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                           ("overrides.yaml", hydra_cfg.overrides.task)):
            write_text_atomic(record / name, OmegaConf.to_yaml(node))
    except OSError as exc:
        raise run_folder_error(run_dir, os_reason(exc), folder_key) from None


def check_group_options(argv: list[str]) -> None:
    """A config group option on the command line that no search path folder has (quant=w5a5, task=foo, a comma
    list's member with -m) is one SaqError line listing the options; Hydra's own message spans many lines. Anything
    this cannot read simply (another config, interpolations, range()/glob() sweeps, hydra/ groups) is left to Hydra,
    so nothing Hydra accepts is refused."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        # Hydra parses the same arguments again and prints what they ask for (--version, a usage error) itself
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = get_args_parser().parse_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (Exception, SystemExit):
        flags = get_args_parser()._option_string_actions  # Hydra's own: -m, --cfg, -cn, ...
        late = next((a for i, a in enumerate(argv) if a in flags and any(
            "=" in b and not b.startswith("-") for b in argv[:i])), None)
        if late is not None:  # Hydra reads its flags before the overrides: argparse's refusal is a usage page
            example = (f": python -m saq {late} {' '.join(a for a in argv if a != late)}"
                       if late in ("-m", "--multirun") else "")  # a flag taking a value moves with it
            raise SaqError(f"{late} comes after an override; Hydra's flags go before the overrides{example}") from None
        # a key without a value (quant.w_bits): Hydra's parser says "missing EQUAL at '<EOF>'" and a link
        bare = next((a for i, a in enumerate(argv) if "=" not in a and not a.startswith("-") and re.fullmatch(
            r"[+~]{0,2}[A-Za-z_][\w./@-]*", a) and not (i and argv[i - 1] in flags)), None)
        if bare is not None and not bare.startswith("~"):
            raise SaqError(f"{bare} needs a value: {bare}=VALUE (or ~{bare.lstrip('+')} to remove it)") from None
        return
    if args.multirun and (args.cfg or args.info):  # Hydra's refusal is a traceback
        flag = f"--cfg {args.cfg}" if args.cfg else "--info"
        raise SaqError(f"-m and {flag} cannot go together: Hydra either runs the sweep or prints; drop -m to print "
                       f"what a job starts from (python -m saq ... {flag})")
    if any(getattr(args, flag, None) for flag in OTHER_CONFIG_FLAGS) or any(
            o.key_or_group.startswith("hydra.searchpath") for o in overrides):
        return
    defaults_groups = default_groups()
    for override in overrides:
        group, value = override.key_or_group, override.value()
        if override.is_sweep_override() and not args.multirun:  # Hydra's refusal is four lines
            raise SaqError(f"{override.input_line} sweeps its values: add -m (python -m saq -m ...) to run one job "
                           f"per value, or quote it for one text value ({group}='{override.input_line.split('=', 1)[1]}')"
                           if isinstance(value, ChoiceSweep) else
                           f"{override.input_line} sweeps its values: add -m (python -m saq -m ...)")
        if group in defaults_groups and (override.is_add() or override.is_force_add()):
            # Hydra: "Multiple values for method", then how to override it
            raise SaqError(f"{group} is chosen with {group}=NAME, without a plus ({override.input_line} adds a second "
                           f"{group} beside the one the config has): python -m saq {override.input_line.lstrip('+')}")
        if group == "sweeps" and not (override.is_add() or override.is_force_add() or override.is_delete()):
            # the root config has no sweeps entry to change: Hydra's message asks for an append
            raise SaqError(f"a sweep preset is added with a plus: +{override.input_line} (python -m saq -m "
                           f"+{override.input_line}, or make sweep SWEEP=...)")
        if group.startswith("hydra/") and isinstance(value, str) and not override.is_delete():
            hydra_options = hydra_group_options(group)  # hydra/launcher: Hydra's plugins and conf/hydra's own
            if hydra_options and value not in hydra_options:
                raise SaqError(f"{group}={value} unknown; options: {', '.join(hydra_options)}")
            continue
        # conf/ and, through hydra.searchpath file://., the folder the command runs in (sweeps/ in the repository)
        folders = [root / group for root in (CONF_DIR, Path.cwd()) if not group.startswith("hydra")
                   and (root / group).is_dir()]
        if not folders or override.is_delete():
            continue
        if value is None:  # Hydra's refusal is a traceback; a group takes a preset name
            default = "; to run without a preset leave it out or write ~method" if group == "method" else ""
            raise SaqError(f"{group}=null invalid; {group} takes a preset: "
                           f"{', '.join(group_options(folders)) or 'none'}{default}")
        if isinstance(value, ChoiceSweep) and args.multirun:  # without -m Hydra itself asks for it
            values = value.list
        else:
            values = [value] if isinstance(value, str) else []
        for option in values:
            # an option is a YAML file (a folder beside them, such as sweeps/wandb, is none)
            if isinstance(option, str) and "${" not in option and not any(
                    (folder / option).is_file() or (folder / f"{option}.yaml").is_file() for folder in folders):
                raise SaqError(unknown_option(group, option, folders))
    check_override_keys(overrides, args.multirun)


def default_groups() -> set[str]:
    """The config groups conf/config.yaml's defaults list chooses (model, quant, method, ...): set with group=NAME."""
    from omegaconf import OmegaConf

    groups = set()
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", []):
        if isinstance(entry, DictConfig):
            groups |= {str(k) for k in entry if not str(k).startswith(("override ", "optional "))}
    return groups


def hydra_group_options(group: str) -> list[str]:
    """The options of a hydra/ config group (hydra/launcher: basic, joblib, ...) as Hydra's config loader lists them
    from its plugins and conf/; empty where it cannot tell."""
    from hydra import initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            from hydra.core.global_hydra import GlobalHydra

            return list(GlobalHydra.instance().config_loader().get_group_options(group))
    except Exception:  # noqa: BLE001 - left to Hydra
        return []


def check_override_keys(overrides: list, multirun: bool) -> None:
    """A key the composed config lacks (a typo; quant.calib_images with quant=fp; recon.drop_prob with recon=none) is
    one line saying which presets have it or which keys there are: Hydra's message spans lines, and its hint
    (+key=...) adds a knob that saq then refuses. Composed as Hydra composes first (a multirun without its swept
    values); any other composition problem is left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ConfigTypeError

    for o in overrides:  # a sweep preset not found from here: said first, as the keys it would add are missing too
        if o.key_or_group == "sweeps" and isinstance(o.value(), str) and not (
                Path.cwd() / "sweeps" / f"{o.value()}.yaml").is_file():
            raise SaqError(preset_not_found(o.value()))
    plain = [o for o in overrides if not (multirun and o.is_sweep_override())]
    # the swept group choices (quant=w6a6,w4a4; method=minmax,saq_sam): method= sets recon, clip and quant too
    swept = {o.key_or_group: [str(v) for v in o.value().list] for o in overrides
             if multirun and o.is_sweep_override() and isinstance(o.value(), ChoiceSweep)
             and (CONF_DIR / o.key_or_group).is_dir()}
    lines, notes = [], []
    wrong_type = None
    everywhere: dict[str, list[str]] = {}  # swept group -> keys every swept option has (the ++ hint)
    absent = object()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            missing = []  # (key, the first part of it the config lacks): Hydra names one per composition
            remaining = [o.input_line for o in plain]
            while True:
                try:
                    compose(config_name="config", overrides=remaining)
                    break
                except ConfigCompositionException as exc:
                    merging = re.match(r"Error merging override (.+)", str(exc))
                    if merging and isinstance(exc.__cause__, ConfigTypeError) and not missing:
                        # a mapping where a list belongs or the reverse: Hydra's lines call a group of settings a list
                        wrong_type = merge_type_line(merging.group(1), plain, compose)
                        break
                    found = re.match(r"Could not override '([^']+)'", str(exc))
                    if found is None or not isinstance(exc.__cause__, ConfigAttributeError | ConfigKeyError):
                        if not missing:
                            return
                        # something else as well: the keys found so far are said against the presets chosen (Hydra
                        # reports the rest once they are fixed)
                        remaining = [o.input_line for o in plain if "." not in o.key_or_group
                                     and (CONF_DIR / o.key_or_group).is_dir() and not o.is_delete()]
                        break
                    key = found.group(1)
                    missing.append((key, getattr(exc.__cause__, "full_key", None) or key))
                    fewer = [o.input_line for o in plain if o.key_or_group not in {k for k, _ in missing}]
                    if len(fewer) == len(remaining):  # a key no override names: nothing to take out, Hydra says it
                        return
                    remaining = fewer
            if not missing and wrong_type is None:
                return
            for key, lacking in missing:
                line, presets_have_it = missing_key_line(key, lacking, remaining, compose)
                lines.append(line)
                for group, options in swept.items() if presets_have_it else ():
                    if group not in (key.split(".")[0], "method"):
                        continue
                    having = [v for v in options if OmegaConf.select(compose(
                        config_name="config", overrides=[*remaining, f"{group}={v}"]), key, default=absent)
                        is not absent]
                    if having == options:  # the first composition has the defaults, not the swept options
                        everywhere.setdefault(group, []).append(key)  # said once per group, below
                    elif having:
                        notes.append(f"of the swept {group}={','.join(options)}, {', '.join(having)} "
                                     f"{'has' if len(having) == 1 else 'have'} {key} and "
                                     f"{', '.join(v for v in options if v not in having)} not: sweep them apart")
    except Exception:  # noqa: BLE001 - whatever this cannot compose, Hydra reports in its own words
        return
    if wrong_type is not None:
        raise SaqError(wrong_type)
    notes[:0] = [f"this multirun sweeps {group}, and Hydra composes its first config without the swept values: to "
                 f"give every job {', '.join(keys)}, write {' '.join(f'++{k}=...' for k in keys)}"
                 for group, keys in everywhere.items()]
    by_tail: dict[str, list[str]] = {}  # keys with the same message after their name are said once
    for (key, _), one in zip(missing, lines):
        by_tail.setdefault(one[len(key):], []).append(key)
    raise SaqError("; ".join([*(keys[0] + tail if len(keys) == 1 else ", ".join(keys) + tail.replace(
        " is not a known key", " are not known keys", 1).replace(" is not a key of ", " are not keys of ", 1).replace(
        " it (choose one)", " them (choose one)", 1) for tail, keys in by_tail.items()), *notes]))


def merge_type_line(line: str, overrides: list, compose) -> str | None:
    """The line for override `line`, whose value is a mapping where the config holds a list or the reverse: what the
    key holds (from the config composed without it) and how to write it; None for any other type clash."""
    from omegaconf import DictConfig as Node
    from omegaconf import ListConfig

    key = next(o.key_or_group for o in overrides if o.input_line == line)
    cfg = compose(config_name="config", overrides=[o.input_line for o in overrides if o.input_line != line])
    held = OmegaConf.select(cfg, key, default=None)
    if isinstance(held, ListConfig):
        return f"{line}: {key} takes a list (now {OmegaConf.to_container(held)}); write {key}=[...]"
    if isinstance(held, Node):
        first = next(iter(held.keys()), "KEY")
        return (f"{line}: {key} is a group of settings ({', '.join(map(str, held.keys()))}), not a list; set them "
                f"by name: {key}.{first}=... or {key}={{{first}: ...}}")
    return None  # anything else is Hydra's to say


def missing_key_line(key: str, missing: str, others: list[str], compose) -> tuple[str, bool]:
    """The line for override `key` that the config composed from `others` cannot take (`missing`: the first part
    it lacks), and whether other presets of its group have the key."""
    from omegaconf import DictConfig as Node

    absent = object()
    cfg = compose(config_name="config", overrides=others, return_hydra_config=True)
    if OmegaConf.select(cfg, key, default=absent) is not absent:  # a dict value with a key the node lacks
        key = missing
    else:
        group = key.split(".")[0]
        choice = cfg.hydra.runtime.choices.get(group) if "." in key else None
        if choice is not None:
            options = group_options([CONF_DIR / group])
            having = [o for o in options if o != choice and OmegaConf.select(
                compose(config_name="config", overrides=[f"{group}={o}"]), key, default=absent) is not absent]
            if having:
                return (f"{key} is not a key of {group}={choice}; {group}={', '.join(having)} "
                        f"{'has' if len(having) == 1 else 'have'} it (choose one)"), True
    parent = key.rpartition(".")[0]
    while parent and not isinstance(OmegaConf.select(cfg, parent, default=None), Node):
        parent = parent.rpartition(".")[0]  # the nearest part the config has
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = sorted(k for k in node.keys() if k != "hydra")
    if parent == key.rpartition(".")[0]:
        return f"{key} is not a known key; expected one of {keys}", False
    return f"{key} is not a known key: {parent or 'the config'} has no {key[len(parent):].lstrip('.').split('.')[0]}; " \
           f"its keys: {keys}", False


def unknown_option(group: str, option: str, folders: list[Path]) -> str:
    """The line for an unknown group option: the options there (without _-prefixed shared parts) and, for a
    bit-width preset that does not exist, the knobs that set any width."""
    options = group_options(folders)
    line = f"{group}={option} unknown; options: {', '.join(options) or 'none'}"
    cased = [o for o in options if o.lower() == option.lower()]
    if cased:  # W4A4: preset names are lower case
        return f"{line} (names are lower case: {group}={cased[0]})"
    if group == "quant":  # quant.w_bits / quant.a_bits, conf/quant/_base.yaml: 2-8 on any quantizing preset
        from saq.quant.quantizers import MAX_BITS, MIN_BITS

        bits = re.fullmatch(r"[wW](\d+)[aA](\d+)", option)
        w, a = bits.groups() if bits else ("N", "N")
        if bits and not all(MIN_BITS <= int(b) <= MAX_BITS for b in (w, a)):
            return f"{line}; bit-widths run from {MIN_BITS} to {MAX_BITS} (quant=w4a4 quant.w_bits=N quant.a_bits=N)"
        line += f"; other bit-widths: quant=w4a4 quant.w_bits={w} quant.a_bits={a}"
    return line


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from saq.pipeline import run
    from saq.sweep import (
        check_preset_found,
        check_single_run_of_a_sweep,
        claim_sweep_job_folder,
        override_strings,
        run_sweep_job,
        write_failure,
    )

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    folder_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    job_overrides = override_strings(hydra_cfg.overrides.task)
    # a sweep job's log names the job's own overrides, not the whole sweep's command line
    arguments = job_overrides if multirun else sys.argv[1:]
    with ExitStack() as stack:
        try:  # the folder first: a run turned away must not write into another one's log
            if not multirun:
                stack.enter_context(claim_run_dir(run_dir))
            elif claim_sweep_job_folder(run_dir, stack) == "running":  # another multirun computes this job
                print(f"skipped: {run_dir} is being computed by another sweep's process")
                return
        except RunDirHeld as exc:
            if not multirun:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)
            # held by a tool (sensitivity, deploy): this job's failure, and the sweep goes on
            write_failure(run_dir, cfg, exc, job_overrides)
            print(f"error: {exc}", file=sys.stderr)
            return
        try:
            stack.enter_context(tee_run_log(run_dir / RUN_LOG, command=" ".join(["python -m saq", *arguments])))
        except OSError as exc:  # a folder Hydra made (or found) that cannot be written
            error = run_folder_error(run_dir, os_reason(exc), folder_key)
            print(f"error: {error}", file=sys.stderr)
            if not multirun:
                sys.exit(2)
            with contextlib.suppress(OSError):  # where the folder takes it, the sweep's summary lists the job
                write_failure(run_dir, cfg, error, job_overrides)
            return
        # written once the config passed the run's checks: a refused run leaves an earlier run's record as it was
        accepted = partial(write_hydra_record, run_dir, cfg, hydra_cfg, folder_key)
        try:
            try:
                check_preset_found(cfg)
                if multirun:  # resume, and a failed job recorded without stopping the others
                    run_sweep_job(cfg, run_dir, partial(run, accepted=accepted), job_overrides)
                else:
                    check_single_run_of_a_sweep(hydra_cfg)
                    run(cfg, run_dir, accepted=accepted)
            except BaseException:  # interrupted too: a record beside results it does not describe would mislead
                discard_pending_record(run_dir)
                raise
        except SaqError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # one line, not a traceback; a sweep stops too (its job wrote its failure.json)
            learned = str(OmegaConf.select(cfg, "recon.name", default="none")) != "none"
            print("error: interrupted (Ctrl-C); this run wrote no results.json" + (
                "; reconstruction units it finished, if any, are saved: the same command with recon.resume=true "
                "continues from them" if learned else ""), file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    try:  # before Hydra composes: its message for an unknown option spans lines
        check_group_options(sys.argv[1:])
    except SaqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
