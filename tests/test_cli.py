"""The installed ``pid-native`` console script, run as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

EXE = shutil.which("pid-native")


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    assert EXE, "the pid-native console script is not installed (pip install .)"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


@pytest.mark.parametrize(
    "cmd", ["decode", "upscale", "demo", "synth", "info", "bench", "selftest", "fetch", "verify", "convert"]
)
def test_every_command_has_help(cmd: str) -> None:
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: pid-native" in r.stdout


def test_decode_npy_and_safetensors_to_png(synth_bundle, tmp_path: Path) -> None:
    lat = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    np.save(tmp_path / "lat.npy", lat)
    r = run(
        "decode",
        str(tmp_path / "lat.npy"),
        "--weights",
        str(synth_bundle),
        "--caption",
        "a cat",
        "--backend",
        "candle-cpu",
        "-o",
        str(tmp_path / "out.png"),
    )
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "out.png") as img:
        assert img.size == (96, 64) and "NSCLv1" in img.text["pid-license"]
    save_file({"latents": lat[None].repeat(2, 0)}, str(tmp_path / "lat.safetensors"))
    r = run(
        "decode",
        str(tmp_path / "lat.safetensors"),
        "--weights",
        str(synth_bundle),
        "-o",
        str(tmp_path / "b.png"),
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b_0.png").is_file() and (tmp_path / "b_1.png").is_file()


def test_decode_raw_latents_normalises_them_first(synth_bundle, tmp_path: Path) -> None:
    raw = np.random.default_rng(1).standard_normal((1, 4, 2, 3)).astype(np.float32)
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "scaled.npy", raw * np.float32(0.13025))
    common = ["--weights", str(synth_bundle), "--backend", "candle-cpu", "--space", "kolors"]
    for name, extra in (("raw", ["--raw-latent"]), ("scaled", [])):
        r = run("decode", str(tmp_path / f"{name}.npy"), *common, *extra, "-o", str(tmp_path / f"{name}.png"))
        assert r.returncode == 0 and "with sdxl-2kto4k" in r.stdout, r.stderr
    with Image.open(tmp_path / "raw.png") as a, Image.open(tmp_path / "scaled.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    r = run("decode", str(tmp_path / "raw.npy"), *common, "--flux2-vae", "vae.safetensors", "-o", "x.png")
    assert r.returncode == 1 and "--flux2-vae goes with --raw-latent" in r.stderr
    r = run("decode", str(tmp_path / "raw.npy"), *common[:-2], "--space", "flux", "-o", "x.png")
    assert r.returncode == 1 and "[wrong_space]" in r.stderr


def test_upscale_synth_and_demo(synth_bundle, tmp_path: Path) -> None:
    Image.new("RGB", (40, 33), (200, 30, 30)).save(tmp_path / "in.png")
    r = run(
        "upscale", str(tmp_path / "in.png"), "--weights", str(synth_bundle), "-o", str(tmp_path / "up.png")
    )
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "up.png") as img:
        assert img.size == (128, 128)  # 32x32 after the centre crop, then 4x
    r = run(
        "demo", "--synthetic", "-o", str(tmp_path / "demo.png"), env={"PID_NATIVE_CACHE": str(tmp_path / "c")}
    )
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC DEMO" in r.stderr
    with Image.open(tmp_path / "demo.png") as img:
        assert img.size == (1024, 768)


def test_info_reports_backends_and_budget(tmp_path: Path) -> None:
    r = run("info", env={"PID_MEMORY_BUDGET_GIB": "6", "PID_NATIVE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backends"]["candle-cpu"]["available"] is True
    assert info["memory_budget_gib"] == 6 and info["memory_budget_source"] == "env"
    assert info["provisioned"] is False


def test_bench_prints_timings(synth_bundle) -> None:
    r = run(
        "bench", "--weights", str(synth_bundle), "--latent", "2x2", "--repeat", "1", "--backend", "candle-cpu"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["output"] == "64x64" and out["seconds_best"] > 0


def test_errors_are_one_line_with_exit_codes(synth_bundle, tmp_path: Path) -> None:
    r = run(
        "decode", str(tmp_path / "missing.npy"), "--weights", str(synth_bundle), "-o", str(tmp_path / "x.png")
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "missing.npy" in r.stderr and "Traceback" not in r.stderr
    np.save(tmp_path / "bad.npy", np.zeros((3, 2, 2), np.float32))
    r = run(
        "decode", str(tmp_path / "bad.npy"), "--weights", str(synth_bundle), "-o", str(tmp_path / "x.png")
    )
    assert r.returncode == 1 and "latent_channels" in r.stderr
    r = run(
        "--debug",
        "decode",
        str(tmp_path / "bad.npy"),
        "--weights",
        str(synth_bundle),
        "-o",
        str(tmp_path / "x.png"),
    )
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert run("decode").returncode == 2
    r = run("demo", "-o", str(tmp_path / "d.png"), env={"PID_NATIVE_HOME": str(tmp_path / "empty")})
    assert r.returncode == 1 and "pid-native fetch" in r.stderr and "not_provisioned" in r.stderr
    assert not (tmp_path / "x.png").exists()
