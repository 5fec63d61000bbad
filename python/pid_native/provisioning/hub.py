"""The Hugging Face Hub side of provisioning, through huggingface_hub.

Resolves a component to a commit and the files it holds (sizes and the checksums the
Hub publishes), probes files with huggingface_hub dry runs, downloads them into the Hub
cache (``$HF_HOME/hub`` layout, shared with every other Hub user on the machine), and
turns the client's exceptions into :class:`~pid_native.errors.ProvisioningError` codes.

Configuration is huggingface_hub's own: ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` (or a stored ``hf auth login`` token). huggingface_hub
reads most of them when it is first imported, so a host must set them before that.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from ..errors import ProvisioningError
from .manifest import COMMIT, Component


class RemoteFile(BaseModel):
    """A file of a repository at a commit.

    Attributes:
        size: bytes.
        sha256: published by the Hub for LFS files (``None`` otherwise).
        git_sha1: the Git blob id, for files stored in Git itself (``None`` for LFS files).
    """

    model_config = ConfigDict(frozen=True)

    size: int | None
    sha256: str | None
    git_sha1: str | None


class Resolved(BaseModel):
    """A component's repository at one commit, and the files it holds."""

    model_config = ConfigDict(frozen=True)

    commit: str
    files: dict[str, RemoteFile]


def cache_dir_or_default(cache_dir: str | Path | None) -> Path:
    """The Hub cache directory that will be used: ``cache_dir``, else ``HF_HUB_CACHE`` / ``$HF_HOME/hub``."""
    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser()


def offline_default() -> bool:
    """Whether huggingface_hub runs offline (``HF_HUB_OFFLINE=1`` when it was imported)."""
    return constants.HF_HUB_OFFLINE


