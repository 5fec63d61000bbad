"""Many inputs, one decoder: resumable batch decoding and upscaling.

:func:`collect` turns paths, directories, globs and JSONL manifests into :class:`Item`\\ s (input,
output PNG, caption, seed, sigma); :func:`run` decodes or upscales them with one
:class:`~pid_native.Decoder` and yields an :class:`ItemResult` per item: ``done``, ``skipped``
(its output already exists and is a complete PNG) or ``failed`` (with the error's code and
message; the other items still run). Outputs are written atomically, so an interrupted run
leaves no half-written PNG and rerunning it resumes where it stopped. Consecutive items of one
latent shape are decoded together, up to ``batch_size`` latents per decode call. The same
items run on a Ray cluster through :mod:`pid_native.ray`.

Every decoded image is under the NVIDIA License (NSCLv1): research and evaluation only; the
PNGs carry the restriction in their metadata.
"""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .decoder import MAX_SEED, Decoder, ProgressCallback, _first_error, as_latents
from .errors import Cancelled, InvalidInputError, MissingFileError, PidError
from .images import save_png, to_pil
from .latents import normalise

Mode = Literal["decode", "upscale"]
Status = Literal["done", "skipped", "failed"]

LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_SUFFIX = ".jsonl"
REPORT_NAME = "pid-report.jsonl"
# Measured on the 2-core CPU VM (README, "Many images"): several latents per decode call were no
# faster than one at a time, on the mini or the real network, so items go one by one by default.
DEFAULT_BATCH_SIZE = 1


class Item(BaseModel):
    """One input and where its image goes.

    A latent file holding ``B > 1`` latents writes ``<output stem>_<b>.png`` for each, with seed
    ``seed + b`` (as ``pid-native decode`` does for one file).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Path
    output: Path
    caption: str = ""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    sigma: float = Field(0.0, ge=0.0, le=1.0)

    def outputs(self, count: int) -> list[Path]:
        """The output paths for an input holding ``count`` latents."""
        return output_paths(self.output, count)


def output_paths(output: Path, count: int) -> list[Path]:
    """``output`` for one image, else ``<stem>_<b><suffix>`` for each of ``count``."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{b}{output.suffix}") for b in range(count)]


