"""PiD in diffusers pipelines: decode what SDXL-family pipelines generate, early-stopped or not.

::

    import pid_native.diffusers as pid

    latents = pipe(prompt, output_type="latent").images
    images = pid.decode(latents, prompt)            # PIL images at 4x the pipeline's size
    pid.save_png(images[0], "out.png")              # keeps the licence note in the file

The latent frame. With ``output_type="latent"``, ``StableDiffusionXLPipeline``,
``StableDiffusionXLImg2ImgPipeline`` and ``KolorsPipeline`` return the denoised latent as the
UNet sees it: they divide by ``vae.config.scaling_factor`` only on their VAE branch, taken when
``output_type != "latent"``. That latent is the raw VAE latent times 0.13025, the frame PiD's
SDXL student takes, so it is decoded as it is. (A VAE whose config sets ``latents_mean`` and
``latents_std`` normalises differently; its latents are not in that frame.) A run stopped
before its last step (:class:`EarlyStop`, or ``denoising_end``) leaves a noisy latent in the
scheduler's frame; :class:`EarlyStop` converts it to PiD's. A *raw* VAE latent (what
``vae.encode(x).latent_dist.mean`` gives) is normalised for the decoder's space first with
``decode(..., raw_vae=pipe.vae)``.

Every decoded image is under the NVIDIA License (NSCLv1): research and evaluation only. The
PIL images returned carry that restriction in their ``info``, as pid-native's PNGs do.

This module imports neither torch nor diffusers: the caller's pipeline brings them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
from PIL import Image

from .decoder import Decoder, tensor_to_numpy
from .errors import InvalidInputError, MissingFileError
from .images import save_png, to_pil
from .latents import euler_to_vp, normalise
from .plugin import capture_plan
from .provisioning.bundle import default_bundle

OutputType = Literal["pil", "np", "pt"]
OUTPUT_TYPES: tuple[str, ...] = get_args(OutputType)

# Schedulers whose latent is x = z + sigma * e at ``sigmas[step_index]`` after every step (one
# model call per step), the frame euler_to_vp converts. Matched by exact class name: a
# subclass may keep another frame.
EULER_FRAME_SCHEDULERS: tuple[str, ...] = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


class EarlyStop:
    """A ``callback_on_step_end`` that stops the pipeline early and keeps its latent for PiD.

    Upstream's recipe: run 30 steps, capture after step 26 and let PiD finish the image::

        stop = pid.EarlyStop(step=26)        # or EarlyStop(ceiling=0.1): a VP noise level
        pipe(prompt, num_inference_steps=30, output_type="latent", callback_on_step_end=stop)
        images = pid.decode(stop, prompt)

    ``step`` counts the denoising steps this pipeline call runs; ``ceiling`` stops at the first
    step whose variance-preserving noise level sigma / sqrt(sigma^2 + 1) is at or below it. When
    neither happens before the run ends, the final latent is kept. ``output_type="latent"`` saves
    the pipeline a VAE decode of the noisy latent. One object may serve run after run: each
    run's first step starts a fresh capture.

    After a run: ``latents`` (float32 numpy, PiD's VP frame), ``sigma`` (VP noise level),
    ``sigma_euler`` (the scheduler's), ``steps`` (steps run), ``stopped`` (whether it stopped
    the pipeline).

    Raises (during the run): InvalidInputError for a scheduler outside
    :data:`EULER_FRAME_SCHEDULERS`, a ``step`` past the run's end, or a pipeline call that does
    not pass ``latents`` to its callback.
    """

    # What diffusers' MultiPipelineCallbacks asks each of its callbacks for.
    tensor_inputs: ClassVar[tuple[str, ...]] = ("latents",)

    def __init__(self, step: int | None = None, *, ceiling: float | None = None) -> None:
        if (step is None) == (ceiling is None):
            raise InvalidInputError(
                "EarlyStop needs exactly one of step= (stop after that many steps) or ceiling= "
                "(stop at the first step whose VP noise level is at or below it)",
                "early_stop_args",
            )
        if step is not None and (not isinstance(step, int) or step < 1):
            raise InvalidInputError(
                f"EarlyStop step must be an integer >= 1, got {step!r}", "early_stop_step"
            )
        if ceiling is not None and not 0.0 < ceiling <= 1.0:  # also rejects NaN
            raise InvalidInputError(
                f"EarlyStop ceiling is a VP noise level in (0, 1], got {ceiling!r}", "early_stop_ceiling"
            )
        self.step = step
        self.ceiling = ceiling
        self._start()

    def _start(self) -> None:
        self._euler_latents: Any = None
        self._vp: tuple[np.ndarray, float] | None = None
        self._sigmas = np.zeros(0, dtype=np.float32)
        self._stop_position: int | None = None
        self.sigma_euler = 0.0
        self.steps = 0
        self.stopped = False

    def __call__(
        self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if "latents" not in callback_kwargs:
            raise InvalidInputError(
                "EarlyStop received no latents: keep 'latents' in the pipeline's "
                "callback_on_step_end_tensor_inputs (the default)",
                "early_stop_no_latents",
            )
        scheduler = pipe.scheduler
        if step_index == 0:
            self._begin_run(pipe, scheduler)
        # After this step the scheduler's position is step_index + the img2img start offset, and
        # the latent sits at sigmas[position].
        position = scheduler.step_index
        self._euler_latents = callback_kwargs["latents"]
        self._vp = None
        self.sigma_euler = float(self._sigmas[position])
        self.steps = step_index + 1
        if self.step is not None:
            stop = self.steps == self.step
        else:
            stop = self._stop_position is not None and position >= self._stop_position
        if stop:
            pipe._interrupt = True  # diffusers' own way: the loop skips the remaining steps
            self.stopped = True
        return callback_kwargs

    def _begin_run(self, pipe: Any, scheduler: Any) -> None:
        name = type(scheduler).__name__
        if name not in EULER_FRAME_SCHEDULERS:
            raise InvalidInputError(
                f"EarlyStop cannot convert the latents of {name} to PiD's frame; it supports "
                f"{', '.join(EULER_FRAME_SCHEDULERS)}. Switch with pipe.scheduler = "
                f"EulerDiscreteScheduler.from_config(pipe.scheduler.config), or decode the final "
                f"latent without EarlyStop",
                "unsupported_scheduler",
            )
        self._start()
        if self.step is not None and self.step > pipe.num_timesteps:
            raise InvalidInputError(
                f"EarlyStop(step={self.step}) but this pipeline call runs {pipe.num_timesteps} steps; "
                f"choose a step <= {pipe.num_timesteps}",
                "early_stop_step",
            )
        self._sigmas = tensor_to_numpy(scheduler.sigmas)
        if self.ceiling is not None:
            plan = capture_plan(self._sigmas, self.ceiling)
            self._stop_position = plan.stop_after if plan is not None else None

    def _converted(self) -> tuple[np.ndarray, float]:
        if self._euler_latents is None:
            raise InvalidInputError(
                "EarlyStop has captured nothing yet: pass it to the pipeline as "
                "callback_on_step_end=... and run the pipeline first",
                "early_stop_empty",
            )
        if self._vp is None:
            self._vp = euler_to_vp(tensor_to_numpy(self._euler_latents), self.sigma_euler)
        return self._vp

    @property
    def latents(self) -> np.ndarray:
        """The captured latent in PiD's VP frame, float32 ``[B, 4, h, w]``."""
        return self._converted()[0]

    @property
    def sigma(self) -> float:
        """The captured latent's VP noise level (0 for a fully denoised one)."""
        return self._converted()[1]


def decode(
    latents: Any,
    prompt: str | Sequence[str] = "",
    *,
    decoder: Decoder | None = None,
    output_type: OutputType = "pil",
    sigma: float | Sequence[float] | None = None,
    seed: int | Sequence[int] = 0,
    raw_vae: Any = None,
    **kwargs: Any,
) -> Any:
    """Decode a diffusers SDXL-family latent with PiD at 4x the pipeline's resolution.

    Args:
        latents: what ``pipe(..., output_type="latent")`` returned (the output object, its
            ``.images``, or the ``return_dict=False`` tuple): a torch tensor (CPU or CUDA, any
            float dtype) or numpy array ``[B, 4, h, w]``; or an :class:`EarlyStop` after its run.
        prompt: the caption: one for all latents, or one per latent.
        decoder: a :class:`~pid_native.Decoder`; by default :func:`default_decoder`.
        output_type: ``"pil"`` (list of PIL images with the licence note in ``info``), ``"np"``
            (float32 ``[B, H, W, 3]`` in [0, 1]) or ``"pt"`` (float32 CPU tensor
            ``[B, 3, H, W]`` in [0, 1]), as diffusers spells them.
        sigma: VP noise level of the latents; an :class:`EarlyStop` supplies its own, else 0.
        seed: PiD's noise seed; ``s`` gives latent ``b`` the seed ``s + b``.
        raw_vae: the VAE whose *raw* latents these are (``vae.encode(x).latent_dist.mean``), to
            normalise them for the decoder's space first (:func:`pid_native.latents.normalise`;
            a FLUX.2 VAE brings its BatchNorm statistics, ``vae.bn``).
        **kwargs: forwarded to :meth:`Decoder.decode` (``steps``, ``progress``, ``cancel``, ``tile``).

    Raises:
        InvalidInputError: wrong channel count (e.g. a 16-channel SD3 or Flux latent), a
            prompt list that does not match the batch, an unknown ``output_type``, an image
            the pipeline already decoded. MissingFileError: no ``decoder`` and nothing
            provisioned.
    """
    if output_type not in OUTPUT_TYPES:
        raise InvalidInputError(
            f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}", "output_type"
        )
    if isinstance(latents, EarlyStop):
        if sigma is not None:
            raise InvalidInputError(
                "sigma comes from the EarlyStop capture; do not pass sigma= with it", "invalid_argument"
            )
        latents, sigma = latents.latents, latents.sigma
    else:
        latents = _pipeline_latents(latents)
    dec = decoder if decoder is not None else default_decoder()
    if raw_vae is not None:
        bn = getattr(raw_vae, "bn", None)
        stats = (bn.running_mean, bn.running_var) if dec.space.name == "flux2" and bn is not None else None
        latents = normalise(dec.space.name, latents, bn=stats)
    try:
        images = dec.decode(latents, prompt, sigma=0.0 if sigma is None else sigma, seed=seed, **kwargs)
    except InvalidInputError as exc:
        if exc.code != "caption_count":
            raise
        raise InvalidInputError(
            f"{exc.message}: pass one prompt, or one per latent (with num_images_per_prompt=n, "
            "each prompt n times in a row: [p for p in prompts for _ in range(n)])",
            exc.code,
        ) from None
    if output_type == "pil":
        return to_pil(images)
    unit = images * 0.5 + 0.5  # [-1, 1] to diffusers' [0, 1]
    if output_type == "np":
        return np.ascontiguousarray(unit.transpose(0, 2, 3, 1))
    import torch

    return torch.from_numpy(unit)


