"""The MLX and candle backends agree: same weights, inputs and seeds give the same images.

Both draw noise from the shared counter-based generator (stream 0 initial, k + 1 after
step k, per-image seeds), so whole decodes are compared directly, to <= 1e-3 max abs. The
plans (memory model and tiling) must be identical, and a tiled decode must agree too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from conftest import golden_config, golden_files, is_full_topology

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'pid-native[mlx]')")

from pid_native import _native
from pid_native.backends.mlx.decoder import MlxDecoder
from pid_native.decoder import CancelToken, Decoder
from pid_native.errors import BudgetError, Cancelled, InvalidInputError
from pid_native.testing.goldens import seeded_checkpoint

pytestmark = pytest.mark.mlx

CROSS_TOL = 1e-3
BUDGET = 1 << 40


def _mini_files() -> list:
    return [pytest.param(p, id=p.stem) for p in golden_files("pidnet") if not is_full_topology(p)]


def _sdxl_mini() -> Path:
    """A mini golden with the SDXL latent space (4 channels at /8)."""
    for p in golden_files("pidnet"):
        if not is_full_topology(p) and golden_config(p)["lq_latent_channels"] == 4:
            return p
    raise RuntimeError("no mini SDXL pidnet golden (4-channel latent) in PID_GOLDENS")


def _case0(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "np") as f:
        return {k.removeprefix("in.case0."): f.get_tensor(k) for k in f.keys() if k.startswith("in.case0.")}


def _open_both(path: Path, cache: Path) -> tuple[MlxDecoder, _native.Decoder]:
    cfg = golden_config(path)
    ckpt = seeded_checkpoint(path, cache)
    space = {
        "latent_channels": cfg["lq_latent_channels"],
        "latent_down_factor": cfg["latent_spatial_down_factor"],
    }
    return MlxDecoder.open(ckpt, **space), _native.Decoder.open(str(ckpt), **space)


def _request(
    dec: MlxDecoder,
    z: np.ndarray,
    y: np.ndarray,
    sigma: list[float],
    seeds: list[int],
    steps: int,
    **plan: int,
) -> _native.DecodeRequest:
    """A request for ``dec``'s network (plan within BUDGET, or the ``tile=`` of ``plan``)."""
    p = dec.plan(z.shape[0], z.shape[2], z.shape[3], BUDGET, plan.get("tile"))
    return _native.DecodeRequest(dec.config.to_json(), z, y, sigma, seeds, steps, p)


def _decode_params() -> list:
    """Every mini golden at the trained 4 steps, plus the 1-step (t = 1) and 3-step ladders once."""
    params = [pytest.param(p.values[0], 4, id=f"{p.id}-4") for p in _mini_files()]
    return params + [pytest.param(_sdxl_mini(), n, id=f"{_sdxl_mini().stem}-{n}") for n in (1, 3)]


@pytest.mark.parametrize(("path", "steps"), _decode_params())
def test_mlx_decode_matches_candle(path: Path, steps: int, seeded_cache: Path) -> None:
    mlx_dec, candle = _open_both(path, seeded_cache)
    inp = _case0(path)
    b = inp["lq_latent"].shape[0]
    seeds = [7 + 1000 * i for i in range(b)]
    request = _request(mlx_dec, inp["lq_latent"], inp["y"], inp["sigma"].tolist(), seeds, steps)
    got = mlx_dec.decode(request)
    ref = candle.decode(request)
    assert got.shape == ref.shape == (b, 3, *(mlx_dec.scale * s for s in inp["lq_latent"].shape[2:]))
    err = float(np.abs(got - ref).max())
    assert err <= CROSS_TOL, f"mlx vs candle max abs {err:.3e} > {CROSS_TOL}"
    if b > 1:  # each image follows its own seed
        swapped = mlx_dec.decode(
            _request(mlx_dec, inp["lq_latent"], inp["y"], inp["sigma"].tolist(), seeds[::-1], steps)
        )
        assert np.abs(swapped - got).max() > 0.1


