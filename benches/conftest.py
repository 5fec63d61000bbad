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
from pid_native.testing.synth import write_bundle

PRESET = os.environ.get("PID_BENCH_PRESET", "mini")
CACHE = Path(
    os.environ.get("PID_SEEDED_CACHE", Path(__file__).resolve().parent.parent / "target" / "pid-seeded")
)


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of this process (Linux), so VmHWM covers one benchmark."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return None


@pytest.fixture(scope="session")
def bundle() -> Path:
    return write_bundle(CACHE / f"bench-bundle-{PRESET}", preset=PRESET)


def runnable_backends() -> list[str]:
    return [name for name, a in backends.available().items() if a.available]
