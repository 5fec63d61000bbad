"""The MLX backend: the whole decoder in pure-Python MLX (Metal on Apple silicon, CPU elsewhere).

The tree mirrors ``rust/pid-core/src`` file for file: ``config``, ``weights``, ``net/``
(``embedders``, ``rope``, ``attention``, ``layers``, ``patch_block``, ``pixel_block``,
``lq_proj``), ``noise``, ``sampler``, ``plan``, ``caption/`` (``prompt``, ``gemma``),
``vae`` and ``decoder``; request validation, planning, tile geometry and noise come
from the core itself through the extension. The deliberate differences (no ``kernels/``,
errors from the package-level ``pid_native.errors``, ``engine`` adapting
:class:`MlxDecoder` to the backend registry, a few network types arranged differently) are
listed, with their reasons, in ``tests/test_mlx_mirror.py``, which fails on any other.

Importing this package does not import ``mlx``, so the registry can report why the backend
is unavailable instead of failing.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from .. import Availability, OpenSpec

if TYPE_CHECKING:
    from .engine import MlxEngine

_INSTALL = "pip install 'pid-native[mlx]'"


def _bind_fast_blas() -> None:
    """Make MLX's Linux CPU build use MKL instead of the netlib reference BLAS it links.

    The ``mlx[cpu]`` wheel's ``cblas_sgemm`` runs at about 1 GFLOP/s. A library loaded
    RTLD_GLOBAL before ``mlx.core`` is imported takes precedence when ``libmlx`` binds its
    symbols, so loading MKL (which the ``mlx`` extra installs on Linux x86_64) first makes
    f32 matmuls some 30x faster. It must run before anything imports ``mlx.core``.
    """
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return
    try:
        files = metadata.distribution("mkl").files or []
    except metadata.PackageNotFoundError:
        return
    for file in files:
        if file.name.startswith("libmkl_rt.so"):
            try:
                ctypes.CDLL(str(file.locate()), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass  # a broken MKL install leaves MLX on its own BLAS: slower, still correct
            return


_bind_fast_blas()


def gpu_kind() -> str | None:
    """Which GPU backend MLX has here: "Metal", "CUDA" or None."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "Metal"
    cuda = getattr(mx, "cuda", None)
    return "CUDA" if cuda is not None and cuda.is_available() else None


@dataclass(frozen=True)
class MlxBackend:
    """Registry entry ``mlx``: what "auto" picks on Apple silicon (Metal), never elsewhere."""

    name: str = "mlx"

    @property
    def priority(self) -> int:
        # Without Metal, stay below candle-cpu (0): MLX's CPU path is slower than candle's
        # even with MKL bound, and on CUDA hosts candle-cuda is the engine to pick.
        return 10 if self.availability().available and gpu_kind() == "Metal" else -10

    def availability(self) -> Availability:
        try:
            import mlx.core  # noqa: F401
        except ImportError as exc:
            if "libmlx" in str(exc):
                return Availability(
                    False,
                    f"mlx is installed without its native library ({exc}); on Linux install the CPU build "
                    "with pip install 'mlx[cpu]'",
                )
            return Availability(False, f"mlx is not installed ({exc}); {_INSTALL}")
        kind = gpu_kind()
        if kind:
            return Availability(True, f"{kind} GPU available to mlx")
        where = "macOS without a Metal device" if sys.platform == "darwin" else "no Metal or CUDA GPU here"
        return Availability(True, f"mlx on the CPU only ({where}): correct but slow")

    def open(self, spec: OpenSpec) -> MlxEngine:
        from .engine import MlxEngine

        return MlxEngine.open(spec)


BACKEND = MlxBackend()

__all__ = ["BACKEND", "MlxBackend"]
