"""The CUDA kernels' source (rust/pid-core/kernels/pid_kernels.cu), run on the CPU.

CI has no GPU, so the kernel file is compiled with g++ against a small CUDA stand-in
(tests/cuda_emu: a thread per CUDA thread, barriers, warp shuffles, WMMA tiles) and each
kernel is checked against the formula of its candle-ops twin in src/kernels/mod.rs. The
noise kernel must reproduce the Rust generator bit for bit. On a GPU, ``pid-native selftest
--device cuda`` runs the same comparisons against the twins themselves.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pid_native import _native
from pid_native.testing.seeded import bf16_bits

REPO = Path(__file__).resolve().parent.parent
EMU = REPO / "tests" / "cuda_emu"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the CUDA emulation builds with g++ on Linux",
)

F32P = ctypes.POINTER(ctypes.c_float)
U16P = ctypes.POINTER(ctypes.c_uint16)


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    lib = tmp_path_factory.mktemp("cuda_emu") / "emu.so"
    cmd = ["g++", "-std=c++20", "-O2", "-pthread", "-ffp-contract=off", "-fPIC", "-shared"]
    cmd += [f"-I{EMU / 'include'}", "-include", "cuda_emu.h", str(EMU / "harness.cpp"), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def ptr(a: np.ndarray) -> ctypes._Pointer:
    assert a.flags.c_contiguous
    return a.ctypes.data_as(U16P if a.dtype == np.uint16 else F32P)


def to_bf16(a: np.ndarray) -> np.ndarray:
    return bf16_bits(np.ascontiguousarray(a, np.float32))


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def rms_norm_modulate_ref(x, w, shift, scale, rows_per_mod, eps=1e-6):
    x64 = x.astype(np.float64)
    n = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps) * w
    m = np.repeat(np.arange(shift.shape[0]), rows_per_mod)
    return n * (1 + scale[m]) + shift[m]


@pytest.mark.parametrize(("seed", "stream"), [(0, 0), (42, 2), (0xDEADBEEF12345678, 7)])
def test_noise_kernel_is_bit_identical_to_the_cpu_generator(emu, seed: int, stream: int) -> None:
    n = 4 * 2500 + 3  # a partial last block
    out = np.full(n, np.nan, np.float32)
    emu.emu_normal_f32(ptr(out), ctypes.c_size_t(n), ctypes.c_uint64(seed), ctypes.c_uint32(stream))
    cpu = _native.gaussian_noise(seed, stream, [n])
    assert np.array_equal(out.view(np.uint32), cpu.view(np.uint32)), f"{(out != cpu).sum()} values differ"


@pytest.mark.parametrize(("rows", "d", "per_mod"), [(2 * 37, 200, 37), (50, 16, 1), (9, 1152, 9)])
def test_rms_norm_modulate_f32(emu, rows: int, d: int, per_mod: int) -> None:
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, d), np.float32) * 3
    w = rng.standard_normal(d, np.float32)
    shift, scale = (rng.standard_normal((rows // per_mod, d), np.float32) for _ in range(2))
    out = np.zeros_like(x)
    emu.emu_rms_norm_modulate_f32(
        ptr(x), ptr(w), ptr(shift), ptr(scale), ptr(out), rows, d, per_mod, ctypes.c_float(1e-6)
    )
    np.testing.assert_allclose(out, rms_norm_modulate_ref(x, w, shift, scale, per_mod), rtol=1e-5, atol=1e-5)


def test_rms_norm_modulate_bf16_rounds_once(emu) -> None:
    rows, d, per_mod = 64, 72, 64
    rng = np.random.default_rng(1)
    x, w = to_bf16(rng.standard_normal((rows, d))), to_bf16(rng.standard_normal(d))
    shift, scale = to_bf16(rng.standard_normal((1, d))), to_bf16(rng.standard_normal((1, d)))
    out = np.zeros_like(x)
    emu.emu_rms_norm_modulate_bf16(
        ptr(x), ptr(w), ptr(shift), ptr(scale), ptr(out), rows, d, per_mod, ctypes.c_float(1e-6)
    )
    ref = rms_norm_modulate_ref(*(from_bf16(a) for a in (x, w, shift, scale)), per_mod)
    # One bf16 rounding of the f32 result: half an ulp, 2^-9 relative.
    np.testing.assert_allclose(from_bf16(out), ref, rtol=2**-8, atol=1e-6)


def gated_add_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(2)
    rows, d, per_mod = 3 * 41, 96, 41
    x, y = rng.standard_normal((rows, d), np.float32), rng.standard_normal((rows, d), np.float32)
    return x, rng.standard_normal((rows // per_mod, d), np.float32), y, per_mod


def gated_add_ref(x: np.ndarray, gate: np.ndarray, y: np.ndarray, per_mod: int) -> np.ndarray:
    return x.astype(np.float64) + np.repeat(gate, per_mod, 0) * y.astype(np.float64)


def test_gated_add_f32(emu) -> None:
    x, gate, y, per_mod = gated_add_inputs()
    out = np.zeros_like(x)
    emu.emu_gated_add_f32(ptr(x), ptr(gate), ptr(y), ptr(out), ctypes.c_size_t(x.size), x.shape[1], per_mod)
    np.testing.assert_allclose(out, gated_add_ref(x, gate, y, per_mod), rtol=1e-6, atol=1e-6)


def test_gated_add_bf16_rounds_once(emu) -> None:
    x, gate, y, per_mod = gated_add_inputs()
    x, gate, y = (to_bf16(a) for a in (x, gate, y))
    out = np.zeros_like(x)
    emu.emu_gated_add_bf16(ptr(x), ptr(gate), ptr(y), ptr(out), ctypes.c_size_t(x.size), x.shape[1], per_mod)
    ref = gated_add_ref(*(from_bf16(a) for a in (x, gate, y)), per_mod)
    # f32 arithmetic on the bf16 inputs, one bf16 rounding of the result: 2^-9 relative.
    np.testing.assert_allclose(from_bf16(out), ref, rtol=2**-8, atol=1e-6)


def sigma_gate_inputs(per_token: bool) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(3)
    b, tokens, d = 2, 29, 48
    s, f = (rng.standard_normal((b, tokens, d), np.float32) for _ in range(2))
    logit = rng.standard_normal((b, tokens, 1 if per_token else d), np.float32) * 2
    return s, f, logit, np.array([0.0, 2.5], np.float32)


def sigma_gate_ref(s: np.ndarray, f: np.ndarray, logit: np.ndarray, offset: np.ndarray) -> np.ndarray:
    gate = 1 / (1 + np.exp(-(logit.astype(np.float64) - offset[:, None, None])))
    return s + f * gate


@pytest.mark.parametrize("per_token", [False, True])
def test_sigma_gate_f32(emu, per_token: bool) -> None:
    s, f, logit, offset = sigma_gate_inputs(per_token)
    out = np.zeros_like(s)
    _, tokens, d = s.shape
    emu.emu_sigma_gate_f32(
        ptr(s), ptr(f), ptr(logit), ptr(offset), ptr(out), ctypes.c_size_t(s.size), d, logit.shape[2], tokens
    )
    np.testing.assert_allclose(out, sigma_gate_ref(s, f, logit, offset), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_token", [False, True])
def test_sigma_gate_bf16_rounds_once(emu, per_token: bool) -> None:
    s, f, logit, offset = sigma_gate_inputs(per_token)
    s, f, logit = (to_bf16(a) for a in (s, f, logit))
    out = np.zeros_like(s)
    _, tokens, d = s.shape
    emu.emu_sigma_gate_bf16(
        ptr(s), ptr(f), ptr(logit), ptr(offset), ptr(out), ctypes.c_size_t(s.size), d, logit.shape[2], tokens
    )
    ref = sigma_gate_ref(*(from_bf16(a) for a in (s, f, logit)), offset)
    np.testing.assert_allclose(from_bf16(out), ref, rtol=2**-8, atol=1e-6)


def misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` starting 2 bytes past a 16-byte boundary."""
    buf = np.zeros(a.size + 8, a.dtype)
    start = (-buf.ctypes.data % 16) // a.itemsize + 1
    out = buf[start : start + a.size].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("aligned", [True, False], ids=["16-byte-loads", "scalar-loads"])
