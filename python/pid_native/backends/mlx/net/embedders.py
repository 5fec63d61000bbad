"""Input embedders: timestep, caption, patch and pixel tokens (pid_spec §3.2; mirrors ``embedders.rs``)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .layers import Linear, RmsNorm
from .rope import pixel_sincos, unary_f32


class TimestepEmbedder(nn.Module):
    """``t_embedder``: sinusoidal features of t (max_period 10, cos first) -> Linear -> SiLU -> Linear."""

    FREQ_DIM = 256

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = [Linear(self.FREQ_DIM, hidden), nn.SiLU(), Linear(hidden, hidden)]

    def __call__(self, t: mx.array) -> mx.array:
        """``t (B,)`` timesteps already scaled by 1000 -> ``(B, hidden)``."""
        half = self.FREQ_DIM // 2
        # Same f32 steps as the reference: exp(-ln(10) * i / half).
        ln10 = -np.float32(math.log(10.0))
        freqs = unary_f32(np.exp, (ln10 * np.arange(half, dtype=np.float32)) / np.float32(half))
        args = t.astype(mx.float32)[:, None] * mx.array(freqs)[None]
        emb = mx.concatenate([mx.cos(args), mx.sin(args)], axis=1)
        for layer in self.mlp:
            emb = layer(emb)
        return emb


class CaptionEmbedder(nn.Module):
    """``y_embedder``: Linear(txt_embed_dim -> hidden) then RMSNorm."""

    def __init__(self, txt_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = Linear(txt_dim, hidden)
        self.norm = RmsNorm(hidden)

    def __call__(self, y: mx.array) -> mx.array:
        return self.norm(self.proj(y))


class PatchEmbedder(nn.Module):
    """``s_embedder``: unfold PxP patches (index c*P*P + ky*P + kx) and project to hidden."""

    def __init__(self, in_channels: int, patch: int, hidden: int) -> None:
        super().__init__()
        self.proj = Linear(in_channels * patch * patch, hidden)
        self._patch = patch

    def __call__(self, x: mx.array) -> mx.array:
        """``x (B, C, H, W)`` -> ``(B, L, hidden)``, tokens row-major over the patch grid."""
        b, c, h, w = x.shape
        p = self._patch
        patches = (
            x.reshape(b, c, h // p, p, w // p, p)
            .transpose(0, 2, 4, 1, 3, 5)
            .reshape(b, (h // p) * (w // p), c * p * p)
        )
        return self.proj(patches)


class PixelEmbedder(nn.Module):
    """``pixel_embedder``: per-pixel Linear(3 -> 16) plus the absolute sin-cos position table."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = Linear(in_channels, dim)
        self._dim = dim

    def position_table(self, rows: range, cols: range) -> mx.array:
        """The position table of the pixels ``rows x cols``, ``(rows, cols, dim)``; cache it across steps."""
        return pixel_sincos(self._dim, rows, cols)

    def __call__(self, x: mx.array, pos: mx.array, patch: int) -> mx.array:
        """``x (B, C, H, W)`` -> pixel tokens ``(B * L, P*P, dim)`` grouped by patch (index ky*P + kx)."""
        b, _, h, w = x.shape
        hs, ws = h // patch, w // patch
        tokens = self.proj(x.transpose(0, 2, 3, 1)) + pos  # (B, H, W, dim)
        return (
            tokens.reshape(b, hs, patch, ws, patch, self._dim)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(b * hs * ws, patch * patch, self._dim)
        )
