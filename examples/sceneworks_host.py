"""A minimal image host written only against the documented ``sceneworks.decoders`` contract.

It discovers PiD through the entry point (no ``import pid_native``), describes it, loads it
for an SDXL model, and for each generation either keeps its own VAE (``use_pid`` false) or
hands its latent to PiD, including an early-stopped latent at a noise ceiling.

    python examples/sceneworks_host.py --bundle BUNDLE [--capture 0.2]

Here the host's "SDXL model" is a stand-in that returns random latents along a real SDXL Euler
schedule: the point is the plugin contract, not the generation.
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from typing import Any

import numpy as np


def sdxl_euler_sigmas(steps: int) -> np.ndarray:
    """diffusers EulerDiscreteScheduler sigmas for SDXL (scaled_linear 0.00085..0.012, leading, offset 1)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    train = np.sqrt((1 - ac) / ac)
    t = (np.arange(steps) * (1000 // steps)).round()[::-1] + 1
    return np.append(np.interp(t, np.arange(1000), train), 0.0)


def load_decoder_plugin(name: str = "pid") -> Any:
    (ep,) = [e for e in entry_points(group="sceneworks.decoders") if e.name == name]
    return ep.load()


def fake_sdxl_denoise(
    count: int, h: int, w: int, sigmas: np.ndarray, stop_after: int, seed: int
) -> np.ndarray:
    """The host's sampler stand-in: a latent at ``sigmas[stop_after]`` in the Euler (VE) frame."""
    rng = np.random.default_rng(seed)
    clean = rng.standard_normal((count, 4, h, w)).astype(np.float32) * 0.8
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    return clean + np.float32(sigmas[stop_after]) * noise


def generate(
    plugin: Any,
    loaded: Any,
    *,
    caption: str,
    width: int,
    height: int,
    use_pid: bool,
    capture: float | None,
    seed: int = 0,
    count: int = 1,
    events: list | None = None,
    cancel: Any = None,
) -> tuple[str, Any, dict]:
    """One host generation; returns (decoder used, images, metadata)."""
    request = plugin.DecodeRequest(
        use_pid=use_pid,
        pid_capture_sigma=capture,
        caption=caption,
        seed=seed,
        count=count,
        width=width,
        height=height,
    )
    sigmas = sdxl_euler_sigmas(30)
    plan = plugin.capture_plan(sigmas, capture) if (use_pid and capture) else None
    stop = plan.stop_after if plan else len(sigmas) - 1
    h, w = height // 32, width // 32  # PiD decodes 4x past the SDXL VAE's 8x
    latents = fake_sdxl_denoise(count, h, w, sigmas, stop, seed)
    if plan:
        latents = plan.to_vp(latents)
    out = loaded.decode(
        request,
        latents,
        sigma=plan.sigma_vp if plan else 0.0,
        progress=events.append if events is not None else None,
        cancel=cancel,
    )
    if out is None:
        return "vae", None, {}
    return "pid", out.images, out.metadata


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--capture", type=float)
    args = parser.parse_args()
    plugin = load_decoder_plugin()
    info = plugin.describe()
    print(f"{info.name} {info.version}: spaces {sorted(info.latent_spaces)}, x{info.output_scale}")
    for lic in info.licenses:
        print(f"  licence {lic.id}: commercial use {lic.commercial_use}; {lic.restriction}")
    loaded = plugin.load(plugin.LoadSpec(bundle=args.bundle))
    events: list = []
    used, images, meta = generate(
        plugin,
        loaded,
        caption="a castle on a hill",
        width=128,
        height=96,
        use_pid=True,
        capture=args.capture,
        events=events,
    )
    print(used, None if images is None else images.shape, meta, [str(e) for e in events])


if __name__ == "__main__":
    main()
