"""Helpers for tests and integrators' CI: deterministic synthetic weights and bundles.

Nothing here is needed to decode real images.
"""

from .seeded import RECIPE, bf16_bits, cached_seeded, layout_key, seeded_float32, write_seeded
from .tokenizer import build_tiny_gemma_tokenizer

__all__ = [
    "RECIPE",
    "bf16_bits",
    "build_tiny_gemma_tokenizer",
    "cached_seeded",
    "layout_key",
    "seeded_float32",
    "write_seeded",
]
