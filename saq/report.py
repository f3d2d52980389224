"""Sweep reports: the results.json under a folder as paper-layout tables (report.md/csv/tex) and PNG plots.

`python -m saq.report PATH [out=DIR]` (or `make report RUNS=PATH`). Rows are methods, columns model × bit-width,
one table per task, prompt source and metric; FP on top; values in % with mean ± sample std over seeds; the best quantized
cell of each column in bold; the paper's published numbers (saq/paper_results.py) as a separate, labelled block.
A corrupt, partial or foreign results.json is listed and skipped; failed sweep jobs (failure.json) and jobs that
never finished (running.json left by a killed process, or one still running) are listed.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import re
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from saq import CONF_DIR
from saq.errors import SaqError, is_number
from saq.log import (
    CUSTOM_SUFFIX,
    METHOD_PRESETS,
    PAPER_COMPAT_SUFFIX,
    PART_BITS_KEYS,
    RESULTS_FILE,
    bits_label,
    flatten,
    folder_in_use,
    labelled_config,
    method_label,
    paper_compat_evaluation,
    record_problem,
    write_text_atomic,
)
from saq.paper_results import PAPER_MODEL, PAPER_ROW, paper_row, paper_table
from saq.sam.unit_kinds import iters_key_read
from saq.sweep import (
    FAILURE_FILE,
    RESUME_IGNORED_KEYS,
    RESUME_IGNORED_NESTED,
    RUNNING_FILE,
    bounded_name,
    with_knobs_added_since,
)

FP_ROW = "FP"
# label of a run's int8 ONNX Runtime evaluation (deploy=true), a row under its method's
DEPLOYED_SUFFIX = " (int8 ONNX Runtime)"
# rows that evaluate a method's model another way: they follow the method's row and do not compete for the best
EVALUATION_SUFFIXES = (PAPER_COMPAT_SUFFIX, DEPLOYED_SUFFIX)
FP_LINE_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1))]  # FP rows in plots, in row order
FP_COLORS = ["black", "dimgray", "darkgray"]  # ... and their colours (a fourth FP row repeats the first colour)
# Metric order per task (the first is the task's main metric); other scalar metrics follow in the order found.
METRIC_ORDER = {"instance": ["mask_AP", "mask_AP50", "mask_AP75", "mIoU"], "oriented": ["mAP50", "rbox_mIoU"],
                "semantic": ["mIoU", "aAcc"]}
NOT_TABLE_METRICS = {"images", "prompts", "empty_masks", "masks_per_image"}  # counts, not scores
MODEL_ORDER = ["sam_tiny", "sam_tiny_outliers", "sam_vit_b", "sam_vit_l", "sam_vit_h"]
METHOD_ORDER = ["minmax", "minmax (custom)", "percentile", "mse", "pcc", "ptq4sam_s", "saq_sam_star", "qdrop",
                "ptq4sam_l", "saq_sam"]
REPORT_FILES = ("report.md", "report.csv", "report.tex")


def is_table_metric(name: str, value) -> bool:
    """A score to tabulate: a number that is not a count, a timing (*_s) or the semantic task's coarse prior."""
    return (is_number(value) and name not in NOT_TABLE_METRICS
            and not name.endswith("_s") and not name.startswith("coarse_"))


@dataclass
class Entry:
    """One row-cell sample: a run's FP or quantized metrics with what places it in a table."""

    task: str
    prompts: str
    model: str
    bits: str  # "fp" for FP entries
    label: str  # method label (FP_ROW for FP entries), before splitting by other config differences
    seed: object
    metrics: dict
    flat: dict
    path: Path
    mtime: float
    paper_row: str | None = None  # the published row this run corresponds to (paper_results.paper_row)
    paper_departures: int = 0  # method knobs in which the run leaves its paper row's preset (paper_setting_departures)
    row: str = ""
    evaluation: str = ""  # what it was evaluated on or with, where that leaves its table's most common ("": the same)
    threads: object = None  # the thread count the run used (threads=null: the process's own)


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))


@dataclass
class Table:
    task: str
    prompts: str
    metric: str
    columns: list[tuple[str, str]]
    rows: list[str]
    row_label: dict[str, str]  # row -> its method label (FP_ROW for FP rows)
    row_paper: dict[str, str | None]  # row -> the paper's row it corresponds to, if any
    cells: dict[tuple[str, tuple[str, str]], Cell]
    seeds: dict[tuple[str, tuple[str, str]], list]
    evaluation: dict[str, str] = field(default_factory=dict)  # row -> its Entry.evaluation (absent: the common)
    threads: dict[tuple[str, tuple[str, str]], list] = field(default_factory=dict)  # per cell, as seeds
    row_departures: dict[str, int] = field(default_factory=dict)  # row -> knobs off its paper row's preset

    def mixed_threads(self) -> list[tuple[str, tuple[str, str], list]]:
        """Cells whose runs ran at more than one thread count (the order of float sums differs, and at 4 bits a
        cell moves by a few tenths of a point: noise inside the seed spread)."""
        return [(row, col, sorted(set(self.threads[(row, col)]), key=str)) for row in self.rows for col in self.columns
                if len(set(map(str, self.threads.get((row, col), [])))) > 1]

    def best(self, column: tuple[str, str]) -> set[str]:
        """Quantized rows with the highest mean in this column (none when fewer than two rows compete, or all tie).
        FP and paper-compat rows do not compete; of the others, only the rows evaluated alike compete: the column's
        most common evaluation (images, prompts, weights, device), none when two are as common."""
        scored = {r: self.cells[(r, column)].mean for r in self.rows
                  if self.row_label[r] != FP_ROW and not self.row_label[r].endswith(EVALUATION_SUFFIXES)
                  and (r, column) in self.cells}
        scored = {r: v for r, v in scored.items() if math.isfinite(v)}  # a NaN mean would hide every best (shown)
        kinds = Counter(self.evaluation.get(r, "") for r in scored).most_common(2)
        if len(kinds) == 2 and kinds[0][1] == kinds[1][1]:
            return set()
        scored = {r: v for r, v in scored.items() if kinds and self.evaluation.get(r, "") == kinds[0][0]}
        if len(scored) < 2:
            return set()
        top = max(scored.values())
        best = {r for r, v in scored.items() if v >= top - 1e-12}
        return best if len(best) < len(scored) else set()  # all alike (every method at 0.00): none stands out