@pytest.mark.parametrize("d", [64, 72])
def test_flash_attention_bf16(emu, d: int, aligned: bool) -> None:
    # Query and key counts that are not multiples of the 64-query block and 32-key tile.
    bh, lq, lk = 2, 133, 75
    rng = np.random.default_rng(d)
    q, k, v = (to_bf16(rng.standard_normal((bh, n, d)) * s) for n, s in ((lq, 1.5), (lk, 1.5), (lk, 1.0)))
    if not aligned:
        q, k, v = misaligned(q), misaligned(k), misaligned(v)
        assert q.ctypes.data % 16 == 2
    out = np.zeros((bh, lq, d), np.uint16)
    scale = 1 / np.sqrt(d)
    emu.emu_flash_attention_bf16(ptr(q), ptr(k), ptr(v), ptr(out), bh, lq, lk, d, ctypes.c_float(scale))
    q64, k64, v64 = (from_bf16(a).astype(np.float64) for a in (q, k, v))
    s = q64 @ k64.transpose(0, 2, 1) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v64
    err = np.abs(from_bf16(out) - ref).max()
    # Probabilities and the output are bf16 (8 bits of mantissa); |ref| is at most ~2.
    assert err < 2e-2, f"max abs error {err:.3e}"
    assert not np.array_equal(from_bf16(out)[:, 0], from_bf16(out)[:, 1]), "rows must differ"
