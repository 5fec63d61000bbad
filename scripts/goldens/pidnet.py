"""Generate ``kind = pidnet`` golden files by running the upstream PyTorch network.

The outputs come only from nv-tlabs/PiD's own ``PidNet`` (CPU, float32, and bfloat16 autocast
for ``v_bf16_autocast``), with weights from the ``seeded-v1`` recipe (tests/goldens/README.md)
over the upstream state dict's own names and shapes; pid-native's network is not involved.
Needs torch, loguru and a checkout of the reference::

    pip install ".[reference]"
    python scripts/goldens/pidnet.py --reference ~/src/PiD --out tests/goldens [NAME ...]

Without names it writes every golden of :data:`GOLDENS`. The full-topology ones build the
1.4 B-parameter network in float32 (about 6 GB of RAM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from pid_native import _native
from pid_native.testing.seeded import RECIPE, bf16_bits, seeded_float32

T_LIST = [0.999, 0.866, 0.634, 0.342, 0.0]

# The released v1 backbone (upstream PID_SR4X, configs/common/defaults/net.py:30-60) and its
# v1.5 changes (PID_SR4X_V1PT5, :63-83); the aux RGB head is training-only and left out.
FULL_V1 = {
    "in_channels": 3, "hidden_size": 1536, "num_groups": 24, "pixel_hidden_size": 16,
    "pixel_attn_hidden_size": 1152, "pixel_num_groups": 16, "patch_depth": 14, "pixel_depth": 2,
    "patch_size": 16, "txt_embed_dim": 2304, "txt_max_length": 300, "use_text_rope": True,
    "text_rope_theta": 10000.0, "rope_mode": "ntk_aware", "rope_ref_h": 1024, "rope_ref_w": 1024,
    "lq_inject_mode": "controlnet", "lq_in_channels": 0, "lq_latent_channels": 16, "lq_hidden_dim": 512,
    "lq_num_res_blocks": 4, "lq_latent_unpatchify_factor": 1, "lq_aux_rgb_head": False,
    "lq_conv_padding_mode": "zeros", "lq_gate_type": "sigma_aware_per_token_per_dim", "lq_interval": 2,
    "sr_scale": 4, "latent_spatial_down_factor": 8, "pit_lq_inject": False,
}  # fmt: skip
V15 = {
    "lq_conv_padding_mode": "replicate", "rope_ref_h": 2048, "rope_ref_w": 2048, "pit_lq_inject": True,
    "lq_gate_type": "sigma_aware_per_token", "lq_hidden_dim": 1024,
}  # fmt: skip
# The shrunk backbone of the bundled minis (pidnet_sdxl_mini).
MINI = {
    "hidden_size": 128, "num_groups": 2, "pixel_attn_hidden_size": 144, "pixel_num_groups": 2,
    "patch_depth": 4, "txt_embed_dim": 64, "lq_hidden_dim": 32, "lq_num_res_blocks": 2,
}  # fmt: skip
FLUX2_V1 = {"lq_latent_channels": 128, "latent_spatial_down_factor": 16}
FLUX2_V15 = {**FLUX2_V1, "lq_latent_unpatchify_factor": 2}


@dataclass(frozen=True)
class Spec:
    """One golden file.

    ``latents``: the latent (h, w) of each forward case (case0 has a batch of 2 with per-image
    t and sigma when ``batch2``); ``sample``: also run the 4-step sampler on the first size;
    ``traces``: which traces to keep, by prefix (the per-pixel ones are most of a file's size);
    ``text_tokens``: the caption length (the network slices its 300 positions to it).
    """

    notes: str
    config: dict
    latents: tuple[tuple[int, int], ...]
    batch2: bool = True
    sample: bool = True
    autocast: bool = True
    text_tokens: int = 300
    traces: tuple[str, ...] = (
        "t_embedder", "s_embedder", "lq_head_", "gate_", "patch_block_", "pit_gate",
    )  # fmt: skip


FULL_TRACES = (
    "t_embedder", "s_embedder", "lq_head_0", "gate_0", "patch_block_13.0", "pit_gate",
)  # fmt: skip

GOLDENS: dict[str, Spec] = {
    "pidnet_v1_16ch_mini": Spec(
        "v1 topology shrunk with a 16-channel latent at /8 (flux 2k, sd3 2k and 2kto4k, qwenimage v1)",
        {**FULL_V1, **MINI},
        ((2, 3),),
    ),
    "pidnet_v1_flux2_mini": Spec(
        "v1 flux2 topology (2k) shrunk: 128-channel packed latent at /16, nearest x4 in the adapter",
        {**FULL_V1, **MINI, **FLUX2_V1},
        ((1, 2),),
    ),
    "pidnet_v1_16ch_full_seeded": Spec(
        "real v1 student topology with a 16-channel latent (flux 2k, sd3 2k/2kto4k): 456 tensors",
        {**FULL_V1},
        ((2, 2),),
        batch2=False,
        sample=False,
        autocast=False,
        text_tokens=16,
        traces=FULL_TRACES,
    ),
    "pidnet_v1_flux2_full_seeded": Spec(
        "real v1 flux2 student topology (flux2 2k): 128-channel latent at /16, 456 tensors",
        {**FULL_V1, **FLUX2_V1},
        ((2, 2),),
        batch2=False,
        sample=False,
        autocast=False,
        text_tokens=16,
        traces=FULL_TRACES,
    ),
    "pidnet_v15_16ch_full_seeded": Spec(
        "real v1.5 student topology with a 16-channel latent (flux, qwenimage 2kto4k_v1pt5): 461 tensors",
        {**FULL_V1, **V15},
        ((2, 2),),
        batch2=False,
        sample=False,
        autocast=False,
        text_tokens=16,
        traces=FULL_TRACES,
    ),
    "pidnet_v15_flux2_full_seeded": Spec(
        "real v1.5 flux2 student topology (flux2 2kto4k_v1pt5): 128-channel packed latent, 461 tensors",
        {**FULL_V1, **V15, **FLUX2_V15},
        ((2, 2),),
        batch2=False,
        sample=False,
        autocast=False,
        text_tokens=16,
        traces=FULL_TRACES,
    ),
}


def build_net(reference: Path, config: dict) -> torch.nn.Module:
    """The upstream PidNet with seeded-v1 weights (rounded to bf16, run in float32)."""
    sys.path.insert(0, str(reference))
    from pid._src.networks.pid_net import PidNet

    with torch.device("meta"):
        net = PidNet(**config)
    ours = {name for name, _ in _native.checkpoint_layout(json.dumps(config))}
    differ = set(net.state_dict()) ^ ours
    if differ:
        raise SystemExit(f"upstream's tensors differ from the layout pid-native derives: {sorted(differ)}")
    state = {}
    for name, tensor in net.state_dict().items():
        values = seeded_float32(name, tuple(tensor.shape))
        rounded = (bf16_bits(values).astype(np.uint32) << 16).view(np.float32)
        state[name] = torch.from_numpy(rounded.reshape(tensor.shape))
    net.load_state_dict(state, assign=True)
    return net.eval()


def trace_hooks(net: torch.nn.Module, store: dict[str, torch.Tensor]) -> list:
    """Forward hooks recording the README's trace tensors into ``store``."""

    def keep(name: str, index: int | None = None):
        def hook(_module, _inputs, output):
            value = output if index is None else output[index]
            store[name] = value.detach().float().clone()

        return hook

    modules = {
        "t_embedder": net.t_embedder,
        "y_embedder": net.y_embedder,
        "s_embedder": net.s_embedder,
        "pixel_embedder": net.pixel_embedder,
        "final_layer": net.final_layer,
    }
    for j, head in enumerate(net.lq_proj.output_heads):
        modules[f"lq_head_{j}"] = head
    for j, gate in enumerate(net.lq_proj.gate_modules):
        modules[f"gate_{j}"] = gate
    for j, block in enumerate(net.pixel_blocks):
        modules[f"pixel_block_{j}"] = block
    if net.pit_lq_gate is not None:
        modules["pit_gate"] = net.pit_lq_gate
    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    for i, block in enumerate(net.patch_blocks):
        handles.append(block.register_forward_hook(keep(f"patch_block_{i}.0", 0)))
        handles.append(block.register_forward_hook(keep(f"patch_block_{i}.1", 1)))
    return handles


def generate(name: str, spec: Spec, reference: Path, out: Path) -> Path:
    torch.manual_seed(0)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cfg = spec.config
    net = build_net(reference, cfg)
    f = cfg["sr_scale"] * cfg["latent_spatial_down_factor"]

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors: dict[str, np.ndarray] = {}
    store: dict[str, torch.Tensor] = {}
    handles = trace_hooks(net, store)

    def run(x, t, y, lq, sigma, autocast=False) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            args = [torch.from_numpy(a) for a in (x, t, y, lq, sigma)]
            return net(args[0], args[1], args[2], lq_latent=args[3], degrade_sigma=args[4]).float()

    for k, (h, w) in enumerate(spec.latents):
        case = f"case{k}"
        b = 2 if spec.batch2 and k == 0 else 1
        inputs = {
            "x": normal(b, 3, h * f, w * f),
            "t": np.array([999.0, 342.0][:b] if b == 2 else [634.0], np.float32),
            "y": normal(b, spec.text_tokens, cfg["txt_embed_dim"]),
            "lq_latent": normal(b, cfg["lq_latent_channels"], h, w),
            "sigma": np.array([0.0, 0.4][:b] if b == 2 else [0.25], np.float32),
        }
        order = [inputs[n] for n in ("x", "t", "y", "lq_latent", "sigma")]
        store.clear()
        v = run(*order)
        tensors |= {f"in.{case}.{n}": a for n, a in inputs.items()}
        tensors[f"out.{case}.v"] = v.numpy()
        for trace, value in store.items():
            if trace.startswith(spec.traces) and not trace.endswith(".1"):
                tensors[f"trace.{case}.{trace}"] = value.numpy()
        if spec.autocast:
            tensors[f"out.{case}.v_bf16_autocast"] = run(*order, autocast=True).numpy()
    for handle in handles:
        handle.remove()

    if spec.sample:
        h, w = spec.latents[0]
        noise = normal(1, 3, h * f, w * f)
        sample = {
            "noise": noise,
            "y": normal(1, spec.text_tokens, cfg["txt_embed_dim"]),
            "lq_latent": normal(1, cfg["lq_latent_channels"], h, w),
            "sigma": np.zeros(1, np.float32),
        }
        for k in range(len(T_LIST) - 2):
            sample[f"eps{k}"] = normal(1, 3, h * f, w * f)
        x = torch.from_numpy(noise)
        for k, t in enumerate(T_LIST[:-1]):
            t_in = np.full(1, t * 1000.0, np.float32)
            v = run(x.numpy(), t_in, sample["y"], sample["lq_latent"], sample["sigma"])
            x0 = x.double() - t * v.double()
            tensors[f"trace.sample.x0_step{k}"] = x0.float().numpy()
            t_next = T_LIST[k + 1]
            if t_next > 0:
                x = ((1 - t_next) * x0 + t_next * torch.from_numpy(sample[f"eps{k}"]).double()).float()
        tensors["out.sample.image"] = x0.clamp(-1, 1).float().numpy()
        tensors |= {f"in.sample.{n}": a for n, a in sample.items()}

    commit = subprocess.run(
        ["git", "-C", str(reference), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    metadata = {
        "kind": "pidnet",
        "config": json.dumps(cfg, sort_keys=True),
        "weights": RECIPE,
        "weights_salt": "",
        "t_list": json.dumps(T_LIST),
        "reference": f"nv-tlabs/PiD {commit or 'checkout'}, torch {torch.__version__} CPU fp32",
        "notes": spec.notes,
        "generator": "scripts/goldens/pidnet.py",
    }
    path = out / f"{name}.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, str(path), metadata)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="checkout of nv-tlabs/PiD")
    parser.add_argument("--out", type=Path, default=Path("tests/goldens"))
    parser.add_argument("names", nargs="*", help=f"goldens to write (default: all of {', '.join(GOLDENS)})")
    args = parser.parse_args()
    for name in args.names or GOLDENS:
        path = generate(name, GOLDENS[name], args.reference, args.out)
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
