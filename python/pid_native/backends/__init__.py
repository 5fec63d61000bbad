"""Backend registry: which engines can decode here, and why not for the others.

Built-ins are ``candle-cpu`` and ``candle-cuda`` (the Rust extension) and ``mlx``.
Third-party packages add backends through the ``pid_native.backends`` entry-point group,
whose objects follow the :class:`Backend` protocol. ``"auto"`` picks the available backend
with the highest ``priority`` (cuda > mlx on Metal > candle-cpu).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .. import _native
from ..errors import BackendUnavailableError, InvalidInputError
from ..latents import LatentSpace

ENTRY_POINT_GROUP = "pid_native.backends"


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str


@dataclass(frozen=True)
class OpenSpec:
    """What a backend needs to build an engine; paths are already validated.

    ``dtype`` is the resident weight dtype, ``compute_dtype`` the network's arithmetic; None
    leaves either to the backend.
    """

    checkpoint: Path
    space: LatentSpace
    gemma: Path | None = None
    vae: Path | None = None
    device: str | None = None
    dtype: str | None = None
    softcap: bool = False
    compute_dtype: str | None = None


@runtime_checkable
class Engine(Protocol):
    """A loaded decoder on one backend. Every method must be safe to call from several threads.

    The contract: :class:`pid_native.Decoder` makes the plan (:meth:`plan`) once and builds a
    :class:`pid_native.DecodeRequest` for the network ``config``, which the core validates, plan
    included; :meth:`decode` decodes it as it is and reports :class:`pid_native.ProgressEvent`
    objects. ``encode_captions`` and the VAE methods are called only when the decoder was
    opened with a Gemma directory and a VAE directory.
    """

    backend: str
    scale: int
    config: str
    """The network configuration as JSON (upstream names)."""

    def encode_captions(self, captions: list[str]) -> np.ndarray: ...

    def free_memory(self) -> int | None:
        """Free bytes of the engine's device for the budget, or None where available RAM applies."""
        ...

    def plan(self, batch: int, h: int, w: int, budget_bytes: int, tile: int | None) -> _native.Plan: ...

    def decode(
        self,
        request: _native.DecodeRequest,
        progress: Callable[[_native.ProgressEvent], None] | None,
        cancel: _native.CancelToken | None,
    ) -> np.ndarray: ...

    def vae_encode(self, images: np.ndarray) -> np.ndarray: ...

    def vae_decode(self, latents: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    priority: int

    def availability(self) -> Availability: ...

    def open(self, spec: OpenSpec) -> Engine: ...


_BUILTIN: dict[str, str] = {
    "candle-cpu": "pid_native.backends.candle:CPU",
    "candle-cuda": "pid_native.backends.candle:CUDA",
    "mlx": "pid_native.backends.mlx:BACKEND",
}
_registered: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"{backend!r} does not implement the pid_native Backend protocol")
    _registered[backend.name] = backend


def _load(target: str) -> Backend:
    module, _, attr = target.partition(":")
    mod = __import__(module, fromlist=[attr])
    return getattr(mod, attr)


def _all() -> dict[str, Backend | Exception]:
    """Every known backend, loaded; a backend whose module fails to import maps to the error."""
    found: dict[str, Backend | Exception] = {}
    sources = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        sources.setdefault(ep.name, ep.value)
    for name, target in sources.items():
        if name in _registered:
            continue
        try:
            found[name] = _load(target)
        except Exception as exc:  # a broken third-party plugin must not break the others
            found[name] = exc
    found.update(_registered)
    return found


def names() -> list[str]:
    return sorted(_all())


def available() -> dict[str, Availability]:
    """Every backend with whether it can run here and, if not, why."""
    out = {}
    for name, b in sorted(_all().items()):
        if isinstance(b, Exception):
            out[name] = Availability(False, f"failed to load: {b}")
        else:
            out[name] = b.availability()
    return out


def get(name: str = "auto") -> Backend:
    """The backend called ``name``, or the best available one for ``"auto"``.

    Raises:
        InvalidInputError: unknown name (code ``unknown_backend``).
        BackendUnavailableError: known but cannot run here; the message says why.
    """
    backends = _all()
    if name == "auto":
        usable = [b for b in backends.values() if not isinstance(b, Exception) and b.availability().available]
        if not usable:
            raise BackendUnavailableError("no backend can run here: " + str(available()))
        return max(usable, key=lambda b: b.priority)
    if name not in backends:
        raise InvalidInputError(
            f"unknown backend {name!r}; known: {', '.join(sorted(backends))}", "unknown_backend"
        )
    b = backends[name]
    if isinstance(b, Exception):
        raise BackendUnavailableError(f"backend {name!r} failed to load: {b}")
    status = b.availability()
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {status.reason}")
    return b


__all__ = [
    "ENTRY_POINT_GROUP",
    "Availability",
    "Backend",
    "Engine",
    "OpenSpec",
    "available",
    "get",
    "names",
    "register",
]
