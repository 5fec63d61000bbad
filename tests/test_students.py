"""The released students: naming, identification from a checkpoint, the published ``.pth`` read
without pickle, ``pid-native convert``, and the raw-latent normalisation of every space.

Checkpoints here are each student's network shrunk (``Student.config(shrunk=True)``, seeded
weights) and written the way upstream publishes them: ``checkpoints/<experiment>/
model_ema_bf16.pth``, ``net.*`` beside a training-only network.
"""

from __future__ import annotations

import inspect
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import pid_native
from pid_native import InvalidInputError, WeightsError, _native
from pid_native.convert import convert
from pid_native.latents import (
    FLUX2_BN_EPS,
    QWENIMAGE_MEAN,
    QWENIMAGE_STD,
    SPACES,
    latent_space,
    normalise,
    pack_2x2,
)
from pid_native.students import HUB_FILE, STUDENTS, Student, default_student, identify, student
from pid_native.testing.pth import write_pth
from pid_native.testing.seeded import cached_seeded

RNG = np.random.default_rng(26)


def published(s: Student, root: Path, cache: Path, name: str | None = None) -> Path:
    """Student ``s`` shrunk, as upstream publishes it (under ``root``, in its experiment folder)."""
    weights = cached_seeded(cache, _native.checkpoint_layout(s.config(shrunk=True)))
    arrays = {f"net.{k}": v for k, v in _native.checkpoint_arrays(str(weights)).items()}
    arrays["net_ema.t_embedder.mlp.0.bias"] = ("f32", np.zeros(4, np.float32))
    arrays["discriminator.head.weight"] = ("f32", np.ones((2, 2), np.float32))
    path = root / "checkpoints" / (name or s.experiment) / HUB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_pth(arrays, path)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("flux-2k", "flux-2k"),
        ("zimage-turbo-2k", "flux-2k"),
        ("ZImage-2kto4k_v1pt5", "flux-2kto4k_v1pt5"),
        ("flux2-klein-4b-2k", "flux2-2k"),
        ("flux2-klein-9b-2kto4k_v1pt5", "flux2-2kto4k_v1pt5"),
        ("qwenimage-2512-2kto4k_v1pt5", "qwenimage-2kto4k_v1pt5"),
        ("sd3-2k", "sd3-2k"),
        ("sd3-2kto4k", "sd3-2kto4k"),
        ("kolors-2kto4k", "sdxl-2kto4k"),
    ],
)
def test_students_and_their_aliases(name: str, expected: str) -> None:
    assert student(name).name == expected


def test_every_released_student_is_known_once() -> None:
    # nv-tlabs/PiD docs/checkpoints.md: the distilled students of the VAE spaces.
    released = {
        ("flux", "2k"): "PiD_res2k_sr4x_official_flux_distill_4step",
        ("flux", "2kto4k_v1pt5"): "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
        ("flux2", "2k"): "PiD_res2k_sr4x_official_flux2_distill_4step",
        ("flux2", "2kto4k_v1pt5"): "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
        ("sd3", "2k"): "PiD_res2k_sr4x_official_sd3_distill_4step",
        ("sd3", "2kto4k"): "PiD_res2kto4k_sr4x_official_sd3_distill_4step",
        ("sdxl", "2kto4k"): "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
        ("qwenimage", "2kto4k_v1pt5"): "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
    }
    hub = {(s.space, s.variant): s.experiment for s in STUDENTS if s.hub}
    assert hub == released
    assert {s.name for s in STUDENTS} == {f"{k[0]}-{k[1]}" for k in released} | {"qwenimage-2kto4k"}
    for s in STUDENTS:
        cfg = json.loads(s.config())
        assert (cfg["lq_latent_channels"], cfg["pit_lq_inject"]) == (s.latent.channels, s.v15)
        assert cfg["lq_hidden_dim"] == (1024 if s.v15 else 512)
        assert len(_native.checkpoint_layout(s.config())) == (461 if s.v15 else 456)
    assert [default_student(s.name).name for s in SPACES] == [
        "sdxl-2kto4k",
        "flux-2kto4k_v1pt5",
        "sd3-2kto4k",
        "qwenimage-2kto4k_v1pt5",
        "flux2-2kto4k_v1pt5",
    ]


