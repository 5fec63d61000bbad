"""Bundles: one directory with everything a decoder opens, and the reader the Decoder calls.

Layout (format 1)::

    <bundle>/pid-bundle.json        written last: its presence means the bundle is complete
    <bundle>/pid-bundle.lock.json   per component: repo, requested and resolved revision,
                                    every file with its size and sha256
    <bundle>/checkpoints/<experiment>/model_ema_bf16.pth     (a fetched student, as published;
                                    or a local checkpoint's file name)
    <bundle>/gemma/config.json, tokenizer.json, one merged *.safetensors
                   (or model.safetensors.index.json and its shards)
    <bundle>/vae/config.json, diffusion_pytorch_model.safetensors      (optional)

``pid-bundle.json``::

    {"format": 1, "space": "sdxl", "student": "sdxl-2kto4k" | null,
     "checkpoint": "checkpoints/PiD_res2kto4k_sr4x_official_sdxl_distill_4step/model_ema_bf16.pth",
     "gemma": "gemma", "vae": "vae" | null,
     "license": {"licences": [{"id": "NSCLv1", "version": "1"}, ...],
                 "accepted_at": "2026-11-25T23:00:00+00:00", "method": "argument"} | null}

Synthetic bundles (``pid_native.testing.synth``) add ``"synthetic": "<preset>"`` and have
no lock file. Readers ignore keys they do not know, so later format-1 writers may add some.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import MissingFileError, ProvisioningError
from ..latents import latent_space
from ..students import default_student
from ..students import student as find_student
from .licence import Acceptance
from .manifest import SHARD_INDEX

BUNDLE_FILE = "pid-bundle.json"
LOCK_FILE = "pid-bundle.lock.json"
HOME_ENV = "PID_NATIVE_HOME"
BUNDLE_ENV = "PID_NATIVE_BUNDLE"  # the bundle the command line uses when none is named
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
GEMMA_FILES = ("config.json", "tokenizer.json")

_FETCH_HINT = "run `pid-native fetch --accept-license` (Python: pid_native.provision(accept_license=True))"


class BundleFile(BaseModel):
    """The content of ``pid-bundle.json``. Paths are relative to the bundle directory."""

    # A tolerant reader: format-1 writers may add keys (``synthetic`` was added that way).
    model_config = ConfigDict(frozen=True, extra="ignore")

    format: Literal[1]
    space: str
    checkpoint: str
    gemma: str
    vae: str | None = None
    license: Acceptance | None = None
    synthetic: str | None = None
    student: str | None = None


class LockedFile(BaseModel):
    """One file of a bundle: path relative to the bundle, size in bytes, sha256 (hex)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int
    sha256: str


class LockedComponent(BaseModel):
    """Where a component came from and what it holds.

    Attributes:
        repo: Hub repository (None for local files).
        requested_revision: the revision asked for (``main`` or a pinned commit).
        revision: the commit that was fetched.
        local: the local file or directory it was built from (None for Hub components).
        licence: licence id of the weights.
        shrunk: PiD only: the checkpoint was checked as its student's network shrunk (a test mirror).
        student: PiD only: the student (None for a local checkpoint of open variant).
        files: every file, with size and sha256.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo: str | None
    requested_revision: str | None
    revision: str | None
    local: str | None
    licence: str
    shrunk: bool = False
    student: str | None = None
    files: tuple[LockedFile, ...]


class Lock(BaseModel):
    """The content of ``pid-bundle.lock.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1]
    manifest_version: int
    pid_native: str
    created: str
    components: dict[str, LockedComponent]


class Bundle(BaseModel):
    """A bundle opened by :func:`load_bundle`, with absolute paths.

    Attributes:
        root: the bundle directory.
        space: canonical latent space of the PiD checkpoint.
        student: the released student, when known (``flux-2k``...).
        checkpoint: the PiD checkpoint (``.safetensors`` or upstream's ``.pth``).
        gemma: the Gemma-2-2b-it directory.
        vae: the SDXL VAE directory, if the bundle has one.
        license: the recorded licence acceptance (None for synthetic or unaccepted local bundles).
        synthetic: the ``pid_native.testing.synth`` preset for random-weight bundles.
        lock: the lock file's content (None when the bundle has no lock file).
    """

    model_config = ConfigDict(frozen=True)

    root: Path
    space: str
    student: str | None
    checkpoint: Path
    gemma: Path
    vae: Path | None
    license: Acceptance | None
    synthetic: str | None
    lock: Lock | None


class BundleStatus(BaseModel):
    """What :func:`inspect_bundle` found: which components are present, without raising."""

    model_config = ConfigDict(frozen=True)

    root: Path
    complete: bool
    checkpoint: bool
    gemma: bool
    vae: bool
    missing: tuple[str, ...]