def _pipeline_latents(output: Any) -> Any:
    """The latents inside a pipeline's return value (output object or tuple), else ``output``."""
    if hasattr(output, "images"):
        output = output.images
    elif isinstance(output, tuple) and len(output) == 1:
        output = output[0]
    if isinstance(output, list) and output and all(isinstance(i, Image.Image) for i in output):
        raise InvalidInputError(
            "got PIL images: the pipeline already decoded them with its VAE; "
            "call it with output_type='latent' and decode that latent",
            "latent_type",
        )
    return output


_default_lock = threading.Lock()
_default: tuple[Path, Decoder] | None = None


def default_decoder() -> Decoder:
    """The decoder :func:`decode` uses without ``decoder=``: the bundle ``$PID_NATIVE_BUNDLE``
    names, else the provisioned SDXL one, opened on first use and reused while that path stays.

    Raises:
        MissingFileError: nothing at that path, with how to provision it.
    """
    global _default
    path = default_bundle()
    with _default_lock:
        if _default is None or _default[0] != path:
            if not path.exists():
                raise MissingFileError(
                    f"no PiD bundle at {path}: run `pid-native fetch --accept-license`, point "
                    "$PID_NATIVE_BUNDLE at a bundle, or pass decoder=pid_native.Decoder.open(...)",
                    "not_provisioned",
                )
            _default = (path, Decoder.open(path))
        return _default[1]


__all__ = [
    "EULER_FRAME_SCHEDULERS",
    "OUTPUT_TYPES",
    "EarlyStop",
    "decode",
    "default_decoder",
    "save_png",
]
