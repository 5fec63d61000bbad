"""Our candle network beside the upstream PyTorch reference: same weights, same inputs, one run.

    pip install ".[reference]"                      # torch, loguru, nvidia-ml-py (dev only)
    git clone https://github.com/nv-tlabs/PiD ~/src/PiD
    python benches/compare_reference.py --reference ~/src/PiD --sizes 512,1024

For every output size both sides run the 4-step distilled loop (``--steps 1``: one network
forward) on the real 1.36 B-parameter topology with the same seeded bf16 weights (or
``--checkpoint`` a real ``pid_sdxl_2kto4k.safetensors``), the same inputs and the same
injected noise, each in its own process so that peak RSS (VmHWM) is per side. The reference
runs as upstream runs it on CPU: weights upcast to float32, eager, ``torch.no_grad``. Printed
and written (``--json``): seconds, peak RSS, our/reference ratios and the largest absolute
difference of the outputs. Nothing here is a test; the checkout is never imported by the
package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PID_SEEDED_CACHE", REPO / "target" / "pid-seeded"))
PRESET = "sdxl-2kto4k"


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make_inputs(size: int, steps: int, txt_dim: int, latent_channels: int, path: Path) -> None:
    rng = np.random.default_rng(size)
    h = size // 32

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    arrays = {
        "noise": normal(1, 3, size, size),
        "y": normal(1, 300, txt_dim),
        "lq_latent": normal(1, latent_channels, h, h),
        "sigma": np.zeros(1, np.float32),
    }
    for k in range(steps - 1):
        arrays[f"eps{k}"] = normal(1, 3, size, size)
    np.savez(path, **arrays)


def run_ours(
    checkpoint: Path, inputs: dict[str, np.ndarray], t_list: list[float]
) -> tuple[np.ndarray, float]:
    """``t_list``: the sampler's ladder ending in 0, or a single t for one forward."""
    from pid_native import _native

    net = _native.PidNet.open(checkpoint)
    eps = [inputs[f"eps{k}"] for k in range(len(t_list) - 2)]
    start = time.perf_counter()
    if len(t_list) == 1:
        t = np.full(1, t_list[0] * 1000, np.float32)
        out = net.forward(inputs["noise"], t, inputs["y"], inputs["lq_latent"], inputs["sigma"])
    else:
        out, _ = net.sample(inputs["noise"], eps, inputs["y"], inputs["lq_latent"], inputs["sigma"], t_list)
    return np.asarray(out), time.perf_counter() - start


def run_reference(
    reference: Path, checkpoint: Path, inputs: dict[str, np.ndarray], t_list: list[float]
) -> tuple[np.ndarray, float]:
    import torch
    from safetensors import safe_open

    from pid_native import _native

    sys.path.insert(0, str(reference))
    from pid._src.networks.pid_net import PidNet

    config = json.loads(_native.inspect_checkpoint(checkpoint))
    with torch.device("meta"):
        net = PidNet(**config)
    # Upcast one tensor at a time, as the upstream loader does, so loading does not set the peak.
    state = {}
    with safe_open(str(checkpoint), "pt") as f:
        for name in f.keys():
            if not name.startswith("lq_proj.lq_aux_rgb_head."):
                state[name.removeprefix("net.")] = f.get_tensor(name).float()
    net.load_state_dict(state, assign=True)
    del state
    net.eval()
    x = torch.from_numpy(inputs["noise"])
    y, lq, sigma = (torch.from_numpy(inputs[k]) for k in ("y", "lq_latent", "sigma"))
    start = time.perf_counter()
    with torch.no_grad():
        for k, t in enumerate(t_list[:-1] if len(t_list) > 1 else t_list):
            v = net(x, torch.full((1,), t * 1000.0), y, lq_latent=lq, degrade_sigma=sigma)
            if len(t_list) == 1:
                return v.numpy(), time.perf_counter() - start
            x0 = x.double() - t * v.double()
            t_next = t_list[k + 1]
            if t_next > 0:
                x = ((1 - t_next) * x0 + t_next * torch.from_numpy(inputs[f"eps{k}"]).double()).float()
    return x0.clamp(-1, 1).float().numpy(), time.perf_counter() - start


def child(args: argparse.Namespace) -> None:
    inputs = dict(np.load(args.inputs))
    t_list = json.loads(args.t_list)
    if args.child == "ours":
        out, seconds = run_ours(args.checkpoint, inputs, t_list)
    else:
        out, seconds = run_reference(args.reference, args.checkpoint, inputs, t_list)
    np.save(args.out, out)
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib()}))


def run_side(side: str, args: argparse.Namespace, inputs: Path, out: Path, t_list: list[float]) -> dict:
    threads = str(args.threads)
    env = {**os.environ, "RAYON_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    cmd = [sys.executable, __file__, "--child", side, "--checkpoint", str(args.checkpoint)]
    cmd += ["--inputs", str(inputs), "--out", str(out), "--t-list", json.dumps(t_list)]
    cmd += ["--reference", str(args.reference), "--threads", threads]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="checkout of github.com/nv-tlabs/PiD")
    parser.add_argument("--checkpoint", type=Path, help="PiD sdxl checkpoint (default: seeded weights)")
    parser.add_argument("--sizes", default="512,1024", help="output sizes, multiples of 32")
    parser.add_argument("--steps", type=int, default=4, choices=(1, 4), help="4: the sampler; 1: one forward")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--t-list", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from pid_native import _native

    if not (args.reference / "pid" / "_src" / "networks" / "pid_net.py").is_file():
        raise SystemExit(
            f"{args.reference} is not a checkout of nv-tlabs/PiD (no pid/_src/networks/pid_net.py)"
        )
    config = json.loads(_native.preset_config(PRESET))
    if args.checkpoint is None:
        from pid_native.testing import cached_seeded

        args.checkpoint = cached_seeded(CACHE, _native.checkpoint_layout(json.dumps(config)))
    else:
        config = json.loads(_native.inspect_checkpoint(args.checkpoint))
    ladder = _native.t_ladder(4)
    t_list = ladder if args.steps == 4 else ladder[:1]

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            inputs = Path(tmp) / f"in-{size}.npz"
            make_inputs(size, args.steps, config["txt_embed_dim"], config["lq_latent_channels"], inputs)
            row = {"size": size, "steps": args.steps, "threads": args.threads}
            outs = {}
            for side in ("ours", "torch"):
                outs[side] = Path(tmp) / f"{side}-{size}.npy"
                row[side] = run_side(side, args, inputs, outs[side], t_list)
                seconds, rss = row[side]["seconds"], row[side]["peak_rss_gib"]
                print(f"{size}² {side:5s}: {seconds:8.1f} s, peak RSS {rss:.2f} GiB")
            row["time_ratio"] = row["ours"]["seconds"] / row["torch"]["seconds"]
            row["rss_ratio"] = row["ours"]["peak_rss_gib"] / row["torch"]["peak_rss_gib"]
            row["max_abs_diff"] = float(np.abs(np.load(outs["ours"]) - np.load(outs["torch"])).max())
            print(
                f"{size}² ours/reference: time {row['time_ratio']:.2f}x, peak RSS {row['rss_ratio']:.2f}x, "
                f"max |diff| {row['max_abs_diff']:.2e}"
            )
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
