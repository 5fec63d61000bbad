"""Unit tests of the MLX backend: attention, config, weights, decoder API, captions, VAE, registry."""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from conftest import golden_config, golden_files, golden_metadata, is_full_topology

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'pid-native[mlx]')")

from pid_native import _native  # noqa: E402
from pid_native.backends import get  # noqa: E402
from pid_native.backends.mlx import BACKEND  # noqa: E402
from pid_native.backends.mlx.caption import CaptionEncoder  # noqa: E402
from pid_native.backends.mlx.caption.prompt import HfPromptTokenizer, select_tokens  # noqa: E402
from pid_native.backends.mlx.config import NetConfig  # noqa: E402
from pid_native.backends.mlx.decoder import MlxDecoder  # noqa: E402
from pid_native.backends.mlx.net.attention import AttentionBudget, attention  # noqa: E402
from pid_native.backends.mlx.weights import Checkpoint, load_pidnet, regroup_pit_modulation  # noqa: E402
from pid_native.errors import Cancelled, InvalidInputError, MissingFileError, WeightsError  # noqa: E402
from pid_native.testing.goldens import seeded_checkpoint  # noqa: E402
from pid_native.testing.tokenizer import build_tiny_gemma_tokenizer  # noqa: E402

pytestmark = pytest.mark.mlx


def _reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = (q.astype(np.float64) @ np.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("head_dim", [64, 72])
def test_attention_padding_and_chunking_are_exact(head_dim: int) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, n, head_dim)).astype(np.float32) for n in (37, 41, 41))
    ref = _reference_attention(q, k, v)
    budgets = {
        "plain": AttentionBudget(pad_head_dim=False),
        "padded": AttentionBudget(pad_head_dim=True),
        "one row per chunk": AttentionBudget(score_bytes=1, pad_head_dim=True),
    }
    for name, budget in budgets.items():
        out = np.array(attention(mx.array(q), mx.array(k), mx.array(v), budget))
        assert out.shape == q.shape
        assert np.abs(out - ref).max() < 2e-6, name


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="MKL is bound only on Linux x86_64 (macOS uses Accelerate)",
)
def test_mlx_matmul_runs_on_mkl_on_linux() -> None:
    """The mlx extra installs MKL on Linux x86_64 and the backend binds it before mlx.core loads."""
    maps = Path("/proc/self/maps").read_text()
    assert "libmkl_rt.so" in maps, "MKL is not loaded: pip install 'pid-native[mlx]' installs it"
    a = mx.random.normal((256, 512), key=mx.random.key(0))
    b = mx.random.normal((512, 256), key=mx.random.key(1))
    ref = np.array(a).astype(np.float64) @ np.array(b).astype(np.float64)
    assert np.abs(np.array(a @ b) - ref).max() < 1e-3
    # MKL's kernels load on the first call; the netlib BLAS has no such library.
    maps = Path("/proc/self/maps").read_text()
    assert any(f"libmkl_{k}" in maps for k in ("avx2", "avx512", "avx10", "def"))


def test_sdxl_layout_has_456_tensors_and_1_36b_parameters() -> None:
    layout = NetConfig.preset("sdxl-2kto4k").expected_tensors()
    assert len(layout) == 456
    assert sum(math.prod(s) for _, s in layout) == 1_362_292_874


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in golden_files("pidnet")])
def test_config_round_trips(path: Path) -> None:
    cfg = NetConfig.from_json(golden_metadata(path)["config"])
    assert NetConfig.from_json(cfg.to_json()) == cfg
    ours, golden = json.loads(cfg.to_json()), golden_config(path)
    assert {k: ours[k] for k in golden} == golden


def test_pit_modulation_regrouping_follows_upstream_index() -> None:
    p2, dim = 4, 3  # upstream row p*6*dim + k*dim + ch feeds modulation k at pixel p, channel ch
    rows = mx.arange(6 * p2 * dim)
    regrouped = np.array(regroup_pit_modulation(rows, p2, dim))
    for k in range(6):
        for p in range(p2):
            for ch in range(dim):
                assert regrouped[k * p2 * dim + p * dim + ch] == p * 6 * dim + k * dim + ch


def _mini(cache: Path) -> tuple[Path, Path]:
    """(golden, seeded checkpoint) of the mini SDXL golden."""
    for p in golden_files("pidnet"):
        if not is_full_topology(p) and golden_config(p)["lq_latent_channels"] == 4:
            return p, seeded_checkpoint(p, cache)
    raise RuntimeError("no mini SDXL pidnet golden in PID_GOLDENS")


