"""The GPU check, step by step, each in its own time-boxed process (run by device_check.sh).

Every step's outcome goes into ``$OUT/device_check.json`` as soon as it ends (``passed``,
``failed``, ``timeout``, ``error`` or ``skipped``, with its time, command, the tail of its log
and the JSON files it wrote), and a failed or timed-out step never stops the next one. The
steps, in order of value:

    install      the carried wheels into a throwaway target dir (pip --no-index --no-deps)
    environment  GPU, driver, CUDA libraries found, our build_info(), torch, compute-sanitizer
    parity       pid-native selftest: every pidnet golden in f32 and bf16, kernels against
                 their candle-ops twins, the GPU's noise against the CPU's bit for bit
    timing       4-step decodes of the real topology (seeded weights) per size, median of
                 ``--repeats`` after a warm-up, peak VRAM via NVML; custom kernels on, then off
    reference    the upstream PyTorch network (bf16 autocast) on the same inputs and weights
    sanitizer    compute-sanitizer memcheck and racecheck over one small decode, kernels on

Standard library only: it must run where our package does not import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import kit  # noqa: E402  (the kit's format: one module beside this one)

LOG_TAIL = 4000
# Seconds per step on an H100; the whole run must fit 8 minutes with its start-up.
TIMEOUTS = {
    "install": 60,
    "environment": 30,
    "parity": 100,
    "timing_kernels_on": 100,
    "timing_kernels_off": 60,
    "reference": 60,
    "sanitizer_memcheck": 35,
    "sanitizer_racecheck": 35,
}


@dataclass
class Context:
    out: Path
    kit: Path
    work: Path
    device: str
    preset: str
    sizes: str
    repeats: int
    goldens: Path
    timeouts: dict[str, float]
    deadline: float
    python: str = sys.executable
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> Path:
        return self.work / "site"

    @property
    def reference(self) -> Path:
        return self.work / "reference"

    @property
    def cuda(self) -> bool:
        return self.device != "cpu"

    def env(self, **extra: str) -> dict[str, str]:
        """The children's environment: the carried packages first on the path."""
        path = os.pathsep.join(p for p in (str(self.site), os.environ.get("PYTHONPATH", "")) if p)
        return {
            **os.environ,
            "PYTHONPATH": path,
            "PID_SEEDED_CACHE": str(self.work / "seeded"),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def save(self) -> None:
        partial = self.out / "device_check.json.partial"
        partial.write_text(json.dumps(self.report, indent=2) + "\n")
        os.replace(partial, self.out / "device_check.json")


def write_atomic(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def run_step(
    ctx: Context,
    name: str,
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    files: Sequence[str] = (),
    judge: Callable[[int], tuple[str, str | None]] | None = None,
) -> dict[str, Any]:
    """Runs ``cmd`` for at most the step's time box (less if the run's deadline is closer),
    records the outcome and saves the report. ``judge(returncode)`` may turn a finished
    command into (status, reason); by default exit code 0 passes."""
    remaining = ctx.deadline - time.monotonic()
    box = min(ctx.timeouts.get(name, 60.0), remaining)
    row: dict[str, Any] = {"name": name, "command": list(cmd), "timeout_s": round(box, 1)}
    if box < 5:
        row.update(status="skipped", reason=f"out of time: {remaining:.0f} s left of the run's budget")
        return record(ctx, row)
    log = ctx.out / f"{name}.log"
    start = time.monotonic()
    with log.open("w") as sink:
        try:
            # Its own session, so that a timeout stops the grandchildren too (the reference's
            # sides, the process under compute-sanitizer), which would hold the GPU otherwise.
            child = subprocess.Popen(
                list(cmd),
                cwd=ROOT,
                env=env or ctx.env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            row.update(status="error", reason=f"cannot start: {exc}")
        else:
            try:
                returncode = child.wait(timeout=box)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                row.update(status="timeout", reason=f"still running after {box:.0f} s: stopped")
            else:
                status, reason = (
                    judge(returncode) if judge else ("passed" if returncode == 0 else "failed", None)
                )
                row.update(status=status, returncode=returncode)
                if reason:
                    row["reason"] = reason
    row["seconds"] = round(time.monotonic() - start, 2)
    row["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:]
    row["files"] = [f for f in files if (ctx.out / f).is_file()]
    return record(ctx, row)


def record(ctx: Context, row: dict[str, Any]) -> dict[str, Any]:
    ctx.report["steps"].append(row)
    ctx.save()
    print(
        f"[device_check] {row['name']}: {row['status']}" + (f" ({row['reason']})" if "reason" in row else "")
    )
    return row


def step_install(ctx: Context) -> dict[str, Any]:
    """The carried wheels into the throwaway target dir, and the reference unpacked."""
    packed = sorted((ctx.kit / "wheels").glob("*.whl.xz")) + sorted((ctx.kit / "sanitizer").glob("*.whl.xz"))
    if not packed:
        return record(ctx, {"name": "install", "status": "error", "reason": f"no wheels in {ctx.kit}/wheels"})
    reason = glibc_too_old(ctx.report["kit"].get("glibc"), platform.libc_ver())
    if reason:
        return record(ctx, {"name": "install", "status": "error", "reason": reason})
    unpacked = ctx.work / "wheels"
    unpacked.mkdir(parents=True, exist_ok=True)
    wheels = [kit.unpack(p, unpacked) for p in packed]
    archive = ctx.kit / "reference.tar.gz"
    if archive.is_file():
        with tarfile.open(archive) as tar:
            tar.extractall(ctx.reference, filter="data")
    cmd = [
        ctx.python,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--quiet",
        "--target",
        str(ctx.site),
    ]
    return run_step(ctx, "install", [*cmd, *map(str, wheels)], env=dict(os.environ))


def glibc_too_old(needed: str | None, found: tuple[str, str]) -> str | None:
    """Why the kit's extension cannot load here, if this machine's glibc is older than it needs."""
    if not needed or found[0] != "glibc":
        return None
    if tuple(map(int, found[1].split("."))) >= tuple(map(int, needed.split("."))):
        return None
    return (
        f"the kit's extension needs glibc {needed} or newer and this machine has {found[1]}: "
        "build the kit on a system with an older glibc"
    )


def step_environment(ctx: Context) -> dict[str, Any]:
    out = ctx.out / "environment.json"
    cmd = [ctx.python, str(Path(__file__)), "probe", "--device", ctx.device, "--out", str(out)]
    return run_step(ctx, "environment", cmd, files=[out.name])


def selftest(ctx: Context, out: str, *args: str) -> list[str]:
    return [
        ctx.python,
        "-m",
        "pid_native.cli",
        "selftest",
        "--device",
        ctx.device,
        "--out",
        str(ctx.out / out),
        *args,
    ]


def step_parity(ctx: Context) -> dict[str, Any]:
    dtypes = "f32,bf16" if ctx.cuda else "f32"
    cmd = selftest(ctx, "parity.json", "--skip-timing", "--dtypes", dtypes, "--goldens", str(ctx.goldens))
    return run_step(ctx, "parity", cmd, files=["parity.json"])


def timing_args(ctx: Context, repeats: int) -> list[str]:
    dtype = "bf16" if ctx.cuda else "f32"
    return ["--preset", ctx.preset, "--sizes", ctx.sizes, "--repeats", str(repeats), "--dtypes", dtype]


def step_timing(ctx: Context, kernels: bool) -> dict[str, Any]:
    name = f"timing_kernels_{'on' if kernels else 'off'}"
    cmd = selftest(ctx, f"{name}.json", "--skip-parity", *timing_args(ctx, ctx.repeats))
    return run_step(
        ctx, name, cmd, env=ctx.env(PID_CUDA_KERNELS="1" if kernels else "0"), files=[f"{name}.json"]
    )


def step_reference(ctx: Context) -> dict[str, Any]:
    if not (ctx.reference / "pid").is_dir():
        row = {
            "name": "reference",
            "status": "failed",
            "reason": "the kit carries no reference (--no-reference)",
        }
        return record(ctx, row)
    cmd = selftest(ctx, "reference.json", "--skip-parity", "--skip-timing", "--reference", str(ctx.reference))
    # One timed run per side after a warm-up: each size costs two processes loading the weights.
    return run_step(ctx, "reference", [*cmd, *timing_args(ctx, 1)], files=["reference.json"])


def find_sanitizer(ctx: Context) -> str | None:
    """compute-sanitizer: the carried wheel's, else the machine's."""
    carried = ctx.site / "nvidia" / "cu13" / "bin" / "compute-sanitizer"
    if carried.is_file():
        return str(carried)
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def step_sanitizer(ctx: Context, tool: str) -> dict[str, Any]:
    name = f"sanitizer_{tool}"
    if not ctx.cuda:
        return record(
            ctx, {"name": name, "status": "skipped", "reason": "compute-sanitizer checks GPU code only"}
        )
    sanitizer = find_sanitizer(ctx)
    if sanitizer is None:
        row = {
            "name": name,
            "status": "error",
            "reason": "compute-sanitizer not found (kit built --no-sanitizer?)",
        }
        return record(ctx, row)
    os.chmod(sanitizer, 0o755)  # pip --target keeps the wheel's mode bits only on some versions
    decode = [ctx.python, str(Path(__file__)), "small-decode", "--device", ctx.device]
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20", *decode]

    def judge(returncode: int) -> tuple[str, str | None]:
        if returncode == 86:
            return "failed", f"{tool} reported errors (see log_tail)"
        return ("passed", None) if returncode == 0 else ("error", f"the decode failed (exit {returncode})")

    return run_step(ctx, name, cmd, env=ctx.env(PID_CUDA_KERNELS="1"), judge=judge)


def check(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or out / "_work")
    work.mkdir(parents=True, exist_ok=True)
    timeouts = {**TIMEOUTS, **{k: float(v) for k, v in (t.split("=", 1) for t in args.timeout)}}
    ctx = Context(
        out=out,
        kit=args.kit,
        work=work,
        device=args.device,
        preset=args.preset,
        sizes=args.sizes,
        repeats=args.repeats,
        goldens=args.goldens,
        timeouts=timeouts,
        deadline=time.monotonic() + args.budget_s,
        python=args.python,
    )
    ctx.report.update(
        device=args.device,
        budget_s=args.budget_s,
        kit=_kit_manifest(args.kit),
        host={"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        steps=[],
    )
    start = time.monotonic()
    installed = step_install(ctx)["status"] == "passed"
    steps: list[Callable[[], Any]] = [
        lambda: step_environment(ctx),
        lambda: step_parity(ctx),
        lambda: step_timing(ctx, kernels=True),
        lambda: step_timing(ctx, kernels=False),
        lambda: step_reference(ctx),
        lambda: step_sanitizer(ctx, "memcheck"),
        lambda: step_sanitizer(ctx, "racecheck"),
    ]
    if installed:
        for step in steps:
            step()
    ctx.report["seconds"] = round(time.monotonic() - start, 1)
    ctx.report["passed"] = [s["name"] for s in ctx.report["steps"] if s["status"] == "passed"]
    ctx.report["not_passed"] = [s["name"] for s in ctx.report["steps"] if s["status"] != "passed"]
    ctx.save()
    print(f"[device_check] done in {ctx.report['seconds']} s: {out / 'device_check.json'}")
    return 0 if not ctx.report["not_passed"] else 1


def _kit_manifest(folder: Path) -> Any:
    try:
        return json.loads((folder / "kit.json").read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"no readable {folder / 'kit.json'}: {exc}"}


def probe(args: argparse.Namespace) -> int:
    """The environment step, inside a child that sees the carried packages."""
    env: dict[str, Any] = {"python": sys.version, "executable": sys.executable, "libc": platform.libc_ver()}
    env["nvidia_smi"] = _nvidia_smi()
    try:
        import pid_native
        from pid_native import _cudalibs

        env["pid_native"] = {"version": pid_native.__version__, "path": pid_native.__file__}
        env["build_info"] = pid_native.build_info()
        env["cuda_libraries_found"] = {k: str(v) for k, v in _cudalibs.find_libraries().items()}
        if args.device != "cpu":
            from pid_native.testing.measure import gpu_info

            env["gpu"] = gpu_info(args.device)
            env["device_memory_free_total"] = pid_native._native.device_memory(args.device)
        env["backends"] = {k: vars(v) for k, v in pid_native.backends.available().items()}
        failed = None
    except Exception as exc:  # recorded, and the step fails: the report says why
        env["error"] = f"{type(exc).__name__}: {exc}"
        failed = exc
    try:
        import torch

        env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
        env["torch"]["cuda_available"] = bool(torch.cuda.is_available())
    except Exception as exc:
        env["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    write_atomic(args.out, env)
    print(json.dumps(env, indent=2))
    return 1 if failed else 0


def _nvidia_smi() -> Any:
    query = "name,driver_version,memory.total,compute_cap"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    return {"query": query, "output": done.stdout.strip(), "returncode": done.returncode}


def small_decode(args: argparse.Namespace) -> int:
    """One 4-step bf16 decode of the mini network to 256² (every custom kernel runs), for the sanitizer."""
    import numpy as np

    from pid_native import _native
    from pid_native.testing import cached_seeded
    from pid_native.testing.paths import seeded_cache_dir

    layout = _native.preset_config("sdxl-mini")
    config = json.loads(layout)
    checkpoint = cached_seeded(seeded_cache_dir(), _native.checkpoint_layout(layout))
    decoder = _native.Decoder.open(
        checkpoint,
        latent_channels=config["lq_latent_channels"],
        latent_down_factor=config["latent_spatial_down_factor"],
        device=args.device,
        compute_dtype="bf16",
    )
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, config["lq_latent_channels"], 8, 8)).astype(np.float32)
    embs = rng.standard_normal((1, 300, config["txt_embed_dim"])).astype(np.float32)
    image = decoder.decode(latents, embs, [0.0], [0], 4, 8 << 30)
    _native.synchronize(args.device)
    print(f"decoded {image.shape}, finite: {bool(np.isfinite(image).all())}")
    return 0 if np.isfinite(image).all() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="every step (what device_check.sh runs)")
    c.add_argument("--out", type=Path, required=True, help="the folder the JSON goes to ($OUT)")
    c.add_argument("--kit", type=Path, default=ROOT / "gpu-kit")
    c.add_argument("--work", help="scratch folder (default OUT/_work)")
    c.add_argument("--device", default="cuda:0")
    c.add_argument("--preset", default="full", choices=["full", "mini"])
    c.add_argument("--sizes", default="1024,2048,4096")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--goldens", type=Path, default=ROOT / "tests" / "goldens")
    c.add_argument("--budget-s", type=float, default=470.0, help="the whole run's time (default 470)")
    c.add_argument("--timeout", action="append", default=[], metavar="STEP=S", help="override a step's box")
    c.add_argument("--python", default=sys.executable, help="the interpreter the steps run under")
    p = sub.add_parser("probe", help="(child) the environment step")
    p.add_argument("--device", required=True)
    p.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("small-decode", help="(child) one small decode for compute-sanitizer")
    d.add_argument("--device", required=True)
    args = parser.parse_args(argv)
    return {"check": check, "probe": probe, "small-decode": small_decode}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
