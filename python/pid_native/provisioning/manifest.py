"""The provisioning manifest: which Hub repositories and files make a bundle, per PiD student.

The manifest is data, ``manifest.json`` next to this module, with a ``version`` that is
bumped whenever an entry changes (it is recorded in every bundle's lock file). Each
component (the PiD students, the Gemma-2-2b-it caption encoder, the SDXL VAE) names a
default repository and the known alternatives, each with a revision.

The students come from where upstream publishes them, ``nvidia/PiD`` (nv-tlabs/PiD README,
"Download Checkpoints"): one file per student, ``checkpoints/<experiment>/model_ema_bf16.pth``
(:attr:`pid_native.students.Student.hub_file`), never the whole repository. Which spaces
also take the SDXL VAE (to upscale images) is ``vae_spaces``.

Revisions: a 40-hex commit pins a source; ``"main"`` means "unpinned, whatever the branch
holds when fetched". Sources stay unpinned until their commits have been checked against
the real Hub (that cannot be done offline); the lock file of every bundle records the
commit that was actually fetched, so a provisioned bundle is reproducible either way.

``PID_NATIVE_MANIFEST`` may name another manifest file of the same format (a mirror with
its own repositories or pins).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import InvalidInputError, MissingFileError, ProvisioningError
from ..latents import latent_space
from ..students import Student, default_student, identify, student

MANIFEST_ENV = "PID_NATIVE_MANIFEST"
PACKAGED_MANIFEST = Path(__file__).with_name("manifest.json")

COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
SHARD_INDEX = "model.safetensors.index.json"

ComponentName = Literal["pid", "gemma", "vae"]

# Where each component lives inside a bundle ("" = the bundle root).
COMPONENT_DIRS: dict[str, str] = {"pid": "", "gemma": "gemma", "vae": "vae"}


class Source(BaseModel):
    """One Hub repository that can supply a component.

    Attributes:
        revision: branch, tag or 40-hex commit (a commit pins the source).
        gated: the repository requires an access token after accepting its licence on the Hub.
        licence: id of the weights' licence (see :func:`pid_native.provisioning.licences`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    revision: str = "main"
    gated: bool = False
    licence: str

    @property
    def pinned(self) -> bool:
        return COMMIT.fullmatch(self.revision) is not None


