"""The shared counter-based Gaussian noise (mirrors ``rust/pid-core/src/noise.rs``).

The generator lives in the Rust core (Philox4x32-10 + Box-Muller, exposed as
``_native.gaussian_noise``), so a seed gives the same image on every backend. A value
depends only on (seed, stream, flat index): stream 0 is a decode's initial noise, stream
k + 1 the re-noising after step k.
"""

from __future__ import annotations

import mlx.core as mx

from ... import _native

INITIAL = 0


def renoise(step: int) -> int:
    """The stream of the fresh noise drawn after sampler step ``step``."""
    return step + 1


def image_noise(seed: int, stream: int, h: int, w: int, channels: int = 3) -> mx.array:
    """Standard-normal noise of ``stream`` for one image, ``(1, channels, h, w)`` f32."""
    return mx.array(_native.gaussian_noise(seed, stream, [1, channels, h, w]))
