"""Shared fixtures: the golden fixture directory and cached seeded weights.

``PID_GOLDENS`` names the golden directory (default: ``tests/goldens``). Every parity test
is parametrised over *every* file of its kind found there, so dropping more files of the
same format into the directory extends the suite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

# Before any test module imports mlx.core: lets MLX bind MKL's BLAS on Linux (see the module).
import pid_native.backends.mlx  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
GOLDENS = Path(os.environ.get("PID_GOLDENS", REPO / "tests" / "goldens"))
SEEDED_CACHE = Path(os.environ.get("PID_SEEDED_CACHE", REPO / "target" / "pid-seeded"))


def golden_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


def golden_files(kind: str) -> list[Path]:
    """Every golden file of ``kind``; an empty directory is an error, never a silent pass."""
    files = sorted(p for p in GOLDENS.glob("*.safetensors") if golden_metadata(p).get("kind") == kind)
    if not files:
        raise RuntimeError(f"no golden files of kind {kind!r} in {GOLDENS} (set PID_GOLDENS)")
    return files


def golden_cases(path: Path, input_name: str) -> list[str]:
    """Case names with an input ``in.<case>.<input_name>``."""
    with safe_open(str(path), "np") as f:
        keys = list(f.keys())
    suffix = f".{input_name}"
    return sorted(k[3 : -len(suffix)] for k in keys if k.startswith("in.") and k.endswith(suffix))


def golden_config(path: Path) -> dict:
    return json.loads(golden_metadata(path)["config"])


def is_full_topology(path: Path) -> bool:
    return golden_config(path).get("hidden_size", 0) >= 1024


@pytest.fixture(scope="session")
def seeded_cache() -> Path:
    return SEEDED_CACHE


@pytest.fixture(scope="session")
def mini_checkpoint(seeded_cache: Path) -> Path:
    """A seeded checkpoint of the shrunk SDXL network of the pidnet_sdxl_mini golden."""
    from pid_native import _native
    from pid_native.testing import cached_seeded

    config = golden_metadata(GOLDENS / "pidnet_sdxl_mini.safetensors")["config"]
    return cached_seeded(seeded_cache, _native.checkpoint_layout(config))


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
