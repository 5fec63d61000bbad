"""Latent-space registry, frame conversion, memory budget precedence and the backend registry."""

from __future__ import annotations

import numpy as np
import pytest

import pid_native
from pid_native import backends
from pid_native.latents import euler_capture_step, euler_to_vp, latent_space
from pid_native.memory import ENV_VAR, GIB, resolve_budget


def sdxl_euler_sigmas(steps: int) -> np.ndarray:
    """diffusers EulerDiscreteScheduler sigmas for SDXL's config (scaled_linear betas
    0.00085..0.012 over 1000 steps, "leading" spacing, steps_offset 1), ending at 0."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    train = np.sqrt((1 - ac) / ac)
    t = (np.arange(steps) * (1000 // steps)).round()[::-1] + 1
    return np.append(np.interp(t, np.arange(1000), train), 0.0)


@pytest.mark.parametrize(
    ("alias", "space", "channels"),
    [
        ("SDXL", "sdxl", 4),
        ("kolors", "sdxl", 4),
        ("realvisxl-lightning", "sdxl", 4),
        ("zimage", "flux", 16),
        ("qwenimage-2512", "qwenimage", 16),
        ("flux2-klein-9b", "flux2", 128),
    ],
)
def test_aliases_resolve(alias: str, space: str, channels: int) -> None:
    s = latent_space(alias)
    assert (s.name, s.channels) == (space, channels)


def test_unknown_space_is_an_error_listing_the_known_ones() -> None:
    with pytest.raises(pid_native.InvalidInputError) as info:
        latent_space("nonsense")
    assert info.value.code == "unknown_space" and "kolors" in str(info.value)


@pytest.mark.parametrize("name", ["dinov2", "rae", "siglip", "Scale-RAE"])
def test_rae_spaces_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(pid_native.InvalidInputError) as info:
        latent_space(name)
    assert info.value.code == "unsupported_space" and "not supported" in str(info.value)


def test_euler_to_vp_matches_the_formula() -> None:
    x = np.full((1, 4, 2, 2), 3.0, np.float32)
    xv, sv = euler_to_vp(x, 2.0)
    assert sv == pytest.approx(2.0 / np.sqrt(5.0))
    np.testing.assert_allclose(xv, 3.0 / np.sqrt(5.0), rtol=1e-6)
    assert euler_to_vp(x, 0.0)[1] == 0.0
    with pytest.raises(pid_native.InvalidInputError):
        euler_to_vp(x, float("nan"))


def test_capture_step_on_a_real_sdxl_schedule() -> None:
    sigmas = sdxl_euler_sigmas(30)
    assert sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)
    k = euler_capture_step(sigmas, 0.2)
    vp = sigmas / np.sqrt(sigmas**2 + 1)
    assert vp[k] <= 0.2 < vp[k - 1]
    assert euler_capture_step(sigmas, 0.0) is None
    assert euler_capture_step(sigmas, 1e-9) is None


def test_budget_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "3")
    assert resolve_budget(1.5) == (int(1.5 * GIB), "argument")
    assert resolve_budget(None) == (3 * GIB, "env")
    monkeypatch.delenv(ENV_VAR)
    budget, source = resolve_budget(None, detected=10 * GIB)
    assert source == "detected" and 0 < budget < 10 * GIB
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(pid_native.InvalidInputError):
            resolve_budget(None)


def test_backend_registry_reports_availability_with_reasons() -> None:
    status = backends.available()
    assert status["candle-cpu"].available
    assert {"candle-cpu", "candle-cuda", "mlx"} <= set(status)
    for name, s in status.items():
        assert s.reason, name
    if "cuda" not in pid_native.build_info()["features"]:
        assert not status["candle-cuda"].available and "CUDA" in status["candle-cuda"].reason
        with pytest.raises(pid_native.BackendUnavailableError, match="no CUDA support"):
            backends.get("candle-cuda")
    with pytest.raises(pid_native.InvalidInputError) as info:
        backends.get("tpu")
    assert info.value.code == "unknown_backend"
    # auto never picks MLX on a machine without Metal, where candle is faster.
    assert backends.get("auto").name in {"candle-cpu", "candle-cuda"} or status["mlx"].reason.startswith(
        "Metal"
    )


def test_third_party_backends_register() -> None:
    class Dummy:
        name = "dummy"
        priority = -5

        def availability(self) -> backends.Availability:
            return backends.Availability(False, "dummy never runs")

        def open(self, spec: backends.OpenSpec) -> backends.Engine:
            raise AssertionError

    backends.register(Dummy())
    try:
        assert backends.available()["dummy"].reason == "dummy never runs"
        with pytest.raises(pid_native.BackendUnavailableError, match="dummy never runs"):
            backends.get("dummy")
    finally:
        backends._registered.pop("dummy")
