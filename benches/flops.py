"""Multiply-add FLOPs of one PiD network forward, from its config (for scaling checks).

    python benches/flops.py 512 1024 2048 4096

Counts the matmuls (2 FLOPs per multiply-add) of the patch stage (14 MMDiT blocks over
image + caption tokens, joint attention, SwiGLU MLPs, LQ gates) and the pixel stage (per-pixel
adaLN, compress/expand, global patch attention, per-pixel MLP); elementwise work is left out.
"""

from __future__ import annotations

import json
import sys

from pid_native import _native


def forward_flops(size: int, config: dict) -> dict[str, float]:
    d, depth, p = config["hidden_size"], config["patch_depth"], config["patch_size"]
    f = 2 * 4 * d // 3  # SwiGLU hidden
    text = config["txt_max_length"]
    tokens = (size // p) ** 2
    pixels = size * size

    def stream(n: int) -> float:  # qkv, proj, SwiGLU
        return 2 * n * d * 3 * d + 2 * n * d * d + 6 * n * d * f

    gates = len(range(0, depth, config["lq_interval"])) * 2 * tokens * 2 * d * d
    patch_linear = depth * (stream(tokens) + stream(text)) + gates
    joint = tokens + text
    # The last block's text stream is skipped: only image queries attend there.
    patch_attention = (depth - 1) * 4 * joint * joint * d + 4 * tokens * joint * d
    pd, pa, p2 = config["pixel_hidden_size"], config["pixel_attn_hidden_size"], p * p
    pixel_linear = config["pixel_depth"] * (
        2 * tokens * d * 6 * pd * p2  # per-pixel adaLN
        + 2 * 2 * tokens * p2 * pd * pa  # compress + expand
        + 2 * tokens * pa * 4 * pa  # qkv + proj
        + 2 * pixels * 2 * pd * 4 * pd  # per-pixel MLP
    )
    pixel_attention = config["pixel_depth"] * 4 * tokens * tokens * pa
    parts = {
        "patch_linear": patch_linear,
        "patch_attention": patch_attention,
        "pixel_linear": pixel_linear,
        "pixel_attention": pixel_attention,
    }
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    config = json.loads(_native.preset_config("sdxl-2kto4k"))
    base = None
    for size in [int(s) for s in sys.argv[1:]] or [512, 1024, 2048, 4096]:
        fl = forward_flops(size, config)
        base = base or fl["total"]
        attn = (fl["patch_attention"] + fl["pixel_attention"]) / fl["total"]
        tflop = fl["total"] / 1e12
        print(f"{size}²: {tflop:8.2f} TFLOP per forward ({attn:.0%} attention), x{fl['total'] / base:.2f}")


if __name__ == "__main__":
    main()
