"""The ``pid-native`` command line.

Exit codes: 0 success, 1 failure (the error is printed as one line; ``--debug`` shows the
traceback), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from .errors import InvalidInputError, MissingFileError, PidError
from .provisioning.bundle import BUNDLE_ENV, default_bundle

DATA = Path(__file__).parent / "data"
DEMO_IMAGE = DATA / "demo.png"


def _progress_bar(desc: str) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """A tqdm bar over sampler steps (and tiles) fed by decode progress events."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="step", disable=not sys.stderr.isatty())

    def update(event: Any) -> None:
        if event.phase == "step":
            if event.index == 1:
                bar.reset(total=event.count)
            bar.update(1)
        bar.set_postfix_str(str(event))

    return update, bar.close


def _open_args(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The weights and the ``Decoder.open`` options the arguments ask for."""
    weights = Path(args.weights) if args.weights else default_bundle()
    if not weights.exists():
        raise MissingFileError(
            f"no PiD weights at {weights}; run `pid-native fetch --accept-license` first, pass --weights, "
            f"or try `pid-native demo --synthetic`",
            "not_provisioned",
        )
    options = {
        "backend": args.backend,
        # Absolute: Ray actors open the decoder from their own working directory.
        "gemma": Path(args.gemma).absolute() if args.gemma else None,
        "vae": Path(args.vae).absolute() if args.vae else None,
        "memory_budget": args.memory_budget,
        "space": args.space,
        "student": args.student,
    }
    return weights, options


def _open(args: argparse.Namespace) -> Any:
    from .decoder import Decoder

    weights, options = _open_args(args)
    return Decoder.open(weights, **options)


def _save(images: Sequence[Any], out: Path, extra: dict[str, str]) -> list[Path]:
    from .batch import output_paths
    from .images import save_png

    paths = output_paths(out, len(images))
    return [save_png(img, path, extra) for img, path in zip(images, paths, strict=True)]


def _is_batch(args: argparse.Namespace) -> bool:
    """Several inputs, a directory, glob or manifest, ``-o`` a directory, or ``--ray``: a batch run."""
    from .batch import MANIFEST_SUFFIX, has_pattern

    spec = args.inputs[0]
    batch = (
        len(args.inputs) > 1
        or args.ray is not None
        or Path(spec).is_dir()
        or Path(spec).suffix == MANIFEST_SUFFIX
        or (not Path(spec).exists() and has_pattern(spec))
        or Path(args.output).is_dir()
        or args.output.endswith(("/", os.sep))
    )
    if not batch and (args.overwrite or args.report):
        raise InvalidInputError(
            "--overwrite and --report apply to batch runs (several inputs, a directory, a glob or a "
            "manifest); to write one input into a directory, end -o with /",
            "batch_only",
        )
    return batch


def _run_batch(args: argparse.Namespace, mode: Literal["decode", "upscale"]) -> int:
    """Decode or upscale many items into ``-o DIR``, locally or on Ray; exit code 1 if any failed."""
    from tqdm import tqdm

    from . import batch

    out_dir = Path(args.output)
    if out_dir.suffix.lower() in batch.IMAGE_SUFFIXES and not out_dir.is_dir():
        raise InvalidInputError(
            f"-o {out_dir} names a file, but a batch run writes into a directory: pass -o DIR",
            "output_dir",
        )
    items = batch.collect(
        args.inputs, out_dir, mode, caption=args.caption, seed=args.seed, sigma=getattr(args, "sigma", 0.0)
    )
    weights, options = _open_args(args)
    settings = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "overwrite": args.overwrite,
        "raw": _raw(args),
    }
    bar = tqdm(total=len(items), desc=mode, unit="item", disable=not sys.stderr.isatty())
    report = None
    try:
        if args.ray is not None:
            from . import ray as pid_ray

            results = pid_ray.run(
                items,
                weights,
                mode,
                address=args.ray or None,
                workers=args.ray_workers,
                cpus_per_worker=args.ray_cpus,
                gpus_per_worker=args.ray_gpus,
                **settings,
                **options,
            )
        else:
            from .decoder import Decoder

            dec = Decoder.open(weights, **options)
            results = batch.run(
                dec, items, mode, progress=lambda event: bar.set_postfix_str(str(event)), **settings
            )
        # Only now: a missing extra or unreadable weights fail before any report is written.
        report = batch.Report(Path(args.report) if args.report else out_dir / batch.REPORT_NAME)
        for result in results:
            report.add(result)
            bar.update(1)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        raise
    finally:
        bar.close()
        if report is not None:
            report.close()
            print(report.summary())
    return 1 if report and report.failures else 0


def _raw(args: argparse.Namespace) -> Any:
    """``--raw-latent``: the files' latents get normalised for the decoder's space."""
    from .batch import RawLatents

    if getattr(args, "flux2_vae", None) and not args.raw_latent:
        raise InvalidInputError("--flux2-vae goes with --raw-latent", "invalid_argument")
    if not getattr(args, "raw_latent", False):
        return None
    return RawLatents(flux2_vae=str(Path(args.flux2_vae).absolute()) if args.flux2_vae else None)


def cmd_decode(args: argparse.Namespace) -> int:
    from .batch import load_latent_file
    from .images import to_pil
    from .latents import normalise

    if _is_batch(args):
        return _run_batch(args, "decode")
    raw = _raw(args)
    dec = _open(args)
    latents = load_latent_file(Path(args.inputs[0]))
    if raw is not None:
        latents = normalise(dec.space.name, latents, vae=raw.flux2_vae)
    update, close = _progress_bar("decode")
    t0 = time.perf_counter()
    try:
        out = dec.decode(
            latents, args.caption, sigma=args.sigma, seed=args.seed, steps=args.steps, progress=update
        )
    finally:
        close()
    paths = _save(to_pil(out), Path(args.output), {"pid-caption": args.caption, "pid-seed": str(args.seed)})
    print(
        f"decoded {out.shape[0]} image(s) {out.shape[3]}x{out.shape[2]} in {time.perf_counter() - t0:.1f}s "
        f"with {dec.student.name if dec.student else dec.space.name} on {dec.backend}: "
        f"{', '.join(map(str, paths))}"
    )
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    if _is_batch(args):
        return _run_batch(args, "upscale")
    return _upscale_one(args, args.inputs[0])


def _upscale_one(args: argparse.Namespace, image: str | Path) -> int:
    dec = _open(args)
    update, close = _progress_bar("upscale")
    try:
        img = dec.upscale(image, args.caption, seed=args.seed, steps=args.steps, progress=update)
    finally:
        close()
    _save([img], Path(args.output), {"pid-caption": args.caption})
    print(f"upscaled to {img.width}x{img.height}: {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        from .testing.synth import write_bundle

        cache = Path(os.environ.get("PID_NATIVE_CACHE", Path(tempfile.gettempdir()) / "pid-native-demo"))
        args.weights = str(write_bundle(cache / "synthetic-mini", preset="mini"))
        print(
            "*** SYNTHETIC DEMO: random tiny weights, NOT the PiD model. The output is noise-like\n"
            "*** by design; it shows the pipeline runs end to end. Provision the real weights with\n"
            "*** `pid-native fetch --accept-license`.",
            file=sys.stderr,
        )
    args.caption = args.caption or "a lake below green hills under a blue sky with white clouds and the sun"
    return _upscale_one(args, DEMO_IMAGE)


def cmd_synth(args: argparse.Namespace) -> int:
    from .testing.synth import write_bundle

    path = write_bundle(Path(args.dir), preset=args.preset)
    print(f"wrote synthetic {args.preset} bundle (random weights, for tests only): {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import backends, build_info
    from .memory import resolve_budget

    budget, source = resolve_budget(args.memory_budget)
    bundle = default_bundle()
    info = {
        "build": build_info(),
        "backends": {
            k: {"available": v.available, "reason": v.reason} for k, v in backends.available().items()
        },
        "memory_budget_gib": round(budget / (1 << 30), 2),
        "memory_budget_source": source,
        "default_bundle": str(bundle),
        "provisioned": (bundle / "pid-bundle.json").is_file(),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    dec = _open(args)
    h, w = (int(v) for v in args.latent.split("x"))
    lat = np.random.default_rng(0).standard_normal((1, dec.space.channels, h, w)).astype(np.float32)
    embs = dec.encode_captions([args.caption])
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        dec.decode(lat, caption_embs=embs, seed=0)
        times.append(time.perf_counter() - t0)
    px = h * w * dec.scale * dec.scale
    best = min(times)
    print(
        json.dumps(
            {
                "backend": dec.backend,
                "output": f"{w * dec.scale}x{h * dec.scale}",
                "seconds_best": round(best, 3),
                "seconds_all": [round(t, 3) for t in times],
                "megapixels_per_s": round(px / best / 1e6, 4),
            }
        )
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out, student = convert(args.checkpoint, args.output, space=args.space, student=args.student)
    print(f"wrote {out} ({student}), the lossless safetensors equivalent of {args.checkpoint}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from .selftest import options, run, summary

    opts = options(args)
    out = Path(args.out or f"pid-selftest-{opts.device.replace(':', '-')}.json")

    def save(report: dict) -> None:
        # Replaced whole each time: a run killed mid-way leaves the last complete snapshot.
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, out)

    report = run(opts, lambda line: print(line, file=sys.stderr, flush=True), save)
    print(summary(report, out))
    return 0 if report["passed"] else 1


def _add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        help=f"bundle directory or PiD checkpoint (default: ${BUNDLE_ENV} or the provisioned bundle)",
    )
    p.add_argument("--gemma", help="Gemma-2-2b-it directory (overrides the bundle's)")
    p.add_argument("--vae", help="SDXL VAE directory (overrides the bundle's)")
    p.add_argument(
        "--space",
        help="latent space or model family (sdxl, kolors, flux, zimage, sd3, flux2, qwenimage, ...)",
    )
    p.add_argument(
        "--student",
        help="the checkpoint's student (flux-2k, sd3-2kto4k, ...) where its name and tensors do not say it",
    )
    p.add_argument("--backend", default="auto", help="auto, candle-cpu, candle-cuda, mlx")
    p.add_argument(
        "--memory-budget",
        type=float,
        help="GiB a decode may use (default: $PID_MEMORY_BUDGET_GIB or free RAM)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--caption", default="", help="what the image shows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4, choices=[1, 2, 3, 4])


def _add_batch_args(p: argparse.ArgumentParser, what: str) -> None:
    from .batch import DEFAULT_BATCH_SIZE, REPORT_NAME

    p.add_argument(
        "inputs",
        nargs="+",
        metavar=what.upper(),
        help=f"{what} files, directories, glob patterns, or a .jsonl manifest (one JSON object a line: "
        '"input", and optionally "caption", "seed", "sigma", "output")',
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help=f"output PNG for one {what}; for several, a directory (created) receiving <name>.png each",
    )
    g = p.add_argument_group("batch runs")
    g.add_argument("--overwrite", action="store_true", help="redo items whose output PNG already exists")
    g.add_argument("--report", help=f"JSONL report, a line per item (default: -o DIR/{REPORT_NAME})")
    g.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"latents of one shape per decode call (default {DEFAULT_BATCH_SIZE})",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on a Ray cluster (pip install 'pid-native[ray]'): ADDRESS as for ray.init (auto, "
        "ray://host:10001); without it RAY_ADDRESS's cluster or a new local one. Put it after the "
        "inputs or write --ray=ADDRESS",
    )
    g.add_argument("--ray-workers", type=int, help="Ray actors, one decoder each (default: what fits)")
    g.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per Ray actor (default 1)")
    g.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray actor (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pid-native",
        description="NVIDIA PiD pixel-diffusion decoder without PyTorch. PiD weights and every image they "
        "decode are for research and evaluation only (NVIDIA License, NSCLv1).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decode", help="decode latent files (.npy/.npz/.safetensors) to PNG")
    _add_batch_args(p, "latent")
    p.add_argument(
        "--sigma",
        type=float,
        default=0.0,
        help="noise level of a partially denoised latent (VP for sdxl, flow matching for the others)",
    )
    p.add_argument(
        "--raw-latent",
        action="store_true",
        help="the files hold the host VAE's raw latent: normalise it for the checkpoint's space first",
    )
    p.add_argument(
        "--flux2-vae",
        metavar="FILE",
        help="with --raw-latent for flux2: the FLUX.2 VAE .safetensors whose BatchNorm statistics normalise",
    )
    _add_sampling_args(p)
    _add_weights_args(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("upscale", help="upscale images 4x (SDXL VAE encode + PiD decode)")
    _add_batch_args(p, "image")
    _add_sampling_args(p)
    _add_weights_args(p)
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("demo", help="upscale the bundled demo picture")
    p.add_argument("-o", "--output", default="pid-demo.png")
    p.add_argument("--synthetic", action="store_true", help="use generated tiny random weights (no download)")
    _add_sampling_args(p)
    _add_weights_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "convert",
        help="write a PiD checkpoint (upstream's model_ema_bf16.pth) as lossless safetensors",
        description="Read a PiD student checkpoint (the published model_ema_bf16.pth, read without pickle, "
        "or safetensors), keep the student's tensors (net.*, without the net_ema/fake_score/discriminator "
        "training networks), check the exact tensor set and write them unchanged, bare-named, to a "
        "safetensors file that records the student.",
    )
    p.add_argument("checkpoint", help="the .pth (or .safetensors) checkpoint")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--space", help="the checkpoint's latent space, where its name and tensors do not say it")
    p.add_argument("--student", help="the checkpoint's student (flux-2k, ...), likewise")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("synth", help="write a synthetic bundle with seeded random weights (tests, CI)")
    p.add_argument("dir")
    p.add_argument("--preset", choices=["mini", "full"], default="mini")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("info", help="backends, build, memory budget, provisioned weights")
    p.add_argument("--memory-budget", type=float)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="time decodes of a random latent")
    p.add_argument("--latent", default="16x16", help="latent size HxW (default 16x16 -> 512x512 output)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--caption", default="")
    _add_weights_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "selftest",
        help="golden parity, kernel and noise checks, timed decodes, peak memory on a device (JSON report)",
    )
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default cuda)")
    p.add_argument(
        "--dtypes", help="compute dtypes: f32,bf16,f16 (default: f32,bf16 on CUDA, f32 on the CPU)"
    )
    p.add_argument(
        "--goldens",
        type=Path,
        help="golden directory (default: the checkout's); $PID_GOLDENS adds directories to it",
    )
    p.add_argument("--sizes", default="2048,4096", help="output sizes to time (latent = size/32)")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per size, after one warm-up")
    p.add_argument("--steps", type=int, default=4, choices=[1, 2, 3, 4])
    p.add_argument("--preset", choices=["full", "mini"], default="full", help="the network timed (seeded)")
    p.add_argument("--reference", type=Path, help="nv-tlabs/PiD checkout: time PyTorch too (needs torch)")
    p.add_argument("--out", help="report path (default: pid-selftest-<device>.json)")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.set_defaults(func=cmd_selftest)

    from .provisioning.cli import add_fetch_parser, add_verify_parser

    add_fetch_parser(sub)
    add_verify_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pid-native: interrupted", file=sys.stderr)
        return 130
    except (PidError, OSError) as exc:
        if args.debug:
            raise
        code = getattr(exc, "code", type(exc).__name__)
        print(f"pid-native: error [{code}]: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