@dataclass(frozen=True)
class ItemResult:
    """What became of one item: ``outputs`` written (``done``), found complete (``skipped``), or the error."""

    item: Item
    status: Status
    outputs: list[Path] = field(default_factory=list)
    code: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The item's line in the JSONL report."""
        return {
            "status": self.status,
            **self.item.model_dump(mode="json"),
            "outputs": [str(p) for p in self.outputs],
            "code": self.code,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ItemResult:
        item = Item.model_validate({k: row[k] for k in Item.model_fields})
        return cls(item, row["status"], [Path(p) for p in row["outputs"]], row["code"], row["error"])

    @classmethod
    def failure(cls, item: Item, exc: Exception) -> ItemResult:
        """``item`` failed with ``exc`` (its ``code``, else the exception's type)."""
        return cls(item, "failed", code=getattr(exc, "code", type(exc).__name__), error=str(exc))


def load_latent_file(path: Path) -> np.ndarray:
    """The latents stored in a ``.npy``, ``.npz`` (key ``latents`` or the first) or ``.safetensors`` file."""
    if not path.is_file():
        raise MissingFileError(f"latent file not found: {path}", "missing_file")
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise InvalidInputError(
            f"unsupported latent file {path.name}: use .npy, .npz or .safetensors", "latent_format"
        )
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z["latents"] if "latents" in z else z[z.files[0]]
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        return tensors["latents"] if "latents" in tensors else next(iter(tensors.values()))
    except Exception as exc:  # numpy, zipfile and safetensors each raise their own kinds
        raise InvalidInputError(f"cannot read latent file {path}: {exc}", "latent_unreadable") from None


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole PNG (a truncated or damaged file is redone, not skipped)."""
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, SyntaxError, ValueError):  # PIL reports damaged chunks as SyntaxError
        return False
    return True


def read_manifest(
    path: Path, out_dir: Path, *, caption: str = "", seed: int = 0, sigma: float = 0.0
) -> list[Item]:
    """The items of a JSONL manifest: one object per line with ``input`` and optionally ``caption``,
    ``seed``, ``sigma`` (defaulting to the arguments) and ``output``.

    A relative ``input`` is relative to the manifest's folder, a relative ``output`` to ``out_dir``;
    without ``output`` the image goes to ``out_dir/<input stem>.png``.

    Raises:
        InvalidInputError: a line is not such an object (code ``manifest``), naming the line.
    """
    items = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise MissingFileError(f"cannot read manifest {path}: {exc}", "missing_file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("input"), str):
                raise ValueError('expected an object with an "input" path')
            source = path.parent / entry["input"]
            target = out_dir / entry.get("output", f"{Path(entry['input']).stem}.png")
            defaults = {"caption": caption, "seed": seed, "sigma": sigma}
            items.append(Item.model_validate({**defaults, **entry, "input": source, "output": target}))
        except (ValueError, TypeError, ValidationError) as exc:  # JSONDecodeError is a ValueError
            reason = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
            raise InvalidInputError(
                f"{path} line {number}: {reason}; each line must be a JSON object like "
                '{"input": "a.npy", "caption": "...", "seed": 0, "sigma": 0.0, "output": "a.png"}',
                "manifest",
            ) from None
    return items


def has_pattern(spec: str) -> bool:
    """Whether ``spec`` is a glob pattern (``*``, ``?`` or ``[``)."""
    return any(c in spec for c in "*?[")


def collect(
    inputs: Sequence[str | Path],
    out_dir: Path,
    mode: Mode,
    *,
    caption: str = "",
    seed: int = 0,
    sigma: float = 0.0,
) -> list[Item]:
    """The items of a run: each input is a file, a directory (its latent files for ``decode``, its
    images for ``upscale``; not recursive), a glob pattern or a ``.jsonl`` manifest.

    Files and directories write ``out_dir/<input stem>.png`` with the given caption, seed and sigma.
    A file that cannot be read is an item that will fail, not an error here.

    Raises:
        InvalidInputError: nothing to do (``no_inputs``), a pattern matches nothing, or two items
            would write the same output or an output would replace an input (``output_clash``).
    """
    suffixes = LATENT_SUFFIXES if mode == "decode" else IMAGE_SUFFIXES
    out_dir = out_dir.absolute()
    items: list[Item] = []
    for spec in inputs:
        path = Path(spec).absolute()
        if path.suffix == MANIFEST_SUFFIX and path.is_file():
            items += read_manifest(path, out_dir, caption=caption, seed=seed, sigma=sigma)
            continue
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file())
        elif not path.exists() and has_pattern(str(spec)):
            files = sorted(Path(p).absolute() for p in glob.glob(str(spec)) if Path(p).is_file())
            if not files:
                raise InvalidInputError(f"no files match {spec}", "no_inputs")
        else:
            files = [path]
        items += [
            Item(input=f, output=out_dir / f"{f.stem}.png", caption=caption, seed=seed, sigma=sigma)
            for f in files
        ]
    if not items:
        raise InvalidInputError(
            f"nothing to {mode} in {', '.join(map(str, inputs))}: "
            f"expected {', '.join(suffixes)} files or a {MANIFEST_SUFFIX} manifest",
            "no_inputs",
        )
    _check_outputs(items)
    return items


def _check_outputs(items: Sequence[Item]) -> None:
    """Refuse runs where two items write one file or an output would replace an input."""
    inputs = {item.input.resolve() for item in items}
    writers: dict[Path, Item] = {}
    for item in items:
        out = item.output.resolve()
        if out in inputs:
            raise InvalidInputError(
                f"the output {item.output} of {item.input} would replace an input; choose another -o",
                "output_clash",
            )
        if out in writers:
            raise InvalidInputError(
                f"{writers[out].input} and {item.input} would both write {item.output}; "
                "rename one or give explicit outputs in a manifest",
                "output_clash",
            )
        writers[out] = item


@dataclass
class _Pending:
    """An item loaded and checked, with the latents whose outputs are still missing."""

    item: Item
    latents: np.ndarray
    outputs: list[Path]
    seeds: list[int]


@dataclass(frozen=True)
class RawLatents:
    """Latent files hold the host VAE's raw latents: normalise them for the decoder's space first
    (:func:`pid_native.latents.normalise`); ``flux2_vae`` holds FLUX.2's BatchNorm statistics."""

    flux2_vae: str | None = None


def _prepare(
    decoder: Decoder, item: Item, mode: Mode, overwrite: bool, raw: RawLatents | None
) -> _Pending | None:
    """Load and check an item; None when every output of it is already complete."""
    if not overwrite and is_complete(item.output):
        return None
    if mode == "upscale":
        latents = decoder.encode_image(item.input)
    elif raw is not None:
        latents = normalise(decoder.space.name, load_latent_file(item.input), vae=raw.flux2_vae)
    else:
        latents = as_latents(load_latent_file(item.input))
    outputs = item.outputs(len(latents))
    # A file of several latents resumes latent by latent.
    keep = [b for b, out in enumerate(outputs) if overwrite or not is_complete(out)]
    if not keep:
        return None
    return _Pending(item, latents[keep], [outputs[b] for b in keep], [item.seed + b for b in keep])


def run(
    decoder: Decoder,
    items: Iterable[Item],
    mode: Mode = "decode",
    *,
    steps: int = 4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: Any = None,
    raw: RawLatents | None = None,
) -> Iterator[ItemResult]:
    """Decode (latent files) or upscale (images) ``items``, yielding one result per item.

    Args:
        decoder: the one decoder for the whole run.
        items: from :func:`collect` or :func:`read_manifest`.
        mode: ``decode`` or ``upscale``.
        steps: sampler steps, 1-4.
        batch_size: latents per decode call; consecutive items of one latent shape are decoded
            together up to this many (a single file of more latents is still one call).
        overwrite: redo items whose outputs already exist.
        progress: receives the decodes' :class:`~pid_native.ProgressEvent`\\ s.
        cancel: a :class:`~pid_native.CancelToken`; cancelling stops the run at the next step,
            writing nothing for the items in progress.
        raw: decode mode: the files hold raw VAE latents, normalised first (see :class:`RawLatents`).

    Yields:
        An :class:`ItemResult` per item, as items finish (a failed item may come before items
        listed ahead of it that wait to be decoded together).

    Raises:
        Cancelled: when ``cancel`` is cancelled (everything yielded before stays written).
        InvalidInputError: ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}", "invalid_argument")
    group: list[_Pending] = []
    for item in items:
        if cancel is not None and cancel.cancelled:
            raise Cancelled("the batch run was cancelled")
        try:
            pending = _prepare(decoder, item, mode, overwrite, raw)
        except (PidError, OSError) as exc:
            yield ItemResult.failure(item, exc)
            continue
        if pending is None:
            yield ItemResult(item, "skipped")
            continue
        if group and group[0].latents.shape[1:] != pending.latents.shape[1:]:
            yield from _decode_group(decoder, group, steps, progress, cancel)
            group = []
        group.append(pending)
        if sum(len(p.latents) for p in group) >= batch_size:
            yield from _decode_group(decoder, group, steps, progress, cancel)
            group = []
    if group:
        yield from _decode_group(decoder, group, steps, progress, cancel)


def _decode_group(
    decoder: Decoder, group: list[_Pending], steps: int, progress: ProgressCallback | None, cancel: Any
) -> Iterator[ItemResult]:
    """One decode call for items of one latent shape, then their PNGs."""
    rows = [(p.item, seed) for p in group for seed in p.seeds]
    try:
        images = decoder.decode(
            np.concatenate([p.latents for p in group]),
            [item.caption for item, _ in rows],
            sigma=[item.sigma for item, _ in rows],
            seed=[seed for _, seed in rows],
            steps=steps,
            progress=progress,
            cancel=cancel,
        )
    except Cancelled:
        raise
    except PidError as exc:
        if len(group) == 1:
            yield ItemResult.failure(group[0].item, exc)
        else:  # e.g. a batch over the memory budget: each item alone may still fit
            for p in group:
                yield from _decode_group(decoder, [p], steps, progress, cancel)
        return
    pictures = to_pil(images)
    start = 0
    for p in group:
        mine, start = pictures[start : start + len(p.outputs)], start + len(p.outputs)
        try:
            for out, seed, picture in zip(p.outputs, p.seeds, mine, strict=True):
                save_png(picture, out, {"pid-caption": p.item.caption, "pid-seed": str(seed)})
        except OSError as exc:
            yield ItemResult.failure(p.item, exc)
            continue
        yield ItemResult(p.item, "done", list(p.outputs))


class Report:
    """A run's JSONL report (one line per item, flushed as it finishes) and its summary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("w")
        self.counts: dict[Status, int] = {"done": 0, "skipped": 0, "failed": 0}
        self.failures: list[ItemResult] = []
        self._started = time.perf_counter()

    def add(self, result: ItemResult) -> None:
        self._file.write(json.dumps(result.to_json()) + "\n")
        self._file.flush()
        self.counts[result.status] += 1
        if result.status == "failed":
            self.failures.append(result)

    def close(self) -> None:
        self._file.close()

    def summary(self) -> str:
        """A few lines: the counts, the rate, each failure with its reason, where the report is."""
        minutes = (time.perf_counter() - self._started) / 60
        done, skipped, failed = self.counts["done"], self.counts["skipped"], self.counts["failed"]
        lines = [
            f"{done + skipped + failed} item(s): {done} done, {skipped} skipped (already complete), "
            f"{failed} failed in {minutes * 60:.1f}s ({done / minutes if minutes else 0:.1f} items/min)"
        ]
        lines += [f"  FAILED {r.item.input}: [{r.code}] {r.error}" for r in self.failures]
        lines.append(f"report: {self.path}")
        return "\n".join(lines)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "IMAGE_SUFFIXES",
    "LATENT_SUFFIXES",
    "REPORT_NAME",
    "Item",
    "ItemResult",
    "RawLatents",
    "Report",
    "collect",
    "has_pattern",
    "is_complete",
    "load_latent_file",
    "output_paths",
    "read_manifest",
    "run",
]
