"""Type stubs for the compiled extension ``pid_native._native`` (rust/pid-native-py)."""

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

F32 = npt.NDArray[np.float32]

def build_info() -> dict[str, Any]: ...
def checkpoint_layout(config: str) -> list[tuple[str, list[int]]]: ...
def preset_config(name: str) -> str: ...
def normalize_config(config: str) -> str: ...
def inspect_checkpoint(
    path: str | PathLike[str],
    config: str | None = None,
    latent_channels: int | None = None,
    latent_down_factor: int = 8,
) -> str: ...
def plan_decode(
    config: str, batch: int, h: int, w: int, weight_bytes: int, budget_bytes: int, tile: int | None = None
) -> dict[str, Any]: ...
def feather(length: int, ramp_start: bool, ramp_end: bool) -> list[float]: ...
def t_ladder(steps: int) -> list[float]: ...
def check_safetensors(paths: Sequence[str | PathLike[str]]) -> None: ...
def gaussian_noise(seed: int, stream: int, shape: Sequence[int]) -> F32: ...

class CancelToken:
    def __init__(self) -> None: ...
    def cancel(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...

class PidNet:
    @staticmethod
    def open(
        path: str | PathLike[str],
        config: str | None = None,
        latent_channels: int | None = None,
        latent_down_factor: int | None = None,
        weight_dtype: str = "bf16",
    ) -> PidNet: ...
    @property
    def config(self) -> str: ...
    def forward(
        self, x: F32, t: F32, y: F32, lq_latent: F32, sigma: F32, trace: bool = False
    ) -> F32 | tuple[F32, dict[str, F32]]: ...
    def sample(
        self, noise: F32, eps: Sequence[F32], y: F32, lq_latent: F32, sigma: F32, t_list: Sequence[float]
    ) -> tuple[F32, list[F32]]: ...

class Decoder:
    @staticmethod
    def open(
        checkpoint: str | PathLike[str],
        latent_channels: int | None = None,
        latent_down_factor: int = 8,
        weight_dtype: str = "bf16",
        device: str = "cpu",
    ) -> Decoder: ...
    @property
    def config(self) -> str: ...
    @property
    def scale(self) -> int: ...
    def plan(self, batch: int, h: int, w: int, budget_bytes: int, tile: int | None = None) -> dict[str, Any]: ...
    def decode(
        self,
        latents: F32,
        caption_embs: F32,
        sigma: Sequence[float],
        seeds: Sequence[int],
        steps: int,
        budget_bytes: int,
        tile: int | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        cancel: CancelToken | None = None,
    ) -> F32: ...
