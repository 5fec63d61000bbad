"""Where the test data lives: golden fixtures and the cache of generated seeded weights.

Used by the test-suite, the benchmarks and ``pid-native selftest``, so all three agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MissingFileError

GOLDENS_ENV = "PID_GOLDENS"
SEEDED_CACHE_ENV = "PID_SEEDED_CACHE"


def repo_root() -> Path | None:
    """The source checkout this package runs from (an editable install), else None."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "tests").is_dir() else None


def goldens_dir(root: Path | None = None) -> Path:
    """``$PID_GOLDENS``, else the checkout's ``../shared/goldens``, else its ``tests/goldens``.

    ``root`` is the source checkout (default: the one an editable install runs from; a
    regular install has none, so its callers pass it or set ``$PID_GOLDENS``).

    Raises:
        MissingFileError: none of them exists.
    """
    if os.environ.get(GOLDENS_ENV):
        return Path(os.environ[GOLDENS_ENV])
    root = root or repo_root()
    candidates = [root.parent / "shared" / "goldens", root / "tests" / "goldens"] if root else []
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise MissingFileError(
        f"no golden fixture directory found (looked at ${GOLDENS_ENV} and "
        f"{', '.join(map(str, candidates)) or 'a source checkout'}); set {GOLDENS_ENV} or pass --goldens",
        "no_goldens",
    )


def seeded_cache_dir(root: Path | None = None) -> Path:
    """Where generated seeded-v1 weights are kept: ``$PID_SEEDED_CACHE``, else the checkout's
    (``root``, default as in :func:`goldens_dir`) ``target/pid-seeded``, else
    ``<pid_native_home()>/seeded``."""
    if os.environ.get(SEEDED_CACHE_ENV):
        return Path(os.environ[SEEDED_CACHE_ENV])
    root = root or repo_root()
    if root is not None:
        return root / "target" / "pid-seeded"
    from ..provisioning.bundle import pid_native_home

    return pid_native_home() / "seeded"


__all__ = ["GOLDENS_ENV", "SEEDED_CACHE_ENV", "goldens_dir", "repo_root", "seeded_cache_dir"]
