//! The PiD student network, `PidNet` (pid_spec §3-§4; upstream `pid/_src/networks/pid_net.py`
//! and `pixeldit_official.py` @2c8814c).
//!
//! Inputs: noisy pixels `x (B, 3, H, W)`, timestep `t (B,)` already x1000, caption
//! embeddings `y (B, 300, txt_dim)`, LQ latent `z (B, C, h, w)` and noise level `sigma (B,)`.
//! Output: the velocity `v = eps - x0`, `(B, 3, H, W)`.
//!
//! Architecture, in forward order:
//! 1. LQ adapter features (once per decode, [`PidNet::condition`]).
//! 2. Patch tokens, timestep and caption embeddings.
//! 3. 14 MMDiT patch blocks, each even one preceded by a sigma-aware LQ gate.
//! 4. Fusion S = SiLU(t_emb + s) (+ the v1.5 PiT gate).
//! 5. Pixel tokens with absolute sin-cos positions, 2 PiT blocks, final layer, fold.

mod attention;
mod embedders;
mod layers;
mod lq_proj;
mod patch_block;
mod pixel_block;
mod rope;

pub use attention::AttentionBudget;
pub(crate) use layers::Linear;
pub use lq_proj::LqFeatures;
pub(crate) use rope::linspace_f32;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::NetConfig;
use crate::kernels::cast_param;
use crate::plan::Tile;
use embedders::{CaptionEmbedder, PatchEmbedder, PixelEmbedder, TimestepEmbedder};
use lq_proj::{LqProj, SigmaGate};
use patch_block::PatchBlock;
use pixel_block::{fold, FinalLayer, PixelBlock};

/// cos/sin tables `(L, head_dim / 2)` of one rotary embedding.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl From<(Tensor, Tensor)> for Rope {
    fn from((cos, sin): (Tensor, Tensor)) -> Self {
        Self { cos, sin }
    }
}

/// The rotary tables of the joint attention: 2-D for image tokens, 1-D (optional) for text.
#[derive(Debug, Clone)]
pub struct JointRope {
    pub image: Rope,
    pub text: Option<Rope>,
}

/// Named intermediate tensors, recorded only when a caller asks (parity bisection).
/// Names follow the golden files: `t_embedder`, `gate_3`, `patch_block_5.0`, ...
#[derive(Default)]
pub struct Trace(Option<Vec<(String, Tensor)>>);

impl Trace {
    pub fn enabled() -> Self {
        Self(Some(Vec::new()))
    }

    pub fn disabled() -> Self {
        Self(None)
    }

    fn record(&mut self, name: impl FnOnce() -> String, t: &Tensor) {
        if let Some(v) = &mut self.0 {
            v.push((name(), t.clone()));
        }
    }

    pub fn into_entries(self) -> Vec<(String, Tensor)> {
        self.0.unwrap_or_default()
    }
}

/// Everything that stays fixed across the sampler steps of one decode (pid_spec §8.4).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Caption tokens after `y_embedder` and the learned position embedding, `(B, Nt, D)`.
    y: Tensor,
    lq: LqFeatures,
    /// Per-sample noise level of the latent, `(B,)` f32.
    sigma: Tensor,
    rope_patch: JointRope,
    rope_pixel: Rope,
    /// Absolute pixel positions, `(H, W, pixel_dim)`.
    pixel_pos: Tensor,
    size: (usize, usize),
}

impl Conditioning {
    pub fn size(&self) -> (usize, usize) {
        self.size
    }

    /// The absolute pixel positions `(H, W, pixel_dim)` of the conditioned pixels.
    pub fn pixel_positions(&self) -> &Tensor {
        &self.pixel_pos
    }

    /// The rotations of the image tokens in the patch blocks and in the PiT blocks.
    pub fn image_ropes(&self) -> (&Rope, &Rope) {
        (&self.rope_patch.image, &self.rope_pixel)
    }

    pub fn batch(&self) -> usize {
        self.sigma.dims()[0]
    }
}

pub struct PidNet {
    cfg: NetConfig,
    t_embedder: TimestepEmbedder,
    y_embedder: CaptionEmbedder,
    y_pos_embedding: Tensor,
    s_embedder: PatchEmbedder,
    pixel_embedder: PixelEmbedder,
    patch_blocks: Vec<PatchBlock>,
    pixel_blocks: Vec<PixelBlock>,
    final_layer: FinalLayer,
    lq_proj: LqProj,
    pit_lq_gate: Option<SigmaGate>,
    budget: AttentionBudget,
}