class ComponentSpec(BaseModel):
    """How to fetch one component.

    Attributes:
        default: the repository used unless the caller names another.
        sources: known repositories (the default among them) with their revisions.
        files: files that must be fetched, as named in the repository (PiD: none here, each
            student names its own file).
        safetensors: also fetch the weights: the one merged ``*.safetensors`` file if the
            repository has one, otherwise ``model.safetensors.index.json`` and its shards.
        shrunk: PiD only: the mirror serves each student's network shrunk to the mini goldens'
            backbone (``NetConfig::shrunk``; test mirrors), not the released one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: str
    sources: dict[str, Source]
    files: tuple[str, ...]
    safetensors: bool = False
    shrunk: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ComponentSpec:
        if self.default not in self.sources:
            raise ValueError(f"default repository {self.default!r} is not among the sources")
        for name in self.files:
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"file {name!r} must be a plain file name at the repository root")
        return self


class Component(BaseModel):
    """One component of a bundle to assemble, from the Hub or from local files.

    Exactly one of ``repo`` (with ``revision``) and ``local`` is set.

    Attributes:
        name: ``pid``, ``gemma`` or ``vae``.
        repo: Hub repository id.
        revision: branch, tag or commit to fetch.
        gated: the repository needs an access token.
        local: a local PiD file, or a local Gemma / VAE directory.
        licence: licence id of the weights.
        files: required files, repository-relative (for a local PiD checkpoint: its file name).
        safetensors: also take the merged or sharded ``*.safetensors`` weights.
        shrunk: PiD only: the checkpoint is its student's network shrunk (see :class:`ComponentSpec`).
        student: PiD only: the student's name (None for a local checkpoint whose variant its
            name and tensors leave open).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ComponentName
    repo: str | None = None
    revision: str | None = None
    gated: bool = False
    local: Path | None = None
    licence: str
    files: tuple[str, ...]
    safetensors: bool = False
    shrunk: bool = False
    student: str | None = None

    @property
    def dir(self) -> str:
        """The component's folder inside a bundle (``""`` for the bundle root)."""
        return COMPONENT_DIRS[self.name]

    @property
    def label(self) -> str:
        """``repo@revision`` or the local path, for messages."""
        return f"{self.repo}@{self.revision}" if self.repo else str(self.local)

    def bundle_path(self, file: str) -> str:
        """Where ``file`` (a repository-relative name) goes in the bundle, relative to its root."""
        return f"{self.dir}/{file}" if self.dir else file

    def select(self, available: Iterable[str]) -> tuple[str, ...]:
        """The files to take from a repository (or directory) holding ``available``.

        Raises:
            ProvisioningError: a required file is missing (``file_not_found``) or the weights
                are neither one merged file nor an index with its shards (``unexpected_layout``).
        """
        names = set(available)
        missing = [f for f in self.files if f not in names]
        if missing:
            raise ProvisioningError(
                f"{self.label} has no {', '.join(missing)}; it is not a usable {self.name} source "
                f"(it holds: {', '.join(sorted(names)) or 'nothing'})",
                "file_not_found",
            )
        if not self.safetensors:
            return self.files
        top = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
        merged = [n for n in top if not _SHARD.fullmatch(n)]
        shards = [n for n in top if _SHARD.fullmatch(n)]
        if len(merged) == 1:
            return (*self.files, merged[0])
        if not merged and shards and SHARD_INDEX in names:
            return (*self.files, SHARD_INDEX, *shards)
        raise ProvisioningError(
            f"{self.label}: expected one merged *.safetensors file, or {SHARD_INDEX} with "
            f"model-XXXXX-of-XXXXX.safetensors shards; found {', '.join(top) or 'no safetensors'}",
            "unexpected_layout",
        )