@pytest.mark.parametrize(
    ("name", "error", "code"),
    [
        ("flux2-2kto4k", WeightsError, "deprecated_student"),
        ("flux2-klein-4b-2kto4k", WeightsError, "deprecated_student"),
        ("PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606", WeightsError, "deprecated_student"),
        ("dinov2-2k", InvalidInputError, "unsupported_space"),
        ("siglip-2k", InvalidInputError, "unsupported_space"),
        ("sdxl-2k", InvalidInputError, "unknown_student"),
        ("flux", InvalidInputError, "unknown_student"),
    ],
)
def test_students_refused_by_name(name: str, error: type, code: str) -> None:
    with pytest.raises(error) as info:
        student(name)
    assert info.value.code == code
    if code == "deprecated_student":
        assert "flux2-2kto4k_v1pt5" in info.value.message


# ---------------------------------------------------------------- identification


def test_a_published_checkpoint_identifies_itself_from_its_folder(tmp_path: Path, seeded_cache: Path) -> None:
    for s in STUDENTS:
        if s.hub:
            found = identify(published(s, tmp_path, seeded_cache))
            assert (found.student, found.space.name) == (s, s.space)


def test_identification_errors(tmp_path: Path, seeded_cache: Path) -> None:
    flux = published(student("flux-2k"), tmp_path / "a", seeded_cache)
    with pytest.raises(InvalidInputError) as other_space:
        identify(flux, space="sd3")
    assert other_space.value.code == "wrong_space" and "--space flux" in other_space.value.message
    with pytest.raises(InvalidInputError) as sdxl:
        identify(flux, space="sdxl")
    assert sdxl.value.code == "wrong_space"
    with pytest.raises(InvalidInputError) as other_student:
        identify(flux, student_name="flux-2kto4k_v1pt5")
    assert other_student.value.code == "wrong_student" and "v1.5" in other_student.value.message

    # The folder of one student holding another's tensors.
    liar = published(student("sd3-2k"), tmp_path / "b", seeded_cache, name=student("sdxl-2kto4k").experiment)
    with pytest.raises(WeightsError) as inconsistent:
        identify(liar)
    assert inconsistent.value.code == "inconsistent_checkpoint"

    # A 16-channel v1 file whose name says nothing: flux, sd3 or qwenimage v1.
    bare = tmp_path / "bare.pth"
    flux.rename(bare)
    with pytest.raises(InvalidInputError) as ambiguous:
        identify(bare)
    assert ambiguous.value.code == "ambiguous_space" and "--space" in ambiguous.value.message
    assert identify(bare, space="zimage").space.name == "flux"
    assert identify(bare, space="sd3").student is None  # sd3 2k or 2kto4k: the same network
    assert identify(bare, student_name="sd3-2kto4k").student == student("sd3-2kto4k")


def test_decoder_refuses_a_latent_or_checkpoint_of_another_space(tmp_path: Path, seeded_cache: Path) -> None:
    path = published(student("flux2-2kto4k_v1pt5"), tmp_path, seeded_cache)
    dec = pid_native.Decoder.open(path, backend="candle-cpu")
    assert (dec.student, dec.space.name) == (student("flux2-2kto4k_v1pt5"), "flux2")
    y = np.zeros((1, 300, 64), np.float32)
    out = dec.decode(RNG.standard_normal((1, 128, 1, 2)).astype(np.float32), caption_embs=y, steps=1)
    assert out.shape == (1, 3, 64, 128)
    with pytest.raises(InvalidInputError, match="raw flux2 VAE latent: normalise it first") as raw:
        dec.decode(np.zeros((1, 32, 2, 2), np.float32), caption_embs=y)
    assert raw.value.code == "latent_channels"
    with pytest.raises(InvalidInputError, match="flux or sd3 or qwenimage latent") as other:
        dec.decode(np.zeros((1, 16, 2, 2), np.float32), caption_embs=y)
    assert other.value.code == "latent_channels"
    with pytest.raises(InvalidInputError) as wrong:
        pid_native.Decoder.open(path, backend="candle-cpu", space="flux")
    assert wrong.value.code == "wrong_space"


