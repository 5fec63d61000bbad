"""The memory budget a decode must fit in.

Precedence: an explicit ``memory_budget`` argument, then ``PID_MEMORY_BUDGET_GIB``, then
what the device has free (available RAM on the CPU, free VRAM on CUDA). The planner uses it
to choose between a whole-image decode and tiles, and refuses before allocating when nothing
fits.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

from .errors import InvalidInputError

ENV_VAR = "PID_MEMORY_BUDGET_GIB"
GIB = 1 << 30
# Leave room for the interpreter, the caller's own arrays and allocator slack.
_FREE_FRACTION = 0.85
# What a system that answers none of the queries below is assumed to have.
_UNKNOWN_RAM = 16 * GIB


def available_ram_bytes() -> int:
    """Memory the OS can give this process now.

    Linux: ``MemAvailable``; macOS: free, speculative and inactive pages (what ``vm_stat``
    counts, as psutil does; macOS has no ``SC_AVPHYS_PAGES``); Windows: ``ullAvailPhys`` of
    ``GlobalMemoryStatusEx``; other Unixes: free pages. 16 GiB when the query fails.
    """
    if sys.platform.startswith("linux"):
        found = _linux_available()
    elif sys.platform == "darwin":
        found = _macos_available()
    elif sys.platform == "win32":
        found = _windows_available()
    else:
        found = _sysconf_available()
    return _UNKNOWN_RAM if found is None else found


def _linux_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Kernels before 3.14 have no MemAvailable.
    return _sysconf_available()


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _macos_available() -> int | None:
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page = re.search(r"page size of (\d+) bytes", out)
    counts = dict(re.findall(r"^Pages (free|speculative|inactive):\s+(\d+)\.", out, re.MULTILINE))
    if page is None or len(counts) != 3:
        return None
    return sum(int(n) for n in counts.values()) * int(page.group(1))


class _MemoryStatusEx(ctypes.Structure):
    """Windows' MEMORYSTATUSEX."""

    _fields_ = [
        ("dwLength", ctypes.c_uint32),
        ("dwMemoryLoad", ctypes.c_uint32),
        ("ullTotalPhys", ctypes.c_uint64),
        ("ullAvailPhys", ctypes.c_uint64),
        ("ullTotalPageFile", ctypes.c_uint64),
        ("ullAvailPageFile", ctypes.c_uint64),
        ("ullTotalVirtual", ctypes.c_uint64),
        ("ullAvailVirtual", ctypes.c_uint64),
        ("ullAvailExtendedVirtual", ctypes.c_uint64),
    ]


def _windows_available() -> int | None:
    status = _MemoryStatusEx(dwLength=ctypes.sizeof(_MemoryStatusEx))
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.ullAvailPhys)


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
