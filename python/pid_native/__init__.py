"""pid_native: NVIDIA's PiD pixel-diffusion decoder without PyTorch.

PiD replaces a latent diffusion model's VAE decoder: from a latent ``[B, C, h, w]`` and a
caption it denoises directly in pixel space and returns a 4x super-resolved image
``[B, 3, 32h, 32w]`` in 4 distilled steps.

PiD weights are under the NVIDIA License (NSCLv1): research and evaluation only, and the
restriction extends to every decoded image.
"""

from __future__ import annotations

from ._cudalibs import import_native

# First, so that every later `from . import _native` finds the module already loaded (with
# the CUDA build's NVIDIA libraries preloaded when it needs them).
_native = import_native()

from . import backends, latents, provisioning  # noqa: E402
from .decoder import CancelToken, Decoder, Plan, ProgressEvent  # noqa: E402
from .errors import (  # noqa: E402
    BackendUnavailableError,
    BudgetError,
    Cancelled,
    InvalidInputError,
    LicenseError,
    MissingFileError,
    PidError,
    ProvisioningError,
    WeightsError,
)
from .provisioning import provision  # noqa: E402

__version__: str = _native.__version__


def build_info() -> dict[str, object]:
    """How the native extension was built: version, cargo features, candle version, target."""
    return dict(_native.build_info())


__all__ = [
    "BackendUnavailableError",
    "BudgetError",
    "CancelToken",
    "Cancelled",
    "Decoder",
    "InvalidInputError",
    "LicenseError",
    "MissingFileError",
    "PidError",
    "Plan",
    "ProgressEvent",
    "ProvisioningError",
    "WeightsError",
    "__version__",
    "backends",
    "build_info",
    "latents",
    "provision",
    "provisioning",
]
