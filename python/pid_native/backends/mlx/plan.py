"""Memory plan and tile blending: the Rust core's planner (``rust/pid-core/src/plan.rs``),
called through the extension so both backends tile the same requests the same way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import _native
from .config import NetConfig


@dataclass(frozen=True)
class Tile:
    """One forward's grid inside the output image, in output pixels."""

    y: int
    x: int
    h: int
    w: int


@dataclass(frozen=True)
class Plan:
    height: int
    width: int
    tiles: tuple[Tile, ...]  # one tile equal to the image means a whole-image decode
    predicted_peak_bytes: int
    budget_bytes: int

    @property
    def is_whole(self) -> bool:
        return self.tiles == (Tile(0, 0, self.height, self.width),)

    def as_dict(self) -> dict[str, object]:
        """The registry's plan format (same keys as the candle backend)."""
        return {
            "height": self.height,
            "width": self.width,
            "whole": self.is_whole,
            "tiles": [(t.y, t.x, t.h, t.w) for t in self.tiles],
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "budget_bytes": self.budget_bytes,
        }


def whole(h: int, w: int) -> Plan:
    """A whole-image plan with no budget check."""
    return Plan(h, w, (Tile(0, 0, h, w),), 0, 0)


def plan(
    cfg: NetConfig, batch: int, h: int, w: int, weight_bytes: int, budget: int, forced_tile: int | None = None
) -> Plan:
    """Whole-image or tiled decoding for ``batch`` latents of ``h x w`` within ``budget`` bytes.

    Raises:
        InvalidInputError: a forced tile edge that is not a positive multiple of the latent pixel.
        BudgetError: nothing fits, not even the smallest tiles.
    """
    d = _native.plan_decode(cfg.to_json(), batch, h, w, weight_bytes, budget, forced_tile)
    tiles = tuple(Tile(*t) for t in d["tiles"])
    return Plan(d["height"], d["width"], tiles, d["predicted_peak_bytes"], d["budget_bytes"])


def feather(length: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """Blend weight of a tile along one axis: linear ramps over the overlap on shared sides, 1 elsewhere."""
    return np.asarray(_native.feather(length, ramp_start, ramp_end), dtype=np.float32)
