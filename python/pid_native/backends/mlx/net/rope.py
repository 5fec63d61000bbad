"""Positional tables (pid_spec §3.3, §3.4 step 5; mirrors ``net/rope.rs``).

2-D NTK RoPE for image tokens, 1-D RoPE for text tokens and the absolute pixel sin-cos
embedding. Each table is computed in NumPy with the same floating-point steps as the
reference (``pixeldit_official.py:32-200``, ``:1345-1357``), then handed to MLX.
Transcendentals of f32 values are evaluated in f64 and rounded once, which reproduces a
correctly rounded libm: NumPy's own f32 SIMD ``exp``/``power``/``cos`` are off by an ulp
or two, and at RoPE angles up to 16 rad (timestep angles up to 999) an ulp matters.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

f32 = np.float32


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in f32, including its symmetric two-sided evaluation."""
    if steps == 1:
        return np.array([start], dtype=f32)
    step = (f32(end) - f32(start)) / f32(steps - 1)
    i = np.arange(steps)
    low = f32(start) + step * i.astype(f32)
    high = f32(end) - step * (steps - i - 1).astype(f32)
    return np.where(i < steps // 2, low, high).astype(f32)


def unary_f32(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``f`` of f32 values, correctly rounded back to f32 (evaluated in f64)."""
    return f(np.asarray(x, dtype=np.float64)).astype(f32)


def pow_f32(base: np.float32, exps: np.ndarray) -> np.ndarray:
    """``base.powf(e)`` per exponent, correctly rounded to f32."""
    return np.power(np.float64(base), exps.astype(np.float64)).astype(f32)


def _tables(angles: np.ndarray) -> tuple[mx.array, mx.array]:
    return mx.array(unary_f32(np.cos, angles)), mx.array(unary_f32(np.sin, angles))


def image_rope(
    head_dim: int, grid: tuple[int, int], rows: range, cols: range, ref_grid: tuple[int, int], mode: str
) -> tuple[mx.array, mx.array]:
    """cos/sin tables ``(len(rows) * len(cols), head_dim/2)`` for interleaved-pair RoPE over the
    tokens ``rows x cols`` (a tile's, or all) of an ``hs x ws`` token grid.

    Pair 2k rotates by x_pos * w_k(theta_w), pair 2k+1 by y_pos * w_k(theta_h); positions are
    ``linspace(0, 16, n)`` over the whole grid and theta is NTK-scaled per axis of the whole
    grid against the reference grid, so a tile's tokens rotate as in the whole image.
    """
    hs, ws = grid
    axis_dim = head_dim / 2

    def ntk(n: int, reference: int) -> float:
        if mode == "ntk_aware" and axis_dim > 2:
            return (n / reference) ** (axis_dim / (axis_dim - 2))
        return 1.0

    theta_h = f32(10_000.0 * ntk(hs, ref_grid[0]))
    theta_w = f32(10_000.0 * ntk(ws, ref_grid[1]))
    exps = (4 * np.arange(head_dim // 4)).astype(f32) / f32(head_dim)
    fw = f32(1.0) / pow_f32(theta_w, exps)
    fh = f32(1.0) / pow_f32(theta_h, exps)
    xs = linspace_f32(0.0, 16.0, ws)[cols.start : cols.stop]
    ys = linspace_f32(0.0, 16.0, hs)[rows.start : rows.stop]
    rh, rw = len(ys), len(xs)
    ax = np.broadcast_to((xs[:, None] * fw)[None], (rh, rw, head_dim // 4))  # (rows, cols, d/4)
    ay = np.broadcast_to((ys[:, None] * fh)[:, None], (rh, rw, head_dim // 4))
    angles = np.stack([ax, ay], axis=-1).reshape(rh * rw, head_dim // 2)  # x first, then y
    return _tables(angles)


def text_rope(head_dim: int, length: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos/sin tables ``(length, head_dim/2)``: integer positions, pair j at pos * theta^(-2j/d)."""
    exps = (2 * np.arange(head_dim // 2)).astype(f32) / f32(head_dim)
    freqs = f32(1.0) / pow_f32(f32(theta), exps)
    return _tables(np.arange(length).astype(f32)[:, None] * freqs)


def pixel_sincos(dim: int, rows: range, cols: range) -> mx.array:
    """Absolute 2-D sin-cos embedding of the pixels ``rows x cols`` (a tile's, or the whole
    image's), ``(len(rows), len(cols), dim)``, computed in f64 like the reference.

    For pixel (row r, col q): [sin(q w), cos(q w), sin(r w), cos(r w)] with w_k = 10000^(-k / (dim/4)).
    """
    quarter = dim // 4
    omega = 1.0 / np.power(10_000.0, np.arange(quarter, dtype=np.float64) / quarter)

    def axis(positions: range) -> np.ndarray:
        a = np.arange(positions.start, positions.stop, dtype=np.float64)[:, None] * omega
        return np.concatenate([np.sin(a), np.cos(a)], axis=1).astype(f32)  # (n, dim/2)

    h, w = len(rows), len(cols)
    col_table, row_table = axis(cols), axis(rows)
    table = np.concatenate(
        [
            np.broadcast_to(col_table[None], (h, w, 2 * quarter)),
            np.broadcast_to(row_table[:, None], (h, w, 2 * quarter)),
        ],
        axis=-1,
    )
    return mx.array(np.ascontiguousarray(table))
