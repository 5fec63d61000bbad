"""Integrity checks: checksums, safetensors and ``.pth`` structure, the PiD tensor set, and
bundle verification.

Everything here is offline and reads files only. A safetensors header is checked to
describe exactly the bytes in the file (no truncation, no holes, no trailing data); a
``.pth`` must be a state dict of tensors whose storages are all in the archive (read
without pickle, by the core); a PiD checkpoint must hold exactly the tensors of its
student's network (names, shapes, float dtypes), checked by the loader itself
(``rust/pid-core/src/weights.rs``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .. import _native
from ..errors import MissingFileError, ProvisioningError, WeightsError
from ..students import student as find_student
from .bundle import BUNDLE_FILE, LOCK_FILE, LockedFile, load_bundle, read_lock
from .manifest import COMPONENT_DIRS, SHARD_INDEX

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024


class Problem(BaseModel):
    """One integrity problem: the file (relative to the bundle), a stable code, and what is wrong."""

    model_config = ConfigDict(frozen=True)

    path: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: [{self.code}] {self.message}"


class VerifyReport(BaseModel):
    """The result of :func:`verify`.

    Attributes:
        bundle: the bundle directory.
        ok: no problems were found.
        files: files checked against the lock file.
        bytes: their total size.
        problems: everything wrong, one entry per file and problem.
    """

    model_config = ConfigDict(frozen=True)

    bundle: Path
    ok: bool
    files: int
    bytes: int
    problems: tuple[Problem, ...]

    def __str__(self) -> str:
        if self.ok:
            return f"{self.bundle}: ok ({self.files} files, {self.bytes / 1e9:.2f} GB verified)"
        lines = [f"{self.bundle}: {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def file_digests(path: Path, git_blob: bool = False) -> tuple[str, str | None]:
    """The sha256 of a file and, with ``git_blob``, its Git blob id (sha1 of ``blob <size>\\0`` + content)."""
    sha256 = hashlib.sha256()
    sha1 = None
    if git_blob:
        sha1 = hashlib.sha1(usedforsecurity=False)
        sha1.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


def safetensors_index(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor, after checking the header describes the file exactly.

    Raises:
        WeightsError: not a safetensors file (``not_safetensors``), or its size disagrees with
            the header (``truncated``).
    """

    def bad(why: str, code: str = "not_safetensors") -> WeightsError:
        return WeightsError(f"{path}: {why}; the file is corrupt or not safetensors, fetch it again", code)

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > _MAX_HEADER or n + 8 > size:
            raise bad(f"header length {n} does not fit a {size} byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(int(d) for d in entry["shape"]),
                entry["data_offsets"],
            )
            expected = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        if end - begin != expected:
            raise bad(f"tensor {name!r} spans {end - begin} bytes, its dtype and shape need {expected}")
        out[name] = (dtype, shape)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad(f"tensor data has a gap or overlap at byte {position}")
        position = end
    if n + 8 + position != size:
        raise bad(f"the header describes {n + 8 + position} bytes but the file has {size}", "truncated")
    return out


def pid_config(student: str | None, *, shrunk: bool = False) -> str | None:
    """The network a PiD checkpoint must be: its student's (shrunk: its mini version, see
    :class:`~pid_native.provisioning.manifest.ComponentSpec`), else None (any PiD student
    network, as detected from its tensors)."""
    return find_student(student).config(shrunk=shrunk) if student else None


def check_pid_checkpoint(path: Path, student: str | None, *, shrunk: bool = False) -> None:
    """Check a PiD checkpoint holds exactly the tensors of its network (see :func:`pid_config`).

    Keys may be bare (converted files) or upstream's (``net.*``, the training-only networks
    beside them ignored), in safetensors or a ``.pth``, as the loader reads them.

    Raises:
        WeightsError: codes ``not_safetensors``/``truncated``/``not_pth``/``pth_not_tensors``
            (bad file), ``missing_tensor``, ``tensor_shape``, ``tensor_dtype``, ``unexpected_tensor``.
    """
    config = pid_config(student, shrunk=shrunk)
    try:
        _native.inspect_checkpoint(str(path), config)
    except WeightsError as exc:
        if student is None:
            raise
        network = f"{student} PiD student{' (shrunk)' if shrunk else ''}"
        raise WeightsError(f"{exc.message} (expected the {network})", exc.code) from None


def check_json(path: Path) -> None:
    """Check a JSON file parses.

    Raises:
        WeightsError: code ``bad_json``.
    """
    try:
        json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc}); fetch it again", "bad_json") from None


