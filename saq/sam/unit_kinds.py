"""Which reconstruction unit kinds each granularity makes (torch-free: the report and the sweep checks read it)."""

from saq.errors import SaqError

GRANULARITIES = ("stage", "layer", "block")
UNIT_KINDS = ("stage", "layer", "block", "neck", "decoder_layer", "decoder_block", "final_attn")  # every granularity's
# The unit kinds build_chain makes at each granularity (the recon.iters keys a run reads).
KINDS_AT = {"stage": ("stage", "neck", "decoder_layer", "final_attn"),
            "layer": ("layer", "neck", "decoder_layer", "final_attn"),
            "block": ("block", "neck", "decoder_block", "final_attn")}


DECODER_KINDS = ("decoder_layer", "decoder_block", "final_attn")  # the mask decoder's units; the others the encoder's


def check_unit_kind(kind: str) -> None:
    """SaqError for a recon.iters key that no granularity makes (a typo: recon.iters.stages)."""
    if kind not in UNIT_KINDS:
        raise SaqError(f"recon.iters.{kind} is not a unit kind; expected one of {list(UNIT_KINDS)}")


def iters_key_read(config_flat: dict, key: str) -> bool:
    """Whether a run with this flat config reads `key`: recon.iters.<kind> only where its granularity makes that
    kind (a sweep's shared recon.iters.block is no setting of its stage-granularity runs); any other key is read."""
    if not key.startswith("recon.iters."):
        return True
    kinds = KINDS_AT.get(str(config_flat.get("recon.granularity")))
    return kinds is None or key.split(".")[2] in kinds
