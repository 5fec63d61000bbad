"""The reduced-precision network path against the float32 goldens (candle, CPU).

CUDA runs the network in bf16 with norms, RoPE, gates and the sampler in f32. The CPU has no
bf16 matmul, but the same dtype plumbing runs in f16 there, so this checks it on every golden
file with the bf16 tolerances of tests/goldens/README.md (judged against the float32 ``v``):
mean abs error <= 1e-2 and max abs error <= 0.15.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import golden_files, golden_metadata, is_full_topology
from pid_native import _native
from pid_native.testing.goldens import (
    REDUCED_MAX_TOL,
    REDUCED_MEAN_TOL,
    SAMPLE,
    V_TOL,
    case_inputs,
    golden_arrays,
    pidnet_cases,
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
        err = np.abs(v - golden[f"out.{case}.v"])
        mean, worst = float(err.mean()), float(err.max())
        assert mean <= REDUCED_MEAN_TOL and worst <= REDUCED_MAX_TOL, (
            f"{case}: mean {mean:.3e}, max {worst:.3e}"
        )
        # Not silently the f32 path: half precision must leave a trace above the f32 tolerance.
        assert worst > V_TOL, f"{case}: max error {worst:.3e} looks like float32 arithmetic"


def test_bf16_compute_on_cpu_is_refused_with_the_fix() -> None:
    path = golden_files("pidnet")[0]
    with pytest.raises(Exception, match="bf16 compute needs a CUDA device"):
        _native.PidNet.open(str(path), config=golden_metadata(path)["config"], compute_dtype="bf16")
