"""Shared fixtures: the golden fixture directories and cached seeded weights.

The golden files are the bundled ``tests/goldens`` plus every directory of ``PID_GOLDENS``
(``os.pathsep``-separated; see ``pid_native.testing.paths``). Every parity test is
parametrised over *every* file of its kind found there, so a directory of more files of the
same format extends the suite.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

# Before any test module imports mlx.core: lets MLX bind MKL's BLAS on Linux (see the module).
import pid_native.backends.mlx  # noqa: F401
from pid_native.testing.goldens import (  # re-exported for the test modules
    golden_cases,
    golden_config,
    golden_files,
    golden_metadata,
    is_full_topology,
    seeded_checkpoint,
)
from pid_native.testing.paths import GOLDENS_ENV, SEEDED_CACHE_ENV, seeded_cache_dir

# The package may be installed from a wheel (CI), so anchor the defaults at this checkout, for
# this process and the CLI subprocesses the tests start: its bundled goldens come first.
REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "goldens"
SEEDED_CACHE = seeded_cache_dir(REPO)
os.environ[GOLDENS_ENV] = os.pathsep.join([str(GOLDENS), *filter(None, [os.environ.get(GOLDENS_ENV)])])
os.environ.setdefault(SEEDED_CACHE_ENV, str(SEEDED_CACHE))

__all__ = [
    "GOLDENS",
    "golden_cases",
    "golden_config",
    "golden_files",
    "golden_metadata",
    "imported_by",
    "is_full_topology",
]


def imported_by(code: str, modules: Sequence[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported once it has run ``code``."""
    probe = f"{code}\nimport sys\nprint([m for m in {list(modules)!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def console_sigint() -> Iterator[None]:
    """SIGINT handled as in a console, for the tests of Ctrl-C. A test run started in the
    background by a non-interactive shell inherits SIGINT ignored; CPython then installs no
    handler, so neither this process nor the ones it starts would ever see a Ctrl-C."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def seeded_cache() -> Path:
    return SEEDED_CACHE


@pytest.fixture(scope="session")
def mini_checkpoint(seeded_cache: Path) -> Path:
    """A seeded checkpoint of the shrunk SDXL network of the pidnet_sdxl_mini golden."""
    return seeded_checkpoint(GOLDENS / "pidnet_sdxl_mini.safetensors", seeded_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma-style tokenizer.json whose ids fit the gemma2 goldens' 512-entry vocabulary."""
    from pid_native.testing import build_tiny_gemma_tokenizer

    return build_tiny_gemma_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def synth_bundle(seeded_cache: Path) -> Path:
    """A complete synthetic mini bundle (PiD + Gemma + VAE + tokenizer, seeded random weights)."""
    from pid_native.testing.synth import write_bundle

    return write_bundle(seeded_cache / "synth-mini-bundle", preset="mini")
