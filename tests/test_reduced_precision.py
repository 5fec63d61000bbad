"""The reduced-precision network path against the float32 goldens (candle, CPU).

CUDA rounds the operands of matmuls and attention to bf16, everything else staying f32; the
CPU runs the same dtype plumbing in f16 (bf16 compute on the CPU is the core's Rust test). On
every golden file the error of ``v`` must stay within 1.25 times the reference's own bf16
autocast error, in mean and in max, where the file records it, else within the bf16 bounds of
tests/goldens/README.md (mean abs error <= 1e-2, max <= 0.15).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import golden_files, golden_metadata, is_full_topology
from pid_native import _native
from pid_native.testing.goldens import (
    SAMPLE,
    V_TOL,
    case_inputs,
    golden_arrays,
    pidnet_cases,
    reduced_precision_error,
    seeded_checkpoint,
)


def _params() -> list:
    return [
        pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if is_full_topology(path) else [])
        for path in golden_files("pidnet")
    ]


@pytest.mark.parametrize("path", _params())
def test_f16_forward_within_reduced_precision_tolerance(path: Path, seeded_cache: Path) -> None:
    golden = golden_arrays(path)
    net = _native.PidNet.open(
        str(seeded_checkpoint(path, seeded_cache)),
        config=golden_metadata(path)["config"],
        compute_dtype="f16",
    )
    for case in pidnet_cases(path):
        if case == SAMPLE:
            continue
        inp = case_inputs(golden, case)
        v = net.forward(inp["x"], inp["t"], inp["y"], inp["lq_latent"], inp["sigma"])
        assert v.dtype == np.float32
        ok, errors = reduced_precision_error(golden, case, v)
        assert ok, f"{case}: {errors}"
        # Not silently the f32 path: half precision must leave a trace above the f32 tolerance.
        worst = float(np.abs(v - golden[f"out.{case}.v"]).max())
        assert worst > V_TOL, f"{case}: max error {worst:.3e} looks like float32 arithmetic"


def test_bf16_compute_on_cpu_is_refused_with_the_fix() -> None:
    path = golden_files("pidnet")[0]
    with pytest.raises(Exception, match="bf16 compute needs a CUDA device"):
        _native.PidNet.open(str(path), config=golden_metadata(path)["config"], compute_dtype="bf16")
