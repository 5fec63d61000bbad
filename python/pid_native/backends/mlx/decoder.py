"""The MLX decode pipeline, top to bottom (mirrors ``rust/pid-core/src/decoder.rs``).

A :class:`~pid_native.DecodeRequest` (the core checked it, plan included) -> per image: noise,
sampler (every step's velocity assembled from the plan's tiles, one for a whole-image decode)
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

import mlx.core as mx
import numpy as np

from ... import _native
from ...errors import Cancelled, InvalidInputError
from . import noise, sampler
from .caption import CaptionEncoder
from .config import NetConfig
from .net import Conditioning, PidNet
from .plan import feather
from .plan import plan as make_plan
from .sampler import StepEvent
from .vae import AutoencoderKL
from .weights import load_pidnet

EventSink = Callable[[_native.ProgressEvent], None]
Tile = tuple[int, int, int, int]  # (y, x, h, w) in output pixels

_DTYPES = {"float32": mx.float32, "f32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}


def parse_dtype(name: str, what: str) -> mx.Dtype:
    if name not in _DTYPES:
        raise InvalidInputError(f"{what} {name!r} is not supported; use 'float32' or 'bfloat16'", "dtype")
    return _DTYPES[name]


class _Steps:
    """Forwards sampler steps to the event sink."""

    def __init__(self, report: EventSink) -> None:
        self._report = report

    def before_step(self, event: StepEvent) -> None:
        self._report(_native.ProgressEvent("step", event.step + 1, event.total))

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
            dtype: matmul/conv operands, ``"float32"`` (parity) or ``"bfloat16"`` (rounded like the
                reference's CUDA autocast, with f32 accumulation and f32 everywhere else).
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

    def plan(self, batch: int, h: int, w: int, budget_bytes: int, tile: int | None = None) -> _native.Plan:
        """The memory plan for ``batch`` latents of ``h x w`` (raises BudgetError when nothing fits)."""
        weight_bytes = self.net.y_pos_embedding.dtype.size
        return make_plan(self.config, batch, h, w, weight_bytes, budget_bytes, tile)

    def encode_captions(self, captions: list[str]) -> np.ndarray:
        """Gemma-2 caption features ``[B, 300, D]`` float32 (cached per caption); needs ``gemma_dir``."""
        with self._lock:
            return self.captions.encode(list(captions))

    def decode(
        self,
        request: _native.DecodeRequest,
        on_event: EventSink | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """Decode a request made for this network's config.

        Args:
            request: latents, caption features, per-image sigma and seeds, steps and plan, checked
                by the core when it was made.
            on_event: receives a :class:`~pid_native.ProgressEvent` at every image, step and tile
                boundary.
            should_cancel: polled at the same boundaries; True stops the decode.

        Returns:
            float32 ``[B, 3, scale*h, scale*w]`` in [-1, 1].

        Raises:
            InvalidInputError: a request made for another network. Cancelled: ``should_cancel()``
            returned True.
        """
        if NetConfig.from_json(request.config) != self.config:
            raise InvalidInputError(
                "the request was made for another network config; make it with this decoder's config",
                "request",
            )

        def report(event: _native.ProgressEvent) -> None:
            if should_cancel is not None and should_cancel():
                raise Cancelled("decode cancelled")
            if on_event is not None:
                on_event(event)

        with self._lock:
            return self._decode(request, report)

    def _decode(self, request: _native.DecodeRequest, report: EventSink) -> np.ndarray:
        latents, embs = request.latents, request.caption_embs
        sigma = np.asarray(request.sigma, dtype=np.float32)
        t_list = sampler.t_ladder(request.steps)
        count = latents.shape[0]
        images = []
        for b in range(count):
            report(_native.ProgressEvent("image", b + 1, count))
            image = self._decode_one(
                mx.array(latents[b : b + 1]),
                mx.array(embs[b : b + 1]),
                mx.array(sigma[b : b + 1]),
                request.seeds[b],
                t_list,
                request.plan,
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
        plan: _native.Plan,
        report: EventSink,
    ) -> mx.array:
        """One image ``(1, 3, H, W)``: initial noise on stream 0, re-noise after step k on stream k + 1."""
        size = oh, ow = plan.height, plan.width

        def condition(tile: Tile) -> Conditioning:
            return self.net.condition_window(y, z, sigma, size, tile)

        # One tile keeps its conditioning across steps; a tiled plan rebuilds each tile's per step,
        # so it never holds every tile's LQ features at once.
        kept = condition(plan.tiles[0]) if len(plan.tiles) == 1 else None

        def velocity(x: mx.array, t: mx.array) -> mx.array:
            def tile_velocity(i: int, tile: Tile) -> mx.array:
                if len(plan.tiles) > 1:
                    report(_native.ProgressEvent("tile", i + 1, len(plan.tiles)))
                ty, tx, th, tw = tile
                cond = kept if kept is not None else condition(tile)
                return self.net.velocity(cond, x[:, :, ty : ty + th, tx : tx + tw], t)

            return blend(plan, tile_velocity)

        # Noise is drawn for the whole image from (seed, stream, pixel): no tile draws its own.
        return sampler.run(
            noise.image_noise(seed, noise.INITIAL, oh, ow),
            t_list,
            velocity,
            lambda k: noise.image_noise(seed, noise.renoise(k), oh, ow),
            _Steps(report),
        )

    def vae_encode(self, image: np.ndarray) -> np.ndarray:
        """Images ``[B, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] -> the scaled latent PiD decodes
        (needs ``vae_dir``)."""
        x = np.asarray(image, dtype=np.float32)
        with self._lock:
            return self.vae.encode(x[None] if x.ndim == 3 else x)

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        """Scaled latents ``[B, 4, h, w]`` -> the plain VAE decode ``[B, 3, 8h, 8w]`` in [-1, 1]
        (needs ``vae_dir``)."""
        with self._lock:
            return self.vae.decode(latent)


def blend(plan: _native.Plan, tile_velocity: Callable[[int, Tile], mx.array]) -> mx.array:
    """The RGB velocity ``(1, 3, H, W)`` of the plan's image from each tile's, ``tile_velocity(index,
    tile)``, weighted by a feathered window divided by the windows' sum at every pixel: the weights
    of a pixel sum to one, so identical tile velocities blend back to themselves, and a one-tile plan
    returns its tile's velocity exactly."""
    hh, ww = plan.height, plan.width
    acc = mx.zeros((1, 3, hh, ww), dtype=mx.float32)
    wsum = mx.zeros((1, 1, hh, ww), dtype=mx.float32)
    for i, tile in enumerate(plan.tiles):
        v = tile_velocity(i, tile)
        ty, tx, th, tw = tile
        fy = feather(th, ty > 0, ty + th < hh)
        fx = feather(tw, tx > 0, tx + tw < ww)
        wt = mx.array(np.outer(fy, fx))[None, None]
        acc = acc.at[:, :, ty : ty + th, tx : tx + tw].add(v * wt)
        wsum = wsum.at[:, :, ty : ty + th, tx : tx + tw].add(wt)
        mx.eval(acc, wsum)
    return acc / wsum