def test_weights_errors_name_the_problem(seeded_cache: Path, tmp_path: Path) -> None:
    _, ckpt = _mini(seeded_cache)
    tensors = mx.load(str(ckpt))
    cases = {
        "missing_tensor": {k: v for k, v in tensors.items() if k != "patch_blocks.1.attn.proj_x.bias"},
        "tensor_shape": tensors | {"final_layer.linear.bias": mx.zeros((4,), dtype=mx.bfloat16)},
        "unexpected_tensor": tensors | {"pixel_blocks.0.extra.weight": mx.zeros((2,), dtype=mx.bfloat16)},
    }
    cfg = load_pidnet(ckpt).config
    for code, bad in cases.items():
        path = tmp_path / f"{code}.safetensors"
        mx.save_safetensors(str(path), bad)
        with pytest.raises(WeightsError) as err:
            load_pidnet(path, cfg)
        assert err.value.code == code and path.name in str(err.value)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(WeightsError) as err:
        Checkpoint(truncated)
    assert err.value.code == "truncated"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError) as err:
        Checkpoint(junk)
    assert err.value.code == "not_safetensors"
    with pytest.raises(MissingFileError):
        Checkpoint(tmp_path / "absent.safetensors")
    prefixed = tmp_path / "raw_upstream.safetensors"
    mx.save_safetensors(
        str(prefixed), {f"net.{k}": v for k, v in tensors.items()} | {"net_ema.x": tensors["y_pos_embedding"]}
    )
    assert load_pidnet(prefixed).config == cfg


def test_decoder_reports_progress_cancels_and_decodes_only_its_requests(seeded_cache: Path) -> None:
    golden, ckpt = _mini(seeded_cache)
    dec = MlxDecoder.open(ckpt)
    with safe_open(str(golden), "np") as f:
        z, y = f.get_tensor("in.case1.lq_latent"), f.get_tensor("in.case1.y")
    plan = dec.plan(1, z.shape[2], z.shape[3], 1 << 40)
    request = _native.DecodeRequest(dec.config.to_json(), z, y, [0.0], [5], 3, plan)
    events: list[str] = []
    img = dec.decode(request, on_event=lambda e: events.append(str(e)))
    assert events == ["image 1/1", "step 1/3", "step 2/3", "step 3/3"]
    assert img.shape == (1, 3, 32 * z.shape[2], 32 * z.shape[3]) and np.abs(img).max() <= 1.0
    with pytest.raises(Cancelled):
        dec.decode(request, on_event=lambda e: events.append(str(e)), should_cancel=lambda: len(events) >= 6)
    assert events[4:] == ["image 1/1", "step 1/3"]
    # A request checked against another network is not decoded.
    other = json.loads(dec.config.to_json()) | {"rope_ref_h": 2 * dec.config.rope_ref_h}
    foreign = _native.DecodeRequest(json.dumps(other), z, y, [0.0], [5], 3, plan)
    with pytest.raises(InvalidInputError) as err:
        dec.decode(foreign)
    assert err.value.code == "request"


def test_the_mlx_backend_validates_with_the_core_and_names_decoder_keywords(seeded_cache: Path) -> None:
    """Bad requests fail with the core's codes, and a missing Gemma with ``gemma=``: one place for both."""
    from pid_native.decoder import Decoder

    _, ckpt = _mini(seeded_cache)
    dec = Decoder.open(ckpt, backend="mlx")
    embs = np.zeros((1, 300, 64), np.float32)
    for code, latents in {
        "latent_channels": np.zeros((1, 3, 2, 2), np.float32),
        "latent_not_finite": np.full((1, 4, 2, 2), np.nan, np.float32),
    }.items():
        with pytest.raises(InvalidInputError) as err:
            dec.decode(latents, caption_embs=embs)
        assert err.value.code == code
    with pytest.raises(InvalidInputError, match="gemma=") as err:
        dec.encode_captions(["a cat"])
    assert err.value.code == "no_caption_encoder"
    with pytest.raises(InvalidInputError, match="vae=") as err:
        dec.vae_decode(np.zeros((1, 4, 2, 2), np.float32))
    assert err.value.code == "no_vae"


def _gemma_dir(tmp_path: Path) -> tuple[Path, Path]:
    golden = golden_files("gemma2")[0]
    d = tmp_path / "gemma"
    d.mkdir()
    cfg = json.loads(golden_metadata(golden)["config"])
    (d / "config.json").write_text(json.dumps(cfg))
    weights = {
        f"model.{k.removeprefix('weights.')}": v
        for k, v in mx.load(str(golden)).items()
        if k.startswith("weights.")
    }
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    build_tiny_gemma_tokenizer(d / "tokenizer.json")
    return golden, d


