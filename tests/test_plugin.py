"""The SceneWorks plugin, loaded through its entry point from the installed package, driven by
the host in examples/sceneworks_host.py (written only against the documented contract)."""

from __future__ import annotations

import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

import pid_native
from conftest import imported_by

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import sceneworks_host as host


@pytest.fixture(scope="module")
def plugin():
    return host.load_decoder_plugin()


@pytest.fixture(scope="module")
def loaded(plugin, synth_bundle):
    return plugin.load(plugin.LoadSpec(bundle=synth_bundle, backend="candle-cpu"))


def test_entry_point_is_registered_and_cheap_to_load() -> None:
    (ep,) = [e for e in entry_points(group="sceneworks.decoders") if e.name == "pid"]
    assert ep.value == "pid_native.plugin:plugin" and ep.dist.name == "pid-native"
    code = (
        "from importlib.metadata import entry_points;"
        "[e for e in entry_points(group='sceneworks.decoders') if e.name == 'pid'][0].load()"
    )
    assert imported_by(code, ("mlx.core", "huggingface_hub", "torch")) == []


def test_describe(plugin, synth_bundle, tmp_path) -> None:
    info = plugin.describe(plugin.LoadSpec(bundle=synth_bundle))
    assert info.name == "pid" and info.output_scale == 4
    assert {"sdxl", "realvisxl", "realvisxl-lightning", "kolors"} <= set(info.latent_spaces["sdxl"])
    assert all(c.provisioned for c in info.components)
    nscl = next(lic for lic in info.licenses if lic.id == "NSCLv1")
    assert nscl.commercial_use is False and nscl.restriction
    assert any("gemma" in lic.id.lower() for lic in info.licenses)
    assert info.backends["candle-cpu"] == "available"
    empty = plugin.describe(plugin.LoadSpec(bundle=tmp_path / "nothing"))
    assert not any(c.provisioned for c in empty.components if c.required)


def test_use_pid_false_does_nothing(plugin, loaded) -> None:
    used, images, _meta = host.generate(
        plugin, loaded, caption="x", width=64, height=64, use_pid=False, capture=None
    )
    assert used == "vae" and images is None


def test_decode_with_progress_and_metadata(plugin, synth_bundle) -> None:
    fresh = plugin.load(plugin.LoadSpec(bundle=synth_bundle, backend="candle-cpu"))
    events: list = []
    used, images, meta = host.generate(
        plugin,
        fresh,
        caption="a castle",
        width=128,
        height=96,
        use_pid=True,
        capture=None,
        seed=4,
        events=events,
    )
    assert used == "pid" and images.shape == (1, 3, 96, 128) and images.dtype == np.float32
    assert np.abs(images).max() <= 1
    steps = [f"step {k}/4" for k in range(1, 5)]
    assert [str(e) for e in events] == ["loading", "caption 1/1", "image 1/1", *steps, "done"]
    assert meta["backend"] == "candle-cpu" and meta["seed"] == 4 and meta["sigma"] == 0.0
    assert meta["tiles"] == 1 and meta["license"] == "NSCLv1" and "research" in meta["restriction"]


def test_sigma_capture_from_a_real_sdxl_euler_schedule(plugin, loaded) -> None:
    sigmas = host.sdxl_euler_sigmas(30)
    plan = plugin.capture_plan(sigmas, 0.2)
    assert 0 < plan.sigma_vp <= 0.2 and plan.sigma_euler == pytest.approx(sigmas[plan.stop_after])
    assert plan.sigma_vp == pytest.approx(plan.sigma_euler / np.sqrt(plan.sigma_euler**2 + 1))
    x = np.ones((1, 4, 2, 2), np.float32)
    np.testing.assert_allclose(plan.to_vp(x), x / np.sqrt(plan.sigma_euler**2 + 1), rtol=1e-6)
    used, _images, meta = host.generate(
        plugin, loaded, caption="a castle", width=64, height=64, use_pid=True, capture=0.2
    )
    assert used == "pid" and meta["sigma"] == pytest.approx(plan.sigma_vp)
    assert plugin.capture_plan(sigmas, 1e-9) is None


def test_cancel(plugin, loaded) -> None:
    token = pid_native.CancelToken()
    events: list = []

    def cancel_at_step_two(e) -> None:
        events.append(e)
        if str(e) == "step 2/4":
            token.cancel()

    request = plugin.DecodeRequest(use_pid=True, caption="a", width=64, height=64)
    with pytest.raises(pid_native.Cancelled):
        loaded.decode(request, np.zeros((1, 4, 2, 2), np.float32), progress=cancel_at_step_two, cancel=token)
    assert str(events[-1]) == "step 2/4"


def test_not_provisioned_is_an_error_never_a_vae_fallback(plugin, tmp_path) -> None:
    nothing = plugin.load(plugin.LoadSpec(bundle=tmp_path / "absent"))
    request = plugin.DecodeRequest(use_pid=True, width=64, height=64)
    with pytest.raises(pid_native.MissingFileError):
        nothing.decode(request, np.zeros((1, 4, 2, 2), np.float32))


def test_bad_requests(plugin) -> None:
    with pytest.raises(ValueError):
        plugin.DecodeRequest(use_pid=True, pid_capture_sigma=float("nan"), width=64, height=64)
    with pytest.raises(ValueError):
        plugin.DecodeRequest(use_pid=True, width=0, height=64)


def test_concurrent_requests_share_one_load(plugin, synth_bundle) -> None:
    shared = plugin.load(plugin.LoadSpec(bundle=synth_bundle, backend="candle-cpu"))
    request = plugin.DecodeRequest(use_pid=True, caption="same", seed=2, width=64, height=64)
    lat = np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(shared.decode(request, lat).images)) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(np.array_equal(results[0], r) for r in results)


def test_raw_latents_are_normalised_for_the_students_space(plugin, loaded) -> None:
    raw = np.random.default_rng(5).standard_normal((1, 4, 2, 3)).astype(np.float32)
    req = {"use_pid": True, "caption": "a castle", "seed": 2, "width": 96, "height": 64}
    from_raw = loaded.decode(plugin.DecodeRequest(**req, raw_latent=True), raw)
    scaled = loaded.decode(plugin.DecodeRequest(**req), raw * np.float32(0.13025))
    np.testing.assert_array_equal(from_raw.images, scaled.images)
