"""SDXL VAE (diffusers ``AutoencoderKL``) encoder and decoder, NHWC (pid_spec §2.2 item 3).

PiD never calls the VAE: it is needed only to turn an image into the latent PiD decodes
(the posterior *mean*, times the scaling factor 0.13025) and for the plain VAE decode
PiD is compared with. Attribute names are diffusers' state-dict keys
(``encoder.down_blocks.0.resnets.1.conv2.weight``, ``decoder.mid_block.attentions.0.to_q``);
convolution weights are converted OIHW -> OHWI at load, nothing is renamed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...errors import InvalidInputError, MissingFileError, WeightsError
from .net.attention import attention
from .net.layers import Conv2d, GroupNorm, Linear, set_matmul_dtype
from .weights import load_safetensors, read_metadata, to_mlx_conv

# diffusers' VAE blocks use eps 1e-6 in every GroupNorm.
EPS = 1e-6


@dataclass(frozen=True)
class VaeConfig:
    """The ``config.json`` fields of an ``AutoencoderKL`` (diffusers names and defaults)."""

    block_out_channels: tuple[int, ...]
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | os.PathLike[str]) -> VaeConfig:
        """Parse and check a diffusers config; ``source`` names it in errors.

        Raises:
            WeightsError: not an SDXL-style ``AutoencoderKL`` (code ``vae_config``).
        """
        n = len(raw.get("block_out_channels") or ())
        groups = raw.get("norm_num_groups", 32)
        problems = []
        if n == 0 or any(c % groups for c in raw["block_out_channels"]):
            problems.append(f"block_out_channels must be non-empty multiples of norm_num_groups {groups}")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = raw.get(key) or []
            if types and (len(types) != n or any(t != want for t in types)):
                problems.append(f"{key} {types} must be {n} x {want}")
        if raw.get("act_fn", "silu") != "silu" or not raw.get("mid_block_add_attention", True):
            problems.append("only silu activations with mid-block attention are supported")
        if problems:
            raise WeightsError(
                f"{source}: not an SDXL-style AutoencoderKL config: {'; '.join(problems)}", "vae_config"
            )
        kwargs = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**{**kwargs, "block_out_channels": tuple(raw["block_out_channels"])})

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock(nn.Module):
    """``ResnetBlock2D``: x + conv2(silu(norm2(conv1(silu(norm1 x))))), 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(cin, groups, EPS)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout, groups, EPS)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = Conv2d(cin, cout, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class VaeAttention(nn.Module):
    """Single-head self-attention over pixels with a residual (diffusers ``Attention`` in the mid block)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm(ch, groups, EPS)
        self.to_q = Linear(ch, ch)
        self.to_k = Linear(ch, ch)
        self.to_v = Linear(ch, ch)
        self.to_out = [Linear(ch, ch)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t))  # chunked: H*W/64 tokens, one head
        return x + self.to_out[0](out).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)]
        self.attentions = [VaeAttention(ch, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (diffusers' asymmetric pad)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2))


class EncoderBlock(nn.Module):
    """``DownEncoderBlock2D``."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers)]
        if downsample:
            self.downsamplers = [Downsample(cout)]

    def __call__(self, x: mx.array) -> mx.array:
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class DecoderBlock(nn.Module):
    """``UpDecoderBlock2D``."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers)]
        if upsample:
            self.upsamplers = [Upsample(cout)]

    def __call__(self, x: mx.array) -> mx.array:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < n - 1) for i in range(n)
        ]
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = GroupNorm(ch[-1], g, EPS)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
            mx.eval(x)
        return self.conv_out(nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = [
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < n - 1) for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(ch[-1], g, EPS)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
            mx.eval(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The VAE. Image and latent arrays at the public methods are NCHW float32 numpy arrays."""

    def __init__(self, cfg: VaeConfig, matmul_dtype: mx.Dtype | None = None) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        set_matmul_dtype(self, matmul_dtype)
        self._cfg = cfg

    @property
    def config(self) -> VaeConfig:
        return self._cfg

    @classmethod
    def open(cls, path: str | os.PathLike[str], matmul_dtype: mx.Dtype | None = None) -> AutoencoderKL:
        """Load a diffusers VAE directory (``config.json`` + ``diffusion_pytorch_model.safetensors``),
        or a golden file of kind ``sdxl_vae`` (config in its metadata, tensors ``weights.*``).

        Raises:
            MissingFileError: a needed file is missing. WeightsError: bad config or tensors.
        """
        path = Path(path)
        if path.is_dir():
            config, weights = path / "config.json", path / "diffusion_pytorch_model.safetensors"
            missing = [p for p in (config, weights) if not p.is_file()]
            if missing:
                raise MissingFileError(
                    f"{missing[0]}: not found; a diffusers VAE directory holds config.json and "
                    "diffusion_pytorch_model.safetensors (provision it with `pid-native fetch`)",
                    "missing_file",
                )
            cfg = VaeConfig.from_dict(json.loads(config.read_text()), config)
            tensors = load_safetensors([weights])
        else:
            meta = read_metadata(path)
            if meta.get("kind") != "sdxl_vae" or "config" not in meta:
                raise WeightsError(
                    f"{path}: expected a diffusers VAE directory (config.json + "
                    "diffusion_pytorch_model.safetensors) or a golden file of kind sdxl_vae",
                    "not_vae",
                )
            cfg = VaeConfig.from_dict(json.loads(meta["config"]), path)
            tensors = {
                k.removeprefix("weights."): v
                for k, v in load_safetensors([path]).items()
                if k.startswith("weights.")
            }
        vae = cls(cfg, matmul_dtype)
        vae.load(tensors, path)
        return vae

    def load(self, tensors: dict[str, mx.array], source: str | os.PathLike[str]) -> None:
        """Load diffusers-named tensors (OIHW convs), checking names and shapes."""
        expected = dict(nn.utils.tree_flatten(self.parameters()))
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise WeightsError(
                f"{source}: VAE tensors do not match its config: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}",
                "vae_layout",
            )
        weights = [(k, to_mlx_conv(v) if v.ndim == 4 else v) for k, v in tensors.items()]
        for name, w in weights:
            if tuple(w.shape) != tuple(expected[name].shape):
                raise WeightsError(
                    f"{source}: tensor `{name}` has shape {list(w.shape)} (MLX layout), expected "
                    f"{list(expected[name].shape)}",
                    "tensor_shape",
                )
        self.load_weights(weights, strict=True)
        mx.eval(self.parameters())

    def encode_mean(self, image: mx.array) -> mx.array:
        """Raw posterior mean ``(B, h, w, C)`` of NHWC images in [-1, 1] (before scaling)."""
        moments = self.encoder(image)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        # Moments are [mean, logvar] along channels; the mean is the deterministic latent.
        return moments[..., : self._cfg.latent_channels]

    def decode_raw(self, z: mx.array) -> mx.array:
        """NHWC raw latents (before scaling) -> NHWC images, unclamped."""
        return self.decoder(self.post_quant_conv(z) if "post_quant_conv" in self else z)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``(B, 3, H, W)`` in [-1, 1] -> the latent PiD decodes, ``(mean - shift) * scaling_factor``.

        H and W must be multiples of the VAE factor (8 for SDXL).
        """
        x = np.asarray(images, dtype=np.float32)
        f = self._cfg.down_factor
        if x.ndim != 4 or x.shape[1] != self._cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise InvalidInputError(
                f"images must be [B, {self._cfg.in_channels}, H, W] with H and W multiples of {f}, "
                f"got shape {list(x.shape)}",
                "image_shape",
            )
        shift = self._cfg.shift_factor or 0.0
        z = (self.encode_mean(mx.array(x.transpose(0, 2, 3, 1))) - shift) * self._cfg.scaling_factor
        return np.array(z.astype(mx.float32)).transpose(0, 3, 1, 2)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents scaled as :meth:`encode` returns -> images ``(B, 3, f*h, f*w)``.

        The result is about [-1, 1] and not clamped, as in the core.
        """
        z = np.asarray(latents, dtype=np.float32)
        if z.ndim != 4 or z.shape[1] != self._cfg.latent_channels:
            raise InvalidInputError(
                f"latents must be [B, {self._cfg.latent_channels}, h, w], got shape {list(z.shape)}",
                "latent_shape",
            )
        shift = self._cfg.shift_factor or 0.0
        x = self.decode_raw(mx.array(z.transpose(0, 2, 3, 1)) / self._cfg.scaling_factor + shift)
        return np.array(x.astype(mx.float32)).transpose(0, 3, 1, 2)