def test_mlx_tiled_decode_matches_candle(seeded_cache: Path) -> None:
    mlx_dec, candle = _open_both(_sdxl_mini(), seeded_cache)
    inp = _case0(_sdxl_mini())
    z, y, sigma = inp["lq_latent"][:1], inp["y"][:1], inp["sigma"][:1]
    z = np.ascontiguousarray(np.concatenate([z, z[:, :, ::-1]], axis=2))  # taller, so 64 px tiles overlap
    request = _request(mlx_dec, z, y, sigma.tolist(), [3], 2, tile=64)
    assert len(request.tiles) > 2 and not request.plan.whole
    got = mlx_dec.decode(request)
    ref = candle.decode(request)
    err = float(np.abs(got - ref).max())
    assert err <= CROSS_TOL, f"tiled mlx vs candle max abs {err:.3e} > {CROSS_TOL}"


@pytest.mark.parametrize("path", _mini_files())
def test_mlx_plan_matches_candle(path: Path, seeded_cache: Path) -> None:
    mlx_dec, candle = _open_both(path, seeded_cache)
    f = mlx_dec.scale
    for batch, height, width, budget, tile in [  # sizes in output pixels
        (1, 128, 192, BUDGET, None),
        (3, 2048, 3072, BUDGET, None),
        (1, 4096, 4096, 3 << 30, None),
        (2, 3072, 4096, 4 << 30, None),
        (1, 2048, 1536, BUDGET, 512),
    ]:
        h, w = height // f, width // f
        assert mlx_dec.plan(batch, h, w, budget, tile) == candle.plan(batch, h, w, budget, tile)
    with pytest.raises(BudgetError) as mlx_err:
        mlx_dec.plan(1, 4096 // f, 4096 // f, 1 << 20)
    with pytest.raises(BudgetError) as candle_err:
        candle.plan(1, 4096 // f, 4096 // f, 1 << 20)
    assert mlx_err.value.code == candle_err.value.code == "memory_budget"


def test_decoder_registry_mlx_matches_candle(seeded_cache: Path) -> None:
    """The user-facing Decoder on backend "mlx": same images and progress events as candle-cpu."""
    path = _sdxl_mini()
    ckpt = seeded_checkpoint(path, seeded_cache)
    inp = _case0(path)
    out: dict[str, np.ndarray] = {}
    events: dict[str, list[str]] = {}
    for backend in ("mlx", "candle-cpu"):
        dec = Decoder.open(ckpt, backend=backend, memory_budget=64)
        assert dec.backend == backend
        seen: list[object] = []
        out[backend] = dec.decode(
            inp["lq_latent"],
            caption_embs=inp["y"],
            sigma=inp["sigma"].tolist(),
            seed=11,
            steps=3,
            progress=seen.append,
        )
        events[backend] = [str(e) for e in seen]
    assert events["mlx"] == events["candle-cpu"]
    err = float(np.abs(out["mlx"] - out["candle-cpu"]).max())
    assert err <= CROSS_TOL, f"Decoder(mlx) vs Decoder(candle-cpu) max abs {err:.3e} > {CROSS_TOL}"


def test_decoder_compute_dtype_reaches_mlx(seeded_cache: Path) -> None:
    """``compute_dtype="bf16"`` gives MLX's bf16 matmuls: close to the f32 decode, not equal."""
    path = _sdxl_mini()
    ckpt = seeded_checkpoint(path, seeded_cache)
    inp = _case0(path)
    out = {
        dtype: Decoder.open(ckpt, backend="mlx", compute_dtype=dtype).decode(
            inp["lq_latent"], caption_embs=inp["y"], sigma=inp["sigma"].tolist(), steps=1
        )
        for dtype in ("f32", "bf16")
    }
    assert 0 < float(np.abs(out["bf16"] - out["f32"]).max()) < 0.1
    with pytest.raises(InvalidInputError, match="'f16' is not supported"):
        Decoder.open(ckpt, backend="mlx", compute_dtype="f16")


def test_decoder_registry_mlx_cancels(seeded_cache: Path) -> None:
    inp = _case0(_sdxl_mini())
    dec = Decoder.open(seeded_checkpoint(_sdxl_mini(), seeded_cache), backend="mlx")
    token = CancelToken()
    seen: list[str] = []

    def progress(event: object) -> None:
        seen.append(str(event))
        if str(event).startswith("step 2"):
            token.cancel()

    with pytest.raises(Cancelled):
        dec.decode(inp["lq_latent"], caption_embs=inp["y"], progress=progress, cancel=token)
    assert not any(e.startswith("step 3") for e in seen)