# ---------------------------------------------------------------- .pth without pickle


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("payload", ["call", "object", "list"])
def test_a_pth_holding_anything_but_tensors_is_refused_without_running_it(
    tmp_path: Path, payload: str
) -> None:
    marker = tmp_path / "ran"
    obj = {
        "call": {"net.x": _Evil(marker)},
        "object": _Evil(marker),
        "list": [1, 2],
    }[payload]
    path = write_pth({}, tmp_path / "evil.pth", data_pkl=pickle.dumps(obj, protocol=2))
    for check in (_native.check_pth, lambda p: pid_native.Decoder.open(p, backend="candle-cpu")):
        with pytest.raises(WeightsError) as info:
            check(str(path))
        assert info.value.code in ("pth_not_tensors", "pth_unsupported"), info.value
        assert "refus" in info.value.message
    assert not marker.exists()


def test_damaged_pth_files_are_named(tmp_path: Path, seeded_cache: Path) -> None:
    good = published(student("sdxl-2kto4k"), tmp_path, seeded_cache)
    not_zip = tmp_path / "nope.pth"
    not_zip.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle: torch's legacy format
    with pytest.raises(WeightsError) as legacy:
        _native.check_pth(str(not_zip))
    assert legacy.value.code == "not_pth"
    missing = tmp_path / "missing.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(missing, "w") as dst:
        for item in src.infolist():
            if item.filename != "archive/data/0":
                dst.writestr(item, src.read(item))
    with pytest.raises(WeightsError) as truncated:
        _native.check_pth(str(missing))
    assert truncated.value.code == "truncated" and "re-download" in truncated.value.message