@dataclass
class Report:
    root: Path
    runs: list[dict] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    row_of: dict[Path, str] = field(default_factory=dict)  # a quantized run's results.json -> its table row


def files_named(root: Path, name: str) -> list[Path]:
    """Every file `name` under root, through linked folders too (runs gathered from several sweeps by symlinks, which
    Path.rglob skips); a folder reached twice (a link to a folder also under root, a loop) is read once."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        if name in files:
            found.append(Path(folder) / name)
    return sorted(found)


def load_runs(root: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every usable results.json under root (with its path), and the skipped ones with the reason."""
    runs, skipped = [], []
    for path in files_named(root, RESULTS_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            skipped.append((path, f"unreadable JSON ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"))
            continue
        reason = record_problem(record)
        if reason:
            skipped.append((path, reason))
            continue
        runs.append({**record, "_path": path, "_mtime": path.stat().st_mtime})
    return runs, skipped


def modified(path: Path) -> float | None:
    """The file's mtime, or None when it is not there (any more: a job beside the report may finish meanwhile and
    remove its running.json)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def load_failures(root: Path) -> list[dict]:
    failures = []
    for path in files_named(root, FAILURE_FILE):
        mtime, finished = modified(path), modified(path.parent / RESULTS_FILE)
        if mtime is None or (finished is not None and finished >= mtime):
            continue  # an earlier attempt's: the job has finished since (rerun, or run by hand into its folder)
        try:
            record = json.loads(path.read_text())
            failures.append({"path": path, "error": str(record.get("error", "?")),
                             "overrides": list(record.get("overrides") or []), "mtime": mtime})
        except FileNotFoundError:  # removed since it was listed: its job was rerun and finished
            continue
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            # its own time: a damaged failure of this sweep is still this sweep's (and fails it)
            failures.append({"path": path, "error": "unreadable failure.json", "overrides": [], "mtime": mtime})
    for path in files_named(root, RUNNING_FILE):  # a job that started and never ended
        # a later record of the folder tells what became of it: a finished run, or a failure.json of its own (an
        # older failure.json is an earlier attempt's, which this killed one replaces)
        failed = path.parent / FAILURE_FILE
        mtime, finished, failed_at = modified(path), modified(path.parent / RESULTS_FILE), modified(failed)
        if mtime is None or (finished is not None and finished >= mtime):
            continue
        if failed_at is not None:
            if failed_at >= mtime:
                continue
            failures = [f for f in failures if f["path"] != failed]
        try:
            record = json.loads(path.read_text())
            started = f"started {record.get('time', '?')}, pid {record.get('pid', '?')} on {record.get('host', '?')}"
            overrides = list(record.get("overrides") or [])
        except FileNotFoundError:  # the job ended since it was listed
            continue
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            started, overrides = "unreadable running.json", []
        alive = folder_in_use(path.parent)  # its run lock is held while the job's process lives, on any host
        failures.append({"path": path, "error": f"{'still running' if alive else 'did not finish: killed'} ({started})",
                         "overrides": overrides, "mtime": mtime, "running": alive})
    return failures


def entries_of(run: dict) -> list[Entry]:
    config = labelled_config(run)  # a loaded model sits in the row of the run that produced it
    flat = flatten(with_knobs_added_since(config))  # a run made before a knob existed ran its old behaviour
    if flat.get("recon.name") in (None, "none"):
        flat.pop("recon.budget", None)  # learned methods' budget: no knob of a run that learns nothing
    if run.get("checkpoint_sha256"):  # the weights themselves: a retrained file at the same path is another model
        flat["model.weights"] = str(run["checkpoint_sha256"])[:12]
        flat.pop("model.checkpoint", None)  # ... and the same weights at another path (a copy) the same model
    common = dict(task=str(run["task"]), prompts=str(run.get("prompts", "-")), model=str(run["model"]),
                  seed=run.get("seed"), flat=flat, path=run["_path"], mtime=run["_mtime"],
                  threads=run.get("threads_used", flat.get("threads")))  # runs before 2026-12-02: as configured
    out = [Entry(bits="fp", label=FP_ROW, metrics=run["metrics"]["fp"], paper_row=FP_ROW, **common)]
    if run["quant"] != "fp":
        label = method_label(config)
        if paper_compat_evaluation(run):
            label += PAPER_COMPAT_SUFFIX  # the official evaluation, half the linear inputs unquantized (§7)
        paper = paper_row(config)
        out.append(Entry(bits=bits_label(config), label=label, metrics=run["metrics"]["quantized"], paper_row=paper,
                         paper_departures=len(paper_setting_departures(flat, paper)), **common))
        deployed = run["metrics"].get("deployed")
        if isinstance(deployed, dict) and "error" not in deployed:  # the same model as int8 ONNX Runtime graphs
            out.append(Entry(bits=bits_label(config), label=label + DEPLOYED_SUFFIX, metrics=deployed, **common))
    return out


# Seeds of one part that default to the run's seed (null or ${seed}): set to anything else they are a knob.
SEED_FOLLOWERS = ("prompts.seed", "task.coarse.seed", "recon.seed")
# Keys that name a table column (model, bit-width) rather than a row, and keys that change where or how a run
# works but not its numbers.
COLUMN_KEYS = ("quant.name", "quant.w_bits", "quant.a_bits", *PART_BITS_KEYS)  # bits_label's
# Keys that only choose what a run calibrates on (the FP model and the evaluation images do not depend on them).
CALIBRATION_KEYS = ("task.calib.", "prompts.calib_file", "task.generate.n_train")
NO_EFFECT_KEYS = ("seed", "deploy", "quant.load", "recon.paper_eval_compat", *RESUME_IGNORED_NESTED)


# Keys that set a run's schedule or bookkeeping, not the method a paper row names: a budget=equal run still pairs
RECON_SCHEDULE_KEYS = ("recon.budget", "recon.iters.")


@functools.cache
def preset_setting(preset: str) -> dict | None:
    """The flat config `method=<preset>` composes to (the paper's setting as our preset writes it), or None where it
    does not compose (a preset removed since the run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = [f"method={preset}", "quant=w4a4"]  # bit-widths are the table's columns, not compared
    try:
        if GlobalHydra.instance().is_initialized():  # a sweep's end: its Hydra composes from the same conf/
            cfg = compose(config_name="config", overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                cfg = compose(config_name="config", overrides=overrides)
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # noqa: BLE001 - without it a row is paired by its label alone, as before
        return None


def paper_setting_departures(flat: dict, paper: str | None) -> list[str]:
    """The clip/recon/quant knobs in which a run leaves the preset of its paper row (clip.theta=0.3 in a theta sweep
    of saq_sam_star): of several rows claiming one published row, the one at the paper's setting is its match."""
    preset = {name: key for key, name in PAPER_ROW.items() if key in METHOD_PRESETS}.get(paper or "")
    setting = preset_setting(preset) if preset else None
    if setting is None:
        return []
    return [k for k, v in setting.items() if k.split(".")[0] in ("clip", "recon", "quant") and k in flat
            and k not in COLUMN_KEYS and k not in NO_EFFECT_KEYS and not k.startswith(RECON_SCHEDULE_KEYS)
            and _fmt_value(flat[k]) != _fmt_value(v)]


def _row_key_relevant(key: str, fp: bool) -> bool:
    """Whether a config key that differs between runs of one method makes them different rows (the seed never does;
    seeds of the data or the planted outliers do)."""
    top = key.split(".")[0]
    if top in RESUME_IGNORED_KEYS or key in NO_EFFECT_KEYS or key in COLUMN_KEYS:
        return False  # a loaded model is the model that was saved; the evaluation mode is in the row label
    if fp:  # FP depends on the model, the evaluation data and the prompts only
        return top in ("model", "task", "prompts", "device") and not key.startswith(CALIBRATION_KEYS)
    return True


def _fmt_value(value) -> str:
    """A knob's value as an override would write it (null, true, [1, 2]), not as Python prints it."""
    return json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)


def _row_value(e: Entry, key: str) -> str:
    value = e.flat.get(key)
    if key in SEED_FOLLOWERS and (value is None or value == e.seed):
        return "seed"  # follows the run's seed, so it varies with the seed and is no knob
    return _fmt_value(value)


def _name_departures(members: list[Entry], key: str, shown: dict[int, list[str]]) -> set[int]:
    """Add `key` to the label of each member that leaves the members' most common value (all of them when no value
    is most common, a swept knob); returns the ids of those members. A run whose config lacks the key (made before
    the knob existed, or a task without it) has no say and is not labelled by it: absent is not a different setting;
    nor does a recon.iters kind its granularity does not make (it is not read)."""
    members = [e for e in members if key in e.flat and iters_key_read(e.flat, key)]
    if len({_fmt_value(e.flat.get(key)) for e in members}) < 2:
        return set()  # one value everywhere (a seed fixed for all runs included): no knob here
    counts = Counter(_row_value(e, key) for e in members)
    if len(counts) < 2:
        return set()
    (common, n), (_, n_next) = counts.most_common(2)
    departed = {id(e) for e in members if n == n_next or _row_value(e, key) != common}
    for e in members:
        if id(e) in departed and key not in shown[id(e)]:
            shown[id(e)].append(key)
    return departed


def _evaluation_key(key: str) -> bool:
    """Keys that choose what a run is evaluated on (images, prompts, the device whose float sums 4-bit rounding
    amplifies): cells side by side must share them."""
    return key.split(".")[0] in ("task", "prompts", "device") and _row_key_relevant(key, True)


def assign_rows(entries: list[Entry]) -> None:
    """Row = method label, plus `key=value` for the config keys in which a run differs from the other runs of its
    label in one table, apart from the seed and the column keys. Compared across columns too, so one row never mixes
    settings; model keys only between runs of one model (another model is another column). A key is named where a
    run leaves its most common value, and on every run when no value is most common (a swept knob). What a run is
    evaluated on (task.max_images, the data, the prompts) and the model's weights are compared across the whole
    table (weights model by model), so a row evaluated on other images, or run on other weights, than the FP row
    says so even when its method has a single run."""
    shown: dict[int, list[str]] = defaultdict(list)  # id(entry) -> the keys its label names
    groups: dict[tuple, list[Entry]] = defaultdict(list)
    tables: dict[tuple, list[Entry]] = defaultdict(list)
    # a run's int8 evaluation is named as its quantized row (below), not counted as another run of the table
    deployed = [e for e in entries if e.label.endswith(DEPLOYED_SUFFIX)]
    entries = [e for e in entries if not e.label.endswith(DEPLOYED_SUFFIX)]
    for e in entries:
        groups[(e.task, e.prompts, e.label)].append(e)
        tables[(e.task, e.prompts)].append(e)
    for group in groups.values():
        fp = group[0].label == FP_ROW
        for k in sorted({k for e in group for k in e.flat if _row_key_relevant(k, fp)}):
            scopes: dict = defaultdict(list)
            for e in group:
                scopes[e.model if k.startswith("model.") else None].append(e)
            for members in scopes.values():
                _name_departures(members, k, shown)
    for table in tables.values():
        evaluated: dict[int, list[str]] = defaultdict(list)  # id(entry) -> the evaluation keys it departs in
        for k in sorted({k for e in table for k in e.flat if _evaluation_key(k)}):
            for i in _name_departures(table, k, shown):
                evaluated[i].append(k)
        # the model's weights (model.weights, planted outliers) across methods too, model by model: a method whose
        # only run used other weights is named, and does not compete for the best cell against the common ones
        by_model: dict[str, list[Entry]] = defaultdict(list)
        for e in table:
            by_model[e.model].append(e)
        for members in by_model.values():
            for k in sorted({k for e in members for k in e.flat if k.startswith("model.") and _row_key_relevant(k, True)}):
                for i in _name_departures(members, k, shown):
                    evaluated[i].append(k)
        for e in table:  # competes for a column's best only with the runs evaluated alike
            e.evaluation = ", ".join(f"{k}={_row_value(e, k)}" for k in sorted(evaluated[id(e)]))
    for e in entries:
        suffix = ", ".join(f"{k}={_row_value(e, k)}" for k in sorted(shown[id(e)]))
        e.row = f"{e.label} {suffix}" if suffix else e.label
    quantized = {e.path: e for e in entries if e.label != FP_ROW}
    for e in deployed:
        base = quantized[e.path]
        e.row, e.evaluation = e.label + base.row[len(base.label):], base.evaluation


def _bits_order(bits: str) -> tuple:
    found = re.fullmatch(r"w(\d+)a(\d+)", bits)
    return (0, -int(found.group(1)) - int(found.group(2)), bits) if found else (1, 0, bits)


def _model_order(model: str) -> tuple:
    return (MODEL_ORDER.index(model), model) if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def _natural(text: str) -> list:
    return [(0, float(t), "") if re.fullmatch(r"-?\d+(\.\d+)?", t) else (1, 0.0, t) for t in re.split(r"=|, ", text)]


def _row_order(row: str, label: str) -> tuple:
    base, way = label, 0
    for i, suffix in enumerate(EVALUATION_SUFFIXES, 1):  # a method's paper-compat and int8 rows follow its own
        if label.endswith(suffix):
            base, way = label.removesuffix(suffix), i
    rank = -1 if base == FP_ROW else (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER))
    return (rank, base, way, _natural(row))


def build_tables(entries: list[Entry], duplicates: list[Path],
                 unshown: list[tuple[Path, str]] | None = None) -> list[Table]:
    """The tables; duplicates and unshown (FP-only runs no column compares with) are appended to."""
    assign_rows(entries)
    # One sample per seed in each cell: the same run found twice (merged sweep folders) counts once, the newest.
    chosen: dict[tuple, Entry] = {}
    for e in sorted(entries, key=lambda e: e.mtime):
        key = (e.task, e.prompts, e.row, e.model, e.bits, json.dumps(e.seed))
        if key in chosen and e.label != FP_ROW and not e.label.endswith(DEPLOYED_SUFFIX):  # a run listed once
            duplicates.append(chosen[key].path)
        chosen[key] = e
    # an int8 row only beside its own run's quantized row: an older duplicate's would sit under the newer's number
    counted = {e.path for e in chosen.values() if e.label != FP_ROW and not e.label.endswith(DEPLOYED_SUFFIX)}
    chosen = {key: e for key, e in chosen.items() if not e.label.endswith(DEPLOYED_SUFFIX) or e.path in counted}
    by_table: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in chosen.values():
        by_table[(e.task, e.prompts)].append(e)

    tables = []
    placed: set[Path] = set()
    for (task, prompts), group in sorted(by_table.items()):
        quantized = [e for e in group if e.label != FP_ROW]
        columns = sorted({(e.model, e.bits) for e in quantized}, key=lambda c: (_model_order(c[0]), _bits_order(c[1])))
        fp_only = sorted({e.model for e in group} - {m for m, _ in columns}, key=_model_order)
        columns += [(m, "fp") for m in fp_only]
        # a column's FP cells hold the FP rows and seeds of its own runs: an FP row evaluated on other images than
        # any run of the column is not its reference, and jittered prompts and the semantic prior follow the seed,
        # so FP can differ between seeds
        fp_row_of = {e.path: e.row for e in entries if e.label == FP_ROW}
        column_fp = defaultdict(set)
        for e in quantized:
            column_fp[(e.model, e.bits)].add((fp_row_of.get(e.path), json.dumps(e.seed)))
        found: list[str] = []
        for e in sorted(group, key=lambda e: str(e.path)):
            found += [k for k, v in e.metrics.items() if is_table_metric(k, v) and k not in found]
        order = METRIC_ORDER.get(task, [])
        metrics = [m for m in order if m in found] + [m for m in found if m not in order]
        row_label = {e.row: e.label for e in group}
        row_paper = {e.row: e.paper_row for e in group}
        row_departures: dict[str, int] = defaultdict(int)
        for e in group:
            row_departures[e.row] = max(row_departures[e.row], e.paper_departures)
        rows = sorted(row_label, key=lambda r: _row_order(r, row_label[r]))
        for metric in metrics:
            cells: dict = {}
            seeds: dict = {}
            threads: dict = {}
            for e in group:
                value = e.metrics.get(metric)
                if not is_table_metric(metric, value):
                    continue
                targets = ([c for c in columns if c[0] == e.model and (c[1] == "fp" or (e.row, json.dumps(e.seed))
                                                                      in column_fp[c])]
                           if e.label == FP_ROW else [(e.model, e.bits)])
                placed.update([e.path] if targets else [])
                for col in targets:
                    cells.setdefault((e.row, col), Cell([])).values.append(float(value))
                    seeds.setdefault((e.row, col), []).append(e.seed)
                    threads.setdefault((e.row, col), []).append(e.threads)
            used_rows = [r for r in rows if any((r, c) in cells for c in columns)]
            tables.append(Table(task, prompts, metric, columns, used_rows, row_label, row_paper, cells, seeds,
                                {e.row: e.evaluation for e in group if e.evaluation}, threads, dict(row_departures)))
    if unshown is not None:  # an FP-only run of a seed none of its model's quantized runs ran
        unshown += [(e.path, f"FP-only run of seed {e.seed}: no quantized run of {e.model} in its table ran that "
                             f"seed on its images and prompts ({e.row}), so no column's FP cell takes it")
                    for e in chosen.values() if e.path not in placed]
    return tables


def build_report(root: Path) -> Report:
    root = Path(root)
    if not root.is_dir():
        what = f"{root} is a file" if root.is_file() else f"no such folder: {root}"
        raise SaqError(f"report: {what} (give the folder of a sweep or of runs holding results.json)")
    report = Report(root)
    report.runs, report.skipped = load_runs(root)
    report.failures = load_failures(root)
    entries = []
    for run in list(report.runs):
        try:
            entries += entries_of(run)
        except (TypeError, AttributeError, ValueError, KeyError) as exc:  # a field of another type (a hand edit,
            # another tool's file) that record_problem does not look at: that run is left out, the others reported
            report.runs.remove(run)
            report.skipped.append((run["_path"], f"not a saq run record ({type(exc).__name__}: {str(exc)[:120]})"))
    report.tables = build_tables(entries, report.duplicates, report.skipped)
    report.row_of = {e.path: e.row for e in entries if e.label != FP_ROW and not e.label.endswith(DEPLOYED_SUFFIX)}
    return report


# ---------------------------------------------------------------- rendering

def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    return pct(cell.mean) + (f" ± {pct(cell.std)}" if cell.n > 1 else "")


def column_title(column: tuple[str, str]) -> str:
    model, bits = column
    return f"{model} {bits.upper()}"


def table_title(table: Table) -> str:
    return f"{table.task} (prompts {table.prompts}): {table.metric}"


def markdown_table(table: Table) -> str:
    head = ["method", *(column_title(c) for c in table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {c: table.best(c) for c in table.columns}
    for row in table.rows:
        cells = []
        for col in table.columns:
            text = cell_text(table.cells.get((row, col)))
            cells.append(f"**{text}**" if row in best[col] else text)
        lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines)


def paper_block(table: Table) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str]]] | None:
    """The published table matching ours, its (paper row, our row) pairs and its matching columns."""
    published = paper_table(table.task, table.metric)
    if published is None:
        return None
    def rank(row: str) -> tuple:
        # the published learned rows were evaluated with the official code's bug: our paper-compat row is their
        # match; then the row at the paper's setting (a theta sweep's default), then the preset's own row over a
        # custom run of the same setting (clip=pcc beside method=saq_sam_star)
        label = table.row_label[row]
        return (not label.endswith(PAPER_COMPAT_SUFFIX), table.row_departures.get(row, 0),
                label.removesuffix(PAPER_COMPAT_SUFFIX) not in METHOD_PRESETS)

    matched: dict[str, str] = {}  # paper row -> our row, in table order
    for row in table.rows:
        name = table.row_paper.get(row)
        if name in published["rows"] and (name not in matched or rank(row) < rank(matched[name])):
            matched[name] = row
    pairs = list(matched.items())
    paper_columns = list(next(iter(published["rows"].values())))
    ours = [c for c in table.columns if c in paper_columns]
    if not ours:  # our models are not the paper's: show its columns at our bit-widths
        bits = {b for _, b in table.columns}
        ours = [c for c in paper_columns if c[1] in bits]
    if not pairs or not ours:
        return None
    return published, pairs, ours


