"""Latent spaces PiD decodes, their normalisation, and the frame conversion for partially
denoised latents.

Each space fixes what the decoder receives: the VAE latent in its *normalised* frame (the
tensor the host's own diffusion model produces, and the one PiD's student was trained on),
its channel count and spatial factor, and the noising convention its student was trained with
(pid_spec §10.1). :func:`normalise` turns the host VAE's *raw* latent into that frame. Unknown
names are errors, never a silent fallback; the RAE spaces PiD also has students for are
refused with the reason.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import InvalidInputError


class LatentSpace(BaseModel):
    """One PiD latent space.

    Attributes:
        name: canonical name (``sdxl``, ``flux``, ...).
        aliases: host model families that produce latents of this space.
        channels: channels of the latent PiD receives.
        down_factor: image pixels per latent pixel of that latent.
        raw_channels: channels of the host VAE's raw latent (flux2: 32, packed 2x2 into 128).
        normalisation: how the normalised latent relates to the raw VAE latent (see :func:`normalise`).
        noise_frame: ``vp`` (x = sqrt(1 - s^2) z + s e, SDXL) or ``flow`` (x = (1 - s) z + s e).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    aliases: tuple[str, ...]
    channels: int
    down_factor: int
    raw_channels: int
    normalisation: str
    noise_frame: Literal["vp", "flow"]

    @property
    def scale(self) -> int:
        """Output pixels per latent pixel (the latent's factor times PiD's 4)."""
        return self.down_factor * 4


# Host families and their latent spaces: upstream's backbone tags (inference/checkpoint_registry.py,
# nv-tlabs/PiD @2c8814c) plus the SDXL-VAE families SceneWorks decodes with the SDXL student.
SPACES: tuple[LatentSpace, ...] = (
    LatentSpace(
        name="sdxl",
        aliases=("sdxl", "realvisxl", "realvisxl-lightning", "kolors"),
        channels=4,
        down_factor=8,
        raw_channels=4,
        normalisation="raw * 0.13025",
        noise_frame="vp",
    ),
    LatentSpace(
        name="flux",
        aliases=("flux", "zimage", "zimage-turbo"),
        channels=16,
        down_factor=8,
        raw_channels=16,
        normalisation="(raw - 0.1159) * 0.3611",
        noise_frame="flow",
    ),
    LatentSpace(
        name="sd3",
        aliases=("sd3",),
        channels=16,
        down_factor=8,
        raw_channels=16,
        normalisation="(raw - 0.0609) * 1.5305",
        noise_frame="flow",
    ),
    LatentSpace(
        name="qwenimage",
        aliases=("qwenimage", "qwenimage-2512"),
        channels=16,
        down_factor=8,
        raw_channels=16,
        normalisation="per channel (raw - mean) / std, the VAE config's latents_mean/latents_std",
        noise_frame="flow",
    ),
    LatentSpace(
        name="flux2",
        aliases=("flux2", "flux2-klein-4b", "flux2-klein-9b"),
        channels=128,
        down_factor=16,
        raw_channels=32,
        normalisation="32 channels packed 2x2 into 128, then (z - running_mean) / sqrt(running_var + 1e-4) "
        "with the VAE's BatchNorm statistics",
        noise_frame="flow",
    ),
)

# Spaces upstream has students for (docs/checkpoints.md) that pid-native does not serve: their
# latents are the tokens of a vision encoder, which nothing here computes.
REFUSED_SPACES: dict[str, str] = {
    "dinov2": "PiD's dinov2 (RAE) student decodes DINOv2-B-with-registers tokens normalised with RAE's "
    "ImageNet statistics (upstream tokenizers/dinov2_vae.py); pid-native has neither that encoder nor "
    "those statistics, and the RAE diffusion model is not a diffusers pipeline. It is not supported",
    "siglip": "PiD's siglip (Scale-RAE) student decodes SigLIP-2 So400M tokens at 8x (upstream "
    "tokenizers/scale_rae_vae.py); pid-native has no SigLIP-2 encoder and the Scale-RAE diffusion model "
    "is not a diffusers pipeline. It is not supported",
}
REFUSED_SPACES["rae"] = REFUSED_SPACES["dinov2"]
REFUSED_SPACES["scale-rae"] = REFUSED_SPACES["siglip"]