def test_torch_save_files_read_as_torch_reads_them(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    layer = torch.nn.Conv2d(3, 4, 3)
    state = {f"net.{k}": v.to(torch.bfloat16) for k, v in layer.state_dict().items()}
    state["net.scale"] = torch.nn.Parameter(torch.tensor(2.5))  # 0-dim, wrapped as a parameter
    torch.save(state, tmp_path / "t.pth")
    arrays = _native.checkpoint_arrays(str(tmp_path / "t.pth"))
    assert set(arrays) == {"weight", "bias", "scale"}
    tag, weight = arrays["weight"]
    assert tag == "bf16" and weight.shape == (4, 3, 3, 3)
    np.testing.assert_array_equal(weight, state["net.weight"].view(torch.int16).numpy().view(np.uint16))
    assert arrays["scale"][1] == np.float32(2.5)
    # And our writer's files are what torch.load(weights_only=True) reads.
    ours = write_pth(arrays, tmp_path / "ours.pth")
    back = torch.load(ours, weights_only=True)
    assert torch.equal(back["weight"], state["net.weight"]) and back["scale"].item() == 2.5


# ---------------------------------------------------------------- convert


def test_convert_writes_the_lossless_safetensors_equivalent(tmp_path: Path, seeded_cache: Path) -> None:
    s = student("qwenimage-2kto4k_v1pt5")
    pth = published(s, tmp_path, seeded_cache)
    out = tmp_path / "anything.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "pid_native.cli", "convert", str(pth), str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and s.name in run.stdout, run.stderr
    stored = _native.checkpoint_arrays(str(pth))
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(stored) and not any(k.startswith(("net", "disc")) for k in f.keys())
    assert (meta["pid_student"], meta["pid_space"]) == (s.name, "qwenimage")
    converted = _native.checkpoint_arrays(str(out))
    for name, (tag, array) in stored.items():
        assert converted[name][0] == tag
        np.testing.assert_array_equal(converted[name][1], array)
    # The file says which student it is whatever its name.
    assert identify(out).student == s

    for output, code in ((tmp_path / "x.pth", "output_path"), (out, "output_path")):
        with pytest.raises(InvalidInputError) as info:
            convert(output if output.suffix == ".safetensors" else pth, output)
        assert info.value.code == code


# ---------------------------------------------------------------- raw latents


def test_normalise_follows_each_hosts_vae() -> None:
    raw16 = RNG.standard_normal((2, 16, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(normalise("kolors", raw16[:, :4]), raw16[:, :4] * np.float32(0.13025))
    np.testing.assert_allclose(normalise("zimage", raw16), (raw16 - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(normalise("sd3", raw16[0]), (raw16[:1] - 0.0609) * 1.5305, rtol=1e-6)
    mean = np.array(QWENIMAGE_MEAN, np.float32)[:, None, None]
    std = np.array(QWENIMAGE_STD, np.float32)[:, None, None]
    video = raw16[:, :, None]  # Qwen-Image's VAE latent has a frame axis
    np.testing.assert_allclose(normalise("qwenimage-2512", video), (raw16 - mean) / std, rtol=1e-6)

    raw32 = RNG.standard_normal((1, 32, 4, 6)).astype(np.float32)
    bn = (RNG.standard_normal(128).astype(np.float32), RNG.uniform(0.5, 2, 128).astype(np.float32))
    packed = pack_2x2(raw32)
    assert packed.shape == (1, 128, 2, 3)
    # Channel 4c + 2i + j holds raw channel c at offset (i, j) of each 2x2 cell.
    assert packed[0, 4 * 5 + 2 * 1 + 0, 1, 2] == raw32[0, 5, 2 * 1 + 1, 2 * 2 + 0]
    want = (packed - bn[0][:, None, None]) / np.sqrt(bn[1][:, None, None] + 1e-4)
    np.testing.assert_allclose(normalise("flux2-klein-9b", raw32, bn=bn), want, rtol=1e-5)


def test_normalise_matches_diffusers() -> None:
    """The constants and the packing are diffusers' own (the VAE classes' defaults)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    qwen = inspect.signature(diffusers.AutoencoderKLQwenImage.__init__).parameters
    assert (qwen["latents_mean"].default, qwen["latents_std"].default) == (
        list(QWENIMAGE_MEAN),
        list(QWENIMAGE_STD),
    )
    flux2 = inspect.signature(diffusers.AutoencoderKLFlux2.__init__).parameters
    assert flux2["batch_norm_eps"].default == FLUX2_BN_EPS
    raw = RNG.standard_normal((2, 32, 4, 6)).astype(np.float32)
    theirs = diffusers.Flux2Pipeline._patchify_latents(torch.from_numpy(raw)).numpy()
    np.testing.assert_array_equal(pack_2x2(raw), theirs)
    mean, var = torch.randn(128), torch.rand(128) + 0.5
    bn = torch.nn.functional.batch_norm(
        torch.from_numpy(theirs), mean, var, training=False, eps=FLUX2_BN_EPS
    ).numpy()
    np.testing.assert_allclose(normalise("flux2", raw, bn=(mean, var)), bn, rtol=1e-5, atol=1e-6)


def test_normalise_refuses_what_is_not_that_spaces_latent(tmp_path: Path) -> None:
    cases = [
        (("flux", np.zeros((1, 4, 2, 2))), "latent_channels", "raw sdxl latent"),
        (("sdxl", np.zeros((1, 16, 2, 2))), "latent_channels", "flux or sd3 or qwenimage"),
        (("flux2", np.zeros((1, 32, 2, 2))), "flux2_stats", "--flux2-vae"),
        (("flux2", np.zeros((1, 32, 3, 2))), "latent_shape", "even"),
        (("qwenimage", np.zeros((1, 16, 2, 2, 2))), "latent_shape", "one frame"),
        (("dinov2", np.zeros((1, 768, 2, 2))), "unsupported_space", "not supported"),
    ]
    for (space, raw), code, words in cases:
        bn = (np.zeros(128), np.ones(128)) if code == "latent_shape" and space == "flux2" else None
        with pytest.raises(InvalidInputError) as info:
            normalise(space, raw, bn=bn)
        assert info.value.code == code and words in info.value.message, info.value
    not_vae = tmp_path / "x.safetensors"
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, str(not_vae))
    with pytest.raises(WeightsError) as info:
        normalise("flux2", np.zeros((1, 32, 2, 2)), vae=not_vae)
    assert info.value.code == "not_flux2_vae"
    assert latent_space("flux2").raw_channels == 32
