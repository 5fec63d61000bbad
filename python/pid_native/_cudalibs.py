"""Import the extension, preloading NVIDIA's runtime libraries from PyPI for the CUDA build.

The CUDA build links the driver (libcuda, installed with it) and cuBLAS, cuRAND, NVRTC (and
possibly cudart). ``pip install "pid-native[cuda]"`` installs those as NVIDIA's wheels, under
the ``nvidia`` namespace package (``nvidia/cu13/lib`` for CUDA 13, ``nvidia/<name>/lib`` for
the 12.x wheels; DLLs under ``bin/`` on Windows), where the dynamic loader does not look.

:func:`import_native` imports the extension plainly first: the CPU build needs none of this
and must import on machines without a driver. Only when that fails on a CUDA library does it
load the wheels' libraries (Linux: ``RTLD_GLOBAL``, so the extension's dependencies resolve to
them by soname; Windows: ``os.add_dll_directory``) and retry, and if that fails too it says
which library is missing and how to install it.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

NATIVE = "pid_native._native"
WINDOWS = sys.platform == "win32"

# (soname, Windows DLL pattern) in dependency order: cuBLAS needs cuBLASLt.
LIBRARIES: tuple[tuple[str, str], ...] = (
    ("libcudart.so.13", "cudart64_13*.dll"),
    ("libcublasLt.so.13", "cublasLt64_13*.dll"),
    ("libcublas.so.13", "cublas64_13*.dll"),
    ("libcurand.so.10", "curand64_10*.dll"),
    ("libnvrtc.so.13", "nvrtc64_13*.dll"),
)
DRIVER = "nvcuda.dll" if WINDOWS else "libcuda.so.1"

_LIBRARY_NAME = re.compile(
    r"\blib(?:cuda|cudart|cublasLt|cublas|curand|nvrtc)\.so(?:\.\d+)*"
    r"|\b(?:nvcuda|(?:cudart|cublasLt|cublas|curand|nvrtc)64(?:_\d+)+)\.dll",
    re.IGNORECASE,
)
# Windows names no DLL when an extension's dependency is missing.
_WINDOWS_DLL_FAILURE = "DLL load failed"
# A library that loads but lacks a function the build calls: older than the build needs. The
# driver API's functions are cuXxx; the runtime libraries' cublasXxx, curandXxx, nvrtcXxx, cudaXxx.
_UNDEFINED_SYMBOL = re.compile(r"undefined symbol: ((cu[A-Z]|cublas|curand|nvrtc|cuda[A-Z])\w*)")

INSTALL_RUNTIME = 'pip install "pid-native[cuda]"'
INSTALL_DRIVER = (
    "no NVIDIA driver found: install the NVIDIA driver (580+ for CUDA 13) or install the CPU build "
    "of pid-native"
)
# The CUDA version the build's PTX and libraries need from the driver (cuda_device.rs says why).
BUILD_CUDA_VERSION = 13_000

# Keeps the loaded libraries and DLL directories alive for the life of the process.
_KEEP: list[Any] = []


def nvidia_roots() -> list[Path]:
    """Every directory of the ``nvidia`` namespace package on ``sys.path``, in path order."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def _candidates(root: Path, soname: str, dll: str) -> list[Path]:
    if WINDOWS:
        found = [*root.glob(f"*/bin/{dll}"), *root.glob(f"*/bin/*/{dll}")]
    else:
        # The soname itself, else a versioned file such as libcublas.so.13.1.0.3.
        found = list(root.glob(f"*/lib/{soname}*"))
    return sorted(found, key=lambda p: (len(p.name), str(p)))


def find_libraries() -> dict[str, Path]:
    """The wheels' libraries by soname, in load order; one not installed is absent.

    Searches ``<root>/*/lib`` (``bin`` on Windows) of every ``nvidia`` namespace directory,
    which covers both the CUDA 13 (``cu13/lib``) and the 12.x (``cublas/lib``) layouts; the
    first root on ``sys.path`` that has a library wins.
    """
    roots = nvidia_roots()
    found: dict[str, Path] = {}
    for soname, dll in LIBRARIES:
        for root in roots:
            candidates = _candidates(root, soname, dll)
            if candidates:
                found[soname] = candidates[0]
                break
    return found


def preload(libraries: Mapping[str, Path]) -> dict[str, str]:
    """Make ``libraries`` visible to the extension's loader; returns soname -> error for failures."""
    failures: dict[str, str] = {}
    if WINDOWS:
        for directory in dict.fromkeys(p.parent for p in libraries.values()):
            _KEEP.append(os.add_dll_directory(str(directory)))
        return failures
    for soname, path in libraries.items():
        try:
            _KEEP.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        except OSError as exc:
            failures[soname] = str(exc)
    return failures


def missing_library(error: str) -> str | None:
    """The CUDA library a loader error names (``libcublas.so.13``, ``cublas64_13.dll``), if any."""
    match = _LIBRARY_NAME.search(error)
    return match.group(0) if match else None