def latent_space(name: str) -> LatentSpace:
    """The space for a canonical name or alias (case-insensitive).

    Raises:
        InvalidInputError: ``unsupported_space`` for the RAE spaces (with the reason),
            ``unknown_space`` for any other unknown name, listing the known ones.
    """
    key = name.strip().lower()
    for space in SPACES:
        if key == space.name or key in space.aliases:
            return space
    if key in REFUSED_SPACES:
        raise InvalidInputError(REFUSED_SPACES[key], "unsupported_space")
    known = ", ".join(a for s in SPACES for a in s.aliases)
    raise InvalidInputError(f"unknown latent space {name!r}; known: {known}", "unknown_space")


# What each student was trained on, raw VAE latent -> normalised (what the host's own VAE
# decode undoes). Sources: upstream nv-tlabs/PiD @2c8814c and the host VAEs' diffusers configs.
SDXL_SCALE = 0.13025  # inference/pipeline_registry.py:109; SDXL VAE config scaling_factor
FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611  # tokenizers/flux_vae.py:68-69 (encode, :319); FLUX.1 VAE config
SD3_SHIFT, SD3_SCALE = 0.0609, 1.5305  # tokenizers/flux_vae.py:74-77; SD3 VAE config shift/scaling_factor
# tokenizers/qwenimage_vae.py:38-72, "AutoencoderKLQwenImage config defaults" (diffusers 0.42.1,
# autoencoder_kl_qwenimage.py:695-696, the same numbers).
QWENIMAGE_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWENIMAGE_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# FLUX.2: BatchNorm2d(128, eps=1e-4, affine=False) over the 2x2-packed latent (tokenizers/
# flux2_vae.py:303-322; diffusers AutoencoderKLFlux2 batch_norm_eps). Its running statistics are
# weights of the VAE (``bn.running_mean``, ``bn.running_var``), not constants: see flux2_bn_stats.
FLUX2_BN_EPS = 1e-4


def pack_2x2(raw: np.ndarray) -> np.ndarray:
    """``[B, C, 2h, 2w]`` -> ``[B, 4C, h, w]``, raw channel c at offset (i, j) into channel
    ``4c + 2i + j`` (upstream flux2_vae.py:337-342, diffusers ``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = raw.shape
    tokens = raw.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4)
    return tokens.reshape(b, 4 * c, h // 2, w // 2)


def flux2_bn_stats(vae: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The BatchNorm running statistics of a FLUX.2 VAE safetensors file: ``bn.running_mean`` and
    ``bn.running_var`` (diffusers ``AutoencoderKLFlux2``, e.g. ``vae/diffusion_pytorch_model.safetensors``
    of black-forest-labs/FLUX.2-dev or -klein; BFL's own ``ae.safetensors`` uses the same names).

    Raises:
        MissingFileError: no such file. WeightsError: the file lacks the statistics.
    """
    from safetensors import safe_open

    from .errors import MissingFileError, WeightsError

    if not os.path.isfile(vae):
        raise MissingFileError(f"FLUX.2 VAE file not found: {vae}", "missing_file")
    with safe_open(str(vae), "np") as f:
        keys = set(f.keys())
        names = [next((k for k in keys if k.endswith(f"bn.running_{s}")), None) for s in ("mean", "var")]
        if None in names:
            raise WeightsError(
                f"{vae} has no bn.running_mean/bn.running_var: not a FLUX.2 VAE (AutoencoderKLFlux2) file",
                "not_flux2_vae",
            )
        mean, var = (f.get_tensor(n).astype(np.float32) for n in names)
    return mean, var


