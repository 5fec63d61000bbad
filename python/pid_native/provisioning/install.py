"""Assembling bundles, from the Hugging Face Hub or from local files, atomically.

:func:`provision`, top to bottom:

1. resolve the request against the manifest (space, repository overrides, local paths);
2. return the existing bundle when it already holds what was asked for and verifies;
3. the licence gate, before any request to the Hub;
4. plan: each Hub component resolved to a commit and its files (sizes, published
   checksums, already cached or not); refuse early when the disk is too small;
5. fetch each file into the Hub cache and check it (size, checksum, format); a file that
   fails is reported and fetched once more, and is never placed in a bundle;
6. place the files in a staging directory next to the bundle (hard links to the cache
   where possible, else copies), check each component as a whole (the PiD tensor set, the
   Gemma shard index), write the lock file, then ``pid-bundle.json`` last;
7. rename the staging directory into place.

An interrupted or failed run therefore never leaves a directory that looks like a bundle;
the next run removes the staging directory and starts again, and files that were fully
downloaded are still in the Hub cache. Concurrent runs for the same bundle are serialised
by a lock file next to it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict

from .. import _native
from ..errors import InvalidInputError, MissingFileError, ProvisioningError, WeightsError
from .bundle import (
    BUNDLE_FILE,
    LOCK_FILE,
    BundleFile,
    Lock,
    LockedComponent,
    LockedFile,
    default_bundle_dir,
    load_bundle,
    partial_dir,
)
from .licence import Acceptance, gated_licences, require_acceptance
from .manifest import COMMIT, Component, ComponentName, Target, load_manifest
from .progress import ProgressCallback, Reporter
from .verify import check_component, check_file, file_digests, verify

log = logging.getLogger(__name__)

LinkMode = Literal["hardlink", "symlink", "copy"]


class PlannedFile(BaseModel):
    """One file of a planned bundle.

    Attributes:
        component: ``pid``, ``gemma`` or ``vae``.
        source: the Hub repository, or the local file or directory.
        revision: the commit (Hub files).
        file: the file's name in the repository or directory.
        bundle_path: where it goes, relative to the bundle.
        size: bytes (None if the Hub did not say).
        download: it must be downloaded (not in the Hub cache, not local).
        sha256: the checksum the Hub publishes for it (LFS files).
        git_sha1: its Git blob id (files stored in Git itself).
    """

    model_config = ConfigDict(frozen=True)

    component: ComponentName
    source: str
    revision: str | None
    file: str
    bundle_path: str
    size: int | None
    download: bool
    sha256: str | None = None
    git_sha1: str | None = None


class FetchPlan(BaseModel):
    """What :func:`plan` found.

    Attributes:
        space: the canonical latent space.
        student: the PiD student (None for a local checkpoint of open variant).
        bundle: where the bundle would go.
        files: every file of the bundle, and whether it must be downloaded.
        licences: ids of the weights' licences (see :func:`pid_native.provisioning.licences`).
        gated: repositories that need an access token.
    """

    model_config = ConfigDict(frozen=True)

    space: str
    student: str | None
    bundle: Path
    files: tuple[PlannedFile, ...]
    licences: tuple[str, ...]
    gated: tuple[str, ...]

    @property
    def download_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if f.download)

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass(frozen=True)
class _HubAccess:
    """How to talk to the Hub for this run."""

    token: str | bool | None
    cache_dir: Path
    offline: bool


def provision(
    space: str | None = None,
    *,
    student: str | None = None,
    accept_license: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    progress: ProgressCallback | None = None,
    offline: bool | None = None,
    include_vae: bool = True,
    gemma_repo: str | os.PathLike[str] | None = None,
    vae_repo: str | os.PathLike[str] | None = None,
    bundle_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """Make sure a complete, verified bundle for ``space`` exists; download what is missing.

    An existing bundle that holds what is asked for and verifies against its lock file is
    returned without any network request. Local paths always win over the Hub.

    Args:
        space: latent space or model family (``sdxl``, ``flux``, ``qwenimage``...; ``kolors``,
            ``zimage`` and the other aliases map to theirs): its default student
            (:data:`pid_native.students.DEFAULT_VARIANT`). Default: sdxl, or the student's space.
        student: a student instead (``flux-2k``, ``sd3-2k``...; :data:`pid_native.students.STUDENTS`).
        accept_license: accept the NVIDIA License (NSCLv1) of the PiD weights and the Gemma
            Terms of Use. Without it, the user is asked when stdin is a terminal, otherwise
            nothing is downloaded. The acceptance is recorded in the bundle.
        cache_dir: Hub cache directory (default: huggingface_hub's, ``$HF_HOME/hub``).
        token: Hugging Face token for gated repositories (default: ``HF_TOKEN`` or the stored
            login; ``False`` sends none).
        progress: receives :class:`~pid_native.provisioning.FetchEvent` objects.
        offline: use only the Hub cache, no network (default: ``HF_HUB_OFFLINE``).
        include_vae: also fetch the SDXL VAE (needed only to upscale images).
        gemma_repo: another Gemma-2-2b-it repository (``org/name[@revision]``, e.g. the gated
            ``google/gemma-2-2b-it``), or a local directory holding it.
        vae_repo: another SDXL VAE repository (e.g. ``madebyollin/sdxl-vae-fp16-fix``), or a
            local directory.
        bundle_dir: where to put the bundle (default: :func:`default_bundle_dir`).
        checkpoint: a local PiD checkpoint (``.safetensors`` or ``.pth``) to use instead of
            downloading it.

    Returns:
        The bundle directory, ready for ``pid_native.Decoder.open``.

    Raises:
        LicenseError: the licence was not accepted (``license_not_accepted``).
        ProvisioningError: with codes ``gated_repo``, ``repo_not_found``, ``revision_not_found``,
            ``file_not_found``, ``unexpected_layout``, ``network_unreachable``,
            ``download_interrupted``, ``offline_not_cached``, ``disk_full``,
            ``checksum_mismatch`` and the other integrity codes, ``hub_error``, ``download_failed``.
        InvalidInputError: unknown space or student (``unknown_space``, ``unknown_student``), a
            student not in the repository (``no_hub_weights``), a malformed repository id
            (``bad_repo_id``), ``bundle_dir`` holding something else (``not_a_bundle``).
        MissingFileError: a local path that does not exist.
        WeightsError: a deprecated student (``deprecated_student``).
    """
    manifest = load_manifest()
    target, components = manifest.components(
        space,
        student_name=student,
        include_vae=include_vae,
        checkpoint=checkpoint,
        gemma=gemma_repo,
        vae=vae_repo,
    )
    root = Path(bundle_dir).expanduser().resolve() if bundle_dir else _default_dir(target)
    return _assemble(
        root,
        target,
        components,
        manifest_version=manifest.version,
        accept=accept_license,
        hub_args=(cache_dir, token, offline),
        link="hardlink",
        reporter=Reporter(progress),
    )


def build_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str],
    gemma: str | os.PathLike[str],
    vae: str | os.PathLike[str] | None = None,
    space: str | None = None,
    student: str | None = None,
    accept_license: bool = False,
    link: LinkMode = "hardlink",
) -> Path:
    """Build a bundle from weights that are already on disk; nothing is downloaded.

    The files are checked exactly as downloaded ones are (formats, the PiD tensor set where
    the manifest knows the network, the Gemma shard index), then placed in the bundle.

    Args:
        bundle_dir: the bundle directory to write.
        checkpoint: the PiD checkpoint (``.safetensors``, or upstream's ``.pth``).
        gemma: a Gemma-2-2b-it directory (config.json, tokenizer.json, safetensors).
        vae: an SDXL VAE directory (config.json, diffusion_pytorch_model.safetensors).
        space: the checkpoint's latent space, where its name and tensors do not say it.
        student: the checkpoint's student, likewise (see :func:`pid_native.students.identify`).
        accept_license: record the acceptance of the weights' licences in the bundle.
        link: ``hardlink`` (falls back to copying across file systems), ``symlink`` (the
            bundle then breaks if the originals move) or ``copy``.

    Raises:
        MissingFileError: listing every source path that does not exist.
        WeightsError: a file is malformed, or the checkpoint is not the expected network.
    """
    sources = {"checkpoint": checkpoint, "gemma": gemma, "vae": vae}
    missing = [
        f"{what} {p}"
        for what, p in sources.items()
        if p is not None and not (Path(p).is_file() if what == "checkpoint" else Path(p).is_dir())
    ]
    if missing:
        raise MissingFileError(f"cannot build a bundle, not found: {'; '.join(missing)}", "missing_file")
    manifest = load_manifest()
    target, components = manifest.components(
        space, student_name=student, include_vae=vae is not None, checkpoint=checkpoint, gemma=gemma, vae=vae
    )
    return _assemble(
        Path(bundle_dir).expanduser().resolve(),
        target,
        components,
        manifest_version=manifest.version,
        accept=accept_license,
        hub_args=(None, None, True),
        link=link,
        reporter=Reporter(None),
    )


def plan(
    space: str | None = None,
    *,
    student: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    include_vae: bool = True,
    gemma_repo: str | os.PathLike[str] | None = None,
    vae_repo: str | os.PathLike[str] | None = None,
    bundle_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> FetchPlan:
    """What :func:`provision` would fetch, and how big it is (huggingface_hub dry runs).

    Downloads nothing and needs no licence acceptance. Online it makes one metadata request
    per repository and one per file not yet cached; offline it reports what the Hub cache
    holds (and fails like :func:`provision` for what it lacks). Arguments as for
    :func:`provision`.

    Raises:
        ProvisioningError: as for :func:`provision`.
    """
    manifest = load_manifest()
    target, components = manifest.components(
        space,
        student_name=student,
        include_vae=include_vae,
        checkpoint=checkpoint,
        gemma=gemma_repo,
        vae=vae_repo,
    )
    root = Path(bundle_dir).expanduser().resolve() if bundle_dir else _default_dir(target)
    return FetchPlan(
        space=target.space,
        student=target.student.name if target.student else None,
        bundle=root,
        files=tuple(_plan_files(components, _hub_access(components, (cache_dir, token, offline)))),
        licences=tuple(sorted({c.licence for c in components})),
        gated=tuple(sorted(str(c.repo) for c in components if c.gated)),
    )


def _default_dir(target: Target) -> Path:
    return default_bundle_dir(target.space, target.student.name if target.student else None)


def _assemble(
    root: Path,
    target: Target,
    components: list[Component],
    *,
    manifest_version: int,
    accept: bool,
    hub_args: tuple[str | os.PathLike[str] | None, str | bool | None, bool | None],
    link: LinkMode,
    reporter: Reporter,
) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    all_ids = {c.licence for c in components}
    hub_gated = [lic.id for lic in gated_licences(c.licence for c in components if c.repo)]
    with FileLock(str(root.with_name(f".{root.name}.lock"))):
        prior = _recorded_acceptance(root)
        if _satisfies(root, target, components, hub_gated, reporter):
            reporter.complete(str(root))
            return root
        _refuse_foreign(root)
        gated = [lic.id for lic in gated_licences(all_ids)]
        acceptance = None
        if hub_gated or accept:
            acceptance = prior if prior and prior.covers(gated) else require_acceptance(all_ids, accept)
        access = _hub_access(components, hub_args)
        files = _plan_files(components, access)
        _check_space(files, components, access, root, link)
        reporter.plan(sum(f.size or 0 for f in files if f.download), sum(f.download for f in files))
        staging = partial_dir(root)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _stage(staging, target, components, files, acceptance, manifest_version, access, link, reporter)
            _swap(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    reporter.complete(str(root))
    return root


def _stage(
    staging: Path,
    target: Target,
    components: list[Component],
    files: list[PlannedFile],
    acceptance: Acceptance | None,
    manifest_version: int,
    access: _HubAccess | None,
    link: LinkMode,
    reporter: Reporter,
) -> None:
    """Fill the staging directory: every component, then the lock file, then ``pid-bundle.json``."""
    locked = {c.name: _install_component(c, files, staging, access, link, reporter) for c in components}
    (staging / LOCK_FILE).write_text(
        Lock(
            format=1,
            manifest_version=manifest_version,
            pid_native=_native.__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            components=locked,
        ).model_dump_json(indent=2),
        encoding="utf-8",
    )
    pid = next(f for f in files if f.component == "pid")
    (staging / BUNDLE_FILE).write_text(
        BundleFile(
            format=1,
            space=target.space,
            student=target.student.name if target.student else None,
            checkpoint=pid.bundle_path,
            gemma="gemma",
            vae="vae" if "vae" in locked else None,
            license=acceptance,
        ).model_dump_json(indent=2, exclude={"synthetic"}),
        encoding="utf-8",
    )


def _hub_access(
    components: list[Component],
    hub_args: tuple[str | os.PathLike[str] | None, str | bool | None, bool | None],
) -> _HubAccess | None:
    """Hub settings, or None when every component is local (huggingface_hub is then not imported)."""
    if not any(c.repo for c in components):
        return None
    from . import hub

    cache_dir, token, offline = hub_args
    return _HubAccess(
        token, hub.cache_dir_or_default(cache_dir), hub.offline_default() if offline is None else offline
    )


def _plan_files(components: list[Component], access: _HubAccess | None) -> list[PlannedFile]:
    """Every file of the bundle: local ones as they are, Hub ones resolved to a commit."""
    out: list[PlannedFile] = []
    for c in components:
        out += _plan_local(c) if c.local is not None else _plan_hub(c, access)
    return out


def _plan_local(c: Component) -> list[PlannedFile]:
    assert c.local is not None
    directory = c.local.parent if c.name == "pid" else c.local
    names = c.files if c.name == "pid" else c.select(p.name for p in directory.iterdir() if p.is_file())
    return [
        PlannedFile(
            component=c.name,
            source=str(c.local),
            revision=None,
            file=name,
            bundle_path=c.bundle_path(name),
            size=(directory / name).stat().st_size,
            download=False,
        )
        for name in names
    ]


def _plan_hub(c: Component, access: _HubAccess | None) -> list[PlannedFile]:
    from . import hub

    assert access is not None
    resolved = hub.resolve(c, token=access.token, cache_dir=access.cache_dir, offline=access.offline)
    try:
        names = c.select(resolved.files)
    except ProvisioningError as exc:
        if not access.offline:
            raise
        raise ProvisioningError(
            f"offline and the Hub cache has only part of {c.label}: {exc.message}; connect and run the fetch",
            "offline_not_cached",
        ) from exc
    out = []
    for name in names:
        probed, cached = hub.probe(
            c, resolved.commit, name, token=access.token, cache_dir=access.cache_dir, offline=access.offline
        )
        remote = resolved.files[name]
        out.append(
            PlannedFile(
                component=c.name,
                source=str(c.repo),
                revision=resolved.commit,
                file=name,
                bundle_path=c.bundle_path(name),
                # The Hub's size first: a cached copy (what the probe measures) may be damaged.
                size=remote.size if remote.size is not None else probed,
                download=not cached,
                sha256=remote.sha256,
                git_sha1=remote.git_sha1,
            )
        )
    return out


def _install_component(
    c: Component,
    files: list[PlannedFile],
    staging: Path,
    access: _HubAccess | None,
    link: LinkMode,
    reporter: Reporter,
) -> LockedComponent:
    """Fetch, check and place one component's files; check the component; its lock entry."""
    mine = [f for f in files if f.component == c.name]
    placed: list[Path] = []
    entries: list[LockedFile] = []
    for f in mine:
        source, sha256 = _obtain(c, f, access, reporter) if c.repo else _local_file(c, f)
        target = staging / f.bundle_path
        target.parent.mkdir(parents=True, exist_ok=True)
        _place(source, target, link)
        placed.append(target)
        entries.append(LockedFile(path=f.bundle_path, size=target.stat().st_size, sha256=sha256))
    if c.repo is not None and access is not None and not access.offline:
        from . import hub

        hub.record_revision(c, str(mine[0].revision), access.cache_dir)
    try:
        check_component(c.name, placed, c.student, shrunk=c.shrunk)
    except WeightsError as exc:
        if c.local is not None:
            raise
        # Name the repository, not the staging directory (it is removed on failure).
        where = exc.message.replace(str(staging / c.dir) if c.dir else str(staging), c.label)
        raise ProvisioningError(f"{where} (not what the manifest expects for {c.name})", exc.code) from exc
    return LockedComponent(
        repo=c.repo,
        requested_revision=c.revision,
        revision=mine[0].revision,
        local=str(c.local) if c.local is not None else None,
        licence=c.licence,
        shrunk=c.shrunk,
        student=c.student,
        files=tuple(entries),
    )


def _obtain(c: Component, f: PlannedFile, access: _HubAccess | None, reporter: Reporter) -> tuple[Path, str]:
    """A Hub file in the cache that passed its checks, and its sha256; fetched again once if it fails."""
    from . import hub

    assert access is not None and f.revision is not None
    for attempt in range(2):
        downloading = f.download or attempt > 0
        bar = reporter.start(c.name, f.file, f.size or 0) if downloading else None
        if not downloading:
            reporter.cached(c.name, f.file)
        path = hub.download(
            c,
            f.revision,
            f.file,
            token=access.token,
            cache_dir=access.cache_dir,
            offline=access.offline,
            force=attempt > 0,
            tqdm_class=bar,
        )
        sha256, problem = _check_fetched(path, f)
        if problem is None:
            if downloading:
                reporter.verified()
            return path, sha256
        code, message = problem
        log.info("%s/%s: %s", c.label, f.file, message)
        if access.offline:
            raise ProvisioningError(
                f"{c.label}/{f.file} in the Hub cache is damaged ({message}); connect to the network and "
                "run the fetch again to replace it",
                code,
            )
        if attempt == 0:
            reporter.refetch(c.name, f.file, f.size or 0, message, was_downloading=downloading)
    raise ProvisioningError(
        f"{c.label}/{f.file} is still wrong after downloading it again ({message}); the repository's "
        "file may be damaged, or something between here and the Hub alters downloads (a proxy?)",
        code,
    )


def _check_fetched(path: Path, f: PlannedFile) -> tuple[str, tuple[str, str] | None]:
    """The file's sha256, and ``(code, message)`` if it is not what the Hub announced."""
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        return "", ("size_mismatch", f"{size} bytes instead of {f.size}")
    sha256, git_sha1 = file_digests(path, git_blob=f.git_sha1 is not None)
    if f.sha256 is not None and sha256 != f.sha256:
        return sha256, ("checksum_mismatch", f"sha256 {sha256}, the Hub publishes {f.sha256}")
    if f.git_sha1 is not None and git_sha1 != f.git_sha1:
        return sha256, ("checksum_mismatch", f"Git blob id {git_sha1}, the Hub publishes {f.git_sha1}")
    try:
        check_file(path)
    except WeightsError as exc:
        return sha256, (exc.code, exc.message)
    return sha256, None


def _local_file(c: Component, f: PlannedFile) -> tuple[Path, str]:
    assert c.local is not None
    path = c.local if c.name == "pid" else c.local / f.file
    check_file(path)
    return path, file_digests(path)[0]


def _place(source: Path, target: Path, link: LinkMode) -> None:
    """Put ``source`` at ``target``: a hard link (else a copy), a symbolic link, or a copy."""
    try:
        if link == "symlink":
            os.symlink(source, target)
            return
        if link == "hardlink":
            try:
                os.link(source, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                    raise
        shutil.copyfile(source, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ProvisioningError(
                f"the disk is full while writing {target} ({exc}); free space there or choose another "
                "bundle_dir",
                "disk_full",
            ) from exc
        raise


def _device_and_free(path: Path) -> tuple[int, int, Path]:
    """The device, free bytes and nearest existing ancestor of ``path``."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    return existing.stat().st_dev, shutil.disk_usage(existing).free, existing


def _check_space(
    files: list[PlannedFile],
    components: list[Component],
    access: _HubAccess | None,
    root: Path,
    link: LinkMode,
) -> None:
    """Refuse before downloading when a disk cannot hold the downloads and copies.

    Raises:
        ProvisioningError: code ``disk_full``, with the numbers.
    """
    need: dict[int, tuple[int, int, Path]] = {}  # device -> (bytes needed, free, where)

    def add(path: Path, size: int) -> None:
        dev, free, where = _device_and_free(path)
        need[dev] = (need.get(dev, (0, free, where))[0] + size, free, where)

    def source(c: Component) -> Path:
        if c.local is not None:
            return c.local
        assert access is not None
        return access.cache_dir

    sources = {c.name: source(c) for c in components}
    bundle_dev = _device_and_free(root)[0]
    for f in files:
        size = f.size or 0
        source = sources[f.component]
        if f.download:
            add(source, size)
        if link == "copy" or (link == "hardlink" and _device_and_free(source)[0] != bundle_dev):
            add(root, size)
    for needed, free, where in need.values():
        if needed > free:
            raise ProvisioningError(
                f"not enough disk space: {needed / 1e9:.2f} GB are needed on the file system of {where}, "
                f"{free / 1e9:.2f} GB are free; free space, or point HF_HOME (the Hub cache) or the bundle "
                "directory elsewhere",
                "disk_full",
            )


def _satisfies(
    root: Path, target: Target, components: list[Component], gated: list[str], reporter: Reporter
) -> bool:
    """Whether the bundle at ``root`` holds these components (same sources) and verifies."""
    try:
        bundle = load_bundle(root)
    except (MissingFileError, ProvisioningError):
        return False
    lock = bundle.lock
    student = target.student.name if target.student else None
    if bundle.space != target.space or bundle.student != student or lock is None:
        return False
    if gated and (bundle.license is None or not bundle.license.covers(gated)):
        return False
    for c in components:
        entry = lock.components.get(c.name)
        if entry is None:
            return False
        if c.repo is not None:
            pinned = COMMIT.fullmatch(str(c.revision)) is not None
            if entry.repo != c.repo or (entry.revision if pinned else entry.requested_revision) != c.revision:
                return False
        elif entry.local != str(c.local):
            return False
    report = verify(root)
    if not report.ok:
        log.info("%s", report)
        reporter.repair(str(report))
    return report.ok


def _recorded_acceptance(root: Path) -> Acceptance | None:
    """The licence acceptance recorded in an existing bundle at ``root``, if readable."""
    try:
        return BundleFile.model_validate_json((root / BUNDLE_FILE).read_text(encoding="utf-8")).license
    except (OSError, ValueError):
        return None


def _refuse_foreign(root: Path) -> None:
    """Refuse to replace a directory that is not a bundle."""
    if root.exists() and (
        not root.is_dir()
        or (any(root.iterdir()) and not (root / BUNDLE_FILE).exists() and not (root / LOCK_FILE).exists())
    ):
        raise InvalidInputError(
            f"{root} exists and is not a pid-native bundle; choose an empty or new bundle directory",
            "not_a_bundle",
        )


def _swap(staging: Path, root: Path) -> None:
    """Move the finished staging directory to ``root``, replacing an old bundle there.

    The old bundle moves aside under a name of its own, then is deleted: Windows deletes no
    file another process holds open (a decoder's checkpoint), and what such a file leaves
    behind must not block the next swap. Earlier leftovers are deleted first.
    """
    aside = f".{root.name}.old"
    for leftover in root.parent.iterdir():
        if leftover.name == aside or leftover.name.startswith(f"{aside}."):
            shutil.rmtree(leftover, ignore_errors=True)
    old = root.with_name(f"{aside}.{uuid.uuid4().hex}")
    if root.exists():
        os.replace(root, old)
    os.replace(staging, root)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["FetchPlan", "LinkMode", "PlannedFile", "build_bundle", "plan", "provision"]
