"""PiT pixel block, ``pixel_blocks.{j}``, and the final layer (pid_spec §3.6, §3.4 step 7).

Mirrors ``net/pixel_block.rs``; upstream ``PiTBlock`` (``pixeldit_official.py:445-542``).
Pixel tokens ``x (B*L, P*P, dim)`` are modulated per pixel from the patch condition
``s (B*L, D)``, compressed to one token per patch for global attention, and expanded
back. Everything but the attention is local to a patch, so it runs in chunks of patches:
the full per-pixel modulation would be 3.2 GB at 4096².

``adaLN_modulation.0`` arrives regrouped by :mod:`..weights` from the upstream row order
``[p][k][ch]`` to ``[k][p][ch]``, so modulation k is the contiguous row block k and each
pass computes only the modulations it uses.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import AttentionBudget, Rope, apply_rope, attention, merge_heads, split_heads
from .layers import Linear, RmsNorm, gated_add, map_row_chunks, modulate

# Patches processed at once in the token-local passes.
PATCH_ROWS = 1024


class Mlp(nn.Module):
    """``fc1 -> GELU (exact erf) -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))


class PixelAttention(nn.Module):
    """``attn`` (upstream ``RotaryAttention``): qkv, q/k RMSNorm, 2-D RoPE, global attention, proj."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.q_norm = RmsNorm(dim // heads)
        self.k_norm = RmsNorm(dim // heads)
        self.proj = Linear(dim, dim)
        self._heads = heads

    def __call__(self, x: mx.array, rope: Rope, budget: AttentionBudget) -> mx.array:
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        q = apply_rope(self.q_norm(split_heads(q, self._heads)), *rope)
        k = apply_rope(self.k_norm(split_heads(k, self._heads)), *rope)
        v = split_heads(v, self._heads)
        return self.proj(merge_heads(attention(q, k, v, budget, self.qkv.matmul_dtype)))


class PixelBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int, patch: int, attn_dim: int, heads: int) -> None:
        super().__init__()
        p2 = patch * patch
        self.compress_to_attn = Linear(p2 * dim, attn_dim)
        self.expand_from_attn = Linear(attn_dim, p2 * dim)
        self.norm1 = RmsNorm(dim)
        self.norm2 = RmsNorm(dim)
        self.attn = PixelAttention(attn_dim, heads)
        self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = [Linear(cond_dim, 6 * p2 * dim)]
        self._p2 = p2
        self._dim = dim

    def _modulation(self, k: int, s: mx.array) -> mx.array:
        """Modulation ``k`` (shift_msa .. gate_mlp) for the patches ``s (n, D)``: ``(n, P*P, dim)``."""
        width = self._p2 * self._dim
        return (
            self.adaLN_modulation[0]
            .forward_rows(s, k * width, (k + 1) * width)
            .reshape(-1, self._p2, self._dim)
        )

    def __call__(self, x: mx.array, s: mx.array, batch: int, rope: Rope, budget: AttentionBudget) -> mx.array:
        """``x (B*L, P*P, dim)``, ``s (B*L, D)``; ``batch`` = B."""
        bl = x.shape[0]

        # Pass 1 (token-local): modulate, flatten [p][ch], compress to one token per patch.
        def compress(xc: mx.array, start: int) -> mx.array:
            sc = s[start : start + xc.shape[0]]
            xn = modulate(self.norm1(xc), self._modulation(0, sc), self._modulation(1, sc))
            return self.compress_to_attn(xn.reshape(xc.shape[0], -1))

        compressed = map_row_chunks(x, PATCH_ROWS, compress)
        attn_dim = compressed.shape[1]
        attn = self.attn(compressed.reshape(batch, bl // batch, attn_dim), rope, budget).reshape(bl, attn_dim)

        # Pass 2 (token-local): expand, gated residual, then the per-pixel MLP half.
        def finish(xc: mx.array, start: int) -> mx.array:
            n = xc.shape[0]
            sc = s[start : start + n]
            expanded = self.expand_from_attn(attn[start : start + n]).reshape(n, self._p2, self._dim)
            xc = gated_add(xc, self._modulation(2, sc), expanded)
            h = modulate(self.norm2(xc), self._modulation(3, sc), self._modulation(4, sc))
            return gated_add(xc, self._modulation(5, sc), self.mlp(h))

        return map_row_chunks(x, PATCH_ROWS, finish)


class FinalLayer(nn.Module):
    """``final_layer``: RMSNorm(dim) -> Linear(dim -> out_channels) per pixel."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RmsNorm(dim)
        self.linear = Linear(dim, out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.norm(x))


def fold(o: mx.array, batch: int, h: int, w: int, patch: int) -> mx.array:
    """Fold ``(B*L, P*P, C)`` pixel outputs back to an image ``(B, C, H, W)``:
    out[b, c, hs*P + ky, ws*P + kx] = o[b*L + hs*Ws + ws, ky*P + kx, c]."""
    c = o.shape[2]
    return (
        o.reshape(batch, h // patch, w // patch, patch, patch, c)
        .transpose(0, 5, 1, 3, 2, 4)
        .reshape(batch, c, h, w)
    )
