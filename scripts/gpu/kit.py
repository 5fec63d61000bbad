"""What build_wheel.sh carries to the GPU machine besides our wheel, and whether it all fits.

    python scripts/gpu/kit.py deps --python-version 3.12 --dest gpu-kit/wheels
    python scripts/gpu/kit.py pack --kit gpu-kit
    python scripts/gpu/kit.py size --kit gpu-kit --limit-mib 60

``deps`` resolves the closure of pid-native's runtime requirements (``pyproject.toml``) plus what
the upstream reference imports beyond torch (its ``reference`` extra), for CPython
``--python-version`` on manylinux x86-64, subtracts the closure of what the GPU machine already
has (``gpu-machine.txt``), and downloads the wheels of the rest. ``pack`` rewrites every wheel
as an uncompressed zip compressed with xz (``.whl.xz``): a wheel's deflate leaves the CUDA
extension's PTX text and compute-sanitizer's duplicated library at twice the size xz does, and
the carry is capped; ``device_check`` restores the wheels before installing them (a stored zip is
a valid wheel: its RECORD hashes the files, not their compression). ``size`` adds the files the
device tool sends with the working tree (tracked and untracked-not-ignored) to the kit folder
and fails above the limit: the tool refuses more than 64 MiB in all.

Standard library only (it runs where the kit is built, Python >= 3.11).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MIB = 1 << 20
# Carried even though the GPU machine has some version: pydantic needs a recent one, and a
# too-old copy there would fail the whole run at import.
ALWAYS_CARRY = {"typing-extensions"}
# Also on the GPU machine, but too large for the rehearsal to install (gpu-machine.txt lists the rest).
GPU_ONLY = {"torch", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-curand", "nvidia-cuda-nvrtc"}


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return canonical(match.group(1))


def listed(path: Path) -> list[str]:
    """The non-comment lines of a requirements-style file."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def our_requirements() -> list[str]:
    """pid-native's runtime requirements and the reference's extra beyond what the machine provides."""
    import tomllib  # Python 3.11+, where the kit is built (device_check only unpacks)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reference = project["optional-dependencies"]["reference"]
    return [*project["dependencies"], *(r for r in reference if requirement_name(r) not in GPU_ONLY)]


def platform_args(python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    tags = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
    return [
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *(a for t in tags for a in ("--platform", t)),
        *(a for t in (abi, "abi3", "none") for a in ("--abi", t)),
    ]


def resolve(requirements: list[str], python_version: str) -> dict[str, str]:
    """name -> version of the whole dependency closure, resolved by pip for the target interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report), "--target", str(Path(tmp) / "t"), *platform_args(python_version)]
        subprocess.run([*cmd, *requirements], check=True)
        installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def carried(ours: dict[str, str], present: dict[str, str]) -> dict[str, str]:
    """What the GPU machine lacks: our closure minus the closure of what it has, plus ALWAYS_CARRY."""
    return {n: v for n, v in sorted(ours.items()) if n not in present or n in ALWAYS_CARRY}


def deps(args: argparse.Namespace) -> None:
    ours = resolve(our_requirements(), args.python_version)
    present = {
        **resolve(listed(HERE / "gpu-machine.txt"), args.python_version),
        **dict.fromkeys(GPU_ONLY, ""),
    }
    wanted = carried(ours, present)
    args.dest.mkdir(parents=True, exist_ok=True)
    if wanted:
        pins = [f"{n}=={v}" for n, v in wanted.items()]
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(args.dest)]
        subprocess.run([*cmd, *platform_args(args.python_version), *pins], check=True)
    print(json.dumps({"python_version": args.python_version, "carried": wanted}))


def pack(args: argparse.Namespace) -> None:
    for wheel in sorted(args.kit.rglob("*.whl")):
        stored = io.BytesIO()
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                data = src.read(info)
                info.compress_type = zipfile.ZIP_STORED
                dst.writestr(info, data)
        packed = wheel.with_name(wheel.name + ".xz")
        packed.write_bytes(lzma.compress(stored.getvalue(), preset=9 | lzma.PRESET_EXTREME))
        print(f"  {wheel.name}: {wheel.stat().st_size / MIB:.2f} -> {packed.stat().st_size / MIB:.2f} MiB")
        wheel.unlink()


def unpack(packed: Path, dest: Path) -> Path:
    """The wheel ``pack`` stored in ``packed``, written into ``dest``."""
    wheel = dest / packed.name.removesuffix(".xz")
    wheel.write_bytes(lzma.decompress(packed.read_bytes()))
    return wheel


def tree_files(root: Path) -> list[Path]:
    """The files the device tool sends: tracked plus untracked-not-ignored, those that exist."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    paths = (root / p for p in out.decode().split("\0") if p)
    return [p for p in paths if p.is_file()]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def size(args: argparse.Namespace) -> int:
    tree = sum(p.stat().st_size for p in tree_files(ROOT))
    kit = folder_bytes(args.kit)
    total = tree + kit
    print(
        f"carry: working tree {tree / MIB:.1f} MiB + {args.kit.name}/ {kit / MIB:.1f} MiB "
        f"= {total / MIB:.1f} MiB (limit {args.limit_mib:g} MiB)"
    )
    for path in sorted(p for p in args.kit.rglob("*") if p.is_file()):
        print(f"  {path.stat().st_size / MIB:7.2f} MiB  {path.relative_to(args.kit)}")
    if total > args.limit_mib * MIB:
        print(
            f"error: the carry is {total / MIB:.1f} MiB, over the {args.limit_mib:g} MiB limit; "
            "leave out the sanitizer (--no-sanitizer) or the reference, or shrink the tree",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deps", help="download the wheels the GPU machine lacks")
    d.add_argument("--python-version", default="3.12")
    d.add_argument("--dest", type=Path, required=True)
    k = sub.add_parser("pack", help="every wheel in the kit as an xz-compressed stored zip (.whl.xz)")
    k.add_argument("--kit", type=Path, required=True)
    s = sub.add_parser("size", help="total carry size; exit 1 above the limit")
    s.add_argument("--kit", type=Path, required=True)
    s.add_argument("--limit-mib", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.command == "deps":
        deps(args)
        return 0
    if args.command == "pack":
        pack(args)
        return 0
    return size(args)


if __name__ == "__main__":
    sys.exit(main())
