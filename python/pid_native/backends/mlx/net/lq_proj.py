"""Sigma-aware LQ adapter, ``lq_proj`` (pid_spec §4, §10.2; mirrors ``net/lq_proj.rs``).

Upstream ``LQProjection2D`` (``networks/lq_projection_2d.py``). The latent is (un-patchified
for flux2 v1.5 and) nearest-resized to the patch grid, run through a conv trunk, and
projected by one linear head per injection point. The features depend only on the
latent, so callers compute them once per decode. The trunk runs NHWC (MLX's conv layout).
All convolutions are 3x3, stride 1, padding 1 (zeros for v1, replicate for v1.5); GroupNorm
has 4 groups and eps 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .... import _native
from ....errors import InvalidInputError
from ..config import GATE_PER_DIM, NetConfig
from .layers import Conv2d, GroupNorm, Linear


class ResBlock(nn.Module):
    """Pre-activation residual block x + Conv(SiLU(GN(Conv(SiLU(GN(x)))))), keys ``block.{0,2,3,5}``."""

    GROUPS = 4
    EPS = 1e-5

    def __init__(self, ch: int, padding: str) -> None:
        super().__init__()
        self.block = [
            GroupNorm(ch, self.GROUPS, self.EPS),
            nn.SiLU(),
            Conv2d(ch, ch, 3, padding=1, padding_mode=padding),
            GroupNorm(ch, self.GROUPS, self.EPS),
            nn.SiLU(),
            Conv2d(ch, ch, 3, padding=1, padding_mode=padding),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.block:
            h = layer(h)
        return x + h


class SigmaGate(nn.Module):
    """``SigmaAwarePerToken[AndDim]Gate``: s + sigmoid(W [s; F] + b - exp(log_alpha) * sigma) * F."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.content_proj = Linear(2 * dim, out)
        self.log_alpha = mx.array(0.0)

    def __call__(self, s: mx.array, f: mx.array, sigma: mx.array) -> mx.array:
        """``s, f (B, L, D)``, ``sigma (B,)`` in f32."""
        logit = self.content_proj(mx.concatenate([s, f], axis=2))
        offset = (sigma * mx.exp(self.log_alpha.astype(mx.float32)))[:, None, None]
        return s + f * mx.sigmoid(logit - offset)


@dataclass
class LqFeatures:
    """Adapter outputs for one latent: one feature per gate, plus the PiT feature for v1.5."""

    heads: list[mx.array]  # each (B, L, D)
    pit: mx.array | None

    def window(self, grid: tuple[int, int], rows: range, cols: range) -> LqFeatures:
        """The features of the ``rows x cols`` window of their ``(hs, ws)`` patch grid."""
        if (len(rows), len(cols)) == grid:
            return self

        def crop(f: mx.array) -> mx.array:
            b, _, d = f.shape
            grid_f = f.reshape(b, *grid, d)[:, rows.start : rows.stop, cols.start : cols.stop]
            return grid_f.reshape(b, len(rows) * len(cols), d)

        return LqFeatures([crop(f) for f in self.heads], crop(self.pit) if self.pit is not None else None)


def nearest_indices(n_in: int, n_out: int) -> mx.array:
    """PyTorch ``nearest`` source indices: floor(dst * (in / out)) with the scale in f32."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32)
    return mx.array(np.minimum(src, n_in - 1))


class LqProj(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        d, lh, pad = cfg.hidden_size, cfg.lq_hidden_dim, cfg.lq_conv_padding_mode
        gate_out = d if cfg.lq_gate_type == GATE_PER_DIM else 1
        n = cfg.num_lq_outputs
        self.latent_proj = [
            Conv2d(cfg.lq_conv_in_channels, lh, 3, padding=1, padding_mode=pad),
            nn.SiLU(),
            Conv2d(lh, lh, 3, padding=1, padding_mode=pad),
            *(ResBlock(lh, pad) for _ in range(cfg.lq_num_res_blocks)),
        ]
        self.output_heads = [Linear(lh, d) for _ in range(n)]
        if cfg.pit_lq_inject:
            self.pit_head = Linear(lh, d)
        self.gate_modules = [SigmaGate(d, gate_out) for _ in range(n)]
        self._interval = cfg.lq_interval
        self._unpatchify = cfg.lq_latent_unpatchify_factor
        self._latent_channels = cfg.lq_latent_channels

    def gate_for_block(self, i: int) -> int | None:
        """Gate index applied before patch block ``i``, if any (every ``interval``-th block)."""
        j = i // self._interval
        return j if i % self._interval == 0 and j < len(self.gate_modules) else None

    def window_features(
        self, z: mx.array, size: tuple[int, int], window: tuple[int, int, int, int], f: int, p: int
    ) -> LqFeatures:
        """The features of the window ``(y, x, h, w)`` (output pixels) of an output of ``size``
        whose latent is ``z (B, C, zh, zw)``, ``f`` output pixels per latent pixel and ``p`` per patch.

        The whole image takes any latent (nearest-resized to the patch grid, as upstream); a tile
        needs the image's own latent and is computed on the tile's latent and a halo as wide as the
        trunk's receptive field, so that only the GroupNorm statistics tell it from the whole image.
        """
        h, w = size
        if window == (0, 0, h, w):
            return self.features(z, h // p, w // p)
        zh, zw = z.shape[2:]
        if (zh * f, zw * f) != (h, w):
            raise InvalidInputError(
                f"a tile of a {w}x{h} output needs its {w // f}x{h // f} latent, got {zw}x{zh}",
                "latent_shape",
            )
        cells = f // p  # patch cells per latent pixel
        # Each 3x3 convolution of the trunk reaches one patch cell further.
        reach = 2 + 2 * (len(self.latent_proj) - 3)
        (cy, cx, ch, cw), (oy, ox) = _native.latent_crop(window, f, -(-reach // cells), (zh, zw))
        grid = (ch * cells, cw * cells)
        r0, c0 = oy * cells, ox * cells
        features = self.features(z[:, :, cy : cy + ch, cx : cx + cw], *grid)
        return features.window(grid, range(r0, r0 + window[2] // p), range(c0, c0 + window[3] // p))

    def features(self, z: mx.array, hs: int, ws: int) -> LqFeatures:
        """``z (B, C, h, w)`` -> features on the ``hs x ws`` patch grid."""
        b, c, h, w = z.shape
        if c != self._latent_channels:
            raise InvalidInputError(
                f"lq latent has {c} channels, the adapter expects {self._latent_channels}", "latent_channels"
            )
        f = self._unpatchify
        if f > 1:
            # Channel c*f*f + i*f + j moves to spatial offset (i, j) at f-times the resolution.
            z = (
                z.reshape(b, c // (f * f), f, f, h, w)
                .transpose(0, 1, 4, 2, 5, 3)
                .reshape(b, c // (f * f), h * f, w * f)
            )
        t = z.transpose(0, 2, 3, 1)  # NHWC
        if tuple(t.shape[1:3]) != (hs, ws):
            t = t[:, nearest_indices(t.shape[1], hs)][:, :, nearest_indices(t.shape[2], ws)]
        for layer in self.latent_proj:
            t = layer(t)
        tokens = t.reshape(b, hs * ws, t.shape[3])  # row-major, like the image tokens
        return LqFeatures(
            heads=[head(tokens) for head in self.output_heads],
            pit=self.pit_head(tokens) if "pit_head" in self else None,
        )
