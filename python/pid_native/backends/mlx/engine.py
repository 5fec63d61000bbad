"""Adapter from :class:`.decoder.MlxDecoder` to the backend registry's ``Engine`` protocol."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ... import _native
from ...errors import BackendUnavailableError, InvalidInputError
from .. import OpenSpec
from . import gpu_kind
from .decoder import MlxDecoder

_WEIGHT_DTYPES = {
    None: None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "f32": "float32",
    "float32": "float32",
}


def _device(name: str | None) -> mx.Device:
    """None: the GPU when MLX has one, else the CPU."""
    if name in (None, "gpu", "metal", "cuda"):
        if gpu_kind():
            return mx.gpu
        if name is None:
            return mx.cpu
        raise BackendUnavailableError(
            f"device {name!r} needs a GPU backend of mlx, which this host lacks; use 'cpu'"
        )
    if name == "cpu":
        return mx.cpu
    raise InvalidInputError(f"unknown mlx device {name!r}; use 'gpu' or 'cpu'", "device")


class MlxEngine:
    """A loaded MLX decoder; every call runs on the engine's device and calls serialise."""

    backend = "mlx"

    def __init__(self, decoder: MlxDecoder, device: mx.Device) -> None:
        self.decoder = decoder
        self.device = device
        self.scale = decoder.scale
        self.config = decoder.config.to_json()

    @classmethod
    def open(cls, spec: OpenSpec) -> MlxEngine:
        if spec.dtype not in _WEIGHT_DTYPES:
            raise InvalidInputError(f"dtype {spec.dtype!r} is not supported; use 'bf16' or 'f32'", "dtype")
        device = _device(spec.device)
        with mx.stream(device):
            decoder = MlxDecoder.open(
                spec.checkpoint,
                spec.gemma,
                spec.vae,
                latent_channels=spec.space.channels,
                latent_down_factor=spec.space.down_factor,
                softcap=spec.softcap,
                dtype=spec.compute_dtype or "float32",
                weight_dtype=_WEIGHT_DTYPES[spec.dtype],
            )
        return cls(decoder, device)

    def encode_captions(self, captions: list[str]) -> np.ndarray:
        with mx.stream(self.device):
            return self.decoder.encode_captions(captions)

    def free_memory(self) -> int | None:
        """None: MLX works in unified memory (or on the CPU), where available RAM is the budget."""
        return None

    def plan(self, batch: int, h: int, w: int, budget_bytes: int, tile: int | None) -> _native.Plan:
        return self.decoder.plan(batch, h, w, budget_bytes, tile)

    def decode(
        self,
        request: _native.DecodeRequest,
        progress: Callable[[_native.ProgressEvent], None] | None,
        cancel: _native.CancelToken | None,
    ) -> np.ndarray:
        with mx.stream(self.device):
            return self.decoder.decode(
                request,
                on_event=progress,
                should_cancel=(lambda: bool(cancel.cancelled)) if cancel is not None else None,
            )

    def vae_encode(self, images: np.ndarray) -> np.ndarray:
        with mx.stream(self.device):
            return self.decoder.vae_encode(images)

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        with mx.stream(self.device):
            return self.decoder.vae_decode(latents)
