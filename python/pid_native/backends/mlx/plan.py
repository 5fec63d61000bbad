"""Memory plan and tile blending: the Rust core's planner (``rust/pid-core/src/plan.rs``),
called through the extension so both backends tile the same requests the same way."""

from __future__ import annotations

import numpy as np

from ... import _native
from .config import NetConfig


def plan(
    cfg: NetConfig, batch: int, h: int, w: int, weight_bytes: int, budget: int, forced_tile: int | None = None
) -> _native.Plan:
    """Whole-image or tiled decoding for ``batch`` latents of ``h x w`` within ``budget`` bytes.

    Raises:
        InvalidInputError: a forced tile edge that is not a positive multiple of the latent pixel.
        BudgetError: nothing fits, not even the smallest tiles.
    """
    return _native.plan_decode(cfg.to_json(), batch, h, w, weight_bytes, budget, forced_tile)


def feather(length: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """Blend weight of a tile along one axis: linear ramps over the overlap on shared sides, 1 elsewhere."""
    return np.asarray(_native.feather(length, ramp_start, ramp_end), dtype=np.float32)
