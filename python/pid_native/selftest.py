"""``pid-native selftest``: is this build correct and how fast is it, on this device?

One run checks and measures, and writes everything to a JSON report:

- **parity**: every ``pidnet`` golden in the golden directory, every case, each compute dtype,
  against the upstream outputs with the README's tolerances (f32: ``v`` max abs error <= 1e-4,
  sampler image <= 5e-4; bf16/f16: ``v`` mean <= 1e-2 and max <= 0.15, judged against the
  float32 ``v``). Seeded weights are generated on first use (the full topology: ~2.7 GB).
- **custom kernels** (CUDA): the kernels' own self-check, and each golden's first case with
  the custom kernels off (candle-ops fallbacks) and on.
- **noise** (CUDA): the GPU's Gaussian noise against the CPU's, bit for bit.
- **timing**: whole decodes (:class:`pid_native._native.Decoder`, seeded weights of a preset,
  random latents and caption embeddings) per output size and dtype, the median of
  ``repeats`` after one warm-up, GPU work synchronised; peak memory of this process (GPU:
  NVML sampled by a background thread; CPU: VmHWM).
- **reference** (``--reference``): the upstream PyTorch network beside ours on the same
  inputs and weights (:mod:`pid_native.testing.reference`), time and memory ratios.

``passed`` (exit code 0, else 1) requires parity, the kernel checks, the noise check and
every timed decode to succeed; the reference comparison only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .errors import BackendUnavailableError, InvalidInputError
from .memory import resolve_budget
from .testing import cached_seeded
from .testing.goldens import (
    IMAGE_TOL,
    REDUCED_MAX_TOL,
    REDUCED_MEAN_TOL,
    SAMPLE,
    V_TOL,
    case_inputs,
    golden_arrays,
    golden_files,
    golden_metadata,
    pidnet_cases,
    sample_args,
    seeded_checkpoint,
)
from .testing.measure import GpuMemory, gpu_info, peak_rss_bytes, reset_peak_rss
from .testing.paths import golden_dirs, seeded_cache_dir

PRESETS = {"full": "sdxl-2kto4k", "mini": "sdxl-mini"}
DTYPES = ("f32", "bf16", "f16")
# (seed, stream, shape): a large block, odd sizes, and the largest seed.
NOISE_DRAWS = [(0, 0, (1, 3, 512, 512)), (12345, 1, (2, 3, 67, 45)), (2**64 - 1, 4, (7,))]
CAPTION_TOKENS = 300

Log = Callable[[str], None]
# Writes the report as it stands: after every section and timing row.
Save = Callable[[], None]


@dataclass(frozen=True)
class Options:
    device: str
    dtypes: list[str]
    goldens: Path | None
    sizes: list[int]
    repeats: int
    steps: int
    preset: str
    reference: Path | None
    skip_parity: bool
    skip_timing: bool
    notes: tuple[str, ...] = ()


def _tolerance(dtype: str, case: str) -> dict[str, float]:
    if case == SAMPLE:
        return {"max": IMAGE_TOL}
    return {"max": V_TOL} if dtype == "f32" else {"mean": REDUCED_MEAN_TOL, "max": REDUCED_MAX_TOL}


def _judge(out: np.ndarray, ref: np.ndarray, tolerance: dict[str, float]) -> dict[str, Any]:
    if out.shape != ref.shape:
        return {"passed": False, "error": f"output shape {list(out.shape)}, expected {list(ref.shape)}"}
    diff = np.abs(out.astype(np.float64) - ref)
    errors = {"max": float(diff.max()), "mean": float(diff.mean())}
    # NaN compares False: a non-finite output fails.
    passed = all(errors[k] <= tol for k, tol in tolerance.items())
    return {
        "max_abs_err": errors["max"],
        "mean_abs_err": errors["mean"],
        "tolerance": tolerance,
        "passed": passed,
    }


def _forward(net: Any, golden: dict[str, np.ndarray], case: str) -> np.ndarray:
    inp = case_inputs(golden, case)
    return net.forward(inp["x"], inp["t"], inp["y"], inp["lq_latent"], inp["sigma"])


def _run_case(net: Any, golden: dict[str, np.ndarray], path: Path, case: str, dtype: str) -> dict[str, Any]:
    row: dict[str, Any] = {"golden": path.name, "case": case, "dtype": dtype}
    if case == SAMPLE:
        row["output"] = "image"
        out, ref = net.sample(*sample_args(golden, path))[0], golden[f"out.{SAMPLE}.image"]
    else:
        row["output"] = "v"
        out, ref = _forward(net, golden, case), golden[f"out.{case}.v"]
        autocast = golden.get(f"out.{case}.v_bf16_autocast")
        if dtype != "f32" and autocast is not None:
            # For scale: how far the reference's own bf16 autocast run is from its float32 run.
            ref_diff = np.abs(autocast - ref)
            row["reference_bf16"] = {
                "max_abs_err": float(ref_diff.max()),
                "mean_abs_err": float(ref_diff.mean()),
            }
    return {**row, **_judge(out, ref, _tolerance(dtype, case))}


def _kernels_off_and_on(
    net: Any, golden: dict[str, np.ndarray], path: Path, case: str, dtype: str
) -> dict[str, Any]:
    """One forward with the candle-ops fallbacks, one with the custom kernels; restores the switch.

    Passes when both are within the golden's tolerance and within that same tolerance of
    each other.
    """
    initial = _native.custom_kernels()
    try:
        _native.set_custom_kernels(False)
        fallback = _forward(net, golden, case)
        _native.set_custom_kernels(True)
        custom = _forward(net, golden, case)
    finally:
        _native.set_custom_kernels(initial)
    tolerance = _tolerance(dtype, case)
    ref = golden[f"out.{case}.v"]
    checks = {
        "fallback_parity": _judge(fallback, ref, tolerance),
        "custom_parity": _judge(custom, ref, tolerance),
        "custom_vs_fallback": _judge(custom, fallback.astype(np.float64), tolerance),
    }
    return {
        "golden": path.name,
        "case": case,
        "dtype": dtype,
        "max_abs_diff": checks["custom_vs_fallback"].get("max_abs_err", float("nan")),
        **checks,
        "passed": all(c["passed"] for c in checks.values()),
    }


def _failure(exc: Exception, **where: Any) -> dict[str, Any]:
    """A self-test reports every failure, where it happened, and carries on."""
    return {**where, "passed": False, "error": repr(exc)}


def run_parity(opts: Options, cache: Path, log: Log) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parity section, and the custom-kernel comparisons made on the way (CUDA only)."""
    # --goldens DIR: that directory alone; else the bundled set plus $PID_GOLDENS.
    directories = [opts.goldens] if opts.goldens else golden_dirs()
    results: list[dict[str, Any]] = []
    kernels: list[dict[str, Any]] = []
    for path in golden_files("pidnet", opts.goldens):
        golden = golden_arrays(path)
        checkpoint = seeded_checkpoint(path, cache)
        log(f"parity: {path.name} (weights: {checkpoint.name})")
        config = golden_metadata(path)["config"]
        cases = pidnet_cases(path)
        for dtype in opts.dtypes:
            try:
                net = _native.PidNet.open(checkpoint, config=config, device=opts.device, compute_dtype=dtype)
            except Exception as exc:
                results.append(_failure(exc, golden=path.name, case="(open)", dtype=dtype))
                log(f"  {dtype}: ERROR {exc!r}")
                continue
            for case in cases:
                if case == SAMPLE and dtype != "f32":
                    continue  # the README bounds the sampler image in float32 only
                try:
                    row = _run_case(net, golden, path, case, dtype)
                except Exception as exc:
                    row = _failure(exc, golden=path.name, case=case, dtype=dtype)
                results.append(row)
                log(f"  {case} {dtype}: {_row_text(row)}")
            if opts.device != "cpu":
                try:
                    kernels.append(_kernels_off_and_on(net, golden, path, cases[0], dtype))
                except Exception as exc:
                    kernels.append(_failure(exc, golden=path.name, case=cases[0], dtype=dtype))
            del net  # one (possibly 2.7 GB) network resident at a time
    passed = all(r["passed"] for r in results)
    goldens = [str(d.resolve()) for d in directories]
    return {"goldens": goldens, "passed": passed, "results": results}, kernels


