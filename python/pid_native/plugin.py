"""The SceneWorks decoder plugin: entry point ``pid`` in the group ``sceneworks.decoders``.

Contract (all types below are pydantic models, so hosts can validate and serialise them):

1. ``plugin = entry_point.load()`` is cheap: no weights, no backend imports.
   The contract's types are attributes of the plugin object (``plugin.LoadSpec`` ...).
2. ``plugin.describe()`` -> :class:`PluginInfo`: name, version, the latent spaces with the host
   model families that map to them, the 4x output scale, required components and whether
   they are provisioned, machine-readable licence records and the backends that run here.
3. ``plugin.load(LoadSpec(...))`` -> :class:`LoadedDecoder`, once per host model (weights load
   lazily, on the first request that uses PiD).
4. ``loaded.decode(request, latents, progress=..., cancel=...)`` per generation: returns None
   when ``request.use_pid`` is false (the host keeps its VAE), otherwise a :class:`DecodeOutput`
   with float32 ``[B, 3, H, W]`` images in [-1, 1] and metadata to attach to the images.
   Asking for PiD when it is not provisioned raises; there is never a silent VAE fallback.
5. ``capture_plan(sigmas, ceiling)``: for ``pid_capture_sigma``, the step at which the host
   stops its Euler (variance-exploding) SDXL sampler, and how to convert that latent to
   PiD's VP frame (:meth:`CapturePlan.to_vp`).

Progress events (``progress(event: PluginEvent)``): ``loading`` (renderer weights), ``caption``,
``step k/4``, ``tile i/n``, ``done``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

GROUP = "sceneworks.decoders"
NAME = "pid"


class LicenseRecord(BaseModel):
    """A weight licence as hosts display it (SceneWorks' ``WeightLicense`` shape)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    url: str
    commercial_use: bool
    restriction: str | None
    attribution: str


class Component(BaseModel):
    name: str
    required: bool
    provisioned: bool
    path: str | None


class PluginInfo(BaseModel):
    name: str
    version: str
    latent_spaces: dict[str, list[str]]
    output_scale: int
    components: list[Component]
    licenses: list[LicenseRecord]
    backends: dict[str, str]


class LoadSpec(BaseModel):
    """Where the weights are; provisioned defaults for whatever is omitted.

    ``student`` picks a released student (``flux-2k``...) where the checkpoint does not say
    it; ``flux2_vae`` is the FLUX.2 VAE file whose BatchNorm statistics normalise raw flux2
    latents (see ``DecodeRequest.raw_latent``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bundle: Path | None = None
    checkpoint: Path | None = None
    gemma: Path | None = None
    vae: Path | None = None
    space: str = "sdxl"
    student: str | None = None
    flux2_vae: Path | None = None
    backend: str = "auto"
    memory_budget_gib: float | None = Field(default=None, gt=0)


class DecodeRequest(BaseModel):
    """The per-generation knobs the host passes; ``raw_latent``: the latents are the host VAE's
    raw latents, normalised for the student's space first (:func:`pid_native.latents.normalise`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    use_pid: bool = False
    pid_capture_sigma: float | None = None
    caption: str = ""
    seed: int = Field(default=0, ge=0, le=2**64 - 1)
    count: int = Field(default=1, ge=1)
    raw_latent: bool = False
    width: int = Field(gt=0)
    height: int = Field(gt=0)

    @field_validator("pid_capture_sigma")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"pid_capture_sigma must be in (0, 1], got {v}")
        return v


class PluginEvent(BaseModel):
    phase: str
    index: int = 0
    count: int = 0

    def __str__(self) -> str:
        return f"{self.phase} {self.index}/{self.count}" if self.count else self.phase


