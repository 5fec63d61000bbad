"""Write PyTorch ``.pth`` state dicts without PyTorch, the way ``torch.save`` lays them out.

Upstream publishes each PiD student as ``model_ema_bf16.pth``; tests and the fake Hub need
files of that format without depending on torch. The archive is what ``torch.save`` writes
(a zip of ``archive/data.pkl``, ``archive/byteorder``, ``archive/version`` and one stored,
uncompressed ``archive/data/<key>`` per tensor); the pickle (protocol 2) is a
``collections.OrderedDict`` of ``torch._utils._rebuild_tensor_v2`` calls on persistent
storage references, assembled opcode by opcode so that nothing of torch is imported.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

# dtype tag -> torch's storage class (``bf16`` arrays hold the bfloat16 bit patterns as uint16).
_STORAGE = {"bf16": "BFloat16Storage", "f16": "HalfStorage", "f32": "FloatStorage"}


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    data = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(v: int) -> bytes:
    return pickle.BININT + struct.pack("<i", v)


def _ints(values: tuple[int, ...]) -> bytes:
    return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE


_EMPTY_ORDERED_DICT = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE


def _tensor(key: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    numel = int(np.prod(shape, dtype=np.int64))
    strides = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape)))
    storage = (
        pickle.MARK
        + _str("storage")
        + _global("torch", _STORAGE[dtype])
        + _str(key)
        + _str("cpu")
        + _int(numel)
        + pickle.TUPLE
        + pickle.BINPERSID
    )
    args = storage + _int(0) + _ints(shape) + _ints(strides) + pickle.NEWFALSE + _EMPTY_ORDERED_DICT
    return _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + args + pickle.TUPLE + pickle.REDUCE


def write_pth(
    tensors: dict[str, tuple[str, np.ndarray]], path: str | os.PathLike[str], *, data_pkl: bytes | None = None
) -> Path:
    """Write ``{name: (dtype tag, array)}`` (tags ``bf16``, ``f16``, ``f32``) as a ``torch.save`` file.

    ``data_pkl`` replaces the pickle (to build files that are *not* state dicts of tensors).
    """
    path = Path(path)
    body = [pickle.PROTO + b"\x02", _EMPTY_ORDERED_DICT, pickle.MARK]
    storages = {}
    for key, (name, (dtype, array)) in enumerate(tensors.items()):
        body += [_str(name), _tensor(str(key), dtype, tuple(array.shape))]
        storages[str(key)] = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    body += [pickle.SETITEMS, pickle.STOP]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl if data_pkl is not None else b"".join(body))
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


__all__ = ["write_pth"]
