"""The SAQ-SAM paper's published numbers (../shared/paper.md §9), in %, for the report's labelled comparison block."""

from __future__ import annotations

# The paper's row of each method preset (method=...). A run without a preset has a paper row only for clip=pcc
# without reconstruction (SAQ-SAM★); clip=minmax keeps BIG and AGQ on, so it is not the paper's MinMax row.
PAPER_ROW = {
    "minmax": "MinMax",
    "ptq4sam_s": "PTQ4SAM-S",
    "saq_sam_star": "SAQ-SAM★",
    "pcc": "SAQ-SAM★",
    "qdrop": "QDrop",
    "ptq4sam_l": "PTQ4SAM-L",
    "saq_sam": "SAQ-SAM",
}

PAPER_MODEL = {"sam_vit_b": "SAM-B", "sam_vit_l": "SAM-L", "sam_vit_h": "SAM-H"}

_B, _L, _H = "sam_vit_b", "sam_vit_l", "sam_vit_h"


def _row(cols: list[tuple[str, str]], values: list[float | None]) -> dict[tuple[str, str], float | None]:
    return dict(zip(cols, values))


_INSTANCE_COLS = [(_B, "w6a6"), (_B, "w4a4"), (_L, "w6a6"), (_L, "w4a4"), (_H, "w6a6"), (_H, "w4a4")]
_SEMANTIC_COLS = [(_B, "w6a6"), (_B, "w4a4"), (_L, "w6a6"), (_L, "w4a4")]

# Each table: which of our (task, metric) it matches, its source, and rows {paper row: {(model, bits): value}}.
# None = "–" in the paper (about 0, collapsed, or not reported).
PAPER_TABLES = [
    {
        "task": "instance",
        "metric": "mask_AP",
        "source": "SAQ-SAM paper, COCO val2017 mask AP, DINO detector prompts (paper.md §9.1)",
        "rows": {
            "FP": _row(_INSTANCE_COLS, [44.5, 44.5, 48.6, 48.6, 49.1, 49.1]),
            "MinMax": _row(_INSTANCE_COLS, [11.2, None, 44.7, None, 42.8, None]),
            "PTQ4SAM-S": _row(_INSTANCE_COLS, [20.4, None, 47.7, 23.1, 48.1, 30.5]),
            "SAQ-SAM★": _row(_INSTANCE_COLS, [39.4, 3.5, 48.0, 27.8, 48.2, 31.6]),
            "QDrop": _row(_INSTANCE_COLS, [38.9, 11.2, 47.5, 27.5, 48.3, 41.7]),
            "PTQ4SAM-L": _row(_INSTANCE_COLS, [40.4, 14.4, 48.3, 36.6, 48.7, 43.9]),
            "SAQ-SAM": _row(_INSTANCE_COLS, [42.4, 33.8, 48.3, 46.3, 48.9, 47.4]),
        },
        "note": "learned rows (QDrop, PTQ4SAM-L, SAQ-SAM) carry the official code's drop_prob evaluation bug (paper.md §7)",
    },
    {
        "task": "semantic",
        "metric": "mIoU",
        "source": "SAQ-SAM paper, ADE20K val mIoU, SegFormer + SAM (paper.md §9.3)",
        "rows": {
            "FP": _row(_SEMANTIC_COLS, [33.15, 33.15, 33.61, 33.61]),
            "QDrop": _row(_SEMANTIC_COLS, [32.57, 31.79, None, None]),
            "PTQ4SAM-L": _row(_SEMANTIC_COLS, [32.65, 31.85, 33.66, 32.82]),
            "SAQ-SAM": _row(_SEMANTIC_COLS, [33.04, 32.53, 33.63, 33.30]),
        },
        "note": "QDrop's row is SAM-B only (from BAQ)",
    },
]


def paper_row(config: dict) -> str | None:
    """The paper's row a run's config corresponds to, or None (FP rows are matched by the report itself)."""
    from saq.log import method_preset

    if method_preset(config):
        return PAPER_ROW.get(method_preset(config))
    clip, recon, quant = config.get("clip"), config.get("recon"), config.get("quant")
    no_recon = not isinstance(recon, dict) or recon.get("name") in (None, "none")
    big_agq = isinstance(quant, dict) and bool(quant.get("big")) and bool(quant.get("agq"))  # SAQ-SAM★ builds on both
    if isinstance(clip, dict) and clip.get("name") == "pcc" and no_recon and big_agq:
        return "SAQ-SAM★"
    return None


def paper_table(task: str, metric: str) -> dict | None:
    """The published table for our task and metric, or None (oriented detection has no SAQ-SAM numbers, §9.4)."""
    return next((t for t in PAPER_TABLES if t["task"] == task and t["metric"] == metric), None)
