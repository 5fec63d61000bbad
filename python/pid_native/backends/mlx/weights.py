"""Loading safetensors weight files into MLX.

The Rust core validates every file from its header before MLX reads a tensor (the same
checks, codes and messages as the candle backend), so a wrong, truncated or corrupt file is
reported by name. Tensors keep their storage dtype (bf16 for released checkpoints); the
only changes are layout transforms MLX needs, never renames:

- 4-D convolution weights: PyTorch ``(O, I, KH, KW)`` -> MLX ``(O, KH, KW, I)``;
- ``pixel_blocks.{j}.adaLN_modulation.0``: rows regrouped from upstream ``[p][k][ch]``
  to ``[k][p][ch]``, so each of the six per-pixel modulations is one contiguous row block.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
from safetensors import safe_open

from ... import _native
from ...errors import WeightsError
from .config import NetConfig
from .net import PidNet


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a complete, readable safetensors file (checked by the core)."""
    _native.check_safetensors([str(path)])
    with safe_open(str(path), "numpy") as f:
        return dict(f.metadata() or {})


def load_safetensors(paths: Iterable[Path]) -> dict[str, mx.array]:
    """Every tensor of one or more safetensors files (a sharded set is one logical file).

    Raises:
        MissingFileError, WeightsError: missing, truncated or corrupt files, by name.
    """
    paths = [Path(p) for p in paths]
    _native.check_safetensors([str(p) for p in paths])
    tensors: dict[str, mx.array] = {}
    for path in paths:
        try:
            tensors.update(mx.load(str(path), format="safetensors"))
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(
                f"{path}: cannot read safetensors ({exc}); the file is corrupt, re-download it",
                "not_safetensors",
            ) from None
    return tensors


def to_mlx_conv(weight: mx.array) -> mx.array:
    """PyTorch conv weight ``(O, I, KH, KW)`` -> MLX ``(O, KH, KW, I)``."""
    return weight.transpose(0, 2, 3, 1)


def regroup_pit_modulation(weight: mx.array, p2: int, dim: int) -> mx.array:
    """Rows ``p*6*dim + k*dim + ch`` (upstream) -> ``k*p2*dim + p*dim + ch`` (works for the bias too)."""
    rest = weight.shape[1:]
    return weight.reshape(p2, 6, dim, *rest).swapaxes(0, 1).reshape(6 * p2 * dim, *rest)


_RAW_DTYPES = {"bf16": mx.bfloat16, "f16": mx.float16}


def checkpoint_tensors(path: Path) -> dict[str, mx.array]:
    """The student tensors of a checkpoint by bare name, in their stored dtype: converted
    safetensors, or upstream's layout (``net.*`` beside training-only networks) as safetensors
    or the published ``.pth``, read by the core (names and format as the candle backend reads them)."""
    arrays = _native.checkpoint_arrays(str(path))
    tensors = {}
    for name in list(arrays):
        tag, values = arrays.pop(name)  # one tensor at a time: the numpy copy never doubles the peak
        array = mx.array(values)
        tensors[name] = array.view(_RAW_DTYPES[tag]) if tag in _RAW_DTYPES else array
    return tensors


class Checkpoint:
    """A PiD student checkpoint: converted (bare keys) or upstream's (``net.*`` keys, others
    ignored; safetensors or ``.pth``).

    The core validates it from its header first (presence, shape and dtype of every tensor,
    nothing unknown; the config given or detected for the latent space), then MLX loads it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: NetConfig | None = None,
        latent_channels: int | None = None,
        latent_down_factor: int = 8,
    ) -> None:
        self.path = Path(path)
        self.config = NetConfig.from_json(
            _native.inspect_checkpoint(
                str(self.path), config.to_json() if config else None, latent_channels, latent_down_factor
            )
        )
        self.tensors = checkpoint_tensors(self.path)

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
    latent_channels: int | None = None,
    latent_down_factor: int = 8,
    matmul_dtype: mx.Dtype | None = None,
) -> PidNet:
    """Open, validate and load a PiD checkpoint; weights stay resident in their storage dtype.

    Args:
        path: the checkpoint (``.safetensors`` or upstream's ``.pth``).
        config: the network configuration; detected from the tensors when None.
        latent_channels, latent_down_factor: the latent space, needed to detect un-patchifying
            students (flux2 v1.5).
        matmul_dtype: arithmetic of matmuls and convs (None: float32).

    Raises:
        MissingFileError, WeightsError: naming the file and the offending tensor.
    """
    ckpt = Checkpoint(path, config, latent_channels, latent_down_factor)
    net = PidNet(ckpt.config, matmul_dtype)
    net.load_weights(ckpt.mlx_weights(ckpt.config), strict=True)
    mx.eval(net.parameters())
    return net
