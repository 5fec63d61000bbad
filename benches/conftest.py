"""Benchmark fixtures: a synthetic bundle per preset and the backends that run here.

    pytest benches --benchmark-only                      # mini preset, every available backend
    PID_BENCH_PRESET=full pytest benches --benchmark-only  # the real 1.36 B-parameter topology

Each benchmark records pixels/s, peak RSS during the benchmark, backend, dtype and threads in
``extra_info`` (see ``--benchmark-json``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pid_native import backends
from pid_native.testing.measure import peak_rss_bytes, reset_peak_rss
from pid_native.testing.paths import seeded_cache_dir
from pid_native.testing.synth import write_bundle

PRESET = os.environ.get("PID_BENCH_PRESET", "mini")
CACHE = seeded_cache_dir(Path(__file__).resolve().parent.parent)

__all__ = ["PRESET", "peak_rss_gib", "reset_peak_rss", "runnable_backends"]


def peak_rss_gib() -> float | None:
    peak = peak_rss_bytes()
    return None if peak is None else round(peak / 2**30, 3)


@pytest.fixture(scope="session")
def bundle() -> Path:
    return write_bundle(CACHE / f"bench-bundle-{PRESET}", preset=PRESET)


def runnable_backends() -> list[str]:
    return [name for name, a in backends.available().items() if a.available]
