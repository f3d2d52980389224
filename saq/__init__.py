"""saq: post-training quantization of Segment Anything; importing it registers saq's Hydra resolvers."""

from saq.sweep import register_resolvers

register_resolvers()
