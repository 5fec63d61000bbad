"""The exception hierarchy shared by every backend.

Each error carries a stable machine-readable ``code`` (for example ``latent_channels``)
so callers can branch on the kind of failure while the message wording improves.
Subclasses also derive from the matching builtin, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class PidError(Exception):
    """Base class of every error pid_native raises."""

    code: str = "pid_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidInputError(PidError, ValueError):
    """A value passed in is wrong: shape, dtype, range, non-finite numbers."""

    code = "invalid_input"


class WeightsError(PidError):
    """A weight file exists but is corrupt, truncated or not the expected network."""

    code = "weights"


class MissingFileError(PidError, FileNotFoundError):
    """A file or directory that is needed does not exist."""

    code = "missing_file"


class ProvisioningError(PidError):
    """Downloading or verifying weights failed (network, auth, disk, integrity)."""

    code = "provisioning"


class LicenseError(ProvisioningError):
    """The weights' licence has not been accepted."""

    code = "license_not_accepted"


class BudgetError(PidError, MemoryError):
    """The request needs more memory than the budget allows."""

    code = "memory_budget"


class BackendUnavailableError(PidError, RuntimeError):
    """The requested backend cannot run here (not compiled in, no driver, not installed)."""

    code = "backend_unavailable"


class MissingDependencyError(PidError, ImportError):
    """An optional feature's package is not installed (the message names the extra)."""

    code = "missing_dependency"


class Cancelled(PidError):
    """The decode was stopped through its cancel token or by Ctrl-C."""

    code = "cancelled"


__all__ = [
    "BackendUnavailableError",
    "BudgetError",
    "Cancelled",
    "InvalidInputError",
    "LicenseError",
    "MissingDependencyError",
    "MissingFileError",
    "PidError",
    "ProvisioningError",
    "WeightsError",
]