def normalise(
    space: str,
    raw: Any,
    *,
    bn: tuple[Any, Any] | None = None,
    vae: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """The host VAE's raw latent in the normalised frame the space's PiD student decodes.

    Args:
        space: latent space or model family (``flux``, ``zimage``, ``qwenimage``...).
        raw: the VAE encoder's latent (its posterior mean, what the VAE decoder takes), float
            ``[B, C, h, w]`` or ``[C, h, w]`` (qwenimage also ``[B, 16, 1, h, w]``); numpy or torch.
        bn: flux2 only: the VAE's BatchNorm ``(running_mean, running_var)`` (``pipe.vae.bn``).
        vae: flux2 only, instead of ``bn``: a FLUX.2 VAE safetensors file holding them.

    Returns:
        float32 ``[B, channels, h', w']`` (flux2: ``[B, 128, h/2, w/2]``).

    Raises:
        InvalidInputError: ``latent_channels`` (a latent of another space), ``latent_shape``,
            ``flux2_stats`` (flux2 without its statistics), ``unknown_space``.
    """
    from .decoder import tensor_to_numpy

    target = latent_space(space)
    x = np.asarray(tensor_to_numpy(raw), dtype=np.float32)
    if target.name == "qwenimage" and x.ndim == 5:
        if x.shape[2] != 1:
            raise InvalidInputError(
                f"a qwenimage latent [B, 16, T, h, w] must hold one frame (T = 1), got shape {x.shape}",
                "latent_shape",
            )
        x = x[:, :, 0]
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != target.raw_channels:
        raise InvalidInputError(
            f"a raw {target.name} VAE latent is [B, {target.raw_channels}, h, w], got shape {x.shape}"
            + _other_spaces(x.shape[1] if x.ndim == 4 else None, target.name),
            "latent_channels",
        )
    if target.name == "sdxl":
        return x * np.float32(SDXL_SCALE)
    if target.name in ("flux", "sd3"):
        shift, scale = (FLUX_SHIFT, FLUX_SCALE) if target.name == "flux" else (SD3_SHIFT, SD3_SCALE)
        return (x - np.float32(shift)) * np.float32(scale)
    if target.name == "qwenimage":
        mean = np.asarray(QWENIMAGE_MEAN, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(QWENIMAGE_STD, np.float32).reshape(1, -1, 1, 1)
        return (x - mean) / std
    # flux2
    if (bn is None) == (vae is None):
        raise InvalidInputError(
            "normalising a raw FLUX.2 latent needs the VAE's BatchNorm statistics: pass bn=(running_mean, "
            "running_var) (pipe.vae.bn) or vae=<FLUX.2 VAE .safetensors> (CLI: --flux2-vae FILE)",
            "flux2_stats",
        )
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise InvalidInputError(
            f"a raw flux2 latent packs 2x2 pixels per token: height and width must be even, got {x.shape}",
            "latent_shape",
        )
    mean, var = flux2_bn_stats(vae) if vae is not None else (np.asarray(tensor_to_numpy(v)) for v in bn)
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    var = np.asarray(var, np.float32).reshape(1, -1, 1, 1)
    if mean.shape[1] != target.channels or var.shape[1] != target.channels:
        raise InvalidInputError(
            f"FLUX.2 BatchNorm statistics have {target.channels} channels, "
            f"got {mean.shape[1]} and {var.shape[1]}",
            "flux2_stats",
        )
    return (pack_2x2(x) - mean) / np.sqrt(var + np.float32(FLUX2_BN_EPS))


def _other_spaces(channels: int | None, name: str) -> str:
    """'; is it a <space> latent? ...' for a channel count another space's raw latent has."""
    others = [s.name for s in SPACES if s.raw_channels == channels and s.name != name]
    if not others:
        return ""
    return f"; a {channels}-channel latent is a raw {' or '.join(others)} latent: pass that space instead"


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


__all__ = [
    "REFUSED_SPACES",
    "SPACES",
    "LatentSpace",
    "euler_capture_step",
    "euler_to_vp",
    "flux2_bn_stats",
    "latent_space",
    "normalise",
    "pack_2x2",
]
