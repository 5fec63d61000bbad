"""The user-facing decoder: open once, decode latents (or upscale images) many times.

Data flow of :meth:`Decoder.decode`: latents converted and the call's arguments typed ->
the memory plan, made once before any allocation -> captions encoded (Gemma-2, cached) ->
a :class:`DecodeRequest` (the core checks it, once, against the network, plan included) ->
the backend runs the 4-step sampler (whole image or tiles) -> images in [-1, 1].
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import _native, backends
from .errors import InvalidInputError, MissingFileError
from .latents import SPACES, LatentSpace
from .memory import resolve_budget
from .students import Student, identify

CancelToken = _native.CancelToken
DecodeRequest = _native.DecodeRequest
ProgressEvent = _native.ProgressEvent

ProgressCallback = Callable[[ProgressEvent], None]

MAX_SEED = 2**64 - 1


class DecodeParams(BaseModel):
    """Per-call options, validated before any work."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    captions: list[str]
    sigma: list[float]
    seeds: list[int]
    steps: int = Field(ge=1, le=4)

    @field_validator("sigma")
    @classmethod
    def _sigma_range(cls, v: list[float]) -> list[float]:
        for s in v:
            if not (0.0 <= s <= 1.0):  # also rejects NaN
                raise ValueError(
                    f"sigma {s} is outside [0, 1]; pass the VP noise level of the latent (0 = clean)"
                )
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed {s} is outside [0, 2**64 - 1]")
        return v


def _per_image(value: Any, batch: int, name: str) -> list[Any]:
    """A scalar broadcast to the batch, or a sequence that must have one entry per latent."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        return [value] * batch
    items = list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
    if len(items) != batch:
        raise InvalidInputError(
            f"{name} has {len(items)} entries but there are {batch} latents", f"{name}_count"
        )
    return items


def tensor_to_numpy(value: Any) -> Any:
    """A torch tensor (any device, any float dtype) as a float32 numpy array; anything else as is.

    torch is looked up, never imported: a tensor cannot exist unless its caller imported it.
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if value.is_floating_point():
        value = value.to(device="cpu", dtype=torch.float32)  # numpy has no bfloat16
    return value.cpu().numpy()


