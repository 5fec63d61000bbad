"""The memory budget a decode must fit in.

Precedence: an explicit ``memory_budget`` argument, then ``PID_MEMORY_BUDGET_GIB``, then
what the device has free (available RAM on the CPU, free VRAM on CUDA). The planner uses it
to choose between a whole-image decode and tiles, and refuses before allocating when nothing
fits.
"""

from __future__ import annotations

import os
import sys

from .errors import InvalidInputError

ENV_VAR = "PID_MEMORY_BUDGET_GIB"
GIB = 1 << 30
# Leave room for the interpreter, the caller's own arrays and allocator slack.
_FREE_FRACTION = 0.85


def available_ram_bytes() -> int:
    """Memory the OS can give this process now (MemAvailable on Linux)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 * GIB


def _parse_gib(value: float | str, source: str) -> int:
    try:
        gib = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{source} must be a number of GiB, got {value!r}", "memory_budget_value"
        ) from None
    if not gib > 0 or gib != gib or gib == float("inf"):
        raise InvalidInputError(
            f"{source} must be a positive number of GiB, got {value!r}", "memory_budget_value"
        )
    return int(gib * GIB)


def resolve_budget(memory_budget: float | None, detected: int | None = None) -> tuple[int, str]:
    """The budget in bytes and where it came from (``argument``, ``env`` or ``detected``).

    Args:
        memory_budget: GiB, or None to fall back to the environment and then detection.
        detected: the device's free memory in bytes (defaults to available RAM).
    """
    if memory_budget is not None:
        return _parse_gib(memory_budget, "memory_budget"), "argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return _parse_gib(env, ENV_VAR), "env"
    free = available_ram_bytes() if detected is None else detected
    return int(free * _FREE_FRACTION), "detected"


__all__ = ["ENV_VAR", "GIB", "available_ram_bytes", "resolve_budget"]
