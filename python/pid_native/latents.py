"""Latent spaces PiD decodes, and the frame conversion for partially denoised latents.

Each space fixes what the decoder receives: the VAE latent in its *normalised* frame
(the tensor the model's own VAE decoder would get), its channel count and spatial factor,
and the noising convention its student was trained with (pid_spec §10.1). Unknown names
are errors, never a silent fallback.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import InvalidInputError


class LatentSpace(BaseModel):
    """One PiD latent space.

    Attributes:
        name: canonical name (``sdxl``, ``flux``, ...).
        aliases: host model families that produce latents of this space.
        channels: channels of the latent PiD receives.
        down_factor: image pixels per latent pixel of the source model's VAE.
        normalisation: how the normalised latent relates to the raw VAE latent.
        noise_frame: ``vp`` (x = sqrt(1 - s^2) z + s e, SDXL) or ``flow`` (x = (1 - s) z + s e).
        checkpoint: file name of the released 4x student for this space.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    aliases: tuple[str, ...]
    channels: int
    down_factor: int
    normalisation: str
    noise_frame: Literal["vp", "flow"]
    checkpoint: str

    @property
    def scale(self) -> int:
        """Output pixels per latent pixel (the VAE factor times PiD's 4x)."""
        return self.down_factor * 4


SPACES: tuple[LatentSpace, ...] = (
    LatentSpace(
        name="sdxl",
        aliases=("sdxl", "realvisxl", "realvisxl-lightning", "kolors"),
        channels=4,
        down_factor=8,
        normalisation="raw * 0.13025",
        noise_frame="vp",
        checkpoint="pid_sdxl_2kto4k.safetensors",
    ),
    LatentSpace(
        name="flux",
        aliases=("flux", "zimage", "zimage-turbo"),
        channels=16,
        down_factor=8,
        normalisation="(raw - 0.1159) * 0.3611",
        noise_frame="flow",
        checkpoint="pid_flux_2kto4k_v1pt5.safetensors",
    ),
    LatentSpace(
        name="sd3",
        aliases=("sd3",),
        channels=16,
        down_factor=8,
        normalisation="(raw - 0.0609) * 1.5305",
        noise_frame="flow",
        checkpoint="pid_sd3_2kto4k.safetensors",
    ),
    LatentSpace(
        name="qwenimage",
        aliases=("qwenimage", "qwenimage-2512"),
        channels=16,
        down_factor=8,
        normalisation="per-channel (raw - mean) / std from the VAE",
        noise_frame="flow",
        checkpoint="pid_qwenimage_2kto4k.safetensors",
    ),
    LatentSpace(
        name="flux2",
        aliases=("flux2", "flux2-klein-4b", "flux2-klein-9b"),
        channels=128,
        down_factor=16,
        normalisation="32 channels packed 2x2 into 128, BatchNorm running statistics",
        noise_frame="flow",
        checkpoint="pid_flux2_2kto4k_v1pt5.safetensors",
    ),
)


def latent_space(name: str) -> LatentSpace:
    """The space for a canonical name or alias (case-insensitive).

    Raises:
        InvalidInputError: for an unknown name (code ``unknown_space``), listing the known ones.
    """
    key = name.strip().lower()
    for space in SPACES:
        if key == space.name or key in space.aliases:
            return space
    known = ", ".join(a for s in SPACES for a in s.aliases)
    raise InvalidInputError(f"unknown latent space {name!r}; known: {known}", "unknown_space")


def euler_to_vp(latents: np.ndarray, sigma_euler: float) -> tuple[np.ndarray, float]:
    """Convert an early-stopped Euler (variance-exploding) SDXL latent to PiD's VP frame.

    diffusers' ``EulerDiscreteScheduler`` keeps x = z + s e; PiD's SDXL student expects
    x = sqrt(1 - s_vp^2) z + s_vp e. Dividing by sqrt(s^2 + 1) maps one to the other
    (the same scaling as ``scale_model_input``), with s_vp = s / sqrt(s^2 + 1).

    Returns:
        ``(latents_vp, sigma_vp)``.
    """
    if not np.isfinite(sigma_euler) or sigma_euler < 0:
        raise InvalidInputError(f"sigma_euler must be finite and >= 0, got {sigma_euler}", "sigma_range")
    norm = float(np.sqrt(sigma_euler * sigma_euler + 1.0))
    return (np.asarray(latents, dtype=np.float32) / np.float32(norm)), float(sigma_euler / norm)


def euler_capture_step(sigmas: np.ndarray | list[float], ceiling: float) -> int | None:
    """The first step k >= 1 of an Euler schedule whose VP noise level is <= ``ceiling``.

    ``sigmas`` is the scheduler's sigma list (descending, ending at 0). Stopping the
    host's denoise after step k (so the latent is at ``sigmas[k]``) and decoding with PiD
    at that level skips the remaining steps. Returns None when no step qualifies.
    """
    if not np.isfinite(ceiling) or ceiling <= 0:
        return None
    s = np.asarray(sigmas, dtype=np.float64)
    vp = s / np.sqrt(s * s + 1.0)
    for k in range(1, len(s)):
        if 0 < vp[k] <= ceiling:
            return k
    return None


__all__ = ["SPACES", "LatentSpace", "euler_capture_step", "euler_to_vp", "latent_space"]