class Manifest(BaseModel):
    """Every component pid-native knows how to fetch.

    Attributes:
        format: manifest file format (2).
        version: content version, bumped whenever a repository, file or pin changes.
        pid: where the students are published (each student's file: its ``hub_file``).
        vae_spaces: the latent spaces whose bundles also take the SDXL VAE.
        gemma: the caption encoder (shared by every student).
        vae: the SDXL VAE (upscaling images; optional).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[2]
    version: int
    pid: ComponentSpec
    vae_spaces: tuple[str, ...]
    gemma: ComponentSpec
    vae: ComponentSpec

    def components(
        self,
        space: str | None = None,
        *,
        student_name: str | None = None,
        include_vae: bool = True,
        checkpoint: str | os.PathLike[str] | None = None,
        gemma: str | os.PathLike[str] | None = None,
        vae: str | os.PathLike[str] | None = None,
    ) -> tuple[Target, list[Component]]:
        """Resolve a request to the student (or, for a local checkpoint, at least its space) and
        its components.

        Args:
            space: latent space or model family (``kolors`` -> ``sdxl``): its default student.
            student_name: a student (``flux-2k``...) instead of the space's default.
            include_vae: add the SDXL VAE where it applies to the space (or ``vae`` is given).
            checkpoint: a local PiD checkpoint (``.safetensors`` or ``.pth``) instead of the Hub one;
                which student it is comes from :func:`pid_native.students.identify`.
            gemma: a local Gemma directory, or a Hub repository ``org/name[@revision]``.
            vae: a local VAE directory, or a Hub repository ``org/name[@revision]``.

        Raises:
            InvalidInputError: unknown space or student (``unknown_space``, ``unknown_student``), a
                student not published in the repository and no local checkpoint (``no_hub_weights``),
                a malformed repository id (``bad_repo_id``), a checkpoint of another space.
            MissingFileError: a local checkpoint that does not exist.
            WeightsError: a deprecated student, a checkpoint that is no student.
        """
        licence = self.pid.sources[self.pid.default].licence
        if checkpoint is not None:
            path = Path(checkpoint).expanduser().resolve()
            if not path.is_file():
                raise MissingFileError(f"PiD checkpoint not found: {path}", "missing_file")
            found = identify(path, space=space, student_name=student_name)
            target = Target(space=found.space.name, student=found.student)
            pid = Component(
                name="pid",
                local=path,
                licence=licence,
                files=(path.name,),
                shrunk=self.pid.shrunk,
                student=found.student.name if found.student else None,
            )
        else:
            chosen = student(student_name) if student_name else default_student(space or "sdxl")
            if space is not None and chosen.space != latent_space(space).name:
                raise InvalidInputError(
                    f"student {chosen.name} decodes {chosen.space} latents, not {space}", "wrong_student"
                )
            if not chosen.hub:
                raise InvalidInputError(
                    f"{chosen.name} is not in {self.pid.default} (upstream's registry no longer lists it); "
                    "pass a local checkpoint (--checkpoint FILE), or fetch another student",
                    "no_hub_weights",
                )
            target = Target(space=chosen.space, student=chosen)
            pid = _component("pid", self.pid, None).model_copy(
                update={"files": (chosen.hub_file,), "student": chosen.name}
            )
        out = [pid, _component("gemma", self.gemma, gemma)]
        if include_vae and (vae is not None or target.space in self.vae_spaces):
            out.append(_component("vae", self.vae, vae))
        return target, out


class Target(BaseModel):
    """What a bundle decodes: the latent space, and the student where it is known."""

    model_config = ConfigDict(frozen=True)

    space: str
    student: Student | None

    @property
    def label(self) -> str:
        return self.student.name if self.student else self.space


def _component(
    name: ComponentName, spec: ComponentSpec, override: str | os.PathLike[str] | None
) -> Component:
    """A component from its spec, overridden by a local directory or another repository."""
    common = {"name": name, "files": spec.files, "safetensors": spec.safetensors, "shrunk": spec.shrunk}
    default_licence = spec.sources[spec.default].licence
    if override is not None and Path(override).expanduser().is_dir():
        return Component(local=Path(override).expanduser().resolve(), licence=default_licence, **common)
    repo, _, revision = str(override or spec.default).partition("@")
    if not _REPO_ID.fullmatch(repo):
        raise InvalidInputError(
            f"{name}: {str(override)!r} is neither an existing directory nor a Hub repository id "
            "(org/name or org/name@revision)",
            "bad_repo_id",
        )
    known = spec.sources.get(repo)
    return Component(
        repo=repo,
        revision=revision or (known.revision if known else "main"),
        gated=known.gated if known else False,
        licence=known.licence if known else default_licence,
        **common,
    )


def load_manifest(path: str | os.PathLike[str] | None = None) -> Manifest:
    """Read a manifest: ``path``, else ``$PID_NATIVE_MANIFEST``, else the packaged one.

    Raises:
        MissingFileError: the file does not exist.
        ProvisioningError: it is not a valid manifest (``bad_manifest``).
    """
    source = Path(path or os.environ.get(MANIFEST_ENV) or PACKAGED_MANIFEST)
    if not source.is_file():
        raise MissingFileError(f"manifest not found: {source} (check ${MANIFEST_ENV})", "missing_file")
    try:
        return Manifest.model_validate(json.loads(source.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ProvisioningError(
            f"{source} is not a valid pid-native manifest: {exc}", "bad_manifest"
        ) from exc


__all__ = [
    "COMPONENT_DIRS",
    "MANIFEST_ENV",
    "SHARD_INDEX",
    "Component",
    "ComponentSpec",
    "Manifest",
    "Source",
    "Target",
    "load_manifest",
]