impl PidNet {
    /// Build from a VarBuilder over the bare (upstream) tensor names.
    ///
    /// Weights stay in `vb.dtype()`. Matmuls and convolutions take their operands rounded to
    /// `compute_dtype` and accumulate in f32, as the reference's bf16 autocast does (pid_spec
    /// §8.2), but keep their product in f32; attention runs on q, k, v in it with f32 scores
    /// and softmax, as flash attention does. Everything else is f32: norms, residual streams,
    /// gates, the timestep's sinusoids, positions, the elementwise work between matmuls.
    pub fn new(cfg: &NetConfig, vb: VarBuilder, compute_dtype: DType) -> Result<Self> {
        let (d, cd) = (cfg.hidden_size, compute_dtype);
        let gate_out = match cfg.lq_gate_type {
            crate::config::GateType::SigmaAwarePerTokenPerDim => d,
            crate::config::GateType::SigmaAwarePerToken => 1,
        };
        Ok(Self {
            t_embedder: TimestepEmbedder::new(vb.pp("t_embedder"), d, cd)?,
            y_embedder: CaptionEmbedder::new(vb.pp("y_embedder"), cfg.txt_embed_dim, d, cd)?,
            y_pos_embedding: vb.get((1, cfg.txt_max_length, d), "y_pos_embedding")?,
            s_embedder: PatchEmbedder::new(
                vb.pp("s_embedder"),
                cfg.in_channels,
                cfg.patch_size,
                d,
                cd,
            )?,
            pixel_embedder: PixelEmbedder::new(
                vb.pp("pixel_embedder"),
                cfg.in_channels,
                cfg.pixel_hidden_size,
                cd,
            )?,
            patch_blocks: (0..cfg.patch_depth)
                .map(|i| {
                    PatchBlock::new(
                        vb.pp(format!("patch_blocks.{i}")),
                        d,
                        cfg.num_groups,
                        cfg.ffn_hidden(),
                        cd,
                    )
                })
                .collect::<Result<_>>()?,
            pixel_blocks: (0..cfg.pixel_depth)
                .map(|j| {
                    PixelBlock::new(
                        vb.pp(format!("pixel_blocks.{j}")),
                        cfg.pixel_hidden_size,
                        d,
                        cfg.patch_size,
                        cfg.pixel_attn_hidden_size,
                        cfg.pixel_num_groups,
                        cd,
                    )
                })
                .collect::<Result<_>>()?,
            final_layer: FinalLayer::new(
                vb.pp("final_layer"),
                cfg.pixel_hidden_size,
                cfg.in_channels,
                cd,
            )?,
            lq_proj: LqProj::new(vb.pp("lq_proj"), cfg, cd)?,
            pit_lq_gate: if cfg.pit_lq_inject {
                Some(SigmaGate::new(vb.pp("pit_lq_gate"), d, gate_out, cd)?)
            } else {
                None
            },
            budget: AttentionBudget::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Compute what is constant across sampler steps for an `(h, w)` output.
    ///
    /// `y (B, Nt, txt_dim)`, `z (B, C, zh, zw)`, `sigma (B,)`.
    pub fn condition(
        &self,
        y: &Tensor,
        z: &Tensor,
        sigma: &Tensor,
        size: (usize, usize),
        trace: &mut Trace,
    ) -> Result<Conditioning> {
        self.condition_window(y, z, sigma, size, &Tile::whole(size.0, size.1), trace)
    }

    /// [`PidNet::condition`] for the tile `window` of an `(h, w)` output: pixel positions and
    /// RoPE are the whole image's for the tile's pixels, the LQ features come from the tile's
    /// latent with a halo (see [`LqProj::window_features`]).
    pub fn condition_window(
        &self,
        y: &Tensor,
        z: &Tensor,
        sigma: &Tensor,
        (h, w): (usize, usize),
        window: &Tile,
        trace: &mut Trace,
    ) -> Result<Conditioning> {
        let cfg = &self.cfg;
        let p = cfg.patch_size;
        let on_grid = |v: usize| v.is_multiple_of(p);
        let inside = window.y + window.h <= h && window.x + window.w <= w;
        let aligned = [h, w, window.y, window.x, window.h, window.w]
            .into_iter()
            .all(on_grid);
        if h == 0 || w == 0 || window.h == 0 || window.w == 0 || !inside || !aligned {
            candle_core::bail!(
                "output size {h}x{w} must be a positive multiple of the patch size {p}, and the window {window:?} a block of patches inside it"
            )
        }
        let dev = y.device();
        let nt = y.dim(1)?.min(cfg.txt_max_length);
        let y_emb = self.y_embedder.forward(&y.narrow(1, 0, nt)?)?;
        trace.record(|| "y_embedder".into(), &y_emb);
        let y_pos = self.y_pos_embedding.narrow(1, 0, nt)?;
        let y = y_emb.broadcast_add(&cast_param(&y_pos, DType::F32)?)?;
        let lq = self
            .lq_proj
            .window_features(z, (h, w), window, cfg.pixels_per_latent(), p)?;
        for (j, f) in lq.heads.iter().enumerate() {
            trace.record(|| format!("lq_head_{j}"), f);
        }
        let grid = (h / p, w / p);
        let (rows, cols) = (
            window.y / p..(window.y + window.h) / p,
            window.x / p..(window.x + window.w) / p,
        );
        let ref_grid = (cfg.rope_ref_h / p, cfg.rope_ref_w / p);
        let image_rope = |head_dim: usize| -> Result<Rope> {
            let tables = rope::image_rope(
                head_dim,
                grid,
                rows.clone(),
                cols.clone(),
                ref_grid,
                cfg.rope_mode,
                dev,
            )?;
            Ok(tables.into())
        };
        Ok(Conditioning {
            y,
            lq,
            sigma: sigma.to_dtype(DType::F32)?,
            rope_patch: JointRope {
                image: image_rope(cfg.head_dim())?,
                text: if cfg.use_text_rope {
                    Some(rope::text_rope(cfg.head_dim(), nt, cfg.text_rope_theta, dev)?.into())
                } else {
                    None
                },
            },
            rope_pixel: image_rope(cfg.pixel_head_dim())?,
            pixel_pos: self.pixel_embedder.position_table(
                window.y..window.y + window.h,
                window.x..window.x + window.w,
                dev,
            )?,
            size: (window.h, window.w),
        })
    }

    /// The velocity for noisy pixels `x (B, 3, H, W)` at timesteps `t (B,)` (x1000).
    pub fn velocity(
        &self,
        cond: &Conditioning,
        x: &Tensor,
        t: &Tensor,
        trace: &mut Trace,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        if (h, w) != cond.size || b != cond.batch() {
            candle_core::bail!(
                "x has shape {:?} but the conditioning was prepared for batch {} at {:?}",
                x.dims(),
                cond.batch(),
                cond.size
            )
        }
        let x = x.to_dtype(DType::F32)?;
        let t_emb = self.t_embedder.forward(t)?; // (B, D)
        trace.record(|| "t_embedder".into(), &t_emb);
        let c = t_emb.silu()?;

        let mut s = self.s_embedder.forward(&x)?; // (B, L, D)
        trace.record(|| "s_embedder".into(), &s);
        let mut y = cond.y.clone();
        let last = self.patch_blocks.len().saturating_sub(1);
        for (i, block) in self.patch_blocks.iter().enumerate() {
            if let Some(j) = self.lq_proj.gate_for_block(i) {
                s = self.lq_proj.gate(j, &s, &cond.lq.heads[j], &cond.sigma)?;
                trace.record(|| format!("gate_{j}"), &s);
            }
            let (s_next, y_next) =
                block.forward(&s, &y, &c, &cond.rope_patch, i != last, self.budget)?;
            s = s_next;
            trace.record(|| format!("patch_block_{i}.0"), &s);
            if let Some(y_next) = y_next {
                y = y_next;
                trace.record(|| format!("patch_block_{i}.1"), &y);
            }
        }

        // Fusion: the per-patch condition of the pixel pathway.
        let mut s = s.broadcast_add(&t_emb.unsqueeze(1)?)?.silu()?;
        if let (Some(gate), Some(f)) = (&self.pit_lq_gate, &cond.lq.pit) {
            s = gate.forward(&s, f, &cond.sigma)?;
            trace.record(|| "pit_gate".into(), &s);
        }
        let d = s.dim(2)?;
        let s = s.reshape((b * s.dim(1)?, d))?;

        let mut px = self
            .pixel_embedder
            .forward(&x, &cond.pixel_pos, self.cfg.patch_size)?;
        trace.record(|| "pixel_embedder".into(), &px);
        for (j, block) in self.pixel_blocks.iter().enumerate() {
            px = block.forward(&px, &s, b, &cond.rope_pixel, self.budget)?;
            trace.record(|| format!("pixel_block_{j}"), &px);
        }
        let out = self.final_layer.forward(&px)?;
        trace.record(|| "final_layer".into(), &out);
        // The sampler update runs in f32 whatever the compute dtype.
        fold(&out, b, h, w, self.cfg.patch_size)?.to_dtype(DType::F32)
    }

    /// One forward pass: [`PidNet::condition`] then [`PidNet::velocity`].
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: &Tensor,
        z: &Tensor,
        sigma: &Tensor,
        trace: &mut Trace,
    ) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let cond = self.condition(y, z, sigma, (h, w), trace)?;
        self.velocity(&cond, x, t, trace)
    }

    pub fn device(&self) -> &Device {
        self.y_pos_embedding.device()
    }
}
