"""The PiD student network, ``PidNet`` (pid_spec §3-§4; mirrors ``rust/pid-core/src/net/mod.rs``).

Upstream ``pid/_src/networks/pid_net.py`` and ``pixeldit_official.py`` @2c8814c.

Inputs: noisy pixels ``x (B, 3, H, W)``, timestep ``t (B,)`` already x1000, caption
embeddings ``y (B, 300, txt_dim)``, LQ latent ``z (B, C, h, w)`` and noise level
``sigma (B,)``. Output: the velocity ``v = eps - x0``, ``(B, 3, H, W)``.

Architecture, in forward order:

1. LQ adapter features (once per decode, :meth:`PidNet.condition`).
2. Patch tokens, timestep and caption embeddings.
3. The MMDiT patch blocks, each even one preceded by a sigma-aware LQ gate.
4. Fusion S = SiLU(t_emb + s) (+ the v1.5 PiT gate).
5. Pixel tokens with absolute sin-cos positions, the PiT blocks, final layer, fold.

Attribute names are the checkpoint's keys, so weights load without a rename table. The
network evaluates after every block: MLX is lazy, and one graph per block keeps memory
bounded and each Metal command buffer short.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ....errors import InvalidInputError
from ..config import GATE_PER_DIM, NetConfig
from .attention import AttentionBudget, Rope
from .embedders import CaptionEmbedder, PatchEmbedder, PixelEmbedder, TimestepEmbedder
from .layers import set_matmul_dtype
from .lq_proj import LqFeatures, LqProj, SigmaGate
from .patch_block import PatchBlock
from .pixel_block import FinalLayer, PixelBlock, fold
from .rope import image_rope, text_rope


class Trace:
    """Named intermediate tensors, recorded only when enabled (parity bisection).

    Names follow the golden files: ``t_embedder``, ``gate_3``, ``patch_block_5.0``, ...
    """

    def __init__(self, enabled: bool = False) -> None:
        self.entries: dict[str, mx.array] | None = {} if enabled else None

    def record(self, name: str, value: mx.array) -> None:
        if self.entries is not None:
            self.entries[name] = value


@dataclass
class Conditioning:
    """Everything that stays fixed across the sampler steps of one decode (pid_spec §8.4)."""

    y: mx.array  # caption tokens after y_embedder + learned positions, (B, Nt, D)
    lq: LqFeatures
    sigma: mx.array  # (B,) f32
    rope_patch: Rope
    rope_pixel: Rope
    rope_text: Rope | None
    pixel_pos: mx.array  # (H, W, pixel_dim)
    size: tuple[int, int]

    @property
    def batch(self) -> int:
        return self.sigma.shape[0]

    def arrays(self) -> list[mx.array]:
        tables = [*self.rope_patch, *self.rope_pixel, *(self.rope_text or ())]
        pit = [self.lq.pit] if self.lq.pit is not None else []
        return [self.y, self.sigma, self.pixel_pos, *self.lq.heads, *pit, *tables]


class PidNet(nn.Module):
    """The PiD network; weights are loaded by :func:`..weights.load_pidnet`."""

    def __init__(self, cfg: NetConfig, matmul_dtype: mx.Dtype | None = None) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = CaptionEmbedder(cfg.txt_embed_dim, d)
        self.y_pos_embedding = mx.zeros((1, cfg.txt_max_length, d))
        self.s_embedder = PatchEmbedder(cfg.in_channels, cfg.patch_size, d)
        self.pixel_embedder = PixelEmbedder(cfg.in_channels, cfg.pixel_hidden_size)
        self.patch_blocks = [PatchBlock(d, cfg.num_groups, cfg.ffn_hidden) for _ in range(cfg.patch_depth)]
        self.pixel_blocks = [
            PixelBlock(
                cfg.pixel_hidden_size, d, cfg.patch_size, cfg.pixel_attn_hidden_size, cfg.pixel_num_groups
            )
            for _ in range(cfg.pixel_depth)
        ]
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels)
        self.lq_proj = LqProj(cfg)
        if cfg.pit_lq_inject:
            self.pit_lq_gate = SigmaGate(d, d if cfg.lq_gate_type == GATE_PER_DIM else 1)
        set_matmul_dtype(self, matmul_dtype)
        self._cfg = cfg
        self._budget = AttentionBudget()

    @property
    def config(self) -> NetConfig:
        return self._cfg

    def condition(
        self, y: mx.array, z: mx.array, sigma: mx.array, size: tuple[int, int], trace: Trace | None = None
    ) -> Conditioning:
        """Compute what is constant across sampler steps for an ``(h, w)`` output.

        ``y (B, Nt, txt_dim)``, ``z (B, C, zh, zw)``, ``sigma (B,)``.
        """
        return self.condition_window(y, z, sigma, size, (0, 0, *size), trace)

    def condition_window(
        self,
        y: mx.array,
        z: mx.array,
        sigma: mx.array,
        size: tuple[int, int],
        window: tuple[int, int, int, int],
        trace: Trace | None = None,
    ) -> Conditioning:
        """:meth:`condition` for the tile ``window = (y, x, h, w)`` of an output of ``size``:
        pixel positions and RoPE are the whole image's for the tile's pixels, the LQ features come
        from the tile's latent with a halo (see :meth:`LqProj.window_features`)."""
        trace = trace or Trace()
        cfg = self._cfg
        p = cfg.patch_size
        h, w = size
        ty, tx, th, tw = window
        inside = ty + th <= h and tx + tw <= w
        if 0 in (h, w, th, tw) or not inside or any(v % p for v in (h, w, *window)):
            raise InvalidInputError(
                f"output size {h}x{w} must be a positive multiple of the patch size {p}, and the window "
                f"{window} a block of patches inside it",
                "size",
            )
        nt = min(y.shape[1], cfg.txt_max_length)
        y_emb = self.y_embedder(y[:, :nt].astype(mx.float32))
        trace.record("y_embedder", y_emb)
        lq = self.lq_proj.window_features(z.astype(mx.float32), size, window, cfg.pixels_per_latent, p)
        for j, f in enumerate(lq.heads):
            trace.record(f"lq_head_{j}", f)
        grid = (h // p, w // p)
        rows, cols = range(ty // p, (ty + th) // p), range(tx // p, (tx + tw) // p)
        ref_grid = (cfg.rope_ref_h // p, cfg.rope_ref_w // p)
        cond = Conditioning(
            y=y_emb + self.y_pos_embedding[:, :nt].astype(mx.float32),
            lq=lq,
            sigma=sigma.astype(mx.float32),
            rope_patch=image_rope(cfg.head_dim, grid, rows, cols, ref_grid, cfg.rope_mode),
            rope_pixel=image_rope(cfg.pixel_head_dim, grid, rows, cols, ref_grid, cfg.rope_mode),
            rope_text=text_rope(cfg.head_dim, nt, cfg.text_rope_theta) if cfg.use_text_rope else None,
            pixel_pos=self.pixel_embedder.position_table(range(ty, ty + th), range(tx, tx + tw)),
            size=(th, tw),
        )
        mx.eval(cond.arrays())
        return cond

    def velocity(self, cond: Conditioning, x: mx.array, t: mx.array, trace: Trace | None = None) -> mx.array:
        """The velocity (f32) for noisy pixels ``x (B, 3, H, W)`` at timesteps ``t (B,)`` (x1000)."""
        trace = trace or Trace()
        b, _, h, w = x.shape
        if (h, w) != cond.size or b != cond.batch:
            raise InvalidInputError(
                f"x has shape {list(x.shape)} but the conditioning was prepared for batch {cond.batch} "
                f"at {cond.size}",
                "x_shape",
            )
        x = x.astype(mx.float32)
        t_emb = self.t_embedder(t)  # (B, D)
        trace.record("t_embedder", t_emb)
        c = nn.silu(t_emb)

        s = self.s_embedder(x)  # (B, L, D)
        trace.record("s_embedder", s)
        y = cond.y
        last = len(self.patch_blocks) - 1
        for i, block in enumerate(self.patch_blocks):
            j = self.lq_proj.gate_for_block(i)
            if j is not None:
                s = self.lq_proj.gate_modules[j](s, cond.lq.heads[j], cond.sigma)
                trace.record(f"gate_{j}", s)
            s, y_next = block(s, y, c, cond.rope_patch, cond.rope_text, i != last, self._budget)
            trace.record(f"patch_block_{i}.0", s)
            if y_next is not None:
                y = y_next
                trace.record(f"patch_block_{i}.1", y)
            mx.eval(s, y)

        # Fusion: the per-patch condition of the pixel pathway.
        s = nn.silu(s + t_emb[:, None])
        if "pit_lq_gate" in self:
            s = self.pit_lq_gate(s, cond.lq.pit, cond.sigma)
            trace.record("pit_gate", s)
        s = s.reshape(-1, s.shape[2])

        px = self.pixel_embedder(x, cond.pixel_pos, self._cfg.patch_size)
        trace.record("pixel_embedder", px)
        for j, block in enumerate(self.pixel_blocks):
            px = block(px, s, b, cond.rope_pixel, self._budget)
            trace.record(f"pixel_block_{j}", px)
            mx.eval(px)
        out = self.final_layer(px)
        trace.record("final_layer", out)
        return fold(out, b, h, w, self._cfg.patch_size)

    def __call__(
        self, x: mx.array, t: mx.array, y: mx.array, z: mx.array, sigma: mx.array, trace: Trace | None = None
    ) -> mx.array:
        """One forward pass: :meth:`condition` then :meth:`velocity`."""
        _, _, h, w = x.shape
        cond = self.condition(y, z, sigma, (h, w), trace)
        return self.velocity(cond, x, t, trace)
