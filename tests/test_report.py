"""saq.report on hand-made results.json folders: layout, seeds, bold, paper block, bad files, plots, the CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saq import report as report_module
from saq.log import METHOD_PRESETS
from saq.report import build_report, main, markdown_table, write_report
from tests.conftest import REPO


def record(model="sam_tiny", bits=4, clip="mse", ap=0.5, fp_ap=0.8, seed=0, method=None, recon=None, task="instance",
           extra: dict | None = None, **top) -> dict:
    quant = {"name": f"w{bits}a{bits}", "w_bits": bits, "a_bits": bits} if bits else {"name": "fp"}
    config = {"model": {"name": model}, "quant": quant, "clip": {"name": clip, **(extra or {})}, "seed": seed,
              "task": {"max_images": None, "coarse": {"seed": seed}}, "logger": {"name": "none"}}
    if "threads" in top:  # a config key, as the run stores it
        config["threads"] = top.pop("threads")
    if method:
        config["method"] = method  # as the conf/method presets write it (a root string)
    if recon:
        config["recon"] = {"name": recon}
    metrics = {"fp": {"mask_AP": fp_ap, "mIoU": 0.9, "images": 6, "prompts": 20}}
    if bits:
        metrics["quantized"] = {"mask_AP": ap, "mIoU": ap + 0.1, "images": 6, "prompts": 20}
    return {"run_name": "r", "model": model, "task": task, "prompts": "gt", "quant": quant["name"], "seed": seed,
            "metrics": metrics, "config": config, **top}


def put(root: Path, name: str, rec) -> Path:
    path = root / name / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rec if isinstance(rec, str) else json.dumps(rec))
    return path


def ours(report_dir: Path, metric="mask_AP") -> dict[tuple[str, str, str], dict]:
    rows = csv.DictReader((report_dir / "report.csv").open())
    return {(r["row"], r["model"], r["bits"]): r for r in rows if r["source"] == "ours" and r["metric"] == metric}


def test_runs_of_other_weights_at_the_same_checkpoint_path_are_other_rows(tmp_path):
    # a checkpoint retrained in place: its quantized figures must not sit under the other weights' FP row
    put(tmp_path, "old", record(bits=4, ap=0.60, fp_ap=0.80, checkpoint_sha256="a" * 64))
    put(tmp_path, "new4", record(bits=4, ap=0.55, fp_ap=0.70, seed=1, checkpoint_sha256="b" * 64))
    put(tmp_path, "new6", record(bits=6, ap=0.66, fp_ap=0.70, checkpoint_sha256="b" * 64))
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    rows = markdown_table(table).splitlines()[2:]
    # the most common weights go unnamed; each column's FP cells are the FP rows and seeds of its own runs (W4A4's
    # b-weight run is seed 1 only; no a-weight run at W6A6)
    assert rows == ["| FP | 70.00 | 70.00 |",
                    "| FP model.weights=aaaaaaaaaaaa | – | 80.00 |",
                    "| mse | 66.00 | 55.00 |",  # not a mean over the two weights' W4A4 runs
                    # on other weights than the table's: named, and not competing for the column's best
                    "| mse model.weights=aaaaaaaaaaaa | – | 60.00 |"]
    # also a method whose only run used the other weights (compared across methods, not only within one); the two
    # W4A4 runs on the a weights now outnumber the one on b: they compete with each other, the b run does not
    put(tmp_path, "pcc", record(bits=4, clip="pcc", ap=0.65, fp_ap=0.80, checkpoint_sha256="a" * 64))
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    rows = markdown_table(table).splitlines()
    assert "| pcc model.weights=aaaaaaaaaaaa | – | **65.00** |" in rows, rows
    assert "| mse model.weights=bbbbbbbbbbbb | 66.00 | 55.00 |" in rows, rows  # alone in W6A6: nothing to beat


def test_a_column_whose_runs_all_used_other_images_than_the_table_still_has_a_best(tmp_path):
    # W6A6 on all images, W8A8 added on 8 images: the W8A8 runs share their images and compete with each other (the
    # whole column was left out of the race); an even split between two image counts has no best
    for name, bits, clip, ap, images in (("a", 6, "mse", 0.70, None), ("b", 6, "pcc", 0.72, None),
                                         ("c", 6, "minmax", 0.60, None), ("d", 8, "mse", 0.70, 8),
                                         ("e", 8, "pcc", 0.78, 8)):
        rec = record(bits=bits, clip=clip, ap=ap)
        rec["config"]["task"]["max_images"] = images
        put(tmp_path, name, rec)
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert table.best(("sam_tiny", "w8a8")) == {"pcc task.max_images=8"}
    assert table.best(("sam_tiny", "w6a6")) == {"pcc task.max_images=null"}  # its two runs differ: both named
    put(tmp_path, "f", record(bits=8, clip="minmax", ap=0.80))  # W8A8 now one run on all images, two on 8
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert table.best(("sam_tiny", "w8a8")) == {"pcc task.max_images=8"}
    put(tmp_path, "g", record(bits=8, clip="percentile", ap=0.90))  # two and two: which images is the column's?
    assert next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP").best(("sam_tiny", "w8a8")) == set()



def test_a_part_kept_fp_or_at_its_own_widths_is_a_column_and_another_device_is_named(tmp_path):
    from saq.log import bits_label

    quant = {"name": "w4a4", "w_bits": 4, "a_bits": 4, "encoder": {"enabled": True, "w_bits": None, "a_bits": None},
             "decoder": {"enabled": True, "w_bits": None, "a_bits": None}}
    assert bits_label({"quant": quant}) == "w4a4"
    assert bits_label({"quant": {**quant, "decoder": {"enabled": False}}}) == "w4a4 (decoder fp)"
    assert bits_label({"quant": {**quant, "encoder": {"enabled": True, "w_bits": 8}}}) == "w4a4 (encoder w8a4)"
    # in a report: such a run sat unnamed in the W4A4 column and took its bold (74 against 62 and 60)
    for name, clip, ap, part, device in (("a", "mse", 0.62, {}, "cpu"), ("b", "pcc", 0.60, {}, "cpu"),
                                         ("c", "minmax", 0.74, {"decoder": {"enabled": False}}, "cpu"),
                                         ("d", "percentile", 0.70, {}, "cuda")):
        rec = record(bits=4, clip=clip, ap=ap, fp_ap=0.80)
        rec["config"]["quant"], rec["config"]["device"] = {**quant, **part}, device
        rec["quant"] = bits_label(rec["config"])
        put(tmp_path, name, rec)
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    rows = markdown_table(table).splitlines()
    assert rows[0] == "| method | sam_tiny W4A4 | sam_tiny W4A4 (DECODER FP) |", rows
    # the cuda run is named, as its FP row is, and does not compete with the cpu runs (float sums differ)
    assert "| mse | **62.00** | – |" in rows and "| minmax (custom) | – | 74.00 |" in rows, rows
    assert "| percentile device=cuda | 70.00 | – |" in rows, rows


def test_the_same_weights_at_another_path_are_the_same_rows(tmp_path):
    # a copy of the checkpoint (another machine, another folder): one FP row, and its run competes for the best
    checkpoint = {"checkpoint_sha256": "a" * 64}
    original = record(bits=4, clip="minmax", ap=0.72, fp_ap=0.80, **checkpoint)
    original["config"]["model"]["checkpoint"] = "/data/sam.pt"
    put(tmp_path, "a", original)
    copy = record(bits=4, clip="percentile", ap=0.75, fp_ap=0.80, **checkpoint)
    copy["config"]["model"]["checkpoint"] = "/elsewhere/copy.pt"
    put(tmp_path, "b", copy)
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    rows = markdown_table(table).splitlines()[2:]
    assert rows == ["| FP | 80.00 |", "| minmax (custom) | 72.00 |", "| percentile | **75.00** |"], rows


def test_layout_fp_on_top_methods_by_bits_and_best_in_bold(tmp_path):
    put(tmp_path, "a", record(bits=6, method="minmax", clip="minmax", ap=0.70))
    put(tmp_path, "b", record(bits=6, clip="mse", ap=0.75))
    put(tmp_path, "c", record(bits=4, method="minmax", clip="minmax", ap=0.40))
    put(tmp_path, "d", record(bits=4, clip="mse", ap=0.60))
    report = build_report(tmp_path)
    table = next(t for t in report.tables if t.metric == "mask_AP")
    assert table.columns == [("sam_tiny", "w6a6"), ("sam_tiny", "w4a4")]
    assert markdown_table(table).splitlines() == [
        "| method | sam_tiny W6A6 | sam_tiny W4A4 |",
        "|---|---|---|",
        "| FP | 80.00 | 80.00 |",
        "| minmax | 70.00 | 40.00 |",
        "| mse | **75.00** | **60.00** |",
    ]
    assert [t.metric for t in report.tables] == ["mask_AP", "mIoU"]  # counts (images, prompts) are not tables


def test_seeds_give_mean_and_sample_std_and_seed_keys_do_not_split_rows(tmp_path):
    for seed, ap in enumerate([0.50, 0.60, 0.70]):
        put(tmp_path, f"s{seed}", record(seed=seed, ap=ap))
    write_report(build_report(tmp_path), tmp_path)
    cell = ours(tmp_path)[("mse", "sam_tiny", "w4a4")]
    assert float(cell["mean"]) == pytest.approx(0.6) and float(cell["std"]) == pytest.approx(0.1)
    assert cell["n"] == "3" and cell["seeds"] == "0 1 2"
    assert "| mse | 60.00 ± 10.00 |" in (tmp_path / "report.md").read_text()
    assert ours(tmp_path)[("FP", "sam_tiny", "w4a4")]["n"] == "3"  # FP per seed, here identical


def test_a_cell_whose_seeds_ran_at_different_thread_counts_says_so(tmp_path):
    # the thread count does not split rows (a rerun need not recompute), but it moves 4-bit cells by tenths
    for seed, threads in ((0, 2), (1, 1), (2, 1)):
        put(tmp_path / "mixed", f"s{seed}", record(seed=seed, ap=0.6, threads=threads))
        put(tmp_path / "one", f"s{seed}", record(seed=seed, ap=0.6, threads=2))
    for folder in ("mixed", "one"):
        write_report(build_report(tmp_path / folder), tmp_path / folder)
    assert ours(tmp_path / "mixed")[("mse", "sam_tiny", "w4a4")]["threads"] == "2 1 1"
    text = (tmp_path / "mixed" / "report.md").read_text()
    assert "mean ± sample standard deviation (n − 1) over seeds" in text
    assert "different thread counts" in text and "mse at sam_tiny W4A4: threads 1, 2" in text
    assert "different thread counts" not in (tmp_path / "one" / "report.md").read_text()
    # threads=null runs at the process's own count, which results.json records: that is what is compared
    for seed, (configured, used) in enumerate(((None, 2), (2, 2), (None, 1))):
        put(tmp_path / "null", f"s{seed}", record(seed=seed, ap=0.6, threads=configured, threads_used=used))
    cells = build_report(tmp_path / "null").tables[0].threads
    assert cells[("mse", ("sam_tiny", "w4a4"))] == [2, 2, 1]


def test_each_columns_fp_cell_averages_the_seeds_of_that_columns_runs(tmp_path):
    # jittered prompts follow the seed, so FP differs between seeds: W6A6 ran seed 0 only and is compared with
    # seed 0's FP, not with the mean over W4A4's three seeds
    for seed in (0, 1, 2):
        put(tmp_path, f"w4s{seed}", record(bits=4, seed=seed, fp_ap=0.7 + seed / 10, ap=0.65 + seed / 10))
    put(tmp_path, "w6s0", record(bits=6, seed=0, fp_ap=0.7, ap=0.69))
    put(tmp_path, "fp_s5", record(bits=None, seed=5, fp_ap=0.5))  # an FP-only run of another seed
    write_report(build_report(tmp_path), tmp_path)
    cells = ours(tmp_path)
    assert cells[("FP", "sam_tiny", "w6a6")]["seeds"] == "0" and float(cells[("FP", "sam_tiny", "w6a6")]["mean"]) == 0.7
    assert cells[("FP", "sam_tiny", "w4a4")]["seeds"] == "0 1 2"
    assert float(cells[("FP", "sam_tiny", "w4a4")]["mean"]) == pytest.approx(0.8)
    # the seed-5 FP run is in no cell: listed as such rather than counted without a trace
    text = (tmp_path / "report.md").read_text()
    assert f"`{tmp_path / 'fp_s5' / 'results.json'}`: FP-only run of seed 5: no quantized run of sam_tiny" in text
    assert "1 results.json skipped" in text


def test_an_fp_row_fills_only_the_columns_whose_runs_it_evaluated_like(tmp_path):
    """W4A4 ran on 2 images, W8A8 on 8: each column's FP cell is the FP of its own images, not the other's (a
    2-image FP above 8-image W8A8 results would read as a drop where the model gained)."""
    def on(images, rec):
        rec["config"]["task"]["max_images"] = images
        return rec

    put(tmp_path, "w4", on(2, record(bits=4, ap=0.75, fp_ap=0.80)))
    put(tmp_path, "w8", on(8, record(bits=8, ap=0.78, fp_ap=0.776)))
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    fp_rows = [r for r in table.rows if r.startswith("FP")]
    assert len(fp_rows) == 2
    filled = {row: {col[1] for col in table.columns if (row, col) in table.cells} for row in fp_rows}
    assert sorted(filled.values(), key=sorted) == [{"w4a4"}, {"w8a8"}]
    assert [table.cells[(r, ("sam_tiny", "w8a8"))].mean for r in fp_rows if "w8a8" in filled[r]] == [0.776]


def test_a_knob_that_differs_within_a_cell_splits_the_row(tmp_path):
    for theta, ap in [(0.3, 0.55), (0.5, 0.65)]:
        put(tmp_path, f"t{theta}", record(clip="pcc", ap=ap, extra={"theta": theta}))
    write_report(build_report(tmp_path), tmp_path)
    cells = ours(tmp_path)
    assert float(cells[("pcc clip.theta=0.3", "sam_tiny", "w4a4")]["mean"]) == 0.55
    assert float(cells[("pcc clip.theta=0.5", "sam_tiny", "w4a4")]["mean"]) == 0.65


def test_a_run_made_before_a_knob_existed_sits_in_the_row_of_the_knobs_old_behaviour(tmp_path):
    old = record(clip="pcc", method="saq_sam", recon="par", ap=0.60, seed=0)  # no recon.response_input: mixed
    new = record(clip="pcc", method="saq_sam", recon="par", ap=0.70, seed=1)
    new["config"]["recon"]["response_input"] = "quantized"
    same = record(clip="pcc", method="saq_sam", recon="par", ap=0.64, seed=2)
    same["config"]["recon"]["response_input"] = "mixed"
    for name, rec in (("old", old), ("new", new), ("same", same)):
        put(tmp_path, name, rec)
    write_report(build_report(tmp_path), tmp_path)
    cells = ours(tmp_path)
    mixed = cells[("saq_sam", "sam_tiny", "w4a4")]  # the most common setting names no knob
    assert mixed["seeds"] == "0 2" and float(mixed["mean"]) == pytest.approx(0.62)  # never averaged with quantized
    assert float(cells[("saq_sam recon.response_input=quantized", "sam_tiny", "w4a4")]["mean"]) == 0.70


def test_rows_never_mix_settings_across_columns_and_only_the_run_seed_is_a_seed(tmp_path):
    def run(bits=4, seed=0, ap=0.5, recon=None, task=None):
        rec = record(bits=bits, seed=seed, ap=ap, method="saq_sam", clip="pcc", recon="par")
        rec["config"]["recon"].update(recon or {})
        rec["config"]["task"].update({"generate": {"seed": 0}, **(task or {})})  # every real run records its data seed
        return rec

    # one setting per bit-width: without labels the row would join W6A6's drop_prob=1 to W4A4's 0.5
    put(tmp_path, "cols/w6", run(bits=6, ap=0.7, recon={"drop_prob": 1.0}))
    put(tmp_path, "cols/w4", run(bits=4, ap=0.5, recon={"drop_prob": 0.5}))
    write_report(build_report(tmp_path / "cols"), tmp_path / "cols")
    assert set(ours(tmp_path / "cols")) - {("FP", "sam_tiny", "w6a6"), ("FP", "sam_tiny", "w4a4")} == {
        ("saq_sam recon.drop_prob=1.0", "sam_tiny", "w6a6"), ("saq_sam recon.drop_prob=0.5", "sam_tiny", "w4a4")}
    # the seed of the data is a knob (another dataset, another FP), a recon.seed that follows the run seed is not,
    # and a run that leaves the common setting is named by what it changed
    for seed in (0, 1, 2):
        put(tmp_path, f"mix/default{seed}", run(seed=seed, ap=0.5 + seed / 100, recon={"seed": None}))
    put(tmp_path, "mix/recon_seed7", run(ap=0.4, recon={"seed": 7}))
    put(tmp_path, "mix/data1", run(ap=0.3, task={"generate": {"seed": 1}}))
    report = build_report(tmp_path / "mix")
    write_report(report, tmp_path / "mix")
    cells = ours(tmp_path / "mix")
    assert report.duplicates == []
    assert {row for row, _, _ in cells} == {"FP", "FP task.generate.seed=1", "saq_sam", "saq_sam recon.seed=7",
                                            "saq_sam task.generate.seed=1"}
    assert cells[("saq_sam", "sam_tiny", "w4a4")]["seeds"] == "0 1 2"
    assert float(cells[("saq_sam recon.seed=7", "sam_tiny", "w4a4")]["mean"]) == pytest.approx(0.4)
    # a follower fixed for every run (here to 0, which is also seed 0's value) is one setting, not two rows
    for seed in (0, 1, 2):
        put(tmp_path, f"fixed/s{seed}", run(seed=seed, ap=0.5, recon={"seed": 0}))
    write_report(build_report(tmp_path / "fixed"), tmp_path / "fixed")
    assert ours(tmp_path / "fixed")[("saq_sam", "sam_tiny", "w4a4")]["seeds"] == "0 1 2"


def test_the_same_run_found_twice_counts_once(tmp_path, capsys):
    put(tmp_path, "first", record(ap=0.5))
    put(tmp_path, "merged/copy", record(ap=0.5))
    report = build_report(tmp_path)
    write_report(report, tmp_path)
    assert ours(tmp_path)[("mse", "sam_tiny", "w4a4")]["n"] == "1"
    assert len(report.duplicates) == 1
    from saq.report import print_summary

    print_summary(report, [])  # a sweep's printed summary says so too, not only report.md
    assert "2 runs, 0 failed, 0 skipped results.json, 1 duplicates not counted" in capsys.readouterr().out


def test_run_folders_linked_into_the_report_folder_are_read_once(tmp_path):
    """Runs gathered from several sweeps by symlinks were skipped without a word (Path.rglob does not follow them)."""
    put(tmp_path / "sweep_a", "job0", record(ap=0.5))
    put(tmp_path / "sweep_b", "job0", record(ap=0.7, seed=1))
    both = tmp_path / "both"
    both.mkdir()
    (both / "a").symlink_to(tmp_path / "sweep_a" / "job0", target_is_directory=True)
    (both / "b").symlink_to(tmp_path / "sweep_b", target_is_directory=True)
    (both / "loop").symlink_to(both, target_is_directory=True)  # a link back up is walked once, not forever
    report = build_report(both)
    assert sorted(str(r["_path"].relative_to(both)) for r in report.runs) == ["a/results.json",
                                                                             "b/job0/results.json"]
    write_report(report, both)
    assert ours(both)[("mse", "sam_tiny", "w4a4")]["n"] == "2"


def test_row_labels_from_method_preset_or_clip_plus_recon(tmp_path):
    put(tmp_path, "a", record(method="saq_sam", clip="pcc", recon="par", ap=0.7))
    put(tmp_path, "b", record(clip="mse", recon="qdrop", ap=0.6))
    put(tmp_path, "c", record(clip="mse", recon="none", ap=0.5))
    write_report(build_report(tmp_path), tmp_path)
    assert {k[0] for k in ours(tmp_path)} == {"FP", "saq_sam", "mse+qdrop", "mse"}
    # the same saved model evaluated the official way (quant.load + recon.paper_eval_compat): its own, labelled row
    compat = record(method="saq_sam", clip="pcc", recon="par", ap=0.72,
                    recon_record={"method": "par", "eval_mode": "paper_compat: linear/conv inputs left at drop_prob"})
    compat["recon"] = compat.pop("recon_record")
    compat["config"]["quant"]["load"] = str(tmp_path / "a")
    compat["config"]["recon"]["paper_eval_compat"] = True
    put(tmp_path, "a-paper", compat)
    write_report(build_report(tmp_path), tmp_path)
    rows = ours(tmp_path)
    assert float(rows[("saq_sam", "sam_tiny", "w4a4")]["mean"]) == pytest.approx(0.70)
    assert float(rows[("saq_sam (paper-compat eval)", "sam_tiny", "w4a4")]["mean"]) == pytest.approx(0.72)
    # half its linear inputs are unquantized: it does not compete for the best quantized cell
    md = (tmp_path / "report.md").read_text()
    assert "| saq_sam | **70.00** |" in md and "| saq_sam (paper-compat eval) | 72.00 |" in md
    # it sits right after its method's row, and the published SAQ-SAM row (the official, buggy evaluation) is
    # paired with it, not with the fully quantized one
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert table.rows.index("saq_sam (paper-compat eval)") == table.rows.index("saq_sam") + 1
    assert "| SAQ-SAM (saq_sam (paper-compat eval)) |" in md and "| SAQ-SAM (saq_sam) |" not in md


def test_custom_minmax_run_is_not_labelled_as_the_minmax_preset(tmp_path):
    # clip=minmax alone keeps BIG and AGQ on: another method than the preset, so another row, never set beside
    # the paper's MinMax
    put(tmp_path, "preset", record(method="minmax", clip="minmax", ap=0.4))
    put(tmp_path, "custom", record(clip="minmax", ap=0.5))
    write_report(build_report(tmp_path), tmp_path)
    assert {k[0] for k in ours(tmp_path)} == {"FP", "minmax", "minmax (custom)"}
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert table.rows.index("minmax (custom)") == table.rows.index("minmax") + 1
    assert table.row_paper["minmax"] == "MinMax" and table.row_paper["minmax (custom)"] is None
    # the report says what the mark means
    assert "`clip=minmax` alone keeps BIG and AGQ on" in (tmp_path / "report.md").read_text()


def test_method_presets_known_to_the_labels_are_conf_method():
    assert set(METHOD_PRESETS) == {p.stem for p in (REPO / "conf" / "method").glob("*.yaml")}


def test_bad_files_are_listed_and_skipped_and_failures_listed(tmp_path):
    put(tmp_path, "good", record(ap=0.5))
    put(tmp_path, "corrupt", "{ not json")
    put(tmp_path, "foreign", json.dumps({"accuracy": 0.9}))
    partial = record()
    del partial["metrics"]["quantized"]
    put(tmp_path, "partial", partial)
    put(tmp_path, "hand-edited", record(recon="par") | {"recon": "par"})
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "failure.json").write_text(json.dumps({"error": "checkpoint not found: /x.pth",
                                                                  "overrides": ["model.checkpoint=/x.pth"]}))
    report = build_report(tmp_path)
    assert len(report.runs) == 1
    reasons = {p.parent.name: why for p, why in report.skipped}
    assert reasons["corrupt"].startswith("unreadable JSON")
    assert reasons["foreign"] == "not a saq run record (missing model, task, quant, metrics, config)"
    assert reasons["partial"] == "partial run: no quantized metrics"
    assert reasons["hand-edited"] == "not a saq run record (recon is not an object)"
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "checkpoint not found: /x.pth" in md and "model.checkpoint=/x.pth" in md
    assert "`" + str(tmp_path / "corrupt" / "results.json") + "`: unreadable JSON" in md
    assert "| mse | 50.00 |" in md


def test_paper_block_for_matching_rows_and_columns(tmp_path):
    for bits, ap in [(6, 0.41), (4, 0.30)]:
        put(tmp_path, f"saq{bits}", record(model="sam_vit_b", bits=bits, method="saq_sam", clip="pcc", ap=ap))
        put(tmp_path, f"pct{bits}", record(model="sam_vit_b", bits=bits, clip="percentile", ap=ap - 0.1))
    report = build_report(tmp_path)
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    block = md.split("## instance (prompts gt): mask_AP\n")[1].split("## ")[0]
    assert "Published, not our runs — SAQ-SAM paper, COCO val2017 mask AP, DINO detector prompts (paper.md §9.1)" in block
    assert "| paper row (our label) | SAM-B W6A6 | SAM-B W4A4 |" in block
    assert "| FP (FP) | 44.5 | 44.5 |" in block and "| SAQ-SAM (saq_sam) | 42.4 | 33.8 |" in block
    assert "percentile" not in block.split("Published")[1]  # no published row for it
    paper = [r for r in csv.DictReader((tmp_path / "report.csv").open()) if r["source"] == "paper"]
    assert {(r["row"], r["bits"], r["mean"]) for r in paper if r["row"] == "SAQ-SAM"} == {
        ("SAQ-SAM", "w6a6", "0.424"), ("SAQ-SAM", "w4a4", "0.338")}
    tex = (tmp_path / "report.tex").read_text()
    assert r"\textbf{41.00}" in tex and "SAQ-SAM (saq\\_sam) & 42.4 & 33.8" in tex


def test_plots_metric_vs_bits_and_clip_ranges_when_present(tmp_path):
    points = [{"name": f"layers.{i}.k_proj", "fp_min": -150.0, "fp_max": 160.0, "mse_lo": -140.0, "mse_hi": 150.0,
               "pcc_lo": -1.0, "pcc_hi": 1.2, "clip_ratio": 0.01, "dist_before": 0.6, "dist_after": 0.1}
              for i in range(3)]
    for theta in (0.3, 0.5):  # one plot per row: a theta sweep must not keep only its first run's ranges
        put(tmp_path, f"pcc{theta}", record(clip="pcc", ap=0.6, clipping={"points": points}, extra={"theta": theta}))
    put(tmp_path, "mse6", record(bits=6, clip="mse", ap=0.7))
    put(tmp_path, "broken", record(bits=6, clip="pcc", ap=0.7, clipping={"points": "oops"}, extra={"theta": 0.4}))
    written = write_report(build_report(tmp_path), tmp_path)
    names = sorted(p.name for p in written if p.suffix == ".png")
    assert names == ["clip_ranges_instance_gt_sam_tiny_w4a4_pcc_clip.theta=0.3_seed0.png",
                     "clip_ranges_instance_gt_sam_tiny_w4a4_pcc_clip.theta=0.5_seed0.png",
                     "instance_gt_mask_AP_sam_tiny_vs_bits.png"]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_bit_width_plots_a_dot_per_row_with_its_seed_spread(tmp_path, monkeypatch):
    """An ablation at one bit-width gets rows as dots (mean, std over seeds) against FP, not one-point lines."""
    import saq.plots

    put(tmp_path, "q0", record(clip="pcc", recon="qdrop", ap=0.70))
    for seed, ap in ((0, 0.74), (1, 0.72)):
        put(tmp_path, f"p{seed}", record(clip="pcc", recon="par", ap=ap, seed=seed))
    figures = {}
    real_save = saq.plots.save_figure

    def keep(fig, path, **kwargs):
        figures[path.name] = fig
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(saq.plots, "save_figure", keep)
    written = write_report(build_report(tmp_path), tmp_path)
    assert "instance_gt_mask_AP_sam_tiny_w4a4_rows.png" in {p.name for p in written}
    assert not any(p.name.endswith("_vs_bits.png") for p in written)
    ax = figures["instance_gt_mask_AP_sam_tiny_w4a4_rows.png"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    dots = dict(zip(labels, ax.lines[0].get_xdata()))  # the errorbar's data line, rows top to bottom reversed
    assert dots == pytest.approx({"pcc+par": 73.0, "pcc+qdrop": 70.0})
    assert ax.lines[-1].get_xdata()[0] == pytest.approx(80.0)  # FP
    notes = sorted(t.get_text() for t in ax.texts)
    assert notes == ["70.00", "73.00 ± 1.41"]


def test_cli_writes_reports_and_rejects_a_missing_folder(tmp_path, capsys):
    put(tmp_path, "a", record(ap=0.5))
    assert main([str(tmp_path), f"out={tmp_path / 'out'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plots", "report.csv", "report.md", "report.tex"]
    assert "| mse | 50.00 |" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: report: no such folder: {tmp_path / 'nope'} (give the folder of a sweep or of runs holding "
        "results.json)")
    results = next(tmp_path.rglob("results.json"))
    assert main([str(results)]) == 2
    assert f"error: report: {results} is a file (give the folder" in capsys.readouterr().err
    assert main([str(tmp_path), "out="]) == 2  # Path("") would write into the current folder
    assert "error: out= is empty; give it a value" in capsys.readouterr().err


def test_python_m_saq_report_runs(tmp_path):
    put(tmp_path, "a", record(ap=0.5))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "saq.report", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.md").is_file()


def test_tex_escapes_every_special_character_of_a_row_name():
    from saq.report import tex_escape

    assert tex_escape("pcc task.data.root=/d/coco_$HOME^2 {a} ~ 50% & #1 \\") == (
        r"pcc task.data.root=/d/coco\_\$HOME\textasciicircum{}2 \{a\} \textasciitilde{} 50\% \& \#1 \textbackslash{}")


def test_a_custom_pcc_run_is_paired_with_saq_sam_star_only_with_big_and_agq():
    from saq.paper_results import paper_row

    config = record(clip="pcc")["config"]
    assert paper_row(config) is None
    config["quant"].update(big=True, agq=True)
    assert paper_row(config) == "SAQ-SAM★"


def test_clip_plot_names_drop_the_shared_prefix_and_quantizer_suffix():
    from saq.report import short_names

    names = ["mask_decoder.transformer.layers.0.self_attn.k_proj.input_quantizer",
             "mask_decoder.transformer.final_attn_token_to_image.qk_matmul.b_quantizer"]
    assert short_names(names) == ["layers.0.self_attn.k_proj.input", "final_attn_token_to_image.qk_matmul.b"]


def test_report_arguments_are_a_path_and_key_value_options(tmp_path, capsys, monkeypatch):
    from saq.report import main

    assert main([]) == 2 and "usage: python -m saq.report PATH [out=DIR]" in capsys.readouterr().err
    assert main([str(tmp_path), "format=tex"]) == 2
    assert "unknown option 'format'" in capsys.readouterr().err
    # a sweep job's folder is named by its overrides: it is the path, not options
    from saq.cli import tool_args

    job = tmp_path / "sweep" / "clip=mse,quant=w4a4"
    assert tool_args([str(job), "out=x"], "usage", {"out": None}) == (str(job), {"out": "x"})
    job.mkdir(parents=True)
    monkeypatch.chdir(job.parent)  # given relative to the sweep folder, an existing folder is a path too
    assert tool_args(["clip=mse,quant=w4a4"], "usage", {"out": None}) == ("clip=mse,quant=w4a4", {})
    # an option longer than any file name (saq.sensitivity's parts= of many quantizers) is no path to look up
    long = "parts=" + ",".join(["mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj"] * 5)
    assert tool_args([str(job), long], "usage", {"parts": None}) == (str(job), {"parts": long[6:]})
    from saq.errors import SaqError

    with pytest.raises(SaqError, match=r"out= is given twice \('a' and 'b'\); give it once"):
        tool_args([str(job), "out=a", "out=b"], "usage", {"out": None})
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "expected one folder, got 2: " in capsys.readouterr().err
    # a job folder's name mistyped (or not there): named as a missing folder, not 'expected one folder, got 0'
    with pytest.raises(SaqError, match=r"^no such folder: clip=mse,quant=w3a3 \(nor an option of this tool\); usage"):
        tool_args(["clip=mse,quant=w3a3", "out=x"], "usage", {"out": None})


def test_deploy_refuses_an_unknown_softmax_mode(tmp_path, capsys):
    from saq import deploy

    assert deploy.main([str(tmp_path), "softmax=int4"]) == 1
    assert "softmax='int4' is not allowed; expected one of ['float', 'log2']" in capsys.readouterr().err


def test_a_row_evaluated_on_other_images_than_the_table_says_so_even_alone(tmp_path):
    small = lambda rec: rec | {"config": rec["config"] | {"task": {"max_images": 2, "coarse": {"seed": 0}}}}  # noqa: E731
    put(tmp_path, "minmax", small(record(method="minmax", clip="minmax", ap=0.4)))
    put(tmp_path, "mse", small(record(clip="mse", ap=0.6)))
    put(tmp_path, "pcc", record(clip="pcc", ap=0.7, fp_ap=0.75))  # its only run, on all images
    report = build_report(tmp_path)
    table = next(t for t in report.tables if t.metric == "mask_AP")
    assert set(table.rows) == {"FP", "FP task.max_images=null", "minmax", "mse", "pcc task.max_images=null"}
    # pcc scores highest, but on other images: the bold best of the column goes to mse
    assert table.best(("sam_tiny", "w4a4")) == {"mse"}


def test_no_best_when_every_competing_row_ties(tmp_path):
    for clip in ("minmax", "mse", "pcc"):  # every method collapsed: no bold 0.00
        put(tmp_path, clip, record(clip=clip, ap=0.0))
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert table.best(("sam_tiny", "w4a4")) == set()
    put(tmp_path, "percentile", record(clip="percentile", ap=0.1))
    put(tmp_path, "pcc2", record(clip="pcc", ap=0.1, seed=1))  # pcc's mean 0.05: one best again
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert table.best(("sam_tiny", "w4a4")) == {"percentile"}


def test_calibration_only_keys_split_method_rows_but_not_fp_or_the_evaluation(tmp_path):
    # the GT-vs-detector calibration ablation (paper.md §2.3): one FP, the same evaluation images everywhere
    for clip, ap in (("minmax", 0.4), ("mse", 0.6)):
        for calib, bonus in ((None, 0.0), ("dets_train.json", 0.05)):
            rec = record(clip=clip, ap=ap + bonus)
            rec["config"]["prompts"] = {"calib_file": calib}
            rec["config"]["task"] |= {"generate": {"n_train": 64 if calib else 32, "n_val": 500}}
            put(tmp_path, f"{clip}-{bool(calib)}", rec)
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    fp_rows = [r for r in table.rows if r.startswith("FP")]
    assert fp_rows == ["FP"] and len(table.rows) == 5  # FP, and each clip with both calibrations
    assert any("prompts.calib_file=dets_train.json" in r for r in table.rows)
    # every row is evaluated on the table's images, so the column has its bold best (mse calibrated on detections)
    assert table.best(("sam_tiny", "w4a4")) == {next(r for r in table.rows if r.startswith("mse")
                                                     and "dets_train" in r)}


def test_a_key_a_run_does_not_record_is_no_setting_of_its_own(tmp_path):
    # runs made before a knob existed (or of a task without it) lack the key: they are not split off or labelled
    old = record(clip="pcc", bits=6, ap=0.7)
    new = record(clip="pcc", bits=4, ap=0.5)
    new["config"] |= {"deploy": False, "recon": {"name": "none"}}
    put(tmp_path, "old", old)
    put(tmp_path, "new", new)
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert table.rows == ["FP", "pcc"]


def test_an_unwritable_out_folder_is_one_line(tmp_path, capsys):
    put(tmp_path / "runs", "a", record(ap=0.5))
    (tmp_path / "a_file").write_text("kept")
    assert main([str(tmp_path / "runs"), f"out={tmp_path / 'a_file'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: report: out={tmp_path / 'a_file'} is a file; give a folder for report.md, report.csv, report.tex "
        "and plots/")
    assert main([str(tmp_path / "runs"), f"out={tmp_path / 'a_file' / 'report'}"]) == 2  # a folder under a file
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: report: cannot create the report folder out={tmp_path / 'a_file' / 'report'} (")
    assert "\n" not in err and (tmp_path / "a_file").read_text() == "kept"


def test_no_usable_results_lists_the_skipped_files_and_why(tmp_path, capsys):
    put(tmp_path, "a", {"config": {}})
    put(tmp_path, "b", "{ half")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: report: no usable results.json under {tmp_path} (2 skipped, 0 failed jobs); "
                          f"skipped {tmp_path / 'a' / 'results.json'}: not a saq run record (missing model")
    assert f"; {tmp_path / 'b' / 'results.json'}: unreadable JSON (JSONDecodeError" in err and "\n" not in err
    for name in "cdef":
        put(tmp_path, name, [])
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("; and 3 more")
    only_failed = tmp_path / "only_failed"
    (only_failed / "job").mkdir(parents=True)
    (only_failed / "job" / "failure.json").write_text(json.dumps({"error": "CUDA out of memory\nmore", "overrides": []}))
    assert main([str(only_failed)]) == 2  # every job failed: the error says why, not only how many
    assert capsys.readouterr().err.strip() == (f"error: report: no usable results.json under {only_failed} (0 skipped, "
                                               f"1 failed jobs); first failure {only_failed / 'job'}: CUDA out of memory")


def test_a_sweep_job_killed_midway_is_listed_as_unfinished(tmp_path):
    from omegaconf import OmegaConf

    from saq.sweep import RUNNING_FILE, run_sweep_job

    seen = []

    def run(cfg, run_dir):
        seen.append(json.loads((run_dir / RUNNING_FILE).read_text()))  # marked while it runs
        put(run_dir.parent, run_dir.name, record(ap=0.5))
        return {}

    cfg = OmegaConf.create({"resume": False})
    run_sweep_job(cfg, tmp_path / "done", run, ["clip=mse"])
    assert seen[0]["overrides"] == ["clip=mse"] and seen[0]["pid"] == os.getpid()
    assert not (tmp_path / "done" / RUNNING_FILE).exists()  # finished: the mark is gone
    # a worker killed mid-run (SIGKILL, out of memory) leaves only its mark: listed, not left out
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / RUNNING_FILE).write_text(json.dumps({"pid": 42, "host": "node1", "time": "T",
                                                                "overrides": ["clip=pcc"]}))
    # killed after writing its results (during figures or W&B): a finished run, not an unfinished one
    put(tmp_path, "late", record(ap=0.6, clip="minmax"))
    (tmp_path / "late" / RUNNING_FILE).write_text("{}")
    os.utime(tmp_path / "late" / RUNNING_FILE, (1, 1))
    # an earlier attempt failed, a rerun was then killed: the rerun's fate is what the report says
    (tmp_path / "retried").mkdir()
    (tmp_path / "retried" / "failure.json").write_text(json.dumps({"error": "old error", "overrides": []}))
    os.utime(tmp_path / "retried" / "failure.json", (1, 1))
    (tmp_path / "retried" / RUNNING_FILE).write_text(json.dumps({"time": "T2", "pid": 7, "host": "h"}))
    # a job whose process still holds its folder's run lock is another multirun's, not a failure of anyone's
    from saq.log import claim_run_dir

    (tmp_path / "alive").mkdir()
    (tmp_path / "alive" / RUNNING_FILE).write_text(json.dumps({"time": "T3", "pid": 1, "host": "h"}))
    with claim_run_dir(tmp_path / "alive"):
        report = build_report(tmp_path)
    assert len(report.runs) == 2
    assert [(f["path"].parent.name, f["error"], f["running"]) for f in report.failures] == [
        ("alive", "still running (started T3, pid 1 on h)", True),
        ("killed", "did not finish: killed (started T, pid 42 on node1)", False),
        ("retried", "did not finish: killed (started T2, pid 7 on h)", False)]
    assert report.failures[1]["overrides"] == ["clip=pcc"]
    from saq.report import render_markdown

    md = render_markdown(report, [])
    assert "2 runs; 0 results.json skipped; 2 failed jobs; 1 jobs still running." in md  # a live job is no failure
    assert md.index("## Failed jobs") < md.index("`" + str(tmp_path / "killed")) < md.index("## Still running") < \
        md.index("`" + str(tmp_path / "alive"))


def test_a_sweep_job_interrupted_by_ctrl_c_is_listed_and_stops_the_sweep(tmp_path):
    from omegaconf import OmegaConf

    from saq.sweep import FAILURE_FILE, RUNNING_FILE, run_sweep_job

    def run(cfg, run_dir):
        raise KeyboardInterrupt

    cfg = OmegaConf.create({"resume": False})
    with pytest.raises(KeyboardInterrupt):  # the sweep stops, as Ctrl-C means
        run_sweep_job(cfg, tmp_path / "job", run, ["clip=pcc"])
    assert not (tmp_path / "job" / RUNNING_FILE).exists()
    failure = json.loads((tmp_path / "job" / FAILURE_FILE).read_text())
    assert failure["overrides"] == ["clip=pcc"] and failure["error_type"] == "KeyboardInterrupt"
    report = build_report(tmp_path)
    assert [(f["path"].parent.name, f["error"]) for f in report.failures] == [
        ("job", "KeyboardInterrupt: interrupted (Ctrl-C) before it finished; rerun the sweep to compute it")]


def test_plots_of_rows_a_later_report_no_longer_has_are_removed(tmp_path):
    put(tmp_path, "w6", record(bits=6, ap=0.7))
    put(tmp_path, "w4", record(bits=4, ap=0.6))
    first = write_report(build_report(tmp_path), tmp_path)
    assert [p.name for p in first if p.suffix == ".png"] == ["instance_gt_mask_AP_sam_tiny_vs_bits.png"]
    (tmp_path / "mine.png").write_bytes(b"")  # not the report's: kept
    (tmp_path / "plots" / "notes.png").write_bytes(b"")
    (tmp_path / "w6" / "results.json").unlink()  # now one bit-width: a dot per row instead of a line
    second = write_report(build_report(tmp_path), tmp_path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        [p.name for p in second if p.suffix == ".png"] + ["notes.png"]) == [
        "instance_gt_mask_AP_sam_tiny_w4a4_rows.png", "notes.png"]
    assert (tmp_path / "mine.png").exists()


def test_a_row_named_by_long_paths_keeps_its_plots_and_one_failing_figure_costs_only_itself(tmp_path, monkeypatch,
                                                                                           capsys):
    import saq.report

    points = [{"name": "k_proj", "fp_min": -1.0, "fp_max": 1.0, "mse_lo": -0.9, "mse_hi": 0.9, "pcc_lo": -0.5,
               "pcc_hi": 0.5}]
    for i in range(2):  # rows that differ in a long calibration path: names far over a file system's 255 bytes
        calib = f"/datasets/{'very_long_folder_name/' * 12}calib_{i}.json"
        rec = record(clip="pcc", ap=0.6 + i / 10, clipping={"points": points})
        rec["config"]["prompts"] = {"calib_file": calib}
        put(tmp_path, f"r{i}", rec)
    written = write_report(build_report(tmp_path), tmp_path)
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) == 3 and all(p.exists() and len(p.name) < 200 for p in pngs)  # 2 clip-range plots + the rows
    assert len({p.name for p in pngs}) == 3  # the hashed tails keep the two rows apart
    real = saq.report.plot_one_clip_ranges

    def fail_first(points, title, path):
        if "calib_0" in title:
            raise RuntimeError("boom")
        return real(points, title, path)

    monkeypatch.setattr(saq.report, "plot_one_clip_ranges", fail_first)
    again = write_report(build_report(tmp_path), tmp_path)
    assert len([p for p in again if p.suffix == ".png"]) == 2 and "RuntimeError: boom" in capsys.readouterr().err


def test_clip_range_plots_of_other_prompt_sources_are_both_drawn(tmp_path):
    points = [{"name": "k_proj", "fp_min": -1.0, "fp_max": 1.0, "mse_lo": -0.9, "mse_hi": 0.9, "pcc_lo": -0.5,
               "pcc_hi": 0.5}]
    for prompts in ("gt", "jittered"):
        rec = record(clip="pcc", clipping={"points": points})
        rec["prompts"] = prompts
        put(tmp_path, prompts, rec)
    written = write_report(build_report(tmp_path), tmp_path)
    assert sorted(p.name for p in written if p.name.startswith("clip_ranges")) == [
        "clip_ranges_instance_gt_sam_tiny_w4a4_pcc_seed0.png", "clip_ranges_instance_jittered_sam_tiny_w4a4_pcc_seed0.png"]


def test_a_nan_cell_is_shown_and_the_best_finite_cell_stays_bold(tmp_path):
    put(tmp_path, "a", record(method="minmax", clip="minmax", ap=float("nan")))
    put(tmp_path, "b", record(clip="mse", ap=0.5))
    put(tmp_path, "c", record(clip="pcc", ap=0.6))
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    assert markdown_table(table).splitlines()[3:] == ["| minmax | nan |", "| mse | 50.00 |", "| pcc | **60.00** |"]


def test_an_integer_beyond_float_range_is_skipped_with_its_name(tmp_path):
    put(tmp_path, "ok", record(ap=0.5))
    put(tmp_path, "huge", json.dumps(record(ap=0.5)).replace('"mIoU": 0.6', '"mIoU": ' + "9" * 400))
    report = build_report(tmp_path)
    assert len(report.runs) == 1
    assert [(p.parent.name, why) for p, why in report.skipped] == [
        ("huge", "metrics.quantized.mIoU is an integer beyond float range")]


def test_records_removed_while_the_report_reads_are_passed_over(tmp_path, monkeypatch):
    # a job beside the report finishing meanwhile removes its running.json: was a FileNotFoundError from stat()
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "running.json").write_text("{}")
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "failure.json").write_text("{}")
    listed = list(report_module.files_named(tmp_path, "running.json"))

    def files_named(root, name):
        found = list(report_module_files_named(root, name))
        for path in found:
            path.unlink()  # listed, then removed before it is read
        return found

    report_module_files_named = report_module.files_named
    monkeypatch.setattr(report_module, "files_named", files_named)
    assert listed and report_module.load_failures(tmp_path) == []


def test_a_failure_older_than_the_finished_run_is_not_listed(tmp_path):
    path = put(tmp_path, "job", record(ap=0.5))
    (tmp_path / "job" / "failure.json").write_text(json.dumps({"error": "old error", "overrides": []}))
    os.utime(tmp_path / "job" / "failure.json", (1, 1))  # failed once, then finished (a rerun into the folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "failure.json").write_text(json.dumps({"error": "new error", "overrides": []}))
    report = build_report(tmp_path)
    assert [f["error"] for f in report.failures] == ["new error"] and report.runs[0]["_path"] == path


def test_deploy_does_not_split_a_row(tmp_path):
    for seed, (ap, deploy) in enumerate(((0.70, False), (0.72, True))):  # deploy only adds metrics.deployed
        rec = record(seed=seed, ap=ap)
        rec["config"]["deploy"] = deploy
        if deploy:
            rec["metrics"]["deployed"] = {"mask_AP": ap - 0.01}
        put(tmp_path, f"s{seed}", rec)
    report = build_report(tmp_path)
    table = next(t for t in report.tables if t.metric == "mask_AP")
    # the int8 ONNX Runtime evaluation is a row of its own under its method's, out of the race for the best
    assert markdown_table(table).splitlines()[3:] == ["| mse | 71.00 ± 1.41 |", "| mse (int8 ONNX Runtime) | 71.00 |"]
    assert table.best(("sam_tiny", "w4a4")) == set()
    assert set(report.row_of.values()) == {"mse"}  # the run's clip-range figure is named after its method's row
    # the deploy run found twice is one duplicate, not one per row it fills
    put(tmp_path, "copy/s1", json.loads((tmp_path / "s1" / "results.json").read_text()))
    assert len(build_report(tmp_path).duplicates) == 1
    (tmp_path / "copy" / "s1" / "results.json").unlink()
    # a newer run of that config without deploy replaces it: the older one's int8 row goes with it (it sat under
    # the newer run's number)
    newer = record(seed=1, ap=0.74)
    put(tmp_path, "rerun/s1", newer)
    os.utime(tmp_path / "rerun/s1/results.json", (time.time() + 5, time.time() + 5))
    report = build_report(tmp_path)
    assert markdown_table(next(t for t in report.tables if t.metric == "mask_AP")).splitlines()[3:] == [
        "| mse | 72.00 ± 2.83 |"] and report.duplicates == [tmp_path / "s1" / "results.json"]
    shutil.rmtree(tmp_path / "rerun")
    # a deploy=true run whose int8 evaluation failed is a failed job (its failure.json is listed), not a result
    rec = record(seed=2, ap=0.9)
    rec["config"]["deploy"] = True
    rec["metrics"]["deployed"] = {"error": "onnxruntime: out of memory"}
    put(tmp_path, "s2", rec)
    report = build_report(tmp_path)
    assert [why for _, why in report.skipped] == [
        "partial run: deploy=true without deployed metrics (onnxruntime: out of memory)"]
    assert markdown_table(next(t for t in report.tables if t.metric == "mask_AP")).splitlines()[3:] == [
        "| mse | 71.00 ± 1.41 |", "| mse (int8 ONNX Runtime) | 71.00 |"]


def test_figures_print_dollar_signs_as_text_and_are_written_whole(tmp_path):
    # a '$' in a run's path or row label would start matplotlib's math markup and fail the figure
    from saq.plots import pyplot, save_figure

    fig, ax = pyplot().subplots()
    ax.set_title("task.data.root=/d/$HOME_$x")
    path = save_figure(fig, tmp_path / "f.png", layout={})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # the temporary file it was written through is gone


def test_log_axes_are_labelled_in_plain_text_with_math_markup_off(tmp_path):
    # mathtext is off for the '$' above, so matplotlib's own log labels ($\mathdefault{10^{1}}$) printed as source
    from saq.plots import plain_tick_text, pyplot, save_figure

    assert plain_tick_text(r"$\mathdefault{4\times10^{-2}}$") == "4×10⁻²"
    assert plain_tick_text(r"$\mathdefault{-10^{0}}$") == "-10⁰" and plain_tick_text("0.5") == "0.5"
    fig, (log, symlog) = pyplot().subplots(1, 2)
    log.plot([0.03, 0.5, 20], [0.04, 1, 0.09])
    log.set_xscale("log")
    log.set_yscale("log")
    symlog.plot([-3, 0.5, 2000], [1, 2, 3])
    symlog.set_xscale("symlog", linthresh=1.0)
    save_figure(fig, tmp_path / "f.png", layout={})
    labels = [t.get_text() for ax in (log, symlog) for axis in (ax.xaxis, ax.yaxis)
              for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True)]
    assert "10¹" in labels and "-10⁰" in labels and "10³" in labels
    assert not [t for t in labels if "$" in t or "\\" in t], labels


def test_the_one_width_plot_marks_a_nan_row_and_draws_every_fp_row(tmp_path, monkeypatch):
    from saq.report import plot_rows_at_one_width

    put(tmp_path, "a", record(clip="mse", ap=0.6, fp_ap=0.8, checkpoint_sha256="a" * 64))
    put(tmp_path, "b", record(clip="pcc", ap=float("nan"), fp_ap=0.66, checkpoint_sha256="b" * 64))
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    figures = []
    monkeypatch.setattr("saq.plots.save_figure", lambda fig, path, **kw: figures.append(fig) or path)
    plot_rows_at_one_width(table, "sam_tiny", "w4a4", tmp_path)
    ax = figures[0].axes[0]
    fp_lines = [label for label in ax.get_legend_handles_labels()[1] if label.startswith("FP")]
    assert sorted(fp_lines) == ["FP model.weights=aaaaaaaaaaaa 80.00", "FP model.weights=bbbbbbbbbbbb 66.00"]
    assert "nan" in [t.get_text() for t in ax.texts]  # a row with no dot would look like one not run


def test_fp_rows_of_the_bit_width_plot_differ_and_stay_at_their_own_columns(tmp_path, monkeypatch):
    import matplotlib.colors

    from saq.report import plot_one_model_vs_bits

    put(tmp_path, "w4", record(bits=4, ap=0.6, fp_ap=0.8))
    put(tmp_path, "w6", record(bits=6, ap=0.7, fp_ap=0.8))
    eight = record(bits=8, ap=0.78, fp_ap=0.77)
    eight["config"]["task"]["max_images"] = 8  # W8A8 on other images: its own FP row, at W8A8 only
    put(tmp_path, "w8", eight)
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    figures = []
    monkeypatch.setattr("saq.plots.save_figure", lambda fig, path, **kw: figures.append(fig) or path)
    plot_one_model_vs_bits(table, "sam_tiny", ["w8a8", "w6a6", "w4a4"], tmp_path)
    ax = figures[0].axes[0]
    handles, labels = ax.get_legend_handles_labels()
    fp = {label: handle for handle, label in zip(handles, labels) if label.startswith("FP")}
    assert len(fp) == 2

    def look(handle):  # a line across (Line2D) or one segment per column (LineCollection)
        if hasattr(handle, "get_segments"):
            return tuple(handle.get_colors()[0]), str(handle.get_linestyle()[0])
        return matplotlib.colors.to_rgba(handle.get_color()), str(handle.get_linestyle())

    assert len({look(h) for h in fp.values()}) == 2  # two FP rows, two looks
    eight = fp[next(k for k in fp if k != "FP")]
    # the 8-image FP drawn at W8A8 (x = 0) only, not across every bit-width
    assert [(a[0], b[0]) for a, b in eight.get_segments()] == [(-0.3, 0.3)]


def test_clip_range_axis_is_labelled_inside_a_decade_too(tmp_path, monkeypatch):
    """Ranges within ±10 had only ±10^0 on the axis: ticks at 1, 2, 5 of each decade, as plain numbers."""
    from saq.report import plot_one_clip_ranges

    figures = []
    monkeypatch.setattr("saq.plots.save_figure", lambda fig, path, **kw: figures.append(fig) or path)
    points = [{"name": "a.k_proj", "fp_min": -4.5, "fp_max": 4.8, "mse_lo": -3.0, "mse_hi": 3.5, "pcc_lo": -2.5,
               "pcc_hi": 3.0}]
    plot_one_clip_ranges(points, "ranges", tmp_path / "r.png")
    ax = figures[0].axes[0]
    ax.figure.canvas.draw()
    shown = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels() if t.get_text()]
    assert {"-2", "-1", "0", "1", "2"} <= set(shown)


def test_a_recon_iters_kind_a_run_does_not_read_does_not_split_its_rows(tmp_path):
    # one sweep: recon.iters.block=5 set for all, read by the block-granularity runs only
    def learned(granularity, seed, block):
        rec = record(bits=4, clip="pcc", recon="par", seed=seed, ap=0.6 + seed / 100)
        rec["config"]["recon"].update({"granularity": granularity, "iters": {"stage": 2, "block": block}})
        return rec

    put(tmp_path, "s0", learned("stage", 0, 5))
    put(tmp_path, "s1", learned("stage", 1, 2000))  # a stage run whose recon.iters.block differs: no setting of it
    put(tmp_path, "b0", learned("block", 0, 5))
    put(tmp_path, "b1", learned("block", 1, 7))
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    rows = [r.split("|")[1].strip() for r in markdown_table(table).splitlines()[2:]]
    assert rows == ["FP", "pcc+par recon.granularity=block, recon.iters.block=5",
                    "pcc+par recon.granularity=block, recon.iters.block=7", "pcc+par recon.granularity=stage"]


def test_the_paper_row_pairs_with_the_run_at_the_papers_setting(tmp_path):
    # a theta sweep of saq_sam_star and a custom clip=pcc run of the preset's own setting: the published SAQ-SAM★
    # is the preset's run at its default theta, not whichever row comes first
    for theta, ap in [(0.3, 0.61), (0.5, 0.62), (0.7, 0.63)]:
        rec = record(method="saq_sam_star", clip="pcc", ap=ap, extra={"theta": theta})
        rec["config"]["quant"].update(big=True, agq=True)
        put(tmp_path, f"star{theta}", rec)
    custom = record(clip="pcc", ap=0.64, extra={"theta": 0.5})
    custom["config"]["quant"].update(big=True, agq=True)
    put(tmp_path, "custom", custom)
    report = build_report(tmp_path)
    table = next(t for t in report.tables if t.metric == "mask_AP")
    assert table.rows == ["FP", "pcc", "saq_sam_star clip.theta=0.3", "saq_sam_star clip.theta=0.5",
                          "saq_sam_star clip.theta=0.7"]
    from saq.report import paper_block

    _, pairs, _ = paper_block(table)
    assert dict(pairs)["SAQ-SAM★"] == "saq_sam_star clip.theta=0.5"
    write_report(report, tmp_path)
    assert "| SAQ-SAM★ (saq_sam_star clip.theta=0.5) | 3.5 | 27.8 | 31.6 |" in (tmp_path / "report.md").read_text()


def test_a_column_with_a_part_kept_at_another_width_is_no_step_of_the_bit_width_line(tmp_path, monkeypatch):
    from saq.report import plot_one_model_vs_bits

    for bits, ap in ((8, 0.76), (6, 0.75), (4, 0.70)):
        put(tmp_path, f"w{bits}", record(bits=bits, ap=ap, fp_ap=0.77))
    part = record(bits=4, ap=0.74, fp_ap=0.77)
    part["config"]["quant"]["decoder"] = {"enabled": False}
    part["quant"] = "w4a4 (decoder fp)"
    put(tmp_path, "w4-decoder-fp", part)
    table = next(t for t in build_report(tmp_path).tables if t.metric == "mask_AP")
    bits = [b for _, b in table.columns if b != "fp"]
    assert bits == ["w8a8", "w6a6", "w4a4", "w4a4 (decoder fp)"]
    figures = []
    monkeypatch.setattr("saq.plots.save_figure", lambda fig, path, **kw: figures.append(fig) or path)
    plot_one_model_vs_bits(table, "sam_tiny", bits, tmp_path)
    ax = figures[0].axes[0]
    drawn = [(list(line.get_xdata()), line.get_linestyle()) for line in ax.get_lines() if len(line.get_xdata())
             and line.get_marker() not in (None, "None", "")]
    # the mse line joins W8A8, W6A6 and W4A4 only (70 → 74 read as a gain of bit-width before); its decoder-FP
    # point stands alone, past a separator
    assert ([0, 1, 2], "-") in drawn and ([3], "None") in drawn, drawn
    assert "with a part kept at another width" in ax.get_xlabel()


def test_damaged_records_and_failures_are_named_not_a_traceback_and_mixed_threads_are_printed(tmp_path, capsys,
                                                                                             monkeypatch):
    from saq.report import print_summary, render_tex

    put(tmp_path, "good", record(ap=0.5, threads_used=2))
    put(tmp_path, "seed1", record(ap=0.6, seed=1, threads_used=1))  # the same cell at another thread count
    put(tmp_path, "threads", record(clip="pcc", threads_used=[4]))
    put(tmp_path, "odd", record(clip="percentile"))
    real = report_module.with_knobs_added_since

    def reading(config):  # a field of a type no check looks at, as a hand edit may leave
        if config["clip"]["name"] == "percentile":
            raise AttributeError("'str' object has no attribute 'get'")
        return real(config)

    monkeypatch.setattr(report_module, "with_knobs_added_since", reading)
    since = time.time() - 5
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "failure.json").write_text('{"error": "cut')  # damaged after this sweep began
    report = build_report(tmp_path)
    reasons = {p.parent.name: why for p, why in report.skipped}
    assert reasons == {"threads": "not a saq run record (threads_used is [4], not a whole number)",
                       "odd": "not a saq run record (AttributeError: 'str' object has no attribute 'get')"}
    assert len(report.runs) == 2
    current = print_summary(report, [], since=since)
    assert [f["error"] for f in current] == ["unreadable failure.json"]  # this sweep's: it fails the sweep
    out = capsys.readouterr().out
    assert "different thread counts" in out and "mse at sam_tiny W4A4: threads 1, 2" in out
    assert "different thread counts" in render_tex(report)
