"""``pid-native selftest`` on the CPU: the report's structure, real parity numbers, and failure.

The selftest runs as the installed console script over the mini goldens only (symlinked into
a temporary directory; the full-topology golden takes minutes on a CPU) and times the mini
preset at 256² with one step, so each run stays within seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import pid_native
from conftest import GOLDENS, golden_files, golden_metadata, is_full_topology
from pid_native.testing.goldens import SAMPLE, golden_arrays, golden_cases, pidnet_cases

EXE = shutil.which("pid-native")
SDXL_MINI = "pidnet_sdxl_mini.safetensors"
# The README's bounds: float32 v, the sampler's image, reduced precision against the float32 v.
TOLERANCES = {"f32": {"max": 1e-4}, SAMPLE: {"max": 5e-4}, "f16": {"mean": 1e-2, "max": 0.15}}
TINY = ["--device", "cpu", "--preset", "mini", "--sizes", "256", "--repeats", "1", "--steps", "1"]


def selftest(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    assert EXE, "the pid-native console script is not installed (pip install .)"
    out = Path(args[args.index("--out") + 1])
    done = subprocess.run([EXE, "selftest", *args], capture_output=True, text=True, timeout=600)
    return done, json.loads(out.read_text()) if out.is_file() else {}


@pytest.fixture(scope="module")
def mini_goldens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("goldens")
    for path in golden_files("pidnet"):
        if not is_full_topology(path):
            (directory / path.name).symlink_to(path.resolve())
    return directory


def test_cpu_selftest_reports_parity_timing_and_environment(mini_goldens: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done, report = selftest(*TINY, "--dtypes", "f32,bf16", "--goldens", str(mini_goldens), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert report["passed"] is True
    assert "pid-native selftest on cpu: PASSED" in done.stdout and str(out) in done.stdout

    # bf16 has no CPU matmul in candle: f16 stands in, and the report says so.
    assert report["dtypes"] == ["f32", "f16"]
    assert any("f16" in note and "bf16" in note for note in report["notes"])

    env = report["environment"]
    assert env["pid_native"] == pid_native.__version__ and env["build"] == pid_native.build_info()
    assert env["python"] and env["numpy"] == np.__version__

    files = sorted(mini_goldens.glob("*.safetensors"))
    expected = {(f.name, case, "f32") for f in files for case in pidnet_cases(f)}
    expected |= {(f.name, case, "f16") for f in files for case in golden_cases(f, "x")}
    rows = report["parity"]["results"]
    assert {(r["golden"], r["case"], r["dtype"]) for r in rows} == expected
    assert report["parity"]["passed"] is True
    for r in rows:
        tol = r["tolerance"]
        assert r["passed"] is True
        assert 0 < r["mean_abs_err"] <= r["max_abs_err"] <= tol["max"], r
        assert tol == TOLERANCES[SAMPLE if r["case"] == SAMPLE else r["dtype"]]
        assert r["output"] == ("image" if r["case"] == SAMPLE else "v")

    assert report["custom_kernels"] == {"applicable": False, "reason": "the custom kernels are CUDA-only"}
    assert report["noise"]["applicable"] is False

    timing = report["timing"]
    assert timing["preset"] == "sdxl-mini" and timing["steps"] == 1 and timing["passed"] is True
    assert [(r["size"], r["dtype"]) for r in timing["results"]] == [(256, "f32"), (256, "f16")]
    for r in timing["results"]:
        assert r["latent"] == [8, 8] and len(r["seconds"]) == 1 and r["seconds_median"] == r["seconds"][0] > 0
        assert r["peak_memory_bytes"] > 0 and "VmHWM" in r["memory_method"]
        assert r["whole_image"] is True and r["tiles"] == 1
    assert "reference" not in report


def test_a_perturbed_golden_fails_the_selftest(tmp_path: Path) -> None:
    source = GOLDENS / SDXL_MINI
    golden = golden_arrays(source)
    golden["out.case0.v"] = golden["out.case0.v"].copy()
    golden["out.case0.v"].flat[0] += np.float32(1e-2)
    goldens = tmp_path / "goldens"
    goldens.mkdir()
    save_file(golden, str(goldens / SDXL_MINI), metadata=golden_metadata(source))

    out = tmp_path / "report.json"
    done, report = selftest(*TINY, "--skip-timing", "--goldens", str(goldens), "--out", str(out))
    assert done.returncode == 1, done.stderr
    assert report["passed"] is False and report["parity"]["passed"] is False
    rows = {r["case"]: r for r in report["parity"]["results"]}
    assert rows["case0"]["passed"] is False
    assert rows["case0"]["max_abs_err"] == pytest.approx(1e-2, abs=1e-4)
    assert rows["case1"]["passed"] is True and rows[SAMPLE]["passed"] is True
    assert "pid-native selftest on cpu: FAILED" in done.stdout
    assert f"FAILED {SDXL_MINI} case0 f32" in done.stdout
    assert "timing" not in report


def test_cuda_on_a_cpu_build_is_refused_with_the_reason(tmp_path: Path) -> None:
    if "cuda" in pid_native.build_info()["features"]:
        pytest.skip("this build has CUDA")
    out = tmp_path / "report.json"
    done, report = selftest("--device", "cuda", "--skip-timing", "--out", str(out))
    assert done.returncode == 1 and report == {}
    assert "no CUDA support" in done.stderr and 'device="cpu"' in done.stderr


def _reference_checkout() -> Path | None:
    """``$PID_REFERENCE``, else ``../ref/PiD`` beside the checkout, if it is there."""
    root = Path(__file__).resolve().parent.parent
    if "PID_REFERENCE" in os.environ:
        path = Path(os.environ["PID_REFERENCE"])
    else:
        path = root.parent / "ref" / "PiD"
    return path if (path / "pid" / "_src" / "networks" / "pid_net.py").is_file() else None


# Runs where the reference extra and a checkout of nv-tlabs/PiD are present (a developer's machine,
# the GPU kit's device check); CI has no checkout, so there both tests skip with this reason.
needs_reference = pytest.mark.skipif(
    # torch alone is not enough: the diffusers extra brings it without the reference side's others.
    _reference_checkout() is None
    or any(importlib.util.find_spec(m) is None for m in ("torch", "loguru", "pynvml")),
    reason="needs the reference extra (pip install '.[reference]') and a checkout of nv-tlabs/PiD "
    "($PID_REFERENCE, default ../ref/PiD)",
)


@needs_reference
def test_reference_comparison_runs_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    reference = str(_reference_checkout())
    done, report = selftest(*TINY, "--skip-parity", "--reference", reference, "--out", str(out))
    assert done.returncode == 0, done.stderr
    section = report["reference"]
    assert section["torch_mode"] == "float32 eager" and section["t_list"] == [1.0, 0.0]
    (row,) = section["results"]
    for side in ("ours", "torch"):
        assert row[side]["seconds"][0] > 0 and row[side]["peak_memory_bytes"] > 0
    assert row["time_ratio"] > 0 and row["memory_ratio"] > 0
    # The same network on the same inputs: float32 both sides.
    assert row["max_abs_diff"] <= 5e-4


@needs_reference
def test_both_sides_read_a_sharded_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seeded cache keeps full-size networks as shards; the comparison opens them on both sides."""
    from pid_native import _native
    from pid_native.testing import seeded
    from pid_native.testing.reference import Comparison

    monkeypatch.setattr(seeded, "SHARD_BYTES", 0)
    layout = _native.checkpoint_layout(golden_metadata(GOLDENS / "pidnet_sdxl_mini.safetensors")["config"])
    index = seeded.cached_seeded(tmp_path, layout)
    assert index.name.endswith(".index.json")
    (row,) = Comparison(_reference_checkout(), index, [1.0, 0.0], threads=2).rows([64], tmp_path)
    assert "error" not in row["ours"] and "error" not in row["torch"], row
    assert row["max_abs_diff"] <= 5e-4