def pid_native_home() -> Path:
    """pid-native's data directory: ``$PID_NATIVE_HOME``, else ``$XDG_CACHE_HOME/pid-native``,
    else ``~/.cache/pid-native``."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "pid-native"


def default_bundle_dir(space: str = "sdxl", student: str | None = None) -> Path:
    """Where ``provision(space, student=...)`` puts its bundle by default:
    ``<pid_native_home()>/bundles/<space>`` for the space's default student, else
    ``.../bundles/<student>`` (``flux-2k``).

    Raises:
        InvalidInputError: unknown latent space or student.
    """
    chosen = find_student(student) if student else default_student(space)
    name = chosen.space if chosen == default_student(chosen.space) else chosen.name
    return pid_native_home() / "bundles" / name


def default_bundle() -> Path:
    """The bundle opened when none is named: ``$PID_NATIVE_BUNDLE``, else the provisioned SDXL one."""
    return Path(os.environ.get(BUNDLE_ENV) or default_bundle_dir("sdxl"))


def partial_dir(root: Path) -> Path:
    """The staging directory an install of ``root`` writes before renaming it into place."""
    return root.with_name(f".{root.name}.partial")


def _missing_gemma(gemma: Path) -> list[str]:
    missing = [str(gemma / f) for f in GEMMA_FILES if not (gemma / f).is_file()]
    index = gemma / SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return [*missing, f"{index} (not a valid safetensors index)"]
        missing += [str(gemma / s) for s in shards if not (gemma / s).is_file()]
    elif not any(gemma.glob("*.safetensors")):
        missing.append(f"{gemma}/*.safetensors (the Gemma weights)")
    return missing


def _scan(root: Path) -> tuple[BundleFile | None, dict[str, list[str]]]:
    """The parsed ``pid-bundle.json`` and what is missing, per component (``bundle`` for the file itself)."""
    if not (root / BUNDLE_FILE).is_file():
        why = "the directory does not exist" if not root.exists() else f"{BUNDLE_FILE} is missing"
        if partial_dir(root).exists():
            why += f" (an interrupted fetch left {partial_dir(root).name}; run the fetch again)"
        return None, {"bundle": [f"{root / BUNDLE_FILE}: {why}"]}
    try:
        info = BundleFile.model_validate_json((root / BUNDLE_FILE).read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise ProvisioningError(
            f"{root / BUNDLE_FILE} is not a valid pid-native bundle file ({exc}); {_FETCH_HINT} again",
            "bad_bundle",
        ) from exc
    missing: dict[str, list[str]] = {}
    checkpoint = root / info.checkpoint
    if not checkpoint.is_file():
        missing["checkpoint"] = [str(checkpoint)]
    gemma = _missing_gemma(root / info.gemma)
    if gemma:
        missing["gemma"] = gemma
    if info.vae is not None:
        vae = [str(root / info.vae / f) for f in VAE_FILES if not (root / info.vae / f).is_file()]
        if vae:
            missing["vae"] = vae
    return info, missing


def read_lock(root: Path) -> Lock | None:
    """The bundle's lock file, None if it has none.

    Raises:
        ProvisioningError: the lock file is unreadable (``bad_bundle``).
    """
    path = root / LOCK_FILE
    if not path.is_file():
        return None
    try:
        return Lock.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise ProvisioningError(
            f"{path} is not a valid lock file ({exc}); {_FETCH_HINT} again", "bad_bundle"
        ) from exc


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle directory: check that every file a decoder needs is there.

    Cheap: file sizes and checksums are not read (that is :func:`pid_native.provisioning.verify`).

    Raises:
        MissingFileError: listing everything that is missing and how to provision it
            (code ``not_provisioned`` when there is no bundle at all, else ``missing_file``).
        ProvisioningError: ``pid-bundle.json`` or the lock file is unreadable (``bad_bundle``).
    """
    root = Path(path).expanduser().resolve()
    info, missing = _scan(root)
    if info is None:
        raise MissingFileError(
            f"no pid-native bundle at {root}: {missing['bundle'][0]}; {_FETCH_HINT}", "not_provisioned"
        )
    if missing:
        listed = "; ".join(f"{what}: {', '.join(files)}" for what, files in missing.items())
        raise MissingFileError(
            f"the bundle at {root} is incomplete, missing {listed}. Repair it: {_FETCH_HINT} "
            f"with --bundle {root}, or check it with `pid-native verify {root}`",
            "missing_file",
        )
    return Bundle(
        root=root,
        space=latent_space(info.space).name,
        student=info.student,
        checkpoint=root / info.checkpoint,
        gemma=root / info.gemma,
        vae=root / info.vae if info.vae is not None else None,
        license=info.license,
        synthetic=info.synthetic,
        lock=read_lock(root),
    )


def inspect_bundle(path: str | os.PathLike[str]) -> BundleStatus:
    """Which components of a bundle are present. Never raises; for status displays."""
    root = Path(path).expanduser()
    try:
        info, missing = _scan(root)
    except ProvisioningError as exc:
        return BundleStatus(
            root=root, complete=False, checkpoint=False, gemma=False, vae=False, missing=(str(exc),)
        )
    return BundleStatus(
        root=root,
        complete=info is not None and not missing,
        checkpoint=info is not None and "checkpoint" not in missing,
        gemma=info is not None and "gemma" not in missing,
        vae=info is not None and info.vae is not None and "vae" not in missing,
        missing=tuple(f for files in missing.values() for f in files),
    )


__all__ = [
    "BUNDLE_ENV",
    "BUNDLE_FILE",
    "HOME_ENV",
    "LOCK_FILE",
    "Bundle",
    "BundleFile",
    "BundleStatus",
    "Lock",
    "LockedComponent",
    "LockedFile",
    "default_bundle",
    "default_bundle_dir",
    "inspect_bundle",
    "load_bundle",
    "partial_dir",
    "pid_native_home",
    "read_lock",
]
