"""The whole pipeline on a synthetic bundle: caption -> Gemma -> PiD -> image, upscaling, PNG output."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

import pid_native
from pid_native import Decoder
from pid_native.images import LICENSE_NOTE, save_png
from pid_native.testing.synth import BUNDLE_FILE, write_bundle


@pytest.fixture(scope="module")
def dec(synth_bundle) -> Decoder:
    return Decoder.open(synth_bundle, backend="candle-cpu")


def lat(seed: int = 0, h: int = 3, w: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, h, w)).astype(np.float32)


def test_caption_to_image_is_deterministic_and_caption_matters(dec: Decoder) -> None:
    a = dec.decode(lat(), "a red fox in the snow", seed=3)
    assert a.shape == (1, 3, 96, 128) and np.abs(a).max() <= 1
    np.testing.assert_array_equal(a, dec.decode(lat(), "a red fox in the snow", seed=3))
    assert np.abs(a - dec.decode(lat(), "a blue whale", seed=3)).max() > 1e-4
    # Empty captions are valid: the CHI prompt alone, as in upstream's dropped-caption training.
    assert dec.decode(lat(), "", seed=3).shape == a.shape


def test_captions_per_latent_and_the_cache(dec: Decoder) -> None:
    two = np.concatenate([lat(1), lat(2)])
    out = dec.decode(two, ["a cat", "a dog"], seed=[5, 6])
    np.testing.assert_array_equal(out[1:], dec.decode(lat(2), "a dog", seed=6))
    embs = dec.encode_captions(["a cat", "a dog"])
    assert embs.shape == (2, 300, 64)
    np.testing.assert_array_equal(embs[1], dec.encode_captions(["a dog"])[0])


def test_a_truncated_caption_warns_once(dec: Decoder) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec.decode(lat(), "cat " * 400)
    truncated = [w for w in caught if "tokens were dropped" in str(w.message)]
    assert len(truncated) == 1, [str(w.message) for w in caught]


def test_upscale_and_vae_baseline(dec: Decoder, tmp_path) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    up = dec.upscale(img, "noise", seed=1)
    # Centre-cropped to 64x96 (multiples of 16), then 4x.
    assert up.size == (384, 256)
    latent = dec.vae_encode(np.zeros((1, 3, 64, 96), np.float32))
    assert latent.shape == (1, 4, 8, 12)
    base = dec.vae_decode(latent)
    assert base.shape == (1, 3, 64, 96) and np.abs(base).max() <= 1


def test_png_carries_the_licence_restriction(dec: Decoder, tmp_path) -> None:
    image = dec.decode_to_images(lat(), "a cat")[0]
    path = save_png(image, tmp_path / "out.png")
    with Image.open(path) as png:
        assert png.text["pid-license"] == LICENSE_NOTE
        assert "research and evaluation" in png.text["pid-license"]


def test_bundle_is_reused_and_never_overwrites_other_directories(synth_bundle, tmp_path) -> None:
    assert write_bundle(synth_bundle, preset="mini") == synth_bundle
    assert json.loads((synth_bundle / BUNDLE_FILE).read_text())["synthetic"] == "mini"
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        write_bundle(tmp_path, preset="mini")
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_missing_gemma_fails_at_open_with_every_missing_file(synth_bundle, tmp_path) -> None:
    with pytest.raises(pid_native.MissingFileError) as info:
        Decoder.open(
            synth_bundle / "pid_sdxl_2kto4k.safetensors", gemma=tmp_path / "no-gemma", vae=tmp_path / "no-vae"
        )
    msg = str(info.value)
    assert "no-gemma" in msg and "no-vae" in msg and "pid-native fetch" in msg


def test_no_caption_encoder_is_a_clear_error(synth_bundle) -> None:
    bare = Decoder.open(synth_bundle / "pid_sdxl_2kto4k.safetensors", backend="candle-cpu")
    with pytest.raises(pid_native.InvalidInputError) as info:
        bare.decode(lat(), "a cat")
    assert info.value.code == "no_caption_encoder"


@pytest.mark.mlx
def test_mlx_and_candle_agree_end_to_end(synth_bundle, dec: Decoder) -> None:
    pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'pid-native[mlx]')")
    mlx = Decoder.open(synth_bundle, backend="mlx")
    a = dec.decode(lat(), "a lighthouse", seed=9)
    b = mlx.decode(lat(), "a lighthouse", seed=9)
    assert np.abs(a - b).max() <= 1e-3
    np.testing.assert_allclose(
        mlx.encode_captions(["a lighthouse"]), dec.encode_captions(["a lighthouse"]), atol=1e-4
    )
    np.testing.assert_allclose(
        mlx.vae_encode(np.zeros((1, 3, 32, 32), np.float32)),
        dec.vae_encode(np.zeros((1, 3, 32, 32), np.float32)),
        atol=1e-4,
    )
