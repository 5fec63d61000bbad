"""Deterministic synthetic weights: the golden fixtures' ``seeded-v1`` recipe.

For every tensor ``name`` with ``shape``, in float32 arithmetic throughout::

    rng = numpy.random.default_rng(zlib.crc32((salt + name).encode("utf-8")))
    n = rng.standard_normal(size=shape, dtype=float32)
    0-dim (log_alpha):                       float32(log 5) + float32(0.1) * n
    1-dim names ending in "weight" (norms):   1 + 0.1 * n
    names ending in "bias", y_pos_embedding:  0.02 * n
    everything else:                          n / float32(sqrt(prod(shape[1:])))

then rounded to bfloat16 (nearest, ties to even) and stored as bfloat16 with upstream
names. The writer streams one tensor at a time, so the full 1.36 B-parameter SDXL
topology (2.7 GB) never sits in memory twice.

A cache (:func:`cached_seeded`) keeps each layout once. A layout over :data:`SHARD_BYTES` is
kept as one shard per top-level module (``blocks.3``, ``x_embedder``) and a
``.safetensors.index.json`` naming them: a shard's values depend only on its tensors' names,
shapes and the salt, so the full-size topologies, which differ in a few modules, share the
rest (the five of the goldens take 3.4 GB instead of 13.8).

This module only needs NumPy: the Rust test-suite runs it as a script
(``python seeded.py --layout layout.json --cache DIR``, printing the checkpoint's path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

RECIPE = "seeded-v1"

Layout = Sequence[tuple[str, Sequence[int]]]


def seeded_float32(name: str, shape: Sequence[int], salt: str = "") -> np.ndarray:
    """The recipe's float32 values for one tensor, before bfloat16 rounding."""
    rng = np.random.default_rng(zlib.crc32((salt + name).encode("utf-8")))
    shape = tuple(int(s) for s in shape)
    n = np.asarray(rng.standard_normal(size=shape, dtype=np.float32))
    if len(shape) == 0:
        return np.float32(math.log(5.0)) + np.float32(0.1) * n
    if len(shape) == 1 and name.endswith("weight"):
        return np.float32(1.0) + np.float32(0.1) * n
    if name.endswith("bias") or name == "y_pos_embedding":
        return np.float32(0.02) * n
    return n / np.float32(math.sqrt(math.prod(shape[1:])))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even); returns the uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def write_safetensors_streaming(
    path: str | os.PathLike[str],
    entries: Iterable[tuple[str, Sequence[int], str]],
    produce: Callable[[str, Sequence[int]], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file whose tensors are produced one at a time.

    ``entries`` gives (name, shape, dtype tag) in file order; ``produce(name, shape)``
    returns that tensor's array (already in the tagged dtype). The file is written to a
    temporary name and renamed at the end, so a crash never leaves a complete-looking file.
    """
    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}
    entries = [(n, tuple(int(s) for s in shape), dt) for n, shape, dt in entries]
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dt in entries:
        nbytes = math.prod(shape) * itemsize[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    # Per-process temporary name: concurrent writers of the same file never share one.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dt in entries:
            arr = np.ascontiguousarray(produce(name, shape))
            expected = math.prod(shape) * itemsize[dt]
            if arr.nbytes != expected:
                raise ValueError(f"{name}: produced {arr.nbytes} bytes, expected {expected}")
            f.write(arr.tobytes())
    os.replace(tmp, path)
    return path


def write_seeded(
    path: str | os.PathLike[str],
    layout: Layout,
    salt: str = "",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a bfloat16 checkpoint for ``layout`` [(name, shape), ...] from the seeded-v1 recipe."""
    meta = {"weights": RECIPE, "weights_salt": salt, **(metadata or {})}
    return write_safetensors_streaming(
        path,
        ((name, shape, "BF16") for name, shape in layout),
        lambda name, shape: bf16_bits(seeded_float32(name, shape, salt)),
        meta,
    )


def layout_key(layout: Layout) -> str:
    """FNV-1a 64 over ``name`` + ``"d0,d1,...;"`` per tensor (the Rust tests use the same key)."""
    h = 0xCBF29CE484222325
    for name, shape in layout:
        for b in f"{name}{','.join(str(int(d)) for d in shape)};".encode():
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


SHARD_BYTES = 1 << 30
"""Layouts of more bytes than this are cached as shards of their top-level modules."""


def module_of(name: str) -> str:
    """The top-level module a tensor belongs to: ``blocks.3`` for ``blocks.3.attn.qkv.weight``,
    ``x_embedder`` for ``x_embedder.proj.weight``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def cached_seeded(cache_dir: str | os.PathLike[str], layout: Layout, salt: str = "") -> Path:
    """A seeded-v1 checkpoint for ``layout`` in ``cache_dir``, written on first use: one
    ``.safetensors`` file, or over :data:`SHARD_BYTES` a ``.safetensors.index.json`` and its
    shards, each shard shared with every layout holding the same module."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{RECIPE}-{salt}-{layout_key(layout)}"
    if sum(2 * math.prod(shape) for _, shape in layout) <= SHARD_BYTES:
        path = cache / f"{stem}.safetensors"
        if not path.exists():
            write_seeded(path, layout, salt=salt)
        return path
    index = cache / f"{stem}.safetensors.index.json"
    if index.exists():
        return index
    modules: dict[str, list[tuple[str, Sequence[int]]]] = {}
    for name, shape in layout:
        modules.setdefault(module_of(name), []).append((name, shape))
    weight_map = {}
    for module, part in modules.items():
        shard = f"{RECIPE}-{salt}-{module}-{layout_key(part)}.safetensors"
        if not (cache / shard).exists():
            write_seeded(cache / shard, part, salt=salt)
        weight_map.update((name, shard) for name, _ in part)
    # Written last and renamed into place: an index on disk names only complete shards.
    tmp = index.with_name(f"{index.name}.{os.getpid()}.partial")
    metadata = {"weights": RECIPE, "weights_salt": salt}
    tmp.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}))
    os.replace(tmp, index)
    return index


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, help="JSON list of [name, shape] pairs")
    parser.add_argument("--cache", required=True, help="the cache directory")
    parser.add_argument("--salt", default="")
    args = parser.parse_args()
    layout = json.loads(Path(args.layout).read_text())
    print(cached_seeded(args.cache, [(n, s) for n, s in layout], salt=args.salt))


if __name__ == "__main__":
    _main()
