"""The candle backends: the Rust extension on CPU (always) and CUDA (when compiled in)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _native
from ..errors import InvalidInputError
from . import Availability, OpenSpec


@dataclass
class CandleEngine:
    """PiD network, caption encoder and VAE of the Rust extension; all GIL-free and thread-safe."""

    decoder: Any
    captions: Any | None
    vae: Any | None
    backend: str
    device: str
    scale: int = field(init=False)
    config: str = field(init=False)

    def __post_init__(self) -> None:
        self.scale = self.decoder.scale
        self.config = self.decoder.config

    def encode_captions(self, captions: list[str]) -> np.ndarray:
        return self.captions.encode(captions)

    def free_memory(self) -> int | None:
        """Free bytes of the CUDA device (all processes); None on the CPU (available RAM applies)."""
        info = _native.device_memory(self.device)
        return None if info is None else info[0]

    def plan(self, batch: int, h: int, w: int, budget_bytes: int, tile: int | None) -> _native.Plan:
        return self.decoder.plan(batch, h, w, budget_bytes, tile)

    def decode(
        self,
        request: _native.DecodeRequest,
        progress: Callable[[_native.ProgressEvent], None] | None,
        cancel: _native.CancelToken | None,
    ) -> np.ndarray:
        return self.decoder.decode(request, progress, cancel)

    def vae_encode(self, images: np.ndarray) -> np.ndarray:
        return self.vae.encode(images)

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        return self.vae.decode(latents)


@dataclass(frozen=True)
class CandleBackend:
    name: str
    priority: int
    device: str

    def availability(self) -> Availability:
        if self.device == "cpu":
            return Availability(True, "the CPU build is always available")
        if "cuda" not in _native.build_info()["features"]:
            return Availability(
                False,
                "this build of pid-native has no CUDA support; install the CUDA build "
                '(pip install . --config-settings="maturin.build-args=--features cuda", see README)',
            )
        try:
            free, total = _native.device_memory("cuda:0")
        except Exception as exc:  # no device, or the driver refuses: say why, pick another backend
            return Availability(False, f"CUDA build, but GPU 0 cannot be opened: {exc}")
        return Availability(True, f"GPU 0 opened ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)")

    def open(self, spec: OpenSpec) -> CandleEngine:
        if spec.dtype not in (None, "bf16", "bfloat16", "f32", "float32"):
            raise InvalidInputError(f"dtype {spec.dtype!r} is not supported; use 'bf16' or 'f32'", "dtype")
        device = spec.device or ("cpu" if self.device == "cpu" else "cuda:0")
        decoder = _native.Decoder.open(
            str(spec.checkpoint),
            latent_channels=spec.space.channels,
            latent_down_factor=spec.space.down_factor,
            weight_dtype=spec.dtype or "bf16",
            device=device,
            compute_dtype=spec.compute_dtype,
        )
        captions = (
            _native.CaptionEncoder.open(str(spec.gemma), softcap=spec.softcap, device=device)
            if spec.gemma
            else None
        )
        vae = _native.Vae.open(str(spec.vae), device=device) if spec.vae else None
        return CandleEngine(decoder, captions, vae, self.name, device)


CPU = CandleBackend("candle-cpu", priority=0, device="cpu")
CUDA = CandleBackend("candle-cuda", priority=20, device="cuda")
