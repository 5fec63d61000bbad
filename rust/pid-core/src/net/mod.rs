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
#[cfg(feature = "cuda")]
pub(crate) use attention::{attention_dims, sdpa_chunked};
pub(crate) use layers::Linear;
pub use lq_proj::LqFeatures;
pub(crate) use rope::linspace_f32;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::NetConfig;
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
    compute_dtype: DType,
}

impl PidNet {
    /// Build from a VarBuilder over the bare (upstream) tensor names.
    ///
    /// Weights stay in `vb.dtype()`; activations are computed in `compute_dtype`.
    pub fn new(cfg: &NetConfig, vb: VarBuilder, compute_dtype: DType) -> Result<Self> {
        let d = cfg.hidden_size;
        let gate_out = match cfg.lq_gate_type {
            crate::config::GateType::SigmaAwarePerTokenPerDim => d,
            crate::config::GateType::SigmaAwarePerToken => 1,
        };
        Ok(Self {
            t_embedder: TimestepEmbedder::new(vb.pp("t_embedder"), d)?,
            y_embedder: CaptionEmbedder::new(vb.pp("y_embedder"), cfg.txt_embed_dim, d)?,
            y_pos_embedding: vb.get((1, cfg.txt_max_length, d), "y_pos_embedding")?,
            s_embedder: PatchEmbedder::new(
                vb.pp("s_embedder"),
                cfg.in_channels,
                cfg.patch_size,
                d,
            )?,
            pixel_embedder: PixelEmbedder::new(
                vb.pp("pixel_embedder"),
                cfg.in_channels,
                cfg.pixel_hidden_size,
            )?,
            patch_blocks: (0..cfg.patch_depth)
                .map(|i| {
                    PatchBlock::new(
                        vb.pp(format!("patch_blocks.{i}")),
                        d,
                        cfg.num_groups,
                        cfg.ffn_hidden(),
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
                    )
                })
                .collect::<Result<_>>()?,
            final_layer: FinalLayer::new(
                vb.pp("final_layer"),
                cfg.pixel_hidden_size,
                cfg.in_channels,
            )?,
            lq_proj: LqProj::new(vb.pp("lq_proj"), cfg)?,
            pit_lq_gate: if cfg.pit_lq_inject {
                Some(SigmaGate::new(vb.pp("pit_lq_gate"), d, gate_out)?)
            } else {
                None
            },
            budget: AttentionBudget::default(),
            compute_dtype,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn with_attention_budget(mut self, budget: AttentionBudget) -> Self {
        self.budget = budget;
        self
    }

    fn grid(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let p = self.cfg.patch_size;
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!(
                "output size {h}x{w} must be a positive multiple of the patch size {p}"
            )
        }
        Ok((h / p, w / p))
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
        let (h, w) = size;
        let (hs, ws) = self.grid(h, w)?;
        let dev = y.device();
        let cd = self.compute_dtype;
        let nt = y.dim(1)?.min(self.cfg.txt_max_length);
        let y_emb = self
            .y_embedder
            .forward(&y.narrow(1, 0, nt)?.to_dtype(cd)?)?;
        trace.record(|| "y_embedder".into(), &y_emb);
        let y = y_emb.broadcast_add(&self.y_pos_embedding.narrow(1, 0, nt)?.to_dtype(cd)?)?;
        let lq = self.lq_proj.features(&z.to_dtype(cd)?, hs, ws)?;
        for (j, f) in lq.heads.iter().enumerate() {
            trace.record(|| format!("lq_head_{j}"), f);
        }
        let cfg = &self.cfg;
        let ref_grid = (
            cfg.rope_ref_h / cfg.patch_size,
            cfg.rope_ref_w / cfg.patch_size,
        );
        Ok(Conditioning {
            y,
            lq,
            sigma: sigma.to_dtype(DType::F32)?,
            rope_patch: JointRope {
                image: rope::image_rope(cfg.head_dim(), hs, ws, ref_grid, cfg.rope_mode, dev)?
                    .into(),
                text: if cfg.use_text_rope {
                    Some(rope::text_rope(cfg.head_dim(), nt, cfg.text_rope_theta, dev)?.into())
                } else {
                    None
                },
            },
            rope_pixel: rope::image_rope(
                cfg.pixel_head_dim(),
                hs,
                ws,
                ref_grid,
                cfg.rope_mode,
                dev,
            )?
            .into(),
            pixel_pos: self.pixel_embedder.position_table(h, w, dev)?,
            size,
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
        let x = x.to_dtype(self.compute_dtype)?;
        let t_emb = self.t_embedder.forward(t)?.to_dtype(self.compute_dtype)?; // (B, D)
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