def _is_driver(library: str) -> bool:
    return library.lower().startswith(("libcuda.so", "nvcuda"))


def _driver_loads() -> bool:
    try:
        ctypes.CDLL(DRIVER)
    except OSError:
        return False
    return True


def explain(
    error: str, found: Mapping[str, Path] | None = None, failures: Mapping[str, str] | None = None
) -> str | None:
    """The message for an extension that failed to load: the missing library and the fix.

    ``found`` and ``failures`` are what :func:`find_libraries` and :func:`preload` returned;
    None when the error cannot be pinned on a CUDA library.
    """
    found, failures = found or {}, failures or {}
    library = missing_library(error)
    inferred = library is None and WINDOWS
    if inferred:
        # Windows names no DLL: blame the driver, else the first library not installed (by
        # its DLL name: a soname would mean nothing there).
        absent = [dll for soname, dll in LIBRARIES if soname not in found]
        library = DRIVER if not _driver_loads() else (absent[0] if absent else None)
    if library is None:
        return None
    context = f" (the import failed with: {error})" if inferred else ""
    if _is_driver(library):
        return f"the CUDA build of pid-native cannot load {library}: {INSTALL_DRIVER}{context}"
    soname = next((s for s, dll in LIBRARIES if s == library or Path(library).match(dll)), library)
    roots = nvidia_roots()
    if soname in failures:
        why = f"loading {found[soname]} failed: {failures[soname]}"
    elif soname in found:
        why = f"{found[soname]} is installed, yet the extension still failed: {error}"
    elif roots:
        why = f"it is not in NVIDIA's wheels (searched {', '.join(str(r) for r in roots)})"
    else:
        why = "NVIDIA's CUDA wheels are not installed"
    return (
        f"the CUDA build of pid-native cannot load {library}: {why}{context}; install NVIDIA's CUDA 13 "
        f"runtime libraries with {INSTALL_RUNTIME}"
    )


def undefined_symbol(error: str) -> str | None:
    """The CUDA function a loader error says is missing (``undefined symbol: cuFoo``), if any."""
    match = _UNDEFINED_SYMBOL.search(error)
    return match.group(1) if match else None


def _is_driver_symbol(symbol: str) -> bool:
    return re.match(r"cu[A-Z]", symbol) is not None


def driver_cuda_version() -> int | None:
    """The CUDA version the installed driver supports (1000 * major + 10 * minor), if it loads."""
    try:
        driver = ctypes.CDLL(DRIVER)
        version = ctypes.c_int(0)
        if driver.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def explain_symbol(symbol: str, error: str) -> str:
    """The message for a CUDA library that loads but is older than the build needs."""
    if _is_driver_symbol(symbol):
        version = driver_cuda_version()
        supports = f"supports CUDA {_cuda_text(version)}" if version else "is too old"
        return (
            f"the CUDA build of pid-native needs a newer NVIDIA driver: the installed one {supports} and "
            f"lacks {symbol}, and this build needs CUDA {_cuda_text(BUILD_CUDA_VERSION)} (driver 580 or "
            "newer); update the NVIDIA driver or install the CPU build of pid-native"
        )
    return (
        f"the CUDA runtime libraries found are older than this build of pid-native needs ({symbol} is "
        f"missing: {error}); install NVIDIA's CUDA 13 runtime libraries with {INSTALL_RUNTIME}"
    )


def _names_cuda(error: str) -> bool:
    return (
        missing_library(error) is not None
        or undefined_symbol(error) is not None
        or (WINDOWS and _WINDOWS_DLL_FAILURE in error)
    )


def import_native(name: str = NATIVE) -> ModuleType:
    """Import the extension module ``name``, preloading the CUDA libraries only if it needs them.

    Raises:
        ImportError: naming the missing CUDA library and the fix (driver or ``pid-native[cuda]``);
            any other import error unchanged.
    """
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:
        if not _names_cuda(str(exc)):
            raise
        first = exc
    library, symbol = missing_library(str(first)), undefined_symbol(str(first))
    if symbol is not None and _is_driver_symbol(symbol):
        raise ImportError(explain_symbol(symbol, str(first))) from first
    if library is not None and _is_driver(library):
        # The wheels cannot stand in for the driver: do not load them for nothing.
        raise ImportError(explain(str(first))) from first
    found = find_libraries()
    failures = preload(found)
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:
        symbol = undefined_symbol(str(exc))
        message = explain_symbol(symbol, str(exc)) if symbol else explain(str(exc), found, failures)
        if message is None:
            raise
        raise ImportError(message) from exc


__all__ = [
    "BUILD_CUDA_VERSION",
    "DRIVER",
    "LIBRARIES",
    "driver_cuda_version",
    "explain",
    "explain_symbol",
    "find_libraries",
    "import_native",
    "missing_library",
    "preload",
    "undefined_symbol",
]