def paper_title(column: tuple[str, str]) -> str:
    return f"{PAPER_MODEL.get(column[0], column[0])} {column[1].upper()}"


def paper_markdown(table: Table) -> str:
    block = paper_block(table)
    if block is None:
        return ""
    published, pairs, columns = block
    lines = [f"Published, not our runs — {published['source']}, in %; {published['note']}."]
    if not any(c in table.columns for c in columns):
        lines.append("Our models are not in the paper: its columns at the same bit-widths, for orientation.")
    head = ["paper row (our label)", *(paper_title(c) for c in columns)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label in pairs:
        values = [published["rows"][name].get(c) for c in columns]
        cells = ["–" if v is None else str(v) for v in values]
        lines.append("| " + " | ".join([f"{name} ({label})", *cells]) + " |")
    return "\n".join(lines)


def running_jobs(report: Report) -> list[dict]:
    """Jobs whose process still lives (another multirun's): neither failed nor finished."""
    return [f for f in report.failures if f.get("running")]


def failed_jobs(report: Report) -> list[dict]:
    return [f for f in report.failures if not f.get("running")]


def mixed_threads_line(table: Table, code: str = "`") -> str | None:
    """The note under a table naming its cells whose runs ran at different thread counts (None: there are none)."""
    mixed = table.mixed_threads()
    if not mixed:
        return None
    return (f"Cells whose runs ran at different thread counts ({code}threads={code}: float sums add up in another "
            "order, which alone can move a 4-bit cell by a few tenths; compare cells run at one count): "
            + "; ".join(f"{row} at {column_title(col)}: threads {', '.join(map(str, counts))}"
                        for row, col, counts in mixed) + ".")


def render_markdown(report: Report, plots: list[Path]) -> str:
    out = [f"# Report: {report.root}", "",
           f"{len(report.runs)} runs; {len(report.skipped)} results.json skipped; {len(failed_jobs(report))} failed jobs"
           + (f"; {len(running_jobs(report))} jobs still running" if running_jobs(report) else "") + ". "
           "Values in % (metric × 100), mean ± sample standard deviation (n − 1) over seeds where several ran; the "
           "best quantized cell per column in bold. report.csv holds the same cells as fractions, with n, seeds and "
           "thread counts.", ""]
    for table in report.tables:
        out += [f"## {table_title(table)}", "", markdown_table(table), ""]
        mixed = mixed_threads_line(table)
        if mixed:
            out += [mixed, ""]
        if any(table.row_label[r].endswith(CUSTOM_SUFFIX) for r in table.rows):
            out += [f"A row marked `{CUSTOM_SUFFIX.strip()}` is a run whose clipping is named like a `method=` preset "
                    "without that preset's switches (`clip=minmax` alone keeps BIG and AGQ on, the `minmax` preset "
                    "turns them off), so it is not the preset's row.", ""]
        paper = paper_markdown(table)
        if paper:
            out += [paper, ""]
    for title, jobs in (("Failed jobs", failed_jobs(report)), ("Still running", running_jobs(report))):
        if jobs:
            out += [f"## {title}", ""]
            out += [f"- `{f['path'].parent}`: {f['error']}" + (f" (`{' '.join(f['overrides'])}`)" if f["overrides"]
                                                                 else "") for f in jobs]
            out.append("")
    if report.skipped:
        out += ["## Skipped results.json", ""] + [f"- `{p}`: {why}" for p, why in report.skipped] + [""]
    if report.duplicates:
        out += ["## Duplicates", "", "Same cell and seed found more than once; the newest counted, these not:", ""]
        out += [f"- `{p}`" for p in report.duplicates] + [""]
    if plots:
        out += ["## Plots", ""] + [f"- `{p}`" for p in plots] + [""]
    return "\n".join(out)


def write_csv(report: Report, path: Path) -> None:
    fh = io.StringIO(newline="")
    writer = csv.writer(fh)
    writer.writerow(["source", "task", "prompts", "metric", "row", "model", "bits", "mean", "std", "n", "seeds",
                     "threads"])
    for table in report.tables:
        for row in table.rows:
            for col in table.columns:
                cell = table.cells.get((row, col))
                if cell is not None:
                    writer.writerow(["ours", table.task, table.prompts, table.metric, row, col[0], col[1],
                                     repr(cell.mean), repr(cell.std), cell.n,
                                     " ".join(str(s) for s in table.seeds[(row, col)]),
                                     " ".join(str(t) for t in table.threads.get((row, col), []))])
        block = paper_block(table)
        if block:
            published, pairs, columns = block
            for name, _ in pairs:
                for col in columns:
                    value = published["rows"][name].get(col)
                    if value is not None:
                        writer.writerow(["paper", table.task, "", table.metric, name, col[0], col[1],
                                         repr(round(value / 100, 6)), "", "", "", ""])
    write_text_atomic(path, fh.getvalue())


TEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
               "}": r"\}", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}", "★": r"$\star$", "±": r"$\pm$",
               "–": "--"}


