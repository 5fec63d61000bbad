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


def golden_dirs(root: Path | None = None) -> list[Path]:
    """The golden fixtures bundled with the source checkout (its ``tests/goldens``), followed by
    every directory of ``$PID_GOLDENS`` (separated by ``os.pathsep``): a directory there adds its
    files, of any kinds, to the bundled ones.

    ``root`` is the source checkout (default: the one an editable install runs from; a regular
    install has none, so its callers pass it or list the bundled directory in ``$PID_GOLDENS``).
    """
    root = root or repo_root()
    bundled = [root / "tests" / "goldens"] if root and (root / "tests" / "goldens").is_dir() else []
    return bundled + [Path(d) for d in os.environ.get(GOLDENS_ENV, "").split(os.pathsep) if d]


def goldens_dir(root: Path | None = None) -> Path:
    """The first of :func:`golden_dirs`: the bundled fixtures in a source checkout.

    Raises:
        MissingFileError: there is no golden directory at all.
    """
    dirs = golden_dirs(root)
    if not dirs:
        raise MissingFileError(
            f"no golden fixture directory found (no source checkout, ${GOLDENS_ENV} unset); "
            f"set {GOLDENS_ENV} or pass --goldens",
            "no_goldens",
        )
    return dirs[0]


def seeded_cache_dir(root: Path | None = None) -> Path:
    """Where generated seeded-v1 weights are kept: ``$PID_SEEDED_CACHE``, else the checkout's
    (``root``, default as in :func:`golden_dirs`) ``target/pid-seeded``, else
    ``<pid_native_home()>/seeded``."""
    if os.environ.get(SEEDED_CACHE_ENV):
        return Path(os.environ[SEEDED_CACHE_ENV])
    root = root or repo_root()
    if root is not None:
        return root / "target" / "pid-seeded"
    from ..provisioning.bundle import pid_native_home

    return pid_native_home() / "seeded"


__all__ = [
    "GOLDENS_ENV",
    "SEEDED_CACHE_ENV",
    "golden_dirs",
    "goldens_dir",
    "repo_root",
    "seeded_cache_dir",
]