def _row_text(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"ERROR {row['error']}"
    bounds = ", ".join(f"{k} {row[f'{k}_abs_err']:.2e} <= {tol:g}" for k, tol in row["tolerance"].items())
    return f"{'ok' if row['passed'] else 'FAILED'} ({bounds})"


def run_noise(device: str) -> dict[str, Any]:
    """The device's noise kernel against the CPU generator, bit for bit.

    The kernel is switched on for the draw whatever ``PID_CUDA_KERNELS`` says: with it off the
    device's noise comes from the CPU generator, and the check would compare it with itself.
    """
    results = []
    initial = _native.custom_kernels()
    try:
        _native.set_custom_kernels(True)
        for seed, stream, shape in NOISE_DRAWS:
            on_device = _native.gaussian_noise(seed, stream, shape, device=device)
            on_cpu = _native.gaussian_noise(seed, stream, shape)
            mismatches = int(np.count_nonzero(on_device.view(np.uint32) != on_cpu.view(np.uint32)))
            results.append({"seed": seed, "stream": stream, "shape": list(shape), "mismatches": mismatches})
    finally:
        _native.set_custom_kernels(initial)
    return {
        "generator": "the CUDA noise kernel (switched on for this check)",
        "passed": all(r["mismatches"] == 0 for r in results),
        "results": results,
    }


def _timing_checkpoint(preset: str, cache: Path) -> tuple[Path, dict[str, Any]]:
    config = _native.preset_config(PRESETS[preset])
    return cached_seeded(cache, _native.checkpoint_layout(config)), json.loads(config)


def run_timing(
    opts: Options, cache: Path, gpu: GpuMemory | None, log: Log, section: dict[str, Any], save: Save
) -> None:
    """Fills ``section`` row by row, saving the report after each, so a run killed at the
    largest size keeps the smaller ones; ``complete`` turns true at the end."""
    checkpoint, config = _timing_checkpoint(opts.preset, cache)
    rows: list[dict[str, Any]] = []
    section.update(
        preset=PRESETS[opts.preset],
        checkpoint=str(checkpoint),
        steps=opts.steps,
        repeats=opts.repeats,
        results=rows,
        complete=False,
    )
    for dtype in opts.dtypes:
        # Before the weights load, so that the planner does not count them twice.
        budget = resolve_budget(None, detected=gpu.free_bytes() if gpu else None)
        try:
            decoder = _native.Decoder.open(
                checkpoint,
                latent_channels=config["lq_latent_channels"],
                latent_down_factor=config["latent_spatial_down_factor"],
                device=opts.device,
                compute_dtype=dtype,
            )
        except Exception as exc:
            rows += [_failure(exc, size=size, dtype=dtype) for size in opts.sizes]
            log(f"timing {dtype}: ERROR {exc!r}")
            save()
            continue
        for size in opts.sizes:
            try:
                row = {
                    "size": size,
                    "dtype": dtype,
                    **_time_decodes(decoder, config, size, budget, opts, gpu),
                }
                log(f"timing {size}² {dtype}: {_timing_text(row)}")
            except Exception as exc:
                row = _failure(exc, size=size, dtype=dtype)
                log(f"timing {size}² {dtype}: ERROR {exc!r}")
            rows.append(row)
            save()
        del decoder
    section.update(passed=all(r["passed"] for r in rows), complete=True)


def _output_check(image: np.ndarray) -> dict[str, Any]:
    """A timed decode counts only if its image is finite and within the sampler's clamp [-1, 1]."""
    finite = bool(np.isfinite(image).all())
    low, high = (float(image.min()), float(image.max())) if finite else (None, None)
    in_range = finite and -1.0 <= low and high <= 1.0  # type: ignore[operator]
    return {"finite": finite, "min": low, "max": high, "passed": in_range}


def _time_decodes(
    decoder: Any,
    config: dict[str, Any],
    size: int,
    budget: tuple[int, str],
    opts: Options,
    gpu: GpuMemory | None,
) -> dict[str, Any]:
    """One warm-up and ``opts.repeats`` timed decodes of a random latent for a ``size``² output."""
    if size % decoder.scale:
        raise InvalidInputError(f"size {size} is not a multiple of {decoder.scale}", "size")
    h = size // decoder.scale
    rng = np.random.default_rng(size)
    latents = rng.standard_normal((1, config["lq_latent_channels"], h, h)).astype(np.float32)
    embs = rng.standard_normal((1, CAPTION_TOKENS, config["txt_embed_dim"])).astype(np.float32)
    budget_bytes, budget_source = budget
    plan = decoder.plan(1, h, h, budget_bytes)
    request = _native.DecodeRequest(decoder.config, latents, embs, [0.0], [0], opts.steps, plan)
    images: list[np.ndarray] = []

    def decode() -> float:
        start = time.perf_counter()
        images[:] = [decoder.decode(request)]
        _native.synchronize(opts.device)
        return time.perf_counter() - start

    reset_peak_rss()
    measured: AbstractContextManager[dict[str, int]] = gpu.peak() if gpu else nullcontext({})
    with measured as peak:
        decode()  # warm-up: kernel loading, allocator growth
        seconds = [decode() for _ in range(opts.repeats)]
    if gpu:
        memory, method = peak["bytes"], gpu.method
    elif opts.device == "cpu":
        memory, method = peak_rss_bytes(), "VmHWM (peak RSS) of this process, reset before the warm-up"
    else:
        memory, method = None, "not measured: pip install nvidia-ml-py for NVML"
    output = _output_check(images[0])
    return {
        "latent": [h, h],
        "seconds_median": statistics.median(seconds),
        "seconds": seconds,
        "peak_memory_bytes": memory,
        "memory_method": method,
        "budget_bytes": budget_bytes,
        "budget_source": budget_source,
        "whole_image": plan.whole,
        "tiles": len(plan.tiles),
        "output": output,
        "passed": output["passed"],
    }


def _timing_text(row: dict[str, Any]) -> str:
    out = row["output"]
    text = f"median {row['seconds_median']:.3f} s, {_memory_text(row)}"
    if out["passed"]:
        return text
    values = f"in [{out['min']:.3f}, {out['max']:.3f}]" if out["finite"] else "not finite"
    return f"{text}, FAILED: output {values}"


def _memory_text(row: dict[str, Any]) -> str:
    memory = row.get("peak_memory_bytes")
    return f"peak memory {memory / 2**30:.2f} GiB" if memory else "peak memory not measured"


def run_reference(
    reference: Path, opts: Options, cache: Path, log: Log, section: dict[str, Any], save: Save
) -> None:
    """Fills ``section`` size by size, saving the report after each."""
    from .testing.reference import Comparison

    checkpoint, _ = _timing_checkpoint(opts.preset, cache)
    comparison = Comparison(
        reference=reference,
        checkpoint=checkpoint,
        t_list=_native.t_ladder(opts.steps),
        device=opts.device,
        compute_dtype="f32" if opts.device == "cpu" else "bf16",
        warmup=1,
        repeats=opts.repeats,
    )
    rows: list[dict[str, Any]] = []
    section.update(
        checkpoint=str(checkpoint),
        t_list=comparison.t_list,
        compute_dtype=comparison.compute_dtype,
        torch_mode="float32 eager" if opts.device == "cpu" else "bfloat16 autocast",
        ours="PidNet.sample (network and sampler, same injected noise as the reference)",
        results=rows,
    )
    for row in comparison.rows(opts.sizes):
        rows.append(row)
        log(f"reference {row['size']}²: {_reference_text(row)}")
        save()


def _reference_text(row: dict[str, Any]) -> str:
    if "time_ratio" in row:
        return (
            f"ours/torch time {row['time_ratio']:.2f}x, "
            f"memory {row.get('memory_ratio', float('nan')):.2f}x, max |diff| {row['max_abs_diff']:.2e}"
        )
    # The last line of a side's stderr is its exception.
    errors = "; ".join(
        f"{s}: {row[s]['error'].splitlines()[-1]}" for s in ("ours", "torch") if "error" in row[s]
    )
    return f"FAILED ({errors})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: str) -> dict[str, Any]:
    from . import __version__, build_info

    env: dict[str, Any] = {
        "pid_native": __version__,
        "build": build_info(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "custom_kernels": _native.custom_kernels(),
        "PID_CUDA_KERNELS": os.environ.get("PID_CUDA_KERNELS"),
    }
    if device != "cpu":
        try:
            env["gpu"] = gpu_info(device)
        except Exception as exc:  # no NVML, or NVML cannot answer: the report says so
            env["gpu"] = {"error": str(exc)}
    return env


def run(
    opts: Options, log: Log, save: Callable[[dict[str, Any]], None] = lambda report: None
) -> dict[str, Any]:
    """Every section the options ask for; the report as a JSON-ready dict.

    ``save`` receives the report as it grows (``complete`` false until the end), so that a run
    stopped from outside leaves what it measured.
    """
    cuda = opts.device != "cpu"
    notes = list(opts.notes)
    # Before this process touches the GPU: NVML's device-wide fallback subtracts what is in use.
    gpu = None
    if cuda:
        try:
            gpu = GpuMemory(opts.device)
        except Exception as exc:  # no NVML, or NVML cannot answer: measure without it
            notes.append(f"peak VRAM and the GPU's free memory are not measured: {exc}")
    _native.synchronize(opts.device)  # fails here, with the reason, if the device cannot be used
    cache = seeded_cache_dir()
    report: dict[str, Any] = {
        "device": opts.device,
        "dtypes": opts.dtypes,
        "environment": _environment(opts.device),
        "seeded_cache": str(cache),
        "notes": notes,
        "complete": False,
    }

    def checkpoint() -> None:
        save(report)

    if cuda:
        try:
            self_check = _native.kernel_self_check(opts.device)
        except Exception as exc:
            self_check = [_failure(exc, name="kernel_self_check")]
        report["custom_kernels"] = {"self_check": self_check, "comparisons": []}
    else:
        report["custom_kernels"] = {"applicable": False, "reason": "the custom kernels are CUDA-only"}
    checkpoint()
    if not opts.skip_parity:
        report["parity"], comparisons = run_parity(opts, cache, log)
        if cuda:
            report["custom_kernels"]["comparisons"] = comparisons
    if cuda:
        kernels = report["custom_kernels"]
        kernels["passed"] = all(c["passed"] for c in kernels["self_check"] + kernels["comparisons"])
        try:
            report["noise"] = run_noise(opts.device)
        except Exception as exc:
            report["noise"] = _failure(exc)
    else:
        report["noise"] = {"applicable": False, "reason": "compares the GPU's noise with the CPU's"}
    checkpoint()
    if not opts.skip_timing:
        report["timing"] = {}
        run_timing(opts, cache, gpu, log, report["timing"], checkpoint)
    if opts.reference is not None:
        report["reference"] = {}
        run_reference(opts.reference, opts, cache, log, report["reference"], checkpoint)
    sections = ("parity", "custom_kernels", "noise", "timing")
    report["passed"] = all(report[s].get("passed", True) for s in sections if s in report)
    report["complete"] = True
    checkpoint()
    return report


def _check_text(check: dict[str, Any]) -> str:
    """Why a kernel self-check entry or a kernels-off/on comparison failed."""
    if "error" in check:
        return check["error"]
    if "custom_vs_fallback" in check:
        names = ("fallback_parity", "custom_parity", "custom_vs_fallback")
        return "; ".join(f"{n}: {_row_text(check[n])}" for n in names if not check[n]["passed"])
    return f"max |diff| {check['max_abs_diff']:.2e} > {check['tolerance']:g}"


def _where(row: dict[str, Any]) -> str:
    return " ".join(str(row[k]) for k in ("golden", "case", "dtype", "name", "size") if k in row)


def summary(report: dict[str, Any], out: Path) -> str:
    """A few lines for a person: the verdict, the worst errors, the timings, the report's path."""
    gpu = report["environment"].get("gpu", {})
    where = (
        f"{report['device']} ({gpu['name']}, driver {gpu['driver']})" if "name" in gpu else report["device"]
    )
    lines = [f"pid-native selftest on {where}: {'PASSED' if report['passed'] else 'FAILED'}"]
    lines += [f"note: {n}" for n in report["notes"]]
    if "parity" in report:
        results = report["parity"]["results"]
        passed = sum(r["passed"] for r in results)
        where = ", ".join(report["parity"]["goldens"])
        lines.append(f"parity: {passed}/{len(results)} cases within tolerance ({where})")
        for dtype in report["dtypes"]:
            rows = [r for r in results if r["dtype"] == dtype and "max_abs_err" in r]
            if rows:
                worst = max(rows, key=lambda r: r["max_abs_err"])
                mean = max(r["mean_abs_err"] for r in rows)
                lines.append(
                    f"  {dtype}: worst max abs error {worst['max_abs_err']:.2e} "
                    f"({worst['golden']} {worst['case']}), worst mean {mean:.2e}"
                )
        lines += [f"  FAILED {_where(r)}: {_row_text(r)}" for r in results if not r["passed"]]
    kernels = report["custom_kernels"]
    if "passed" in kernels:
        checks, comparisons = kernels["self_check"], kernels["comparisons"]
        diffs = [c["max_abs_diff"] for c in comparisons if "max_abs_diff" in c]
        lines.append(
            f"custom kernels: self-check {sum(c['passed'] for c in checks)}/{len(checks)} passed; "
            f"fallback vs custom kernels over {len(diffs)} forwards: max |diff| {max(diffs, default=0):.2e}"
        )
        lines += [f"  FAILED {_where(c)}: {_check_text(c)}" for c in checks + comparisons if not c["passed"]]
    noise = report["noise"]
    if "results" in noise:
        bad = sum(r["mismatches"] for r in noise["results"])
        lines.append(f"noise on {report['device']} vs CPU: {bad} mismatching values")
    elif "error" in noise:
        lines.append(f"noise: ERROR {noise['error']}")
    for row in report.get("timing", {}).get("results", []):
        if "error" in row:
            lines.append(f"timing {row['size']}² {row['dtype']}: ERROR {row['error']}")
        else:
            times = " ".join(f"{s:.3f}" for s in row["seconds"])
            lines.append(f"timing {row['size']}² {row['dtype']}: {_timing_text(row)} [{times}]")
    for row in report.get("reference", {}).get("results", []):
        lines.append(f"reference {row['size']}²: {_reference_text(row)}")
    lines.append(f"report: {out}")
    return "\n".join(lines)


def options(args: argparse.Namespace) -> Options:
    """Options from the command line; ``notes`` say what was changed to run here."""
    notes = []
    device = args.device
    dtypes = [d.strip() for d in (args.dtypes or ("f32" if device == "cpu" else "f32,bf16")).split(",")]
    for d in dtypes:
        if d not in DTYPES:
            raise InvalidInputError(f"unknown dtype {d!r}; use {', '.join(DTYPES)}", "dtype")
    if device == "cpu" and "bf16" in dtypes:
        dtypes = ["f16" if d == "bf16" else d for d in dtypes]
        notes.append("bf16 compute is not supported by candle on the CPU; ran f16 as the reduced precision")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise InvalidInputError(
            f"--sizes must be integers like 2048,4096, got {args.sizes!r}", "sizes"
        ) from None
    if args.repeats < 1:
        raise InvalidInputError(f"--repeats must be at least 1, got {args.repeats}", "repeats")
    if args.reference is not None:
        import importlib.util

        from .testing.reference import check_checkout

        check_checkout(args.reference)
        if importlib.util.find_spec("torch") is None:
            raise BackendUnavailableError('--reference needs torch: pip install "pid-native[reference]"')
    return Options(
        device=device,
        dtypes=list(dict.fromkeys(dtypes)),
        goldens=args.goldens,
        sizes=sizes,
        repeats=args.repeats,
        steps=args.steps,
        preset=args.preset,
        reference=args.reference,
        skip_parity=args.skip_parity,
        skip_timing=args.skip_timing,
        notes=tuple(notes),
    )


__all__ = ["Options", "options", "run", "summary"]
