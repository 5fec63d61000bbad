"""Network configuration of a PiD student (mirrors ``rust/pid-core/src/config.rs``).

Field names are the upstream ``PidNet`` constructor arguments (nv-tlabs/PiD @2c8814c,
``pid/_src/configs/common/defaults/net.py:30-74``), so a golden file's ``config`` metadata
loads directly. Validation, presets, detection from a checkpoint's tensors and the tensor
layout a config implies all come from the Rust core (``_native``), the one source of truth
for both backends; this module only holds the parsed values and derived sizes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ... import _native

GATE_PER_DIM = "sigma_aware_per_token_per_dim"


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
    def preset(cls, name: str) -> NetConfig:
        """A named preset of the core (``sdxl-2kto4k``, ``sdxl-mini``)."""
        return cls.from_json(_native.preset_config(name))

    @classmethod
    def from_json(cls, text: str) -> NetConfig:
        """Parse upstream-named JSON, validated and completed by the core.

        Raises:
            InvalidInputError: bad JSON, missing fields, or an unsupported network.
        """
        return cls(**json.loads(_native.normalize_config(text)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

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

    def expected_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor the network reads, in upstream names, from the Rust core's layout."""
        return [(name, tuple(shape)) for name, shape in _native.checkpoint_layout(self.to_json())]