def resolve(component: Component, *, token: str | bool | None, cache_dir: Path, offline: bool) -> Resolved:
    """The commit ``component.revision`` points to and the files there.

    Online this is one Hub API call. Offline it reads the Hub cache: the branch's recorded
    commit and the files of that snapshot (their blob names are the checksums).

    Raises:
        ProvisioningError: see :func:`hub_errors`; offline and not cached: ``offline_not_cached``.
    """
    assert component.repo is not None and component.revision is not None
    if offline:
        return _resolve_cached(component, cache_dir)
    with hub_errors(component, token):
        info = HfApi(token=token).model_info(component.repo, revision=component.revision, files_metadata=True)
    files = {
        s.rfilename: RemoteFile(
            size=s.lfs.size if s.lfs else s.size,
            sha256=s.lfs.sha256 if s.lfs else None,
            git_sha1=None if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
    }
    assert info.sha is not None, "the Hub answers model_info with the commit sha"
    return Resolved(commit=info.sha, files=files)


def _storage(component: Component, cache_dir: Path) -> Path:
    """The repository's folder in the Hub cache (``models--org--name``)."""
    return cache_dir / f"models--{str(component.repo).replace('/', '--')}"


def record_revision(component: Component, commit: str, cache_dir: Path) -> None:
    """Note in the Hub cache that the branch or tag asked for points to ``commit``.

    huggingface_hub does the same (``refs/<revision>``) when it downloads by branch name;
    pid-native downloads by commit, so it records the branch itself. Offline runs resolve
    the branch through it.
    """
    if COMMIT.fullmatch(str(component.revision)):
        return
    ref = _storage(component, cache_dir) / "refs" / str(component.revision)
    ref.parent.mkdir(parents=True, exist_ok=True)
    partial = ref.with_name(f"{ref.name}.{os.getpid()}.partial")
    partial.write_text(commit)
    os.replace(partial, ref)


def _resolve_cached(component: Component, cache_dir: Path) -> Resolved:
    storage = _storage(component, cache_dir)
    commit = component.revision
    ref = storage / "refs" / str(commit)
    if not COMMIT.fullmatch(str(commit)) and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / str(commit)
    if not snapshot.is_dir():
        raise ProvisioningError(
            f"offline and {component.label} is not in the Hub cache {cache_dir}; connect to the network and "
            "run `pid-native fetch` once (or unset HF_HUB_OFFLINE), or pass local files",
            "offline_not_cached",
        )
    files = {}
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = path.resolve().name  # snapshot entries link to blobs named by their checksum
        files[path.relative_to(snapshot).as_posix()] = RemoteFile(
            size=path.stat().st_size,
            sha256=blob if len(blob) == 64 else None,
            git_sha1=blob if len(blob) == 40 else None,
        )
    return Resolved(commit=str(commit), files=files)


def probe(
    component: Component, commit: str, file: str, *, token: str | bool | None, cache_dir: Path, offline: bool
) -> tuple[int | None, bool]:
    """``(size, cached)`` of one file, from a huggingface_hub dry run (no request if cached).

    Raises:
        ProvisioningError: see :func:`hub_errors`.
    """
    assert component.repo is not None
    with hub_errors(component, token, file):
        info = hf_hub_download(
            component.repo,
            file,
            revision=commit,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            dry_run=True,
        )
    return info.file_size, info.is_cached


def download(
    component: Component,
    commit: str,
    file: str,
    *,
    token: str | bool | None,
    cache_dir: Path,
    offline: bool,
    force: bool,
    tqdm_class: type[tqdm] | None,
) -> Path:
    """Download one file into the Hub cache (or find it there); returns the cached blob's path.

    Raises:
        ProvisioningError: see :func:`hub_errors`.
    """
    assert component.repo is not None
    with hub_errors(component, token, file):
        pointer = hf_hub_download(
            component.repo,
            file,
            revision=commit,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            force_download=force,
            tqdm_class=tqdm_class,
        )
    return Path(pointer).resolve()


@contextmanager
def hub_errors(component: Component, token: str | bool | None, file: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub and network exceptions into ProvisioningError codes.

    Codes: ``gated_repo``, ``repo_not_found``, ``revision_not_found``, ``file_not_found``,
    ``offline_not_cached``, ``hub_error`` (other HTTP errors), ``network_unreachable``,
    ``download_interrupted``, ``disk_full``, ``download_failed`` (other I/O errors).
    """
    what = f"{component.label}/{file}" if file else component.label
    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError as exc:
        raise ProvisioningError(_gated_message(component, token), "gated_repo") from exc
    except RevisionNotFoundError as exc:
        raise ProvisioningError(
            f"{component.repo} has no revision {component.revision!r} on {endpoint}; check the pin in the "
            "manifest or the @revision you passed",
            "revision_not_found",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ProvisioningError(
            f"{component.repo} was not found on {endpoint}; check the repository id (if it is private, "
            "pass a token: --token, token= or HF_TOKEN)",
            "repo_not_found",
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise ProvisioningError(f"{what} does not exist on {endpoint}", "file_not_found") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise ProvisioningError(
            f"offline and {what} is not in the Hub cache; connect to the network and run `pid-native fetch` "
            "once (or unset HF_HUB_OFFLINE), or pass local files",
            "offline_not_cached",
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise ProvisioningError(
            f"the Hub ({endpoint}) answered {status} for {what}: {exc}", "hub_error"
        ) from exc
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
        raise ProvisioningError(
            f"cannot reach {endpoint} ({type(exc).__name__}: {exc}); check the network connection and proxy "
            "settings, or set HF_HUB_OFFLINE=1 to use only what is already cached",
            "network_unreachable",
        ) from exc
    except httpx2.TransportError as exc:
        raise ProvisioningError(
            f"the connection to {endpoint} broke off while fetching {what} ({type(exc).__name__}: {exc}); "
            "run the fetch again: files already downloaded are kept in the Hub cache",
            "download_interrupted",
        ) from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ProvisioningError(
                f"the disk is full while fetching {what} ({exc}); free space in the Hub cache and run the "
                "fetch again",
                "disk_full",
            ) from exc
        raise ProvisioningError(
            f"fetching {what} failed: {exc}; run the fetch again", "download_failed"
        ) from exc


def _gated_message(component: Component, token: str | bool | None) -> str:
    page = f"{constants.ENDPOINT}/{component.repo}"
    sent = token if isinstance(token, str) else (get_token() if token is not False else None)
    text = (
        f"{component.repo} is gated. To get access: open {page}, log in and accept its licence "
        f"(for Gemma, the Gemma Terms of Use); create a read token at {constants.ENDPOINT}/settings/tokens; "
        "pass it with --token or token=, set HF_TOKEN, or run `hf auth login`."
    )
    if sent:
        text += (
            " A token was sent but has no access: accept the licence with the account that owns the token."
        )
    return text


__all__ = [
    "RemoteFile",
    "Resolved",
    "cache_dir_or_default",
    "download",
    "hub_errors",
    "offline_default",
    "probe",
    "resolve",
]
