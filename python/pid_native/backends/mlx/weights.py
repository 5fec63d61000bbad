"""Opening and validating safetensors weight files (mirrors ``rust/pid-core/src/weights.rs``).

Headers are checked before any tensor is read, so a wrong, truncated or corrupt file is
reported by name. Tensors keep their storage dtype (bf16 for released checkpoints); the
only changes are layout transforms MLX needs, never renames:

- 4-D convolution weights: PyTorch ``(O, I, KH, KW)`` -> MLX ``(O, KH, KW, I)``;
- ``pixel_blocks.{j}.adaLN_modulation.0``: rows regrouped from upstream ``[p][k][ch]``
  to ``[k][p][ch]``, so each of the six per-pixel modulations is one contiguous row block.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

from ...errors import InvalidInputError, MissingFileError, WeightsError
from .config import IGNORED_PREFIXES, LatentHint, NetConfig
from .net import PidNet

WEIGHT_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict:
    """The parsed JSON header of a safetensors file, after checking it fits the file.

    Raises:
        MissingFileError: ``path`` does not exist.
        WeightsError: not a safetensors file, or truncated (codes ``not_safetensors``, ``truncated``).
    """
    if not path.exists():
        raise MissingFileError(f"{path}: not found; pass an existing .safetensors file", "missing_file")
    if path.is_dir():
        raise WeightsError(f"{path}: expected a .safetensors file, got a directory", "not_a_file")
    size = path.stat().st_size

    def not_st(why: str) -> WeightsError:
        return WeightsError(
            f"{path}: not a safetensors file ({why}); convert the checkpoint to .safetensors or re-download it",
            "not_safetensors",
        )

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise not_st("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > _MAX_HEADER or n + 8 > size:
            raise not_st(f"header length {n} does not fit a {size} byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise not_st(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise not_st("header is not a JSON object")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if n + 8 + end > size:
        raise WeightsError(
            f"{path}: file is truncated: the header describes {n + 8 + end} bytes but the file has {size}; "
            "re-download it",
            "truncated",
        )
    return header


def load_safetensors(paths: Iterable[Path]) -> dict[str, mx.array]:
    """Every tensor of one or more safetensors files (a sharded set is one logical file)."""
    tensors: dict[str, mx.array] = {}
    for path in paths:
        read_header(path)
        try:
            tensors.update(mx.load(str(path), format="safetensors"))
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(
                f"{path}: cannot read safetensors ({exc}); the file is corrupt, re-download it", "not_safetensors"
            ) from None
    return tensors


def to_mlx_conv(weight: mx.array) -> mx.array:
    """PyTorch conv weight ``(O, I, KH, KW)`` -> MLX ``(O, KH, KW, I)``."""
    return weight.transpose(0, 2, 3, 1)


def regroup_pit_modulation(weight: mx.array, p2: int, dim: int) -> mx.array:
    """Rows ``p*6*dim + k*dim + ch`` (upstream) -> ``k*p2*dim + p*dim + ch`` (works for the bias too)."""
    rest = weight.shape[1:]
    return weight.reshape(p2, 6, dim, *rest).swapaxes(0, 1).reshape(6 * p2 * dim, *rest)


class Checkpoint:
    """A PiD student checkpoint: converted (bare keys) or raw upstream (``net.*`` keys, others ignored)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        tensors = load_safetensors([self.path])
        prefix = "net." if any(k.startswith("net.") for k in tensors) else ""
        self.tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not self.tensors:
            raise WeightsError(f"{self.path}: the file holds no tensors", "not_pid")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def detect_config(self, hint: LatentHint | None = None) -> NetConfig:
        """Recover the network configuration from the tensors (see :meth:`NetConfig.from_tensor_shapes`)."""
        try:
            return NetConfig.from_tensor_shapes(self.shapes(), hint)
        except InvalidInputError as exc:
            raise WeightsError(f"{self.path}: {exc.message}", exc.code) from None

    def validate(self, cfg: NetConfig) -> None:
        """Check presence, shape and dtype of every tensor ``cfg`` needs, and that nothing unknown is there.

        Raises:
            WeightsError: codes ``missing_tensor``, ``tensor_shape``, ``tensor_dtype``, ``unexpected_tensor``.
        """
        expected = cfg.expected_tensors()
        for name, shape in expected:
            got = self.tensors.get(name)
            if got is None:
                raise WeightsError(
                    f"{self.path}: tensor `{name}` (shape {list(shape)}) is missing; the file is incomplete "
                    "or not a PiD student",
                    "missing_tensor",
                )
            if tuple(got.shape) != shape:
                raise WeightsError(
                    f"{self.path}: tensor `{name}` has shape {list(got.shape)}, expected {list(shape)}", "tensor_shape"
                )
            if got.dtype not in WEIGHT_DTYPES:
                raise WeightsError(
                    f"{self.path}: tensor `{name}` has dtype {got.dtype}, expected bf16, f16 or f32", "tensor_dtype"
                )
        known = {name for name, _ in expected}
        for name in self.tensors:
            if name not in known and not name.startswith(IGNORED_PREFIXES):
                raise WeightsError(
                    f"{self.path}: unexpected tensor `{name}`: the file does not match the detected network layout",
                    "unexpected_tensor",
                )

    def mlx_weights(self, cfg: NetConfig) -> list[tuple[str, mx.array]]:
        """The network's tensors in MLX layout (call :meth:`validate` first)."""
        p2 = cfg.patch_size * cfg.patch_size
        out = []
        for name, _ in cfg.expected_tensors():
            w = self.tensors[name]
            if w.ndim == 4:
                w = to_mlx_conv(w)
            elif re.fullmatch(r"pixel_blocks\.\d+\.adaLN_modulation\.0\.(weight|bias)", name):
                w = regroup_pit_modulation(w, p2, cfg.pixel_hidden_size)
            out.append((name, w))
        return out


def load_pidnet(
    path: str | os.PathLike[str],
    config: NetConfig | None = None,
    hint: LatentHint | None = None,
    matmul_dtype: mx.Dtype | None = None,
) -> PidNet:
    """Open, validate and load a PiD checkpoint; weights stay resident in their storage dtype.

    Args:
        path: the ``.safetensors`` checkpoint.
        config: the network configuration; detected from the tensors when None.
        hint: the latent space, needed to detect un-patchifying students (flux2 v1.5).
        matmul_dtype: arithmetic of matmuls and convs (None: float32).

    Raises:
        MissingFileError, WeightsError: naming the file and the offending tensor.
    """
    ckpt = Checkpoint(path)
    cfg = config or ckpt.detect_config(hint)
    ckpt.validate(cfg)
    net = PidNet(cfg, matmul_dtype)
    net.load_weights(ckpt.mlx_weights(cfg), strict=True)
    mx.eval(net.parameters())
    return net
