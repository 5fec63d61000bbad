"""SDXL VAE parity against diffusers' ``AutoencoderKL`` (candle backend, f32).

One test per (golden file, direction). Tolerance from tests/goldens/README.md: max abs error
<= 1e-4 for the posterior mean (before the 0.13025 scaling) and for the decoded image.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes  # lets safetensors read the bf16 weights as numpy
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import pid_native
from conftest import GOLDENS, golden_files
from pid_native import _native

VAE_TOL = 1e-4

_VAES: dict[Path, _native.Vae] = {}


def _vae(path: Path) -> _native.Vae:
    if path not in _VAES:
        _VAES[path] = _native.Vae.open(path)
    return _VAES[path]


def _golden(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("weights.")}


def _params() -> list:
    return [
        pytest.param(path, direction, id=f"{path.stem}-{direction}")
        for path in golden_files("sdxl_vae")
        for direction in ("encode", "decode")
    ]


@pytest.mark.parametrize(("path", "direction"), _params())
def test_golden_vae(path: Path, direction: str) -> None:
    golden = _golden(path)
    vae = _vae(path)
    if direction == "encode":
        out, ref = vae.encode(golden["in.image"], raw=True), golden["out.latent_mean_raw"]
    else:
        out, ref = vae.decode(golden["in.latent_raw"], raw=True), golden["out.decoded"]
    assert out.shape == ref.shape and out.dtype == np.float32
    err = float(np.abs(out - ref).max())
    assert err <= VAE_TOL, f"{direction} max abs error {err:.3e} > {VAE_TOL}"


def test_scaled_latents_are_the_mean_times_the_scaling_factor() -> None:
    path = golden_files("sdxl_vae")[0]
    golden, vae = _golden(path), _vae(path)
    assert vae.scaling_factor == 0.13025
    image, latent = golden["in.image"], golden["in.latent_raw"]
    mean = vae.encode(image, raw=True)
    np.testing.assert_allclose(vae.encode(image), mean * np.float32(0.13025), rtol=1e-6)
    scaled = latent * np.float32(0.13025)
    assert float(np.abs(vae.decode(scaled) - golden["out.decoded"]).max()) <= VAE_TOL


@pytest.mark.parametrize(
    ("call", "shape", "code"),
    [
        ("encode", (1, 4, 48, 64), "image_shape"),  # 4 channels
        ("encode", (1, 3, 50, 64), "image_shape"),  # not a multiple of the down factor
        ("encode", (3, 48, 64), "image_shape"),
        ("decode", (1, 3, 6, 8), "latent_shape"),
        ("decode", (1, 4, 0, 8), "latent_shape"),
    ],
)
def test_bad_shapes_are_rejected_with_a_code(call: str, shape: tuple[int, ...], code: str) -> None:
    vae = _vae(golden_files("sdxl_vae")[0])
    with pytest.raises(pid_native.InvalidInputError) as info:
        getattr(vae, call)(np.zeros(shape, np.float32))
    assert info.value.code == code


def test_diffusers_directory_loads_like_the_golden(tmp_path: Path) -> None:
    path = golden_files("sdxl_vae")[0]
    with safe_open(str(path), "np") as f:
        weights = {k.removeprefix("weights."): f.get_tensor(k) for k in f.keys() if k.startswith("weights.")}
        config = f.metadata()["config"]
    assert all(w.dtype == ml_dtypes.bfloat16 for w in weights.values())
    (tmp_path / "config.json").write_text(config)
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    latent = _golden(path)["in.latent_raw"]
    from_dir = _native.Vae.open(tmp_path).decode(latent, raw=True)
    np.testing.assert_array_equal(from_dir, _vae(path).decode(latent, raw=True))


def test_a_non_vae_file_is_refused() -> None:
    with pytest.raises(pid_native.WeightsError) as info:
        _native.Vae.open(GOLDENS / "gemma2_mini.safetensors")
    assert info.value.code == "not_vae"


def test_a_missing_directory_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"block_out_channels": [32, 64]}')
    with pytest.raises(pid_native.MissingFileError, match=r"diffusion_pytorch_model\.safetensors"):
        _native.Vae.open(tmp_path)
