"""``pid-native fetch`` and ``pid-native verify``, hooked into the main command line.

``pid_native.cli.build_parser`` calls :func:`add_fetch_parser` and :func:`add_verify_parser`
on its sub-parsers. Handlers return the exit code: 0 success, 1 failure (errors raised as
``PidError`` are printed by the main command line), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .bundle import BUNDLE_ENV, default_bundle_dir
from .install import FetchPlan, plan, provision
from .licence import LICENCES, gated_licences
from .progress import ConsoleProgress
from .verify import verify


def add_fetch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fetch`` to the main command line's sub-parsers."""
    p = subparsers.add_parser(
        "fetch",
        help="download and verify a PiD student, Gemma-2 and the SDXL VAE into a bundle",
        description="Download the weights a decoder needs from the Hugging Face Hub into the Hub cache, "
        "verify them and assemble a bundle directory. The PiD students come from nvidia/PiD, one "
        "model_ema_bf16.pth each, kept as published. The PiD weights are under the NVIDIA License "
        "(NSCLv1): research and evaluation only, including every image decoded with them; they are not "
        "downloaded before you accept it. Honours HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE.",
    )
    p.add_argument(
        "--space",
        help="latent space or model family (sdxl, flux, zimage, sd3, flux2, flux2-klein-4b, qwenimage, ...): "
        "its default student (default: sdxl)",
    )
    p.add_argument(
        "--student",
        help="a student instead of the space's default: flux-2k, flux-2kto4k_v1pt5, flux2-2k, "
        "flux2-2kto4k_v1pt5, sd3-2k, sd3-2kto4k, sdxl-2kto4k, qwenimage-2kto4k_v1pt5",
    )
    p.add_argument(
        "--accept-license",
        action="store_true",
        help="accept the NVIDIA License (NSCLv1) of the PiD weights and the Gemma Terms of Use",
    )
    p.add_argument("--offline", action="store_true", help="use only the Hub cache, make no network request")
    p.add_argument(
        "--dry-run", action="store_true", help="show what would be downloaded and how big; fetch nothing"
    )
    p.add_argument(
        "--token", help="Hugging Face token for gated repositories (default: HF_TOKEN or `hf auth login`)"
    )
    p.add_argument("--bundle", help=f"bundle directory (default: ${BUNDLE_ENV} or the per-user one)")
    p.add_argument("--no-vae", action="store_true", help="skip the SDXL VAE (only needed to upscale images)")
    p.add_argument(
        "--gemma-repo", metavar="REPO|DIR", help="another Gemma-2-2b-it repository or a local directory"
    )
    p.add_argument("--vae-repo", metavar="REPO|DIR", help="another SDXL VAE repository or a local directory")
    p.add_argument(
        "--checkpoint", metavar="FILE", help="a local PiD checkpoint to use instead of downloading it"
    )
    p.add_argument("--cache-dir", help="Hub cache directory (default: $HF_HOME/hub)")
    p.set_defaults(func=cmd_fetch)
    return p


def add_verify_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``verify`` to the main command line's sub-parsers."""
    p = subparsers.add_parser(
        "verify",
        help="check a bundle's files against its lock file (offline)",
        description="Check every file of a bundle against its lock file (size, sha256), the safetensors "
        "headers and the PiD tensor set. Offline. Exit code 0 when the bundle is intact, 1 otherwise.",
    )
    p.add_argument("bundle", nargs="?", help=f"bundle directory (default: ${BUNDLE_ENV} or the sdxl one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)
    return p


def _named_bundle(args: argparse.Namespace) -> Path | None:
    """``--bundle``, else ``$PID_NATIVE_BUNDLE``, else None (the student's default directory)."""
    named = args.bundle or os.environ.get(BUNDLE_ENV)
    return Path(named) if named else None


def cmd_fetch(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        "student": args.student,
        "cache_dir": args.cache_dir,
        "token": args.token,
        "offline": True if args.offline else None,
        "include_vae": not args.no_vae,
        "gemma_repo": args.gemma_repo,
        "vae_repo": args.vae_repo,
        "bundle_dir": _named_bundle(args),
        "checkpoint": args.checkpoint,
    }
    if args.dry_run:
        print(_describe(plan(args.space, **options)))
        return 0
    progress = ConsoleProgress()
    try:
        path = provision(args.space, accept_license=args.accept_license, progress=progress, **options)
    finally:
        progress.close()
    print(f"bundle ready: {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(_named_bundle(args) or default_bundle_dir())
    print(report.model_dump_json(indent=2) if args.json else report)
    return 0 if report.ok else 1


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _describe(fp: FetchPlan) -> str:
    """The dry-run report: one line per file, then the totals and the licences."""
    rows = [
        (
            f.component,
            f"{f.source}@{f.revision[:12]}" if f.revision else f.source,
            f.file,
            _size(f.size),
            "download" if f.download else ("local" if f.revision is None else "cached"),
        )
        for f in fp.files
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"fetch {fp.student or fp.space} into {fp.bundle} (dry run, nothing downloaded):"]
    lines += [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    count = sum(f.download for f in fp.files)
    cached = fp.total_bytes - fp.download_bytes
    lines.append(
        f"to download: {_size(fp.download_bytes)} in {count} files ({_size(cached)} already on disk)"
    )
    lines += [f"licence: {LICENCES[i].name}, {LICENCES[i].url}" for i in fp.licences]
    lines += [
        f"{repo} is gated: accept its licence on the Hub, then pass --token or set HF_TOKEN"
        for repo in fp.gated
    ]
    if gated_licences(fp.licences):
        lines.append("the real fetch asks you to accept them first (or pass --accept-license)")
    return "\n".join(lines)


__all__ = ["add_fetch_parser", "add_verify_parser", "cmd_fetch", "cmd_verify"]