def check_shard_index(directory: Path) -> None:
    """Check ``model.safetensors.index.json`` names only shards that exist and hold its tensors.

    Raises:
        WeightsError: code ``bad_index``.
    """
    index = directory / SHARD_INDEX
    try:
        weight_map: dict[str, str] = json.loads(index.read_bytes())["weight_map"]
        by_shard: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(tensor)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise WeightsError(f"{index}: not a valid safetensors index", "bad_index") from None
    for shard, tensors in sorted(by_shard.items()):
        path = directory / shard
        if not path.is_file():
            raise WeightsError(f"{index} names {shard}, which is not there", "bad_index")
        absent = tensors - safetensors_index(path).keys()
        if absent:
            raise WeightsError(f"{path} lacks {len(absent)} tensors its index assigns to it", "bad_index")


def check_file(path: Path) -> None:
    """The per-file format check: safetensors headers, ``.pth`` structure and JSON files.

    Raises:
        WeightsError: the file is malformed (see :func:`safetensors_index`, :func:`check_json`;
            a ``.pth`` that is no state dict of tensors: ``not_pth``, ``pth_not_tensors``...).
    """
    if path.suffix == ".safetensors":
        safetensors_index(path)
    elif path.suffix == ".pth":
        _native.check_pth(str(path))
    elif path.suffix == ".json":
        check_json(path)


def check_component(
    name: str, paths: list[Path], student: str | None = None, *, shrunk: bool = False
) -> None:
    """The checks that need all of a component's files: the PiD tensor set, a Gemma shard index.

    Raises:
        WeightsError: see :func:`check_pid_checkpoint` and :func:`check_shard_index`.
    """
    if name == "pid":
        (checkpoint,) = paths
        check_pid_checkpoint(checkpoint, student, shrunk=shrunk)
    for path in paths:
        if path.name == SHARD_INDEX:
            check_shard_index(path.parent)


def verify(bundle: str | os.PathLike[str]) -> VerifyReport:
    """Check a bundle offline against its lock file: every file present, sizes, sha256,
    safetensors headers and JSON files, the PiD checkpoint's tensor set, Gemma's shard index.

    Reads every byte (about 8 GB for an SDXL bundle). Never raises for problems in the
    bundle: they are listed in the report.
    """
    root = Path(bundle).expanduser().resolve()

    def report(problems: list[Problem], files: int = 0, size: int = 0) -> VerifyReport:
        return VerifyReport(bundle=root, ok=not problems, files=files, bytes=size, problems=tuple(problems))

    if not (root / BUNDLE_FILE).is_file():
        return report([Problem(path=BUNDLE_FILE, code="not_provisioned", message=f"no bundle at {root}")])
    try:
        load_bundle(root)  # pid-bundle.json readable, every file it names present
        lock = read_lock(root)
    except (MissingFileError, ProvisioningError) as exc:
        return report([Problem(path=BUNDLE_FILE, code=exc.code, message=exc.message)])
    if lock is None:
        return report(
            [Problem(path=LOCK_FILE, code="no_lock", message="no lock file: not made by pid-native fetch")]
        )
    problems: list[Problem] = []
    files = size = 0
    for name, component in lock.components.items():
        intact = True
        for entry in component.files:
            files += 1
            size += entry.size
            problem = _check_locked(root, entry)
            if problem is not None:
                problems.append(problem)
                intact = False
        if intact:
            try:
                check_component(
                    name, [root / e.path for e in component.files], component.student, shrunk=component.shrunk
                )
            except WeightsError as exc:
                where = component.files[0].path if name == "pid" else COMPONENT_DIRS[name]
                problems.append(Problem(path=where, code=exc.code, message=exc.message))
    return report(problems, files, size)


def _check_locked(root: Path, entry: LockedFile) -> Problem | None:
    path = root / entry.path

    def problem(code: str, message: str) -> Problem:
        return Problem(path=entry.path, code=code, message=message)

    if not path.is_file():
        return problem("missing_file", "missing")
    actual = path.stat().st_size
    if actual != entry.size:
        return problem("size_mismatch", f"{actual} bytes, the lock file records {entry.size}")
    digest, _ = file_digests(path)
    if digest != entry.sha256:
        return problem("checksum_mismatch", f"sha256 {digest}, the lock file records {entry.sha256}")
    try:
        check_file(path)
    except WeightsError as exc:
        return problem(exc.code, exc.message)
    return None


__all__ = [
    "Problem",
    "VerifyReport",
    "check_component",
    "check_file",
    "check_json",
    "check_pid_checkpoint",
    "check_shard_index",
    "file_digests",
    "pid_config",
    "safetensors_index",
    "verify",
]
