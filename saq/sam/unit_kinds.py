"""Which reconstruction unit kinds each granularity makes (torch-free: the report and the sweep checks read it)."""

GRANULARITIES = ("stage", "layer", "block")
# The unit kinds build_chain makes at each granularity (the recon.iters keys a run reads).
KINDS_AT = {"stage": ("stage", "neck", "decoder_layer", "final_attn"),
            "layer": ("layer", "neck", "decoder_layer", "final_attn"),
            "block": ("block", "neck", "decoder_block", "final_attn")}


def iters_key_read(config_flat: dict, key: str) -> bool:
    """Whether a run with this flat config reads `key`: recon.iters.<kind> only where its granularity makes that
    kind (a sweep's shared recon.iters.block is no setting of its stage-granularity runs); any other key is read."""
    if not key.startswith("recon.iters."):
        return True
    kinds = KINDS_AT.get(str(config_flat.get("recon.granularity")))
    return kinds is None or key.split(".")[2] in kinds
