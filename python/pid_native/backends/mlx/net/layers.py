"""Small building blocks shared by every PiD module (pid_spec §3.1; mirrors ``net/layers.rs``).

Parameters stay in the checkpoint's storage dtype (bf16 halves resident memory) and are
cast at use. ``matmul_dtype`` selects the arithmetic of the matmuls and convolutions:
float32 for parity, or bfloat16 to run them the way the reference's CUDA autocast does
(bf16 operands, f32 accumulation) while norms and residual streams stay float32.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


class Linear(nn.Module):
    """``nn.Linear``: y = x W^T + b over the last axis, weight ``(out, in)``."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = mx.zeros((out_dim, in_dim))
        if bias:
            self.bias = mx.zeros((out_dim,))
        self.matmul_dtype: mx.Dtype | None = None

    def __call__(self, x: mx.array) -> mx.array:
        return self.forward_rows(x, 0, self.weight.shape[0])

    def forward_rows(self, x: mx.array, start: int, stop: int) -> mx.array:
        """Only output features ``start:stop`` (a slice of the weight's rows)."""
        dt = self.matmul_dtype or x.dtype
        y = x.astype(dt) @ self.weight[start:stop].astype(dt).T
        if "bias" in self:
            y = y + self.bias[start:stop].astype(dt)
        return y


class RmsNorm(nn.Module):
    """PiD RMSNorm: ``w * (x * rsqrt(mean(x^2) + eps))``, eps 1e-6 — not Gemma's (1 + w)."""

    EPS = 1e-6

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.EPS)


def set_matmul_dtype(module: nn.Module, dtype: mx.Dtype | None) -> None:
    """Set the matmul/conv arithmetic of every layer below ``module`` (None: the input's dtype)."""
    for _, m in module.named_modules():
        if hasattr(m, "matmul_dtype"):
            m.matmul_dtype = dtype


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """adaLN modulation: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """``x + gate * y``, the gated residual update every block uses."""
    return x + y * gate


def map_row_chunks(x: mx.array, rows: int, f: Callable[[mx.array, int], mx.array]) -> mx.array:
    """Apply ``f(chunk, start)`` to slices of at most ``rows`` rows (axis 0) and concatenate.

    Each chunk is evaluated before the next is built, so token-local work never holds its
    widest intermediate for every token at once (MLX would otherwise schedule the whole
    lazy graph together).
    """
    n = x.shape[0]
    if n <= rows:
        return f(x, 0)
    outs = []
    for start in range(0, n, rows):
        out = f(x[start : start + rows], start)
        mx.eval(out)
        outs.append(out)
    return mx.concatenate(outs, axis=0)
