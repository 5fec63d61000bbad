"""Our network beside the upstream PyTorch one: same weights, same inputs, one process per side.

Used by ``benches/compare_reference.py`` and ``pid-native selftest --reference``. Needs torch
(``pip install "pid-native[reference]"``) and a checkout of github.com/nv-tlabs/PiD, which is
imported only by the reference's own child process, never by the package.

Both sides run PiD's distilled sampler with the same injected noise (a ladder of one t: a
single network forward), each in a fresh process (``python -m pid_native.testing.reference``)
so that its peak memory is its own: VmHWM on the CPU, NVML-sampled GPU memory on CUDA (see
:mod:`.measure`; the same method for both sides). The reference runs as upstream runs it: on
the CPU eager float32 under ``torch.no_grad``, on CUDA under bfloat16 autocast. Seconds are
per run after ``warmup`` unmeasured runs, GPU work synchronised before the clock stops.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError

Inputs = dict[str, np.ndarray]
SIDES = ("ours", "torch")


def check_checkout(reference: Path) -> None:
    """Raises InvalidInputError unless ``reference`` is a checkout of nv-tlabs/PiD."""
    if not (reference / "pid" / "_src" / "networks" / "pid_net.py").is_file():
        raise InvalidInputError(
            f"{reference} is not a checkout of nv-tlabs/PiD (no pid/_src/networks/pid_net.py); "
            "git clone https://github.com/nv-tlabs/PiD and pass its path",
            "reference_checkout",
        )


def make_inputs(size: int, t_list: list[float], txt_dim: int, latent_channels: int, path: Path) -> None:
    """Seeded inputs for a ``size``² output, saved as ``.npz``: noise, y, lq_latent, sigma, eps."""
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
    for k in range(len(t_list) - 2):
        arrays[f"eps{k}"] = normal(1, 3, size, size)
    np.savez(path, **arrays)


def _timed(run: Callable[[], np.ndarray], warmup: int, repeats: int) -> tuple[np.ndarray, list[float]]:
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - start)
    return out, seconds


@dataclass(frozen=True)
class Comparison:
    """What both sides run: weights, ladder, device and how to time it.

    ``t_list``: the sampler's ladder ending in 0, or a single t for one forward.
    ``compute_dtype``: ours; the reference uses f32 on the CPU and bf16 autocast on CUDA.
    """

    reference: Path
    checkpoint: Path
    t_list: list[float]
    device: str = "cpu"
    compute_dtype: str = "f32"
    warmup: int = 0
    repeats: int = 1
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def run_ours(self, inputs: Inputs) -> tuple[np.ndarray, list[float], dict[str, Any]]:
        from .. import _native

        net = _native.PidNet.open(self.checkpoint, device=self.device, compute_dtype=self.compute_dtype)
        t_list = self.t_list
        eps = [inputs[f"eps{k}"] for k in range(len(t_list) - 2)]
        args = (inputs["y"], inputs["lq_latent"], inputs["sigma"])

        def run() -> np.ndarray:
            if len(t_list) == 1:
                out = net.forward(inputs["noise"], np.full(1, t_list[0] * 1000, np.float32), *args)
            else:
                out, _ = net.sample(inputs["noise"], eps, *args, t_list)
            _native.synchronize(self.device)
            return np.asarray(out)

        out, seconds = _timed(run, self.warmup, self.repeats)
        return out, seconds, {"compute_dtype": self.compute_dtype}

    def run_reference(self, inputs: Inputs) -> tuple[np.ndarray, list[float], dict[str, Any]]:
        import torch
        from safetensors import safe_open

        from .. import _native

        sys.path.insert(0, str(self.reference))
        from pid._src.networks.pid_net import PidNet

        device, t_list, cuda = self.device, self.t_list, self.device != "cpu"
        config = json.loads(_native.inspect_checkpoint(self.checkpoint))
        with torch.device("meta"):
            net = PidNet(**config)
        # Upcast one tensor at a time, as the upstream loader does, so loading does not set the peak.
        state = {}
        files = [self.checkpoint]
        if self.checkpoint.name.endswith(".index.json"):  # shards (the seeded cache's full-size ones)
            weight_map = json.loads(self.checkpoint.read_text())["weight_map"]
            files = sorted({self.checkpoint.parent / shard for shard in weight_map.values()})
        for file in files:
            with safe_open(str(file), "pt", device=device) as f:
                for name in f.keys():
                    if not name.startswith("lq_proj.lq_aux_rgb_head."):
                        state[name.removeprefix("net.")] = f.get_tensor(name).float()
        net.load_state_dict(state, assign=True)
        del state
        net.eval()

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(inputs[name]).to(device)

        y, lq, sigma = tensor("y"), tensor("lq_latent"), tensor("sigma")

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                t_in = torch.full((1,), t * 1000.0, device=device)
                return net(x, t_in, y, lq_latent=lq, degrade_sigma=sigma)

        @torch.no_grad()
        def run() -> np.ndarray:
            x = tensor("noise")
            if len(t_list) == 1:
                out = velocity(x, t_list[0]).float()
            else:
                for k, t in enumerate(t_list[:-1]):
                    x0 = x.double() - t * velocity(x, t).double()
                    t_next = t_list[k + 1]
                    if t_next > 0:
                        x = ((1 - t_next) * x0 + t_next * tensor(f"eps{k}").double()).float()
                out = x0.clamp(-1, 1).float()
            if cuda:
                torch.cuda.synchronize(device)
            return out.cpu().numpy()

        out, seconds = _timed(run, self.warmup, self.repeats)
        extra: dict[str, Any] = {"torch": torch.__version__, "autocast": "bf16" if cuda else None}
        if cuda:
            extra["torch_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        return out, seconds, extra

    def run_side(self, side: str, inputs: Path, out: Path) -> dict[str, Any]:
        """One side in a fresh process; its result (seconds, peak_memory_bytes, memory_method, ...)."""
        threads = str(self.threads)
        env = {**os.environ, "RAYON_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        setup = {**asdict(self), "reference": str(self.reference), "checkpoint": str(self.checkpoint)}
        cmd = [sys.executable, "-m", __name__, side, json.dumps(setup), str(inputs), str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {side} side failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def rows(self, sizes: list[int], workdir: Path | None = None) -> Iterator[dict[str, Any]]:
        """Per output size, both sides on the same inputs: each side's numbers and the ratios.

        A side that fails leaves its ``error`` in the row (and no ratios) instead of stopping the run.
        """
        from .. import _native

        check_checkout(self.reference)
        config = json.loads(_native.inspect_checkpoint(self.checkpoint))
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            for size in sizes:
                inputs = Path(tmp) / f"in-{size}.npz"
                make_inputs(size, self.t_list, config["txt_embed_dim"], config["lq_latent_channels"], inputs)
                row: dict[str, Any] = {"size": size, "threads": self.threads}
                outs = {side: Path(tmp) / f"{side}-{size}.npy" for side in SIDES}
                for side in SIDES:
                    try:
                        row[side] = self.run_side(side, inputs, outs[side])
                    except RuntimeError as exc:
                        row[side] = {"error": str(exc)}
                if all("error" not in row[side] for side in SIDES):
                    ours, torch = row["ours"], row["torch"]
                    row["time_ratio"] = statistics.median(ours["seconds"]) / statistics.median(
                        torch["seconds"]
                    )
                    if ours["peak_memory_bytes"] and torch["peak_memory_bytes"]:
                        row["memory_ratio"] = ours["peak_memory_bytes"] / torch["peak_memory_bytes"]
                    row["max_abs_diff"] = float(np.abs(np.load(outs["ours"]) - np.load(outs["torch"])).max())
                yield row


def _child(side: str, setup: str, inputs_path: str, out_path: str) -> None:
    """One side, in the process :meth:`Comparison.run_side` started; prints its result as JSON."""
    from . import measure

    fields = json.loads(setup)
    comparison = Comparison(
        **{**fields, "reference": Path(fields["reference"]), "checkpoint": Path(fields["checkpoint"])}
    )
    # Before anything touches the GPU: the device-wide fallback subtracts what was in use.
    gpu = measure.GpuMemory(comparison.device) if comparison.device != "cpu" else None
    inputs = dict(np.load(inputs_path))
    with gpu.peak() if gpu else nullcontext({}) as peak:
        run = comparison.run_ours if side == "ours" else comparison.run_reference
        out, seconds, extra = run(inputs)
    np.save(out_path, out)
    if gpu:
        memory, method = peak["bytes"], gpu.method
    else:
        memory, method = measure.peak_rss_bytes(), "VmHWM (peak RSS) of the side's process"
    print(json.dumps({"seconds": seconds, "peak_memory_bytes": memory, "memory_method": method, **extra}))


__all__ = ["SIDES", "Comparison", "check_checkout", "make_inputs"]

if __name__ == "__main__":
    _child(*sys.argv[1:])
