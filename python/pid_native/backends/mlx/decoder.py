"""The MLX decode pipeline, top to bottom (mirrors ``rust/pid-core/src/decoder.rs``).

latent checks -> per image: conditioning, noise, sampler (whole image or tiled velocity)
-> images in [-1, 1]. Images of a batch are decoded one after another with their own seed,
sigma and caption, so a batch costs one image's working memory plus the outputs and each
image equals its single-image decode. Noise comes from the shared counter-based generator,
so a seed gives the same image as the candle backend.

:class:`MlxDecoder` also owns the optional caption encoder (Gemma-2) and SDXL VAE.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ...errors import Cancelled, InvalidInputError
from . import noise, sampler
from .caption import CaptionEncoder
from .config import NetConfig
from .net import PidNet
from .plan import Plan, feather, whole
from .plan import plan as make_plan
from .sampler import StepEvent
from .vae import AutoencoderKL
from .weights import load_pidnet

# Progress events use the candle backend's dict format: {"phase": "image"|"step"|"tile", ...}.
EventSink = Callable[[dict[str, Any]], None]

_DTYPES = {"float32": mx.float32, "f32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}


def parse_dtype(name: str, what: str) -> mx.Dtype:
    if name not in _DTYPES:
        raise InvalidInputError(f"{what} {name!r} is not supported; use 'float32' or 'bfloat16'", "dtype")
    return _DTYPES[name]


def output_size(cfg: NetConfig, h: int, w: int) -> tuple[int, int]:
    """Output size ``(H, W)`` for a latent of ``(h, w)``."""
    f = cfg.pixels_per_latent
    return h * f, w * f


def validate(
    cfg: NetConfig, latents: np.ndarray, captions: np.ndarray, sigma: np.ndarray, seeds: list[int], steps: int
) -> None:
    """Check a request before any work: ranks, channels, sizes, ranges, finiteness.

    Raises:
        InvalidInputError: naming the bad value and what to pass instead (same codes as the core).
    """
    if latents.ndim != 4:
        raise InvalidInputError(
            f"latents must be [B, C, h, w], got shape {list(latents.shape)}", "latent_rank"
        )
    b, c, h, w = latents.shape
    if 0 in (b, h, w):
        raise InvalidInputError(f"latents have an empty axis: shape {list(latents.shape)}", "latent_shape")
    if c != cfg.lq_latent_channels:
        raise InvalidInputError(
            f"latents have {c} channels but this checkpoint expects {cfg.lq_latent_channels} "
            f"(got shape {list(latents.shape)}); pass a latent of the checkpoint's latent space",
            "latent_channels",
        )
    if captions.ndim != 3 or captions.shape[0] != b or captions.shape[2] != cfg.txt_embed_dim:
        raise InvalidInputError(
            f"caption embeddings must be [{b}, N, {cfg.txt_embed_dim}], got {list(captions.shape)}",
            "caption_shape",
        )
    if sigma.shape != (b,) or len(seeds) != b:
        raise InvalidInputError(
            f"{b} latents need {b} sigmas and seeds, got {sigma.size} and {len(seeds)}", "batch"
        )
    bad = [float(s) for s in sigma if not 0.0 <= s <= 1.0]
    if bad:
        raise InvalidInputError(
            f"sigma {bad[0]} is outside [0, 1]; pass the variance-preserving noise level (0 = clean latent)",
            "sigma_range",
        )
    if any(not 0 <= s < 2**64 for s in seeds):
        raise InvalidInputError(f"seeds must be in [0, 2**64 - 1], got {seeds}", "seed_range")
    if not np.isfinite(latents).all():
        raise InvalidInputError("latents contain NaN or infinity", "latent_not_finite")
    sampler.t_ladder(steps)


class _Steps:
    """Forwards sampler steps to the event sink."""

    def __init__(self, report: EventSink) -> None:
        self._report = report

    def before_step(self, event: StepEvent) -> None:
        self._report({"phase": "step", "step": event.step, "total": event.total})

    def after_step(self, step: int, x0: mx.array) -> None:
        pass


class MlxDecoder:
    """PiD on MLX: the network, plus the caption encoder and VAE when given. Thread-safe (calls serialise).

    Open with :meth:`open`.
    """

    def __init__(
        self, net: PidNet, captions: CaptionEncoder | None = None, vae: AutoencoderKL | None = None
    ) -> None:
        self.net = net
        self.captions = captions
        self.vae = vae
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        checkpoint_path: str | os.PathLike[str],
        gemma_dir: str | os.PathLike[str] | None = None,
        vae_dir: str | os.PathLike[str] | None = None,
        *,
        latent_channels: int | None = None,
        latent_down_factor: int = 8,
        softcap: bool = False,
        dtype: str = "float32",
        weight_dtype: str | None = None,
    ) -> MlxDecoder:
        """Open and validate a PiD checkpoint (and optionally Gemma-2 and the SDXL VAE).

        Args:
            checkpoint_path: the PiD ``.safetensors`` file (bare or ``net.``-prefixed keys).
            gemma_dir: Gemma-2-2b-it directory, for :meth:`encode_captions`.
            vae_dir: diffusers SDXL VAE directory, for :meth:`vae_encode` / :meth:`vae_decode`.
            latent_channels, latent_down_factor: the latent space (needed to detect flux2 v1.5).
            softcap: apply Gemma's attention-logit softcap (the reference does not).
            dtype: matmul/conv arithmetic, ``"float32"`` (parity) or ``"bfloat16"`` (the reference's
                CUDA autocast: bf16 operands, f32 accumulation, f32 norms and residual streams).
            weight_dtype: resident weight dtype; None keeps the file's (bf16 for released checkpoints).

        Raises:
            MissingFileError, WeightsError, InvalidInputError.
        """
        compute = parse_dtype(dtype, "dtype")
        net = load_pidnet(checkpoint_path, None, latent_channels, latent_down_factor, matmul_dtype=compute)
        captions = (
            CaptionEncoder.open(gemma_dir, softcap=softcap, matmul_dtype=compute) if gemma_dir else None
        )
        vae = AutoencoderKL.open(vae_dir, matmul_dtype=compute) if vae_dir else None
        if weight_dtype is not None:
            resident = parse_dtype(weight_dtype, "weight_dtype")
            for module in (net, captions.model if captions else None, vae):
                if module is not None:
                    module.set_dtype(resident)
        return cls(net, captions, vae)

    @property
    def config(self) -> NetConfig:
        return self.net.config

    @property
    def scale(self) -> int:
        """Output pixels per latent pixel (32 for SDXL)."""
        return self.config.pixels_per_latent

    def plan(self, batch: int, h: int, w: int, budget_bytes: int, tile: int | None = None) -> Plan:
        """The memory plan for ``batch`` latents of ``h x w`` (raises BudgetError when nothing fits)."""
        weight_bytes = self.net.y_pos_embedding.dtype.size
        return make_plan(self.config, batch, h, w, weight_bytes, budget_bytes, tile)

    def encode_captions(self, captions: list[str]) -> np.ndarray:
        """Gemma-2 caption features ``[B, 300, D]`` float32 (cached per caption)."""
        if self.captions is None:
            raise InvalidInputError(
                "this decoder has no caption encoder; open it with gemma_dir=<Gemma-2-2b-it directory>, "
                "or pass caption embeddings",
                "no_caption_encoder",
            )
        with self._lock:
            return self.captions.encode(list(captions))

    def decode(
        self,
        latents: np.ndarray,
        caption_embs: np.ndarray,
        sigma: np.ndarray,
        seeds: list[int],
        steps: int = 4,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        *,
        plan: Plan | None = None,
        on_event: EventSink | None = None,
    ) -> np.ndarray:
        """Decode latents to images.

        Args:
            latents: ``[B, C, h, w]`` float32 in the checkpoint's latent frame (SDXL: raw x 0.13025).
            caption_embs: ``[B, N, D]`` caption features (see :meth:`encode_captions`).
            sigma: ``[B]`` variance-preserving noise level of each latent (0 = clean).
            seeds: one noise seed per image (0 .. 2^64 - 1).
            steps: sampler steps, 1-4 (4 is the trained schedule).
            on_step: called with ``(step, total)`` (0-based step) before each network evaluation.
            should_cancel: polled at every image, step and tile boundary; True stops the decode.
            plan: whole image or tiles (see :meth:`plan`); whole image when None.
            on_event: receives every boundary as a dict (``phase`` image/step/tile), the
                candle backend's progress format.

        Returns:
            float32 ``[B, 3, scale*h, scale*w]`` in [-1, 1].

        Raises:
            InvalidInputError: a bad argument. Cancelled: ``should_cancel()`` returned True.
        """
        lat = np.ascontiguousarray(latents, dtype=np.float32)
        embs = np.ascontiguousarray(caption_embs, dtype=np.float32)
        sig = np.asarray(sigma, dtype=np.float32).reshape(-1)
        seeds = [int(s) for s in seeds]
        validate(self.config, lat, embs, sig, seeds, steps)
        oh, ow = output_size(self.config, lat.shape[2], lat.shape[3])
        plan = plan or whole(oh, ow)
        if (plan.height, plan.width) != (oh, ow):
            raise InvalidInputError(
                f"the plan is for {plan.width}x{plan.height} but the latents decode to {ow}x{oh}", "plan"
            )

        def report(event: dict[str, Any]) -> None:
            if should_cancel is not None and should_cancel():
                raise Cancelled("decode cancelled")
            if on_event is not None:
                on_event(event)
            if on_step is not None and event["phase"] == "step":
                on_step(event["step"], event["total"])

        with self._lock:
            return self._decode(lat, embs, sig, seeds, steps, plan, report)

    def _decode(
        self,
        latents: np.ndarray,
        embs: np.ndarray,
        sigma: np.ndarray,
        seeds: list[int],
        steps: int,
        plan: Plan,
        report: EventSink,
    ) -> np.ndarray:
        t_list = sampler.t_ladder(steps)
        count = latents.shape[0]
        images = []
        for b in range(count):
            report({"phase": "image", "index": b, "count": count})
            image = self._decode_one(
                mx.array(latents[b : b + 1]),
                mx.array(embs[b : b + 1]),
                mx.array(sigma[b : b + 1]),
                seeds[b],
                t_list,
                plan,
                report,
            )
            images.append(np.array(image))
        return np.concatenate(images, axis=0)

    def _decode_one(
        self,
        z: mx.array,
        y: mx.array,
        sigma: mx.array,
        seed: int,
        t_list: list[float],
        plan: Plan,
        report: EventSink,
    ) -> mx.array:
        """One image ``(1, 3, H, W)``: initial noise on stream 0, re-noise after step k on stream k + 1."""
        oh, ow = plan.height, plan.width
        if plan.is_whole:
            cond = self.net.condition(y, z, sigma, (oh, ow))

            def velocity(x: mx.array, t: mx.array) -> mx.array:
                return self.net.velocity(cond, x, t)
        else:

            def velocity(x: mx.array, t: mx.array) -> mx.array:
                return self._tiled_velocity(plan, z, y, sigma, x, t, report)

        return sampler.run(
            noise.image_noise(seed, noise.INITIAL, oh, ow),
            t_list,
            velocity,
            lambda k: noise.image_noise(seed, noise.renoise(k), oh, ow),
            _Steps(report),
        )

    def _tiled_velocity(
        self,
        plan: Plan,
        z: mx.array,
        y: mx.array,
        sigma: mx.array,
        x: mx.array,
        t: mx.array,
        report: EventSink,
    ) -> mx.array:
        """The whole image's velocity assembled from per-tile forwards, blended with a feathered window.

        Each tile sees its aligned slice of the latent and is conditioned as an image of its own
        size; its conditioning is rebuilt per step so tiled decodes never hold every tile's LQ features.
        """
        f = self.scale
        hh, ww = plan.height, plan.width
        acc = mx.zeros((1, 3, hh, ww), dtype=mx.float32)
        wsum = mx.zeros((1, 1, hh, ww), dtype=mx.float32)
        for i, tile in enumerate(plan.tiles):
            report({"phase": "tile", "tile": i, "tiles": len(plan.tiles)})
            ty, tx, th, tw = tile.y, tile.x, tile.h, tile.w
            zt = z[:, :, ty // f : (ty + th) // f, tx // f : (tx + tw) // f]
            cond = self.net.condition(y, zt, sigma, (th, tw))
            v = self.net.velocity(cond, x[:, :, ty : ty + th, tx : tx + tw], t)
            fy = feather(th, ty > 0, ty + th < hh)
            fx = feather(tw, tx > 0, tx + tw < ww)
            wt = mx.array(np.outer(fy, fx))[None, None]
            acc = acc.at[:, :, ty : ty + th, tx : tx + tw].add(v * wt)
            wsum = wsum.at[:, :, ty : ty + th, tx : tx + tw].add(wt)
            mx.eval(acc, wsum)
        return acc / wsum

    def _require_vae(self) -> AutoencoderKL:
        if self.vae is None:
            raise InvalidInputError(
                "this decoder has no SDXL VAE; open it with vae_dir=<diffusers VAE directory>", "no_vae"
            )
        return self.vae

    def vae_encode(self, image: np.ndarray) -> np.ndarray:
        """Images ``[B, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] -> the scaled latent PiD decodes."""
        x = np.asarray(image, dtype=np.float32)
        with self._lock:
            return self._require_vae().encode(x[None] if x.ndim == 3 else x)

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        """Scaled latents ``[B, 4, h, w]`` -> the plain VAE decode ``[B, 3, 8h, 8w]`` in [-1, 1]."""
        with self._lock:
            return self._require_vae().decode(latent)