def as_latents(latents: Any) -> np.ndarray:
    """Latents as float32 ``[B, C, h, w]``: numpy float16/float32/bfloat16 (ml_dtypes) arrays of
    rank 3 or 4, torch tensors (CPU or CUDA, any float dtype), or anything with ``__array__``.
    Whether they fit the network is the core's check (:class:`DecodeRequest`).

    Raises:
        InvalidInputError: not an array of floats of rank 3 or 4 (naming the problem and the fix).
    """
    try:
        arr = np.asarray(tensor_to_numpy(latents))
    except Exception as exc:
        raise InvalidInputError(
            f"latents must be a numpy array, got {type(latents).__name__}", "latent_type"
        ) from exc
    if arr.dtype.kind not in "f" and arr.dtype.name != "bfloat16":
        raise InvalidInputError(
            f"latents must be floating point (float16/float32/bfloat16), got dtype {arr.dtype}",
            "latent_dtype",
        )
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise InvalidInputError(
            f"latents must be [B, C, h, w] or [C, h, w], got shape {arr.shape}", "latent_rank"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass(frozen=True)
class Plan:
    """How a decode will run: whole image, or tiles of the velocity forward."""

    width: int
    height: int
    whole: bool
    tiles: list[tuple[int, int, int, int]]
    predicted_peak_bytes: int
    budget_bytes: int
    budget_source: str


class Decoder:
    """A PiD decoder on one backend. Safe to share between threads.

    Open with :meth:`open`; decode latents with :meth:`decode`, or upscale an image with
    :meth:`upscale`. Decoded images are under the NVIDIA License (NSCLv1): research and
    evaluation only.
    """

    def __init__(
        self,
        engine: backends.Engine,
        space: LatentSpace,
        memory_budget: float | None,
        *,
        has_gemma: bool,
        has_vae: bool,
        student: Student | None = None,
    ) -> None:
        self._engine = engine
        self.space = space
        self.student = student
        self.memory_budget = memory_budget
        self._has_gemma = has_gemma
        self._has_vae = has_vae

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        backend: str = "auto",
        device: str | None = None,
        gemma: str | os.PathLike[str] | None = None,
        vae: str | os.PathLike[str] | None = None,
        dtype: str | None = None,
        compute_dtype: str | None = None,
        memory_budget: float | None = None,
        space: str | None = None,
        softcap: bool = False,
        student: str | None = None,
    ) -> Decoder:
        """Open a PiD checkpoint file or a provisioned bundle directory.

        Which student the checkpoint is (its latent space and variant) comes from its tensors
        and its name (see :func:`pid_native.students.identify`); ``space`` or ``student`` say it
        where the file does not, and must agree with it.

        Args:
            path: a PiD checkpoint (a converted ``.safetensors``, the ``*.safetensors.index.json``
                of a sharded one, or upstream's ``model_ema_bf16.pth`` as published, read without
                pickle), or a bundle directory written by
                ``pid-native fetch`` / ``pid_native.provision()`` (checkpoint + ``gemma/`` + ``vae/``).
            backend: ``"auto"``, ``"candle-cpu"``, ``"candle-cuda"``, ``"mlx"`` or a registered name.
            device: backend device string (``"cpu"``, ``"cuda:0"``); the backend's default if None.
            gemma: Gemma-2-2b-it directory (config.json, tokenizer.json, safetensors); overrides the bundle's.
            vae: SDXL VAE directory (config.json, diffusion_pytorch_model.safetensors); only for upscaling.
            dtype: resident weight dtype (``"bf16"`` default, or ``"f32"``).
            compute_dtype: arithmetic of the network: ``"f32"``, ``"bf16"`` (CUDA, MLX) or ``"f16"``
                (candle); None: the backend's default (f32 on the CPU, bf16 on CUDA).
            memory_budget: GiB a decode may use; else ``PID_MEMORY_BUDGET_GIB``, else free memory.
            space: latent space or model family (``sdxl``, ``kolors``, ``flux``...); the bundle's by default.
            softcap: apply Gemma's attention-logit softcap (the reference does not; off by default).
            student: the released student, ``<space>-<variant>`` (``flux-2k``, ``sd3-2kto4k``...);
                the bundle's by default.

        Raises:
            MissingFileError: listing every missing file and how to provision it.
            WeightsError: a file is corrupt, truncated, not a PiD checkpoint, a ``.pth`` holding
                anything but tensors, a deprecated student.
            InvalidInputError: a checkpoint of another space or student than asked (``wrong_space``,
                ``wrong_student``), or one whose space its name and tensors leave open (``ambiguous_space``).
            BackendUnavailableError: the backend cannot run here (with the reason).
        """
        path = Path(path)
        if path.is_dir():
            from .provisioning.bundle import load_bundle

            bundle = load_bundle(path)
            checkpoint = bundle.checkpoint
            space = space or bundle.space
            student = student or bundle.student
            gemma = gemma if gemma is not None else bundle.gemma
            vae = vae if vae is not None else bundle.vae
        else:
            checkpoint = path
        missing = [
            f"{what}: {p}"
            for what, p in (("checkpoint", checkpoint), ("gemma", gemma), ("vae", vae))
            if p is not None and not Path(p).exists()
        ]
        if missing:
            raise MissingFileError(
                "cannot open the decoder, missing: "
                + "; ".join(missing)
                + ". Run `pid-native fetch --accept-license` to provision the weights, "
                "or pass existing paths.",
                "missing_file",
            )
        identity = identify(checkpoint, space=space, student_name=student)
        spec = backends.OpenSpec(
            checkpoint=Path(checkpoint),
            space=identity.space,
            gemma=Path(gemma) if gemma is not None else None,
            vae=Path(vae) if vae is not None else None,
            device=device,
            dtype=dtype,
            compute_dtype=compute_dtype,
            softcap=softcap,
        )
        engine = backends.get(backend).open(spec)
        return cls(
            engine,
            identity.space,
            memory_budget,
            has_gemma=gemma is not None,
            has_vae=vae is not None,
            student=identity.student,
        )

    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def scale(self) -> int:
        """Output pixels per latent pixel (32 for SDXL: the VAE's 8 times PiD's 4)."""
        return self._engine.scale

    def plan(self, latent_shape: Sequence[int], *, tile: int | None = None) -> Plan:
        """The memory plan for latents of ``latent_shape`` ([B, C, h, w] or [C, h, w]), without decoding."""
        shape = tuple(latent_shape)
        b, h, w = (1, *shape[-2:]) if len(shape) == 3 else (shape[0], *shape[-2:])
        plan, source = self._plan(b, h, w, tile)
        return Plan(
            plan.width,
            plan.height,
            plan.whole,
            plan.tiles,
            plan.predicted_peak_bytes,
            plan.budget_bytes,
            source,
        )

    def _plan(self, b: int, h: int, w: int, tile: int | None) -> tuple[_native.Plan, str]:
        budget, source = resolve_budget(self.memory_budget, self._engine.free_memory())
        return self._engine.plan(b, h, w, budget, tile), source

    def encode_captions(self, captions: Sequence[str]) -> np.ndarray:
        """Gemma-2 caption embeddings ``[B, 300, 2304]`` as PiD consumes them (cached per caption)."""
        if not self._has_gemma:
            raise InvalidInputError(
                "this decoder has no caption encoder; open it with gemma=<Gemma-2-2b-it directory> or a "
                "provisioned bundle, or pass caption_embs=",
                "no_caption_encoder",
            )
        return self._engine.encode_captions(list(captions))

    def decode(
        self,
        latents: Any,
        caption: str | Sequence[str] = "",
        *,
        sigma: float | Sequence[float] = 0.0,
        seed: int | Sequence[int] = 0,
        steps: int = 4,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        tile: int | None = None,
        caption_embs: np.ndarray | None = None,
    ) -> np.ndarray:
        """Decode latents to images at ``scale`` times their size.

        Args:
            latents: ``[B, C, h, w]`` or ``[C, h, w]`` (float16/32, bfloat16; numpy or torch), in
                the space's normalised frame (SDXL: the VAE latent times 0.13025; a raw VAE latent
                goes through :func:`pid_native.latents.normalise` first).
            caption: one caption for all latents, or one per latent ("" is valid).
            sigma: noise level of a partially denoised latent in the space's frame (variance-preserving
                for SDXL, flow-matching for the others), scalar or per latent (0 = clean). See
                :func:`pid_native.latents.euler_to_vp`.
            seed: noise seed; a scalar ``s`` gives latent ``b`` the seed ``s + b``.
            steps: sampler steps, 1-4 (4 is the trained schedule).
            progress: called with a :class:`ProgressEvent` at each caption/image/step/tile boundary.
            cancel: a :class:`CancelToken`; ``cancel.cancel()`` stops at the next boundary.
            tile: force tiles of this edge (output pixels, a multiple of ``scale``).
            caption_embs: precomputed ``[B, N, D]`` embeddings instead of ``caption``.

        Returns:
            float32 ``[B, 3, scale*h, scale*w]`` in [-1, 1].

        Raises:
            InvalidInputError, BudgetError, Cancelled (and KeyboardInterrupt on Ctrl-C).
        """
        lat = as_latents(latents)
        self._check_space(lat)
        b, _, h, w = lat.shape
        seeds = (
            [seed + i for i in range(b)]
            if isinstance(seed, (int, np.integer))
            else _per_image(seed, b, "seed")
        )
        try:
            params = DecodeParams(
                captions=_per_image(caption, b, "caption"),
                sigma=[float(s) for s in _per_image(sigma, b, "sigma")],
                seeds=[int(s) for s in seeds],
                steps=steps,
            )
        except ValidationError as exc:
            raise InvalidInputError(_first_error(exc), "invalid_argument") from None
        # Plan first: an impossible request fails before Gemma or the sampler allocate anything.
        plan, _ = self._plan(b, h, w, tile)
        if caption_embs is None:
            if progress:
                progress(ProgressEvent("caption", 1, 1))
            caption_embs = self.encode_captions(params.captions)
        embs = np.ascontiguousarray(caption_embs, dtype=np.float32)
        request = DecodeRequest(
            self._engine.config, lat, embs, params.sigma, params.seeds, params.steps, plan
        )
        out = self._engine.decode(request, progress, cancel)
        if progress:
            progress(ProgressEvent("done"))
        return out

    def _check_space(self, lat: np.ndarray) -> None:
        """Refuse a latent of another space's channel count, naming the space it looks like."""
        channels, mine = lat.shape[1], self.space
        if channels == mine.channels:
            return
        normalised = [s.name for s in SPACES if s.channels == channels]
        raw = [s.name for s in SPACES if s.raw_channels == channels and s.raw_channels != s.channels]
        if normalised:
            hint = f"; {channels} channels is a {' or '.join(normalised)} latent, which it cannot decode"
        elif raw:
            hint = (
                f"; {channels} channels is a raw {' or '.join(raw)} VAE latent: normalise it first "
                "(pid_native.latents.normalise, CLI --raw-latent)"
            )
        else:
            hint = ""
        raise InvalidInputError(
            f"latents {lat.shape} have {channels} channels, but this decoder ({self._label()}) takes "
            f"{mine.name} latents [B, {mine.channels}, h, w]{hint}",
            "latent_channels",
        )

    def _label(self) -> str:
        return self.student.name if self.student else self.space.name

    def decode_to_images(self, latents: Any, caption: str | Sequence[str] = "", **kwargs: Any) -> list[Any]:
        """:meth:`decode`, returned as PIL images (with the licence note in their metadata)."""
        from .images import to_pil

        return to_pil(self.decode(latents, caption, **kwargs))

    def vae_decode(self, latents: Any) -> np.ndarray:
        """Plain SDXL VAE decode (the baseline PiD is compared with), ``[B, 3, 8h, 8w]`` in [-1, 1]."""
        lat = as_latents(latents)
        if not np.isfinite(lat).all():
            raise InvalidInputError("latents contain NaN or infinity", "latent_not_finite")
        return np.clip(self._require_vae().vae_decode(lat), -1.0, 1.0)

    def vae_encode(self, images: Any) -> np.ndarray:
        """SDXL VAE encode: ``[B, 3, H, W]`` in [-1, 1] to the scaled posterior mean ``[B, 4, H/8, W/8]``."""
        return self._require_vae().vae_encode(np.ascontiguousarray(images, dtype=np.float32))

    def _require_vae(self) -> backends.Engine:
        if not self._has_vae:
            raise InvalidInputError(
                "this decoder has no SDXL VAE; open it with vae=<diffusers VAE directory> or provision "
                "a bundle with the VAE (pid-native fetch)",
                "no_vae",
            )
        return self._engine

    def encode_image(self, image: Any) -> np.ndarray:
        """The latent :meth:`upscale` decodes: the image cropped to a multiple of 16, VAE-encoded.

        Args:
            image: a PIL image, a path, or a float array ``[3, H, W]`` in [-1, 1].

        Returns:
            float32 ``[1, 4, H/8, W/8]``.
        """
        from .images import load_image

        if self.space.name != "sdxl":
            raise InvalidInputError(
                f"upscale needs the SDXL VAE; this decoder serves {self.space.name}", "space"
            )
        return self.vae_encode(load_image(image))

    def upscale(self, image: Any, caption: str = "", **kwargs: Any) -> Any:
        """Upscale an image 4x with PiD: crop to a multiple of 16, VAE-encode, decode.

        Args:
            image: a PIL image, a path, or a float array ``[3, H, W]`` in [-1, 1].
            caption: what the image shows (helps detail; "" is valid).
            **kwargs: forwarded to :meth:`decode` (seed, sigma, steps, progress, cancel, tile).

        Returns:
            The upscaled PIL image.
        """
        from .images import to_pil

        return to_pil(self.decode(self.encode_image(image), caption, **kwargs))[0]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}"


__all__ = [
    "CancelToken",
    "DecodeParams",
    "DecodeRequest",
    "Decoder",
    "Plan",
    "ProgressEvent",
    "as_latents",
    "tensor_to_numpy",
]
