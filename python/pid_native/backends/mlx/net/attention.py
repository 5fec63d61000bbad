"""Scaled dot-product attention with bounded memory and kernel time (pid_spec §3.1, §7).

Mirrors ``net/attention.rs``. PiD attends without a mask everywhere. Two MLX facts shape
this module:

- ``mx.fast.scaled_dot_product_attention`` has a fused (flash-style) Metal kernel only for
  head dims 64, 80 and 128; any other dim, and every CPU call, falls back to matmul +
  softmax, which materialises the ``(B, H, Lq, Lk)`` scores. The PiT blocks use head dim
  72, so on Metal q, k and v are zero-padded to 80: padded q·k products and the padded
  output columns are exactly zero, and the scale stays 1/sqrt(72), so this is exact.
- Queries are processed in chunks, each evaluated before the next: on the fallback path
  this bounds the score block (a 4096² decode would need ~200 GB at once); on the fused
  path it bounds one kernel's duration (Metal aborts command buffers that run too long).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

# cos/sin tables (L, head_dim / 2) of one rotary embedding.
Rope = tuple[mx.array, mx.array]

# Head dims with a fused Metal kernel (mlx 0.32, ``ScaledDotProductAttention::use_fallback``).
FUSED_HEAD_DIMS = (64, 80, 128)


@dataclass(frozen=True)
class AttentionBudget:
    """Limits of one attention call.

    Attributes:
        score_bytes: bytes the fallback path's scores and probabilities may take together.
        fused_flops: FLOPs one fused-kernel call may do (2^40 is well under a second on any
            Apple GPU, far below the command-buffer watchdog).
        pad_head_dim: pad the head dim to the next fused size; None decides by device
            (Metal only, where the padding buys the fused kernel).
    """

    score_bytes: int = 256 << 20
    fused_flops: int = 1 << 40
    pad_head_dim: bool | None = None


def _on_metal() -> bool:
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def padded_head_dim(d: int) -> int:
    """The smallest fused head dim >= d, or d itself when none is."""
    return next((f for f in FUSED_HEAD_DIMS if f >= d), d)


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    budget: AttentionBudget = AttentionBudget(),
    dtype: mx.Dtype | None = None,
) -> mx.array:
    """softmax(q k^T / sqrt(d)) v for ``q (B, H, Lq, d)`` and ``k, v (B, H, Lk, d)``; ``(B, H, Lq, d)``.

    With ``dtype`` (bfloat16) q, k and v are rounded to it and so is the result, the scores and
    softmax staying float32 and the probabilities rounded for the value product, as flash
    attention (and the core's) computes; the fused Metal kernel does the same.
    """
    if dtype is not None:
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    pad = budget.pad_head_dim if budget.pad_head_dim is not None else _on_metal()
    dp = padded_head_dim(d) if pad else d
    if dp != d:
        widths = [(0, 0), (0, 0), (0, 0), (0, dp - d)]
        q, k, v = (mx.pad(a, widths) for a in (q, k, v))
    fused = _on_metal() and dp in FUSED_HEAD_DIMS
    per_row = 4 * b * h * lk * dp if fused else 2 * b * h * lk * 4
    rows = max(1, (budget.fused_flops if fused else budget.score_bytes) // per_row)

    def block(qc: mx.array) -> mx.array:
        if fused or q.dtype == mx.float32:
            return mx.fast.scaled_dot_product_attention(qc, k, v, scale=scale)
        # The unfused path would round the scores to q's dtype: keep them f32.
        scores = (qc.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
        probs = mx.softmax(scores, axis=-1).astype(v.dtype).astype(mx.float32)
        return (probs @ v.astype(mx.float32)).astype(v.dtype)

    if rows >= lq:
        out = block(q)
    else:
        outs = []
        for start in range(0, lq, rows):
            o = block(q[:, :, start : start + rows])
            mx.eval(o)
            outs.append(o)
        out = mx.concatenate(outs, axis=2)
    return out[..., :d] if dp != d else out


def split_heads(x: mx.array, heads: int) -> mx.array:
    """``(B, L, H * d)`` -> ``(B, H, L, d)``."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """``(B, H, L, d)`` -> ``(B, L, H * d)``."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Interleaved-pair rotation of ``x (B, H, L, d)`` by tables ``(L, d/2)``, in f32, back to x's dtype."""
    shape = x.shape
    pairs = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)
