"""Throughput per backend: one network forward, full 4-step decodes, caption encoding, VAE encoding."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import PRESET, peak_rss_gib, reset_peak_rss, runnable_backends
from pid_native import Decoder, _native

# Latent sizes (output = 32x): 8 -> 256², 16 -> 512², 32 -> 1024² (full preset on CPU: minutes).
SIZES = [int(s) for s in os.environ.get("PID_BENCH_SIZES", "8,16").split(",")]
_DECODERS: dict[str, Decoder] = {}


def decoder(bundle, backend: str) -> Decoder:
    if backend not in _DECODERS:
        _DECODERS[backend] = Decoder.open(bundle, backend=backend)
    return _DECODERS[backend]


def info(benchmark, backend: str, pixels: int) -> None:
    benchmark.extra_info.update(
        backend=backend,
        preset=PRESET,
        dtype={"candle-cpu": "f32 compute, bf16 weights", "candle-cuda": "bf16"}.get(backend, "f32"),
        threads=os.cpu_count(),
        pixels=pixels,
        pixels_per_s=round(pixels / benchmark.stats.stats.median, 1),
        peak_rss_gib=peak_rss_gib(),
    )


def forward_fn(ckpt, backend: str, x: np.ndarray, y: np.ndarray, z: np.ndarray):
    """One velocity forward at t = 999 on ``backend``, as a zero-argument callable."""
    t, sigma = np.full(1, 999.0, np.float32), np.zeros(1, np.float32)
    if backend.startswith("candle"):
        device = "cpu" if backend == "candle-cpu" else "cuda:0"
        net = _native.PidNet.open(ckpt, device=device, compute_dtype="f32" if device == "cpu" else "bf16")
        return lambda: net.forward(x, t, y, z, sigma)
    if backend == "mlx":
        import mlx.core as mx

        from pid_native.backends.mlx.weights import load_pidnet

        mnet = load_pidnet(ckpt)
        cond = mnet.condition(mx.array(y), mx.array(z), mx.array(sigma), x.shape[2:])
        return lambda: np.array(mnet.velocity(cond, mx.array(x), mx.array(t)))
    pytest.skip(f"no network-level entry point for third-party backend {backend}")


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("size", SIZES)
def test_forward(benchmark, bundle, backend: str, size: int) -> None:
    ckpt = bundle / "pid_sdxl_2kto4k.safetensors"
    txt_dim = json.loads(_native.inspect_checkpoint(ckpt))["txt_embed_dim"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, size * 32, size * 32)).astype(np.float32)
    y = rng.standard_normal((1, 300, txt_dim)).astype(np.float32)
    z = rng.standard_normal((1, 4, size, size)).astype(np.float32)
    run = forward_fn(ckpt, backend, x, y, z)
    reset_peak_rss()
    v = benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    assert v.shape == x.shape and np.isfinite(v).all()
    info(benchmark, backend, x.shape[2] * x.shape[3])


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("size", SIZES)
def test_decode(benchmark, bundle, backend: str, size: int) -> None:
    dec = decoder(bundle, backend)
    lat = np.random.default_rng(0).standard_normal((1, 4, size, size)).astype(np.float32) * 0.5
    embs = dec.encode_captions(["a red fox in the snow"])
    reset_peak_rss()
    out = benchmark.pedantic(
        dec.decode, args=(lat,), kwargs={"caption_embs": embs}, rounds=2, warmup_rounds=1
    )
    assert out.shape == (1, 3, size * 32, size * 32)
    info(benchmark, backend, out.shape[2] * out.shape[3])


@pytest.mark.parametrize("backend", runnable_backends())
def test_caption_encoding(benchmark, bundle, backend: str) -> None:
    dec = decoder(bundle, backend)
    captions = [f"caption number {i}: a lighthouse on a cliff at dusk" for i in range(4)]
    reset_peak_rss()
    # Distinct captions per round so the cache never answers.
    rounds = iter(range(1000))
    embs = benchmark.pedantic(
        lambda: dec.encode_captions([f"{c} #{next(rounds)}" for c in captions]), rounds=3, warmup_rounds=1
    )
    assert embs.shape[:2] == (4, 300)
    info(benchmark, backend, 0)


@pytest.mark.parametrize("backend", runnable_backends())
def test_vae_encode(benchmark, bundle, backend: str) -> None:
    dec = decoder(bundle, backend)
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 512, 512)).astype(np.float32)
    reset_peak_rss()
    lat = benchmark.pedantic(dec.vae_encode, args=(image,), rounds=3, warmup_rounds=1)
    assert lat.shape == (1, 4, 64, 64)
    info(benchmark, backend, 512 * 512)
