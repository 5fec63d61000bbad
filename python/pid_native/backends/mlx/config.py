"""Network configuration of a PiD student (mirrors ``rust/pid-core/src/config.rs``).

Field names are the upstream ``PidNet`` constructor arguments (nv-tlabs/PiD @2c8814c,
``pid/_src/configs/common/defaults/net.py:30-74``), so a golden file's ``config`` metadata
loads directly. Released checkpoints carry no config: :meth:`NetConfig.from_tensor_shapes`
recovers it from tensor names and shapes. The tensor layout a config implies comes from
the Rust core (``_native.checkpoint_layout``), the one source of truth for both backends.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ... import _native
from ...errors import InvalidInputError

# Training-only tensors that released files may carry and inference never reads.
IGNORED_PREFIXES = ("lq_proj.lq_aux_rgb_head.",)

GATE_PER_DIM = "sigma_aware_per_token_per_dim"
GATE_PER_TOKEN = "sigma_aware_per_token"


@dataclass(frozen=True)
class LatentHint:
    """What a checkpoint cannot say about its latent: channels and spatial factor (flux2 packs 32x2x2)."""

    channels: int
    spatial_down_factor: int


@dataclass(frozen=True)
class NetConfig:
    """Constructor arguments of one PiD student (upstream names)."""

    hidden_size: int
    num_groups: int
    pixel_hidden_size: int
    pixel_attn_hidden_size: int
    pixel_num_groups: int
    patch_depth: int
    pixel_depth: int
    patch_size: int
    txt_embed_dim: int
    txt_max_length: int
    rope_ref_h: int
    rope_ref_w: int
    lq_latent_channels: int
    lq_hidden_dim: int
    lq_num_res_blocks: int
    lq_interval: int
    lq_gate_type: str
    lq_conv_padding_mode: str
    lq_latent_unpatchify_factor: int
    latent_spatial_down_factor: int
    sr_scale: int
    pit_lq_inject: bool
    in_channels: int = 3
    text_rope_theta: float = 10_000.0
    use_text_rope: bool = True
    rope_mode: str = "ntk_aware"
    lq_inject_mode: str = "controlnet"
    lq_in_channels: int = 0
    lq_aux_rgb_head: bool = False

    @classmethod
    def sdxl_2kto4k(cls) -> NetConfig:
        """The released SDXL ``2kto4k`` student (pid_spec §1.1)."""
        return cls(
            hidden_size=1536,
            num_groups=24,
            pixel_hidden_size=16,
            pixel_attn_hidden_size=1152,
            pixel_num_groups=16,
            patch_depth=14,
            pixel_depth=2,
            patch_size=16,
            txt_embed_dim=2304,
            txt_max_length=300,
            rope_ref_h=1024,
            rope_ref_w=1024,
            lq_latent_channels=4,
            lq_hidden_dim=512,
            lq_num_res_blocks=4,
            lq_interval=2,
            lq_gate_type=GATE_PER_DIM,
            lq_conv_padding_mode="zeros",
            lq_latent_unpatchify_factor=1,
            latent_spatial_down_factor=8,
            sr_scale=4,
            pit_lq_inject=False,
        )

    @classmethod
    def from_json(cls, text: str) -> NetConfig:
        """Parse upstream-named JSON; keys the network does not use are ignored, as in the core.

        Raises:
            InvalidInputError: bad JSON, missing or unknown fields, or an unsupported network.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"invalid network config: {exc}", "config") from None
        if not isinstance(raw, dict):
            raise InvalidInputError("invalid network config: expected a JSON object", "config")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as exc:
            raise InvalidInputError(f"invalid network config: {exc}", "config") from None
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @property
    def is_v15(self) -> bool:
        return self.pit_lq_inject

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_groups

    @property
    def pixel_head_dim(self) -> int:
        return self.pixel_attn_hidden_size // self.pixel_num_groups

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU width of the patch blocks: int(2 * 4 * hidden / 3) (pid_spec §3.1)."""
        return 2 * 4 * self.hidden_size // 3

    @property
    def pixel_mlp_hidden(self) -> int:
        return 4 * self.pixel_hidden_size

    @property
    def num_lq_outputs(self) -> int:
        return -(-self.patch_depth // self.lq_interval)

    @property
    def lq_conv_in_channels(self) -> int:
        """Channels the first adapter conv sees after un-patchifying the latent."""
        return self.lq_latent_channels // self.lq_latent_unpatchify_factor**2

    @property
    def pixels_per_latent(self) -> int:
        """Output pixels per latent pixel (32 for every /8 space at 4x)."""
        return self.sr_scale * self.latent_spatial_down_factor

    @property
    def gate_out_dim(self) -> int:
        return self.hidden_size if self.lq_gate_type == GATE_PER_DIM else 1

    def validate(self) -> None:
        """Reject configurations the network cannot run (same rules as the core).

        Raises:
            InvalidInputError: with code ``config`` naming the offending field.
        """

        def bad(msg: str) -> InvalidInputError:
            return InvalidInputError(msg, "config")

        if self.lq_inject_mode != "controlnet":
            raise bad(f"lq_inject_mode {self.lq_inject_mode!r} is not supported; released students use 'controlnet'")
        if self.lq_in_channels != 0:
            raise bad(
                f"lq_in_channels = {self.lq_in_channels} (pixel-space LQ branch) is not supported; "
                "released students are latent-only"
            )
        if self.lq_gate_type not in (GATE_PER_DIM, GATE_PER_TOKEN):
            raise bad(f"lq_gate_type {self.lq_gate_type!r} is unknown; use {GATE_PER_DIM!r} or {GATE_PER_TOKEN!r}")
        if self.lq_conv_padding_mode not in ("zeros", "replicate"):
            raise bad(f"lq_conv_padding_mode {self.lq_conv_padding_mode!r} is unknown; use 'zeros' or 'replicate'")
        if self.rope_mode not in ("ntk_aware", "original"):
            raise bad(f"rope_mode {self.rope_mode!r} is unknown; use 'ntk_aware' or 'original'")
        if self.num_groups <= 0 or self.hidden_size % self.num_groups:
            raise bad(f"hidden_size {self.hidden_size} is not divisible by num_groups {self.num_groups}")
        if self.pixel_num_groups <= 0 or self.pixel_attn_hidden_size % self.pixel_num_groups:
            raise bad(
                f"pixel_attn_hidden_size {self.pixel_attn_hidden_size} is not divisible by "
                f"pixel_num_groups {self.pixel_num_groups}"
            )
        for name, d in (("head", self.head_dim), ("pixel head", self.pixel_head_dim)):
            if d % 4:
                raise bad(f"{name} dim {d} must be a multiple of 4 for 2-D RoPE")
        if min(self.lq_interval, self.patch_depth, self.patch_size) <= 0:
            raise bad("lq_interval, patch_depth and patch_size must be positive")
        f = self.lq_latent_unpatchify_factor
        if f <= 0 or self.lq_latent_channels % (f * f):
            raise bad(
                f"lq_latent_channels {self.lq_latent_channels} is not divisible by "
                f"lq_latent_unpatchify_factor^2 = {f * f}"
            )
        if self.latent_spatial_down_factor % f:
            raise bad(
                f"latent_spatial_down_factor {self.latent_spatial_down_factor} is not divisible by "
                f"lq_latent_unpatchify_factor {f}"
            )
        ratio = self.sr_scale * self.latent_spatial_down_factor // f
        if ratio < self.patch_size or ratio % self.patch_size:
            raise bad(
                f"latent-to-patch ratio {ratio}/{self.patch_size} is not an integer >= 1; "
                "only upsampling adapters are supported"
            )

    def expected_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor the network reads, in upstream names, from the Rust core's layout."""
        return [(name, tuple(shape)) for name, shape in _native.checkpoint_layout(self.to_json())]

    @classmethod
    def from_tensor_shapes(cls, shapes: Mapping[str, Sequence[int]], hint: LatentHint | None = None) -> NetConfig:
        """Recover a released student's configuration from its tensor shapes (bare names).

        What shapes cannot say comes from the latent space (``hint``): flux2 feeds a
        128-channel packed latent at /16 that the v1.5 adapter un-patchifies by 2.

        Raises:
            InvalidInputError: the tensors are not a PiD student, or do not fit ``hint``.
        """

        def shape(name: str) -> Sequence[int]:
            if name not in shapes:
                raise InvalidInputError(
                    f"tensor `{name}` is missing, so this is not a PiD student checkpoint", "missing_tensor"
                )
            return shapes[name]

        def dim(name: str, axis: int) -> int:
            s = shape(name)
            if len(s) <= axis:
                raise InvalidInputError(f"tensor `{name}` has shape {list(s)}, expected rank > {axis}", "tensor_shape")
            return int(s[axis])

        def count(prefix: str, first: int = 0) -> int:
            found = {int(m.group(1)) for k in shapes if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
            n = first
            while n in found:
                n += 1
            return n - first

        hidden = dim("s_embedder.proj.weight", 0)
        in_channels = dim("pixel_embedder.proj.weight", 1)
        patch_size = round(math.sqrt(dim("s_embedder.proj.weight", 1) / max(in_channels, 1)))
        head_dim = dim("patch_blocks.0.attn.q_norm_x.weight", 0)
        pixel_attn = dim("pixel_blocks.0.compress_to_attn.weight", 0)
        pixel_head_dim = dim("pixel_blocks.0.attn.q_norm.weight", 0)
        lq_conv_in = dim("lq_proj.latent_proj.0.weight", 1)
        patch_depth = count("patch_blocks")
        outputs = count("lq_proj.output_heads")
        if outputs == 0:
            raise InvalidInputError(
                "tensor `lq_proj.output_heads.0.weight` is missing, so this is not a PiD student checkpoint",
                "missing_tensor",
            )
        # The smallest interval that yields this many heads (upstream: ceil(depth / interval)).
        interval = next((i for i in range(1, patch_depth + 1) if -(-patch_depth // i) == outputs), None)
        if interval is None:
            raise InvalidInputError(
                f"{outputs} LQ output heads cannot serve {patch_depth} patch blocks", "inconsistent_checkpoint"
            )
        gate_rows = dim("lq_proj.gate_modules.0.content_proj.weight", 0)
        per_token = gate_rows == 1
        pit_gate = "pit_lq_gate.content_proj.weight" in shapes
        if per_token != pit_gate:
            raise InvalidInputError(
                f"inconsistent v1.5 checkpoint signals: `lq_proj.gate_modules.0.content_proj.weight` has {gate_rows} "
                f"rows (v1.5 has 1) but `pit_lq_gate.content_proj.weight` is {'present' if pit_gate else 'absent'}",
                "inconsistent_checkpoint",
            )
        if hint is None:
            channels, down, unpatchify = lq_conv_in, 8, 1
        else:
            if hint.channels % lq_conv_in:
                raise InvalidInputError(
                    f"the latent space has {hint.channels} channels but `lq_proj.latent_proj.0.weight` expects "
                    f"{lq_conv_in} input channels; this checkpoint belongs to another latent space",
                    "latent_channels",
                )
            unpatchify = round(math.sqrt(hint.channels // lq_conv_in))
            if unpatchify * unpatchify * lq_conv_in != hint.channels:
                raise InvalidInputError(
                    f"latent channels {hint.channels} / adapter input channels {lq_conv_in} is not a perfect square",
                    "latent_channels",
                )
            channels, down = hint.channels, hint.spatial_down_factor
        rope_ref = 2048 if per_token else 1024
        cfg = cls(
            in_channels=in_channels,
            hidden_size=hidden,
            num_groups=hidden // max(head_dim, 1),
            pixel_hidden_size=dim("pixel_embedder.proj.weight", 0),
            pixel_attn_hidden_size=pixel_attn,
            pixel_num_groups=pixel_attn // max(pixel_head_dim, 1),
            patch_depth=patch_depth,
            pixel_depth=count("pixel_blocks"),
            patch_size=patch_size,
            txt_embed_dim=dim("y_embedder.proj.weight", 1),
            txt_max_length=dim("y_pos_embedding", 1),
            rope_ref_h=rope_ref,
            rope_ref_w=rope_ref,
            lq_latent_channels=channels,
            lq_hidden_dim=dim("lq_proj.latent_proj.0.weight", 0),
            # latent_proj: conv 0, SiLU 1, conv 2, then the ResBlocks from index 3.
            lq_num_res_blocks=count("lq_proj.latent_proj", 3),
            lq_interval=interval,
            lq_gate_type=GATE_PER_TOKEN if per_token else GATE_PER_DIM,
            lq_conv_padding_mode="replicate" if per_token else "zeros",
            lq_latent_unpatchify_factor=unpatchify,
            latent_spatial_down_factor=down,
            sr_scale=4,
            pit_lq_inject=per_token,
            lq_aux_rgb_head=any(k.startswith(IGNORED_PREFIXES[0]) for k in shapes),
        )
        cfg.validate()
        return cfg
