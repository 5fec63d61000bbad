"""The distilled few-step sampler (pid_spec §6; mirrors ``rust/pid-core/src/sampler.rs``).

Upstream ``_student_sample_loop`` (``models/pid_distill_model_infer.py:138-210, 320-357``).
Rectified flow with t = 1 as noise; the network predicts v = eps - x0. Each step estimates
x0 = x - t v in float64, then re-noises onto the path at the next t with fresh noise
(DMD2 "SDE" rollout). No CFG, no time shift.

float64: MLX implements float64 elementwise ops on the CPU device only (Metal has no f64),
so the x0 update runs on the CPU stream. On Apple silicon the memory is unified, so this
moves no data; the op is O(pixels) and negligible next to a network step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from ... import _native

f32 = np.float32


def t_ladder(steps: int) -> list[float]:
    """The t ladder for ``steps`` network evaluations (the core's upstream subsampling).

    Raises:
        InvalidInputError: steps outside 1..4 (code ``steps``).
    """
    return _native.t_ladder(steps)


@dataclass(frozen=True)
class StepEvent:
    """Progress of the loop, reported before each network evaluation."""

    step: int
    total: int
    t: float


class StepObserver(Protocol):
    """Hooks into the loop. ``before_step`` may stop it by raising (cancellation)."""

    def before_step(self, event: StepEvent) -> None: ...

    def after_step(self, step: int, x0: mx.array) -> None:
        """The x0 estimate of step ``step`` (golden traces ``x0_stepK``)."""


def x0_estimate(x: mx.array, v: mx.array, t: float) -> mx.array:
    """x0 = x - t v, evaluated in float64 like the reference and rounded to f32."""
    with mx.stream(mx.cpu):
        x0 = x.astype(mx.float64) - v.astype(mx.float64) * float(f32(t))
        return x0.astype(mx.float32)


def run(
    noise: mx.array,
    t_list: list[float],
    velocity: Callable[[mx.array, mx.array], mx.array],
    eps: Callable[[int], mx.array],
    observer: StepObserver | None = None,
) -> mx.array:
    """Run the sampler from ``noise (B, 3, H, W)``.

    Args:
        noise: the initial state (pure noise at t_list[0]).
        t_list: the ladder, ending at 0.
        velocity: ``velocity(x, t_scaled)`` evaluates the network (whole image or tiled).
        eps: ``eps(k)`` supplies the fresh noise for the re-noising after step k.
        observer: optional progress/cancel hooks.

    Returns:
        ``clamp(x0, -1, 1)`` of the last step, f32.
    """
    b = noise.shape[0]
    total = len(t_list) - 1
    x = noise.astype(mx.float32)
    for k in range(total):
        t, t_next = f32(t_list[k]), f32(t_list[k + 1])
        if observer is not None:
            observer.before_step(StepEvent(k, total, float(t)))
        v = velocity(x, mx.full((b,), t * f32(1000.0), dtype=mx.float32))
        x0 = x0_estimate(x, v, t)
        mx.eval(x0)
        if observer is not None:
            observer.after_step(k, x0)
        if t_next <= 0:
            return mx.clip(x0, -1.0, 1.0)
        x = x0 * (f32(1.0) - t_next) + eps(k).astype(mx.float32) * t_next
        mx.eval(x)
    return mx.clip(x, -1.0, 1.0)