def tex_escape(text: str) -> str:
    """Text for a LaTeX table cell: every character LaTeX treats specially, escaped in one pass."""
    return "".join(TEX_SPECIAL.get(ch, ch) for ch in text)


def render_tex(report: Report) -> str:
    out = [f"% saq report of {tex_escape(str(report.root))}; needs \\usepackage{{booktabs}}", ""]
    for table in report.tables:
        best = {c: table.best(c) for c in table.columns}
        out += [r"\begin{table}[t]", r"\centering", r"\caption{" + tex_escape(table_title(table)) + r" (\%)}",
                r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
                " & ".join(["Method", *(tex_escape(column_title(c)) for c in table.columns)]) + r" \\", r"\midrule"]
        for i, row in enumerate(table.rows):
            if i and table.row_label[table.rows[i - 1]] == FP_ROW and table.row_label[row] != FP_ROW:
                out.append(r"\midrule")
            cells = []
            for col in table.columns:
                text = tex_escape(cell_text(table.cells.get((row, col))))
                cells.append(r"\textbf{" + text + "}" if row in best[col] else text)
            out.append(" & ".join([tex_escape(row), *cells]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        mixed = mixed_threads_line(table, code="")
        if mixed:
            out += [r"\par\smallskip{\footnotesize " + tex_escape(mixed) + "}"]
        block = paper_block(table)
        if block:
            published, pairs, columns = block
            out += [r"\par\medskip", r"\begin{tabular}{l" + "c" * len(columns) + "}", r"\toprule",
                    " & ".join(["Published: " + tex_escape(published["source"]),
                                *(tex_escape(paper_title(c)) for c in columns)]) + r" \\", r"\midrule"]
            for name, label in pairs:
                values = [published["rows"][name].get(c) for c in columns]
                out.append(" & ".join([tex_escape(f"{name} ({label})"),
                                       *("--" if v is None else str(v) for v in values)]) + r" \\")
            out += [r"\bottomrule", r"\end{tabular}"]
        out += [r"\end{table}", ""]
    return "\n".join(out)


def _safe(text: str) -> str:
    """A figure's file name stem from its title parts: safe characters, bounded (a row can name long paths)."""
    return bounded_name(re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_"), text, 150)


PLOT_PATTERNS = ("*_rows.png", "*_vs_bits.png", "clip_ranges_*.png")  # the figures write_report owns in plots/


def _draw_each(jobs) -> list[Path]:
    """Call each figure's drawing function; one that fails is a warning and costs only that figure."""
    written = []
    for what, draw in jobs:
        try:
            written.append(draw())
        except Exception as exc:  # a figure must never cost the tables or the other figures
            from saq.plots import pyplot

            pyplot().close("all")  # one failed before save_figure closed it; figures are drawn one at a time
            print(f"warning: plot {what} failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    return written


def plot_rows_at_one_width(table: Table, model: str, bits: str, out_dir: Path) -> Path:
    """One bit-width (an ablation at W4A4, a seed study): each row's main metric as a dot with its spread over seeds,
    the FP value as a dashed line; a line plot against one bit-width would be a single point per method."""
    from saq.plots import pyplot, save_figure

    plt = pyplot()
    rows = [(r, table.cells.get((r, (model, bits)))) for r in table.rows if table.row_label[r] != FP_ROW]
    rows = [(r, c) for r, c in rows if c is not None]
    # every FP row (runs on other weights or data have their own), each its own line style and name
    fps = [(r, table.cells[(r, (model, bits))]) for r in table.rows
           if table.row_label[r] == FP_ROW and (r, (model, bits)) in table.cells]
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]  # table order from the top
    drawn = [(yi, c) for yi, (_, c) in zip(y, rows) if math.isfinite(c.mean)]
    ax.errorbar([100 * c.mean for _, c in drawn], [yi for yi, _ in drawn],
                xerr=[100 * c.std if math.isfinite(c.std) else 0.0 for _, c in drawn], fmt="o", color="tab:blue",
                capsize=3)
    for yi, (_, c) in zip(y, rows):
        if not math.isfinite(c.mean):  # no dot would read as a row not run: the table says nan too
            ax.annotate("nan", (0, yi), xycoords=("axes fraction", "data"), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7, color="tab:red")
            continue
        ax.annotate(f"{100 * c.mean:.2f}" + (f" ± {100 * c.std:.2f}" if c.std else ""), (100 * c.mean, yi),
                    xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
    for i, (row, fp) in enumerate(fps):
        if math.isfinite(fp.mean):
            name = "FP" if row == FP_ROW else row
            ax.axvline(100 * fp.mean, color=FP_COLORS[i % len(FP_COLORS)], linestyle=FP_LINE_STYLES[i % len(FP_LINE_STYLES)],
                       linewidth=1, label=f"{name} {100 * fp.mean:.2f}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(y, [r for r, _ in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.margins(x=0.08)  # an FP line at the highest value would sit on the frame
    ax.set_xlabel(f"{table.metric} (%)")
    ax.set_title(f"{model} {bits.upper()}, {table.task} ({table.prompts})", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    path = out_dir / f"{_safe(f'{table.task}_{table.prompts}_{table.metric}_{model}_{bits}')}_rows.png"
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_metric_vs_bits(report: Report, out_dir: Path) -> list[Path]:
    """Per task, prompt source and model: the main metric against bit-width, one line per method, FP dashed; a model
    with a single bit-width gets a dot per row instead (plot_rows_at_one_width)."""
    jobs = []
    main_tables = [t for t in report.tables if t.metric == main_metric(report, t.task, t.prompts)]
    for table in main_tables:
        for model in dict.fromkeys(m for m, _ in table.columns):
            bits = [b for m, b in table.columns if m == model and b != "fp"]
            what = f"{table.task} {table.prompts} {model}"
            if len(bits) == 1:
                jobs.append((what, lambda t=table, m=model, b=bits[0]: plot_rows_at_one_width(t, m, b, out_dir)))
            elif bits:
                jobs.append((what, lambda t=table, m=model, b=bits: plot_one_model_vs_bits(t, m, b, out_dir)))
    return _draw_each(jobs)


def plot_one_model_vs_bits(table: Table, model: str, bits: list[str], out_dir: Path) -> Path:
    from saq.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = list(range(len(bits)))
    colors, markers = plt.get_cmap("tab20"), "osD^vPX<>"  # many rows (trials) stay distinguishable
    drawn = fp_drawn = 0
    for row in table.rows:
        cells = [table.cells.get((row, (model, b))) for b in bits]
        if table.row_label[row] == FP_ROW:  # FP rows of other data or weights each their own colour and style
            fp = [(i, 100 * c.mean) for i, c in zip(x, cells) if c is not None]
            look = dict(color=FP_COLORS[fp_drawn % len(FP_COLORS)], linestyle=FP_LINE_STYLES[fp_drawn % len(FP_LINE_STYLES)],
                        linewidth=1.2, label=row)
            fp_drawn += 1
            if len(fp) == len(bits) and len({v for _, v in fp}) == 1:  # one FP for every bit-width: a line across
                ax.axhline(fp[0][1], **look)
            elif fp:  # each column's FP (over its own seeds: jittered prompts follow them) across that column only
                look["colors"], look["linestyles"] = look.pop("color"), look.pop("linestyle")
                ax.hlines([v for _, v in fp], [i - 0.3 for i, _ in fp], [i + 0.3 for i, _ in fp], **look)
            continue
        points = [(i, c) for i, c in zip(x, cells) if c is not None]
        if points:
            look = dict(marker=markers[drawn % len(markers)], color=colors(drawn % 20), capsize=3)
            # the line runs through plain bit-widths only: a column with a part kept at another width (`w4a4
            # (decoder fp)`) is no step along the axis, so its point stands apart
            for plain, label in ((True, row), (False, None)):
                part = [(i, c) for i, c in points if (_bits_order(bits[i])[0] == 0) == plain]
                if part:
                    ax.errorbar([i for i, _ in part], [100 * c.mean for _, c in part],
                                yerr=[100 * c.std for _, c in part], linestyle="-" if plain else "none",
                                label=label if plain or len(part) == len(points) else None, **look)
            drawn += 1
    plain_columns = sum(_bits_order(b)[0] == 0 for b in bits)
    if 0 < plain_columns < len(bits):
        ax.axvline(plain_columns - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, [b.upper() for b in bits])
    ax.set_xlabel("bit-width" if plain_columns == len(bits) else "bit-width | with a part kept at another width")
    ax.set_ylabel(f"{table.metric} (%)")
    ax.set_title(f"{model}, {table.task} ({table.prompts})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # beside the axes
    path = out_dir / f"{_safe(f'{table.task}_{table.prompts}_{table.metric}_{model}')}_vs_bits.png"
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def short_names(names: list[str]) -> list[str]:
    """Quantizer names without the prefix they all share (up to a dot) and the `_quantizer` suffix."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]
    return [n[len(prefix):].removesuffix("_quantizer") for n in names]


CLIP_POINT_KEYS = ("name", "fp_min", "fp_max", "mse_lo", "mse_hi", "pcc_lo", "pcc_hi")


def plot_clip_ranges(report: Report, out_dir: Path) -> list[Path]:
    """Per run with a `clipping` section: each searched point's FP range against the MSE and PCC ranges."""
    jobs, seen = [], set()
    duplicates = set(report.duplicates)  # the table counts the newest of a cell's repeated runs; so does its figure
    for run in report.runs:
        clipping = run.get("clipping")
        points = clipping.get("points") if isinstance(clipping, dict) else None
        if not isinstance(points, list) or run["_path"] in duplicates:
            continue
        points = [p for p in points if isinstance(p, dict) and all(
            isinstance(p.get(k), (int, float)) for k in CLIP_POINT_KEYS[1:])]
        if not points:
            continue
        config = labelled_config(run)
        row = report.row_of.get(run["_path"], method_label(config))  # the row names the knobs its runs differ in
        # the table's coordinates: task and prompt source, model, bit-width, row, seed
        name = _safe(f"clip_ranges_{run['task']}_{run.get('prompts', '-')}_{run['model']}_{bits_label(config)}_{row}"
                     f"_seed{run.get('seed')}")
        if name in seen:
            continue
        seen.add(name)
        title = f"clip ranges: {run['model']} {bits_label(config).upper()} {row}, seed {run.get('seed')}"
        jobs.append((name, lambda p=points, t=title, n=name: plot_one_clip_ranges(p, t, out_dir / f"{n}.png")))
    return _draw_each(jobs)


def plot_one_clip_ranges(points: list[dict], title: str, path: Path) -> Path:
    from saq.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(points) + 1.5))
    for i, p in enumerate(points):
        ax.plot([p["fp_min"], p["fp_max"]], [i, i], color="0.7", linewidth=6, solid_capstyle="butt",
                label="FP range" if i == 0 else None)
        ax.plot([p["mse_lo"], p["mse_hi"]], [i + 0.15, i + 0.15], color="tab:blue", linewidth=2,
                label="MSE" if i == 0 else None)
        ax.plot([p["pcc_lo"], p["pcc_hi"]], [i - 0.15, i - 0.15], color="tab:red", linewidth=2,
                label="PCC" if i == 0 else None)
    ax.set_yticks(range(len(points)), short_names([str(p.get("name", i)) for i, p in enumerate(points)]), fontsize=7)
    ax.set_xscale("symlog", linthresh=1.0)
    # ticks at 1, 2, 5 of every decade, written as plain numbers: decades alone leave a range within ±10 with only
    # ±10^0 to read it by
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.SymmetricalLogLocator(base=10, linthresh=1.0, subs=[1.0, 2.0, 5.0]))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("activation range (symmetric log scale, linear within ±1)")
    # a row named by long paths would run off both sides and lose whose ranges these are: wrapped, and the legend
    # beside the axes rather than over the bottom point's bars
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path, dpi=120, layout={}, bbox_inches="tight")


def main_metric(report: Report, task: str, prompts: str) -> str | None:
    """The first metric tabulated for a task and prompt source (mask_AP, mAP50, mIoU)."""
    return next((t.metric for t in report.tables if t.task == task and t.prompts == prompts), None)


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """report.md, report.csv, report.tex and plots/*.png in out_dir; returns the written paths."""
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    if out_dir.exists() and not out_dir.is_dir():
        raise SaqError(f"report: out={out_dir} is a file; give a folder for report.md, report.csv, report.tex and plots/")
    try:
        plot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaqError(f"report: cannot create the report folder out={out_dir} ({exc.strerror or exc}); give a folder "
                       "that can be written") from None
    plots = plot_metric_vs_bits(report, plot_dir) + plot_clip_ranges(report, plot_dir)
    for stale in {p for pattern in PLOT_PATTERNS for p in plot_dir.glob(pattern)} - set(plots):
        stale.unlink(missing_ok=True)  # an earlier report's figure of a row or run this one no longer has
    md, csv_path, tex = (out_dir / name for name in REPORT_FILES)
    try:
        # whole files or none: a sweep's report may be rewritten while another reads it, or killed mid-write
        write_text_atomic(md, render_markdown(report, [p.relative_to(out_dir) for p in plots]))
        write_csv(report, csv_path)
        write_text_atomic(tex, render_tex(report))
    except OSError as exc:
        raise SaqError(f"report: cannot write the report into out={out_dir} ({exc.strerror or exc})") from None
    return [md, csv_path, tex, *plots]


def print_summary(report: Report, written: list[Path], since: float | None = None) -> list[dict]:
    """What a sweep prints at its end: the main table per task, the failures, and where the report is. Failures
    written before `since` (the sweep's start) are jobs of earlier sweeps that this one did not run: listed apart.
    Returns this sweep's failures."""
    print(f"\n=== sweep report: {report.root} — {len(report.runs)} runs, {len(failed_jobs(report))} failed, "
          f"{len(report.skipped)} skipped results.json"
          + (f", {len(report.duplicates)} duplicates not counted (listed in the report)" if report.duplicates else ""))
    for table in report.tables:
        if table.metric == main_metric(report, table.task, table.prompts):
            print(f"\n{table_title(table)} (%)\n\n{markdown_table(table)}")
            mixed = mixed_threads_line(table)
            if mixed:
                print(f"\n{mixed}")
    # a job another multirun (or process) still runs is neither this sweep's failure nor an earlier one
    running = running_jobs(report)
    current = [f for f in report.failures if (since is None or f["mtime"] >= since) and f not in running]
    earlier = [f for f in report.failures if f not in current and f not in running]
    if running:
        print(f"\n{len(running)} jobs still running in another process:")
        for job in running:
            print(f"  {job['path'].parent}: {job['error']}")
    if current:
        print(f"\n{len(current)} failed jobs:")
        for failure in current:
            print(f"  {failure['path'].parent}: {failure['error']}")
    if earlier:
        print(f"\n{len(earlier)} failure.json from earlier sweeps, in jobs this one did not run (delete them once "
              "settled):")
        for failure in earlier:
            print(f"  {failure['path'].parent}: {failure['error']}")
    for path, why in report.skipped:
        print(f"skipped {path}: {why}")
    if written:
        print(f"\nreport: {', '.join(str(p) for p in written[:3])} (+{len(written) - 3} plots)")
    return current


def main(argv: list[str] | None = None) -> int:
    from saq.cli import tool_args

    try:
        path, options = tool_args(sys.argv[1:] if argv is None else argv,
                                  "python -m saq.report PATH [out=DIR]  (PATH: a folder searched for results.json)",
                                  {"out": None}, about=__doc__)
        path = Path(path)
        report = build_report(path)
        if not report.runs:
            shown = "; ".join(f"{p}: {why}" for p, why in report.skipped[:3])
            more = f"; and {len(report.skipped) - 3} more" if len(report.skipped) > 3 else ""
            failed = failed_jobs(report)
            why = (failed[0]["error"].splitlines() or [""])[0] if failed else ""
            first = f"; first failure {failed[0]['path'].parent}: {why}" if failed else ""
            raise SaqError(f"report: no usable results.json under {path} ({len(report.skipped)} skipped, "
                           f"{len(failed)} failed jobs)" + (f"; skipped {shown}{more}" if shown else "") + first)
        written = write_report(report, Path(options.get("out", path)))
    except SaqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(report, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