def test_caption_pipeline_builds_prompts_and_selects_tokens(tmp_path: Path) -> None:
    _, gemma = _gemma_dir(tmp_path)
    enc = CaptionEncoder.open(gemma)
    tok = enc.tokenizer
    ids, mask = tok.tokenize(["", "a cat on the mat " * 200])
    assert ids.shape == mask.shape == (2, tok.num_chi + 298)
    assert (ids[:, 0] == 2).all()
    # "" -> BOS + CHI + right padding; a long caption is truncated on the right, never padded.
    assert mask[0].sum() == tok.num_chi and (ids[0, tok.num_chi :] == 0).all() and mask[1].all()
    feats = enc.encode(["", "a cat on the mat " * 200, ""])
    assert feats.shape == (3, 300, 64) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[0], feats[2])
    np.testing.assert_allclose(feats[:2], select_tokens(enc.hidden_states(ids, mask)), atol=1e-6)
    assert select_tokens(np.arange(10)[None, :, None], 4)[0, :, 0].tolist() == [0, 7, 8, 9]
    for code, (bad_ids, bad_mask) in {
        "token_id": (np.where(ids == 2, 10_000, ids), mask),
        "attention_mask": (ids, np.roll(mask, 1, axis=1)),
        "token_shape": (ids[:, :5], mask),
    }.items():
        with pytest.raises(InvalidInputError) as err:
            enc.hidden_states(bad_ids, bad_mask)
        assert err.value.code == code
    with pytest.raises(WeightsError) as werr:
        HfPromptTokenizer(gemma / "tokenizer.json", bos_id=5)
    assert werr.value.code == "tokenizer_no_bos"


def test_decoder_opens_gemma_and_vae_directories(seeded_cache: Path, tmp_path: Path) -> None:
    _, ckpt = _mini(seeded_cache)
    _, gemma = _gemma_dir(tmp_path)
    vae_golden = golden_files("sdxl_vae")[0]
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(golden_metadata(vae_golden)["config"])
    weights = {
        k.removeprefix("weights."): v for k, v in mx.load(str(vae_golden)).items() if k.startswith("weights.")
    }
    mx.save_safetensors(str(vae_dir / "diffusion_pytorch_model.safetensors"), weights)
    dec = MlxDecoder.open(ckpt, gemma, vae_dir)
    assert dec.encode_captions(["a cat"]).shape == (1, 300, 64)
    with safe_open(str(vae_golden), "np") as f:
        image, mean = f.get_tensor("in.image"), f.get_tensor("out.latent_mean_raw")
        latent, decoded = f.get_tensor("in.latent_raw"), f.get_tensor("out.decoded")
    scale = json.loads(golden_metadata(vae_golden)["config"])["scaling_factor"]
    assert np.abs(dec.vae_encode(image) / scale - mean).max() <= 1e-4
    assert np.abs(dec.vae_decode(latent * scale) - decoded).max() <= 1e-4
    with pytest.raises(MissingFileError):
        MlxDecoder.open(ckpt, vae_dir=tmp_path / "nowhere")
    shutil.rmtree(gemma)


def test_registry_reports_why_mlx_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get("mlx") is BACKEND and BACKEND.availability().available
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    status = BACKEND.availability()
    assert not status.available and "pip install" in status.reason


def test_decoder_on_a_synthetic_bundle(tmp_path: Path) -> None:
    """The user-facing Decoder, backend "mlx", on a complete bundle: captions, decode, VAE, upscale."""
    from pid_native.decoder import Decoder
    from pid_native.testing.synth import write_bundle

    dec = Decoder.open(write_bundle(tmp_path / "bundle", "mini"), backend="mlx")
    latent = np.random.default_rng(0).standard_normal((1, 4, 2, 3)).astype(np.float32)
    events: list[str] = []
    img = dec.decode(latent, "a cat on the mat", seed=3, progress=lambda e: events.append(str(e)))
    assert img.shape == (1, 3, 64, 96) and np.abs(img).max() <= 1.0
    assert events[0] == "caption 1/1" and events[-1] == "done"
    np.testing.assert_array_equal(img, dec.decode(latent, "a cat on the mat", seed=3))
    assert np.abs(img - dec.decode(latent, "a cat on the mat", seed=4)).max() > 0.1
    assert dec.vae_decode(latent).shape == (1, 3, 16, 24)
    assert dec.upscale(np.zeros((3, 32, 16), np.float32), "a cat").size == (64, 128)
