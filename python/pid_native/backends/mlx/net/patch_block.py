"""MMDiT dual-stream patch block, ``patch_blocks.{i}`` (pid_spec §3.5; mirrors ``net/patch_block.rs``).

Upstream ``MMDiTBlockT2I`` / ``MMDiTJointAttention`` (``pixeldit_official.py:550-728``).
Image tokens ``x (B, L, D)`` and text tokens ``y (B, Nt, D)`` each get their own adaLN,
norms, QKV and MLP, and attend jointly over [text; image] with no mask.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import AttentionBudget, Rope, apply_rope, attention, merge_heads, split_heads
from .layers import Linear, RmsNorm, gated_add, map_row_chunks, modulate

# Rows of token-local work (MLP) processed at once; bounds the SwiGLU hidden.
TOKEN_ROWS = 8192


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, d = x.shape
        rows = map_row_chunks(
            x.reshape(b * n, d), TOKEN_ROWS, lambda r, _: self.w2(nn.silu(self.w1(r)) * self.w3(r))
        )
        return rows.reshape(b, n, d)


class JointAttention(nn.Module):
    """``attn``: per-stream QKV and q/k RMSNorm, joint attention over [text; image], per-stream output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        head_dim = dim // heads
        self.qkv_x = Linear(dim, 3 * dim, bias=False)
        self.qkv_y = Linear(dim, 3 * dim, bias=False)
        self.q_norm_x = RmsNorm(head_dim)
        self.k_norm_x = RmsNorm(head_dim)
        self.q_norm_y = RmsNorm(head_dim)
        self.k_norm_y = RmsNorm(head_dim)
        self.proj_x = Linear(dim, dim)
        self.proj_y = Linear(dim, dim)
        self._heads = heads

    def _qkv(
        self, x: mx.array, qkv: Linear, q_norm: RmsNorm, k_norm: RmsNorm, rope: Rope | None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """``x (B, N, D)`` -> q, k, v each ``(B, H, N, d)``; q and k normed and rotated."""
        q, k, v = mx.split(qkv(x), 3, axis=-1)
        q = q_norm(split_heads(q, self._heads))
        k = k_norm(split_heads(k, self._heads))
        v = split_heads(v, self._heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def __call__(
        self,
        x: mx.array,
        y: mx.array,
        rope_img: Rope,
        rope_txt: Rope | None,
        text_out: bool,
        budget: AttentionBudget,
    ) -> tuple[mx.array, mx.array | None]:
        """Projected attention outputs for both streams; the text one only when ``text_out``."""
        qx, kx, vx = self._qkv(x, self.qkv_x, self.q_norm_x, self.k_norm_x, rope_img)
        qy, ky, vy = self._qkv(y, self.qkv_y, self.q_norm_y, self.k_norm_y, rope_txt)
        k = mx.concatenate([ky, kx], axis=2)
        v = mx.concatenate([vy, vx], axis=2)
        dtype = self.qkv_x.matmul_dtype
        if not text_out:
            return self.proj_x(merge_heads(attention(qx, k, v, budget, dtype))), None
        nt = y.shape[1]
        out = attention(mx.concatenate([qy, qx], axis=2), k, v, budget, dtype)
        return self.proj_x(merge_heads(out[:, :, nt:])), self.proj_y(merge_heads(out[:, :, :nt]))


class PatchBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_hidden: int) -> None:
        super().__init__()
        self.norm_x1 = RmsNorm(dim)
        self.norm_y1 = RmsNorm(dim)
        self.norm_x2 = RmsNorm(dim)
        self.norm_y2 = RmsNorm(dim)
        self.attn = JointAttention(dim, heads)
        self.mlp_x = FeedForward(dim, ffn_hidden)
        self.mlp_y = FeedForward(dim, ffn_hidden)
        self.adaLN_modulation_img = [Linear(dim, 6 * dim)]
        self.adaLN_modulation_txt = [Linear(dim, 6 * dim)]

    def __call__(
        self,
        x: mx.array,
        y: mx.array,
        c: mx.array,
        rope_img: Rope,
        rope_txt: Rope | None,
        text_out: bool,
        budget: AttentionBudget,
    ) -> tuple[mx.array, mx.array | None]:
        """One block. ``c (B, D)`` is SiLU(t_emb). With ``text_out = False`` (the last block) the
        text stream's update is skipped: nothing downstream reads it (pid_spec §3.5)."""
        # (B, 1, D) chunks in order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        mod_x = mx.split(self.adaLN_modulation_img[0](c[:, None]), 6, axis=-1)
        mod_y = mx.split(self.adaLN_modulation_txt[0](c[:, None]), 6, axis=-1)

        xn = modulate(self.norm_x1(x), mod_x[0], mod_x[1])
        yn = modulate(self.norm_y1(y), mod_y[0], mod_y[1])
        attn_x, attn_y = self.attn(xn, yn, rope_img, rope_txt, text_out, budget)

        x = gated_add(x, mod_x[2], attn_x)
        x = gated_add(x, mod_x[5], self.mlp_x(modulate(self.norm_x2(x), mod_x[3], mod_x[4])))
        if attn_y is None:
            return x, None
        y = gated_add(y, mod_y[2], attn_y)
        y = gated_add(y, mod_y[5], self.mlp_y(modulate(self.norm_y2(y), mod_y[3], mod_y[4])))
        return x, y
