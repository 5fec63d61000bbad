"""Network and sampler parity against the upstream PyTorch reference (candle backend, f32).

One test per (golden file, case). Tolerances from tests/goldens/README.md: forward ``v``
max abs error <= 1e-4, sampler image <= 5e-4. On failure the message lists every trace
tensor's error in forward order, so the first diverging module is visible.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import GOLDENS, golden_files, golden_metadata, is_full_topology
from pid_native import _native
from pid_native.testing import seeded
from pid_native.testing.goldens import (
    IMAGE_TOL,
    SAMPLE,
    V_TOL,
    case_inputs,
    golden_arrays,
    pidnet_cases,
    sample_args,
    seeded_checkpoint,
)
from pid_native.testing.paths import GOLDENS_ENV


def _params() -> list:
    return [
        pytest.param(
            path, case, id=f"{path.stem}-{case}", marks=[pytest.mark.slow] if is_full_topology(path) else []
        )
        for path in golden_files("pidnet")
        for case in pidnet_cases(path)
    ]


_NETS: dict[Path, _native.PidNet] = {}


def _net(path: Path, cache: Path) -> _native.PidNet:
    if path not in _NETS:
        _NETS.clear()  # keep at most one (possibly 2.7 GB) network resident
        config = golden_metadata(path)["config"]
        _NETS[path] = _native.PidNet.open(str(seeded_checkpoint(path, cache)), config=config)
    return _NETS[path]


def _trace_report(golden: dict, case: str, trace: dict) -> str:
    lines = []
    for name, value in trace.items():
        ref = golden.get(f"trace.{case}.{name}")
        if ref is not None:
            lines.append(
                f"  {name}: max abs {np.abs(value - ref).max():.3e} (|ref| max {np.abs(ref).max():.3f})"
            )
    return "\n".join(lines)


@pytest.mark.parametrize(("path", "case"), _params())
def test_golden_pidnet(path: Path, case: str, seeded_cache: Path) -> None:
    golden = golden_arrays(path)
    net = _net(path, seeded_cache)
    if case == SAMPLE:
        image, x0s = net.sample(*sample_args(golden, path))
        err = float(np.abs(image - golden["out.sample.image"]).max())
        steps = ", ".join(
            f"x0_step{k}: {np.abs(x0 - golden[f'trace.sample.x0_step{k}']).max():.3e}"
            for k, x0 in enumerate(x0s)
        )
        assert err <= IMAGE_TOL, f"sampler image max abs error {err:.3e} > {IMAGE_TOL} ({steps})"
        return
    inp = case_inputs(golden, case)
    v, trace = net.forward(inp["x"], inp["t"], inp["y"], inp["lq_latent"], inp["sigma"], trace=True)
    err = float(np.abs(v - golden[f"out.{case}.v"]).max())
    assert err <= V_TOL, f"v max abs error {err:.3e} > {V_TOL}; traces:\n{_trace_report(golden, case, trace)}"


def test_pid_goldens_adds_directories_of_any_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PID_GOLDENS`` adds its directories to the bundled ones, each with only some kinds; a file
    whose bytes are already listed counts once."""
    bundled = {kind: golden_files(kind) for kind in ("pidnet", "gemma2", "sdxl_vae")}
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(bundled["gemma2"][0], extra / "same_bytes.safetensors")
    save_file(
        {"in.case0.x": np.zeros((1, 3, 16, 16), np.float32)},
        str(extra / "new.safetensors"),
        {"kind": "pidnet"},
    )
    monkeypatch.setenv(GOLDENS_ENV, os.pathsep.join([os.environ[GOLDENS_ENV], str(extra)]))
    assert golden_files("pidnet") == [*bundled["pidnet"], extra / "new.safetensors"]
    assert golden_files("gemma2") == bundled["gemma2"]
    assert golden_files("sdxl_vae") == bundled["sdxl_vae"]


def test_full_size_seeded_weights_are_shards_shared_between_topologies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over ``SHARD_BYTES`` a seeded checkpoint is a shard index whose modules other topologies
    reuse; the core reads it as the one-file checkpoint, tensor for tensor."""
    layouts = {
        name: _native.checkpoint_layout(golden_metadata(GOLDENS / f"{name}.safetensors")["config"])
        for name in ("pidnet_sdxl_mini", "pidnet_v1_16ch_mini")
    }
    whole = {name: seeded.cached_seeded(tmp_path / "whole", layout) for name, layout in layouts.items()}
    monkeypatch.setattr(seeded, "SHARD_BYTES", 0)
    sharded = tmp_path / "sharded"
    first = seeded.cached_seeded(sharded, layouts["pidnet_sdxl_mini"])
    shards = set(sharded.glob("*.safetensors"))
    second = seeded.cached_seeded(sharded, layouts["pidnet_v1_16ch_mini"])
    modules = {seeded.module_of(name) for name, _ in layouts["pidnet_v1_16ch_mini"]}
    new = set(sharded.glob("*.safetensors")) - shards
    assert first.name.endswith(".safetensors.index.json") and len(shards) == len(modules)
    # Only the modules the 16-channel latent changes (its adapter) are written again.
    assert 0 < len(new) < len(modules) // 4, sorted(p.name for p in new)
    for name, index in (("pidnet_sdxl_mini", first), ("pidnet_v1_16ch_mini", second)):
        got, want = _native.checkpoint_arrays(str(index)), _native.checkpoint_arrays(str(whole[name]))
        assert got.keys() == want.keys()
        for key, (tag, values) in want.items():
            assert got[key][0] == tag and np.array_equal(got[key][1], values), key
