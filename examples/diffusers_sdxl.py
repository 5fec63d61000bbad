"""Generate with SDXL in diffusers and decode with PiD at 4x: a 1024² generation becomes 4096².

Needs ``pip install "pid-native[diffusers]"``, the PiD weights (``pid-native fetch --accept-license``)
and the SDXL weights (downloaded by diffusers on first use); a CUDA GPU makes the SDXL part fast.

    python examples/diffusers_sdxl.py "a red fox in the snow" -o fox.png
    python examples/diffusers_sdxl.py "a red fox in the snow" --stop-at 26 -o fox.png

``--stop-at 26`` is upstream's recipe: stop SDXL's 30 steps after step 26 and let PiD finish the
image from the noisy latent. The PNG carries the NVIDIA License (NSCLv1) restriction in its
metadata: images decoded with PiD are for research and evaluation only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

import pid_native
import pid_native.diffusers as pid


def generate(
    pipe: Any,
    prompt: str,
    *,
    steps: int = 30,
    stop_at: int | None = None,
    width: int = 1024,
    height: int = 1024,
    seed: int = 0,
    decoder: pid_native.Decoder | None = None,
) -> Image.Image:
    """One SDXL generation decoded by PiD; early-stopped after ``stop_at`` steps when given."""
    stop = pid.EarlyStop(step=stop_at) if stop_at is not None else None
    out = pipe(
        prompt,
        num_inference_steps=steps,
        width=width,
        height=height,
        output_type="latent",
        generator=torch.Generator(pipe.device).manual_seed(seed),
        callback_on_step_end=stop,
    )
    return pid.decode(stop or out, prompt, decoder=decoder, seed=seed)[0]


def main(argv: Sequence[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("-o", "--output", type=Path, default=Path("pid_sdxl.png"))
    ap.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0", help="Hub id or directory")
    ap.add_argument("--bundle", type=Path, help="PiD bundle (default: $PID_NATIVE_BUNDLE or the fetched one)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stop-at", type=int, help="stop SDXL after this step and let PiD finish (e.g. 26)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    pipe = StableDiffusionXLPipeline.from_pretrained(
        args.model, dtype=torch.float16 if cuda else torch.float32
    ).to("cuda" if cuda else "cpu")
    # EarlyStop converts Euler-frame latents; SDXL base ships this scheduler, other checkpoints may not.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    decoder = pid_native.Decoder.open(args.bundle) if args.bundle else None
    image = generate(
        pipe,
        args.prompt,
        steps=args.steps,
        stop_at=args.stop_at,
        width=args.width,
        height=args.height,
        seed=args.seed,
        decoder=decoder,
    )
    path = pid.save_png(image, args.output)
    print(f"wrote {path} ({image.width}x{image.height}); research and evaluation use only (NSCLv1)")
    return path


if __name__ == "__main__":
    main()
