"""Small building blocks shared by every PiD module (pid_spec §3.1; mirrors ``net/layers.rs``).

Parameters stay in the checkpoint's storage dtype (bf16 halves resident memory) and are
cast at use. Activations are float32. ``matmul_dtype`` sets the precision of the matmuls and
convolutions: None (float32) for parity, or bfloat16 to round their operands as the
reference's CUDA autocast does (bf16 operands, f32 accumulation); the product stays float32
(see ``kernels::linear`` in the core).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


def _reference_blas() -> bool:
    return sys.platform == "linux" and mx.default_device() == mx.cpu


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
        """Only output features ``start:stop`` (a slice of the weight's rows); float32."""
        w = rounded(self.weight[start:stop], self.matmul_dtype)
        x = rounded(x, self.matmul_dtype)
        if _reference_blas():
            # MLX's Linux CPU wheel links the reference (netlib) BLAS, whose row-major
            # x @ W^T is ~2x slower than W @ x^T on a contiguous copy; same products and sums.
            rows = x.reshape(-1, x.shape[-1])
            y = (w @ mx.contiguous(rows.T)).T.reshape(*x.shape[:-1], w.shape[0])
        else:
            y = x @ w.T
        if "bias" in self:
            y = y + self.bias[start:stop].astype(mx.float32)
        return y


def rounded(a: mx.array, dtype: mx.Dtype | None) -> mx.array:
    """``a`` as float32, rounded to ``dtype`` first when one is given (a matmul operand)."""
    return (a.astype(dtype) if dtype is not None else a).astype(mx.float32)


class RmsNorm(nn.Module):
    """PiD RMSNorm: ``w * (x * rsqrt(mean(x^2) + eps))``, eps 1e-6 — not Gemma's (1 + w)."""

    EPS = 1e-6

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.EPS)


class Conv2d(nn.Module):
    """``nn.Conv2d`` on NHWC input; weight ``(O, KH, KW, I)`` (converted from OIHW at load).

    ``padding_mode`` "replicate" pads by repeating the border, as PyTorch's does.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, padding_mode: str = "zeros"
    ) -> None:
        super().__init__()
        self.weight = mx.zeros((cout, kernel, kernel, cin))
        self.bias = mx.zeros((cout,))
        self.matmul_dtype: mx.Dtype | None = None
        self._stride = stride
        self._padding = padding
        self._replicate = padding_mode == "replicate"

    def __call__(self, x: mx.array) -> mx.array:
        x = rounded(x, self.matmul_dtype)
        p = self._padding
        if self._replicate and p:
            x = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)], mode="edge")
            p = 0
        w = rounded(self.weight, self.matmul_dtype)
        return mx.conv2d(x, w, stride=self._stride, padding=p) + self.bias.astype(mx.float32)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(groups, C, eps)`` on NHWC input, computed in f32 (autocast's fp32 list)."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self._groups = groups
        self._eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        g = x.astype(mx.float32).reshape(b, h * w, self._groups, c // self._groups)
        g = g - g.mean(axis=(1, 3), keepdims=True)
        var = mx.square(g).mean(axis=(1, 3), keepdims=True)
        g = (g * mx.rsqrt(var + self._eps)).reshape(b, h, w, c)
        return g * self.weight.astype(mx.float32) + self.bias.astype(mx.float32)


def set_matmul_dtype(module: nn.Module, dtype: mx.Dtype | None) -> None:
    """Set the matmul/conv operand precision of every layer below ``module`` (None: float32)."""
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
