"""saq: post-training quantization of Segment Anything; importing it registers saq's Hydra resolvers."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the Hydra config tree; here, as importing it loads no torch

from saq.sweep import register_resolvers  # noqa: E402  (CONF_DIR first: a module imported from here may take it)

register_resolvers()