class DecodeOutput(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    images: Any  # float32 numpy [B, 3, H, W] in [-1, 1]
    metadata: dict[str, Any]


class CapturePlan(BaseModel):
    """Where to stop an Euler SDXL run for PiD, and the noise level there.

    Attributes:
        stop_after: denoise steps to run before handing the latent to PiD.
        sigma_euler: the scheduler sigma of the captured latent.
        sigma_vp: the same noise level in PiD's variance-preserving frame.
    """

    stop_after: int
    sigma_euler: float
    sigma_vp: float

    def to_vp(self, latents: np.ndarray) -> np.ndarray:
        """The captured Euler latent rescaled to the VP frame PiD expects."""
        from .latents import euler_to_vp

        return euler_to_vp(latents, self.sigma_euler)[0]


def capture_plan(sigmas: Any, ceiling: float) -> CapturePlan | None:
    """For a host Euler schedule ``sigmas`` (descending, ending at 0) and a noise ceiling in
    the VP frame, the capture point; None when no step is at or below the ceiling."""
    from .latents import euler_capture_step

    k = euler_capture_step(sigmas, ceiling)
    if k is None:
        return None
    s = float(np.asarray(sigmas, dtype=np.float64)[k])
    return CapturePlan(stop_after=k, sigma_euler=s, sigma_vp=s / float(np.sqrt(s * s + 1.0)))


class LoadedDecoder:
    """PiD bound to one host model. Thread-safe; weights load on first use."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self._decoder: Any = None
        self._lock = threading.Lock()

    def _get(self, progress: Callable[[PluginEvent], None] | None) -> Any:
        with self._lock:
            if self._decoder is None:
                from .decoder import Decoder

                if progress:
                    progress(PluginEvent(phase="loading"))
                path = self.spec.checkpoint or self.spec.bundle or _default_bundle(self.spec.space)
                self._decoder = Decoder.open(
                    path,
                    backend=self.spec.backend,
                    gemma=self.spec.gemma,
                    vae=self.spec.vae,
                    space=self.spec.space,
                    student=self.spec.student,
                    memory_budget=self.spec.memory_budget_gib,
                )
            return self._decoder

    def decode(
        self,
        request: DecodeRequest,
        latents: np.ndarray,
        *,
        sigma: float = 0.0,
        progress: Callable[[PluginEvent], None] | None = None,
        cancel: Any = None,
    ) -> DecodeOutput | None:
        """Decode the host's latents ``[count, C, h, w]`` (normalised frame, unless
        ``request.raw_latent``) with PiD.

        ``sigma`` is the VP noise level of a captured latent (``CapturePlan.sigma_vp``; 0 for a
        fully denoised one). Returns None when ``request.use_pid`` is false.
        """
        if not request.use_pid:
            return None
        dec = self._get(progress)
        lat = np.asarray(latents)
        if request.raw_latent:
            from .latents import normalise

            lat = normalise(dec.space.name, lat, vae=self.spec.flux2_vae)
        if lat.ndim == 4 and lat.shape[0] != request.count:
            from .errors import InvalidInputError

            raise InvalidInputError(
                f"request.count is {request.count} but {lat.shape[0]} latents were passed", "count"
            )
        plan = dec.plan(lat.shape)
        events = (
            (lambda e: progress(PluginEvent(phase=e.phase, index=e.index, count=e.count)))
            if progress
            else None
        )
        t0 = time.perf_counter()
        images = dec.decode(
            lat, request.caption, sigma=sigma, seed=request.seed, progress=events, cancel=cancel
        )
        from .images import LICENSE_NOTE

        return DecodeOutput(
            images=images,
            metadata={
                "decoder": "pid",
                "backend": dec.backend,
                "seed": request.seed,
                "sigma": sigma,
                "tiles": len(plan.tiles),
                "seconds": round(time.perf_counter() - t0, 3),
                "size": [int(images.shape[3]), int(images.shape[2])],
                "license": "NSCLv1",
                "restriction": LICENSE_NOTE,
            },
        )


def _default_bundle(space: str) -> Path:
    from .provisioning import default_bundle_dir

    return Path(default_bundle_dir(space))


class PidPlugin:
    """The object the ``sceneworks.decoders`` entry point ``pid`` resolves to.

    The contract's types hang off it, so a host needs nothing but the loaded entry point:
    ``plugin.LoadSpec``, ``plugin.DecodeRequest``, ``plugin.capture_plan``.
    """

    name = NAME
    LoadSpec = LoadSpec
    DecodeRequest = DecodeRequest
    capture_plan = staticmethod(capture_plan)

    def describe(self, spec: LoadSpec | None = None) -> PluginInfo:
        from . import backends
        from .latents import SPACES
        from .provisioning import licences
        from .provisioning.bundle import inspect_bundle

        spec = spec or LoadSpec()
        bundle = spec.bundle or _default_bundle(spec.space)
        found = inspect_bundle(bundle)
        components = [
            Component(
                name="pid",
                required=True,
                provisioned=spec.checkpoint is not None or found.checkpoint,
                path=str(spec.checkpoint or bundle),
            ),
            Component(
                name="gemma-2-2b-it",
                required=True,
                provisioned=spec.gemma is not None or found.gemma,
                path=str(spec.gemma) if spec.gemma else None,
            ),
            Component(
                name="sdxl-vae",
                required=False,
                provisioned=spec.vae is not None or found.vae,
                path=str(spec.vae) if spec.vae else None,
            ),
        ]
        try:
            ver = version("pid-native")
        except PackageNotFoundError:
            ver = "unknown"
        return PluginInfo(
            name=NAME,
            version=ver,
            latent_spaces={s.name: list(s.aliases) for s in SPACES},
            output_scale=4,
            components=components,
            licenses=[LicenseRecord(**r) for r in licences()],
            backends={k: ("available" if v.available else v.reason) for k, v in backends.available().items()},
        )

    def load(self, spec: LoadSpec) -> LoadedDecoder:
        return LoadedDecoder(spec)


plugin = PidPlugin()

__all__ = [
    "CapturePlan",
    "DecodeOutput",
    "DecodeRequest",
    "LicenseRecord",
    "LoadSpec",
    "LoadedDecoder",
    "PidPlugin",
    "PluginEvent",
    "PluginInfo",
    "capture_plan",
    "plugin",
]
