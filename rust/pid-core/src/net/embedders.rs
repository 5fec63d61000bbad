//! Input embedders (pid_spec §3.2): timestep, caption, patch tokens and pixel tokens.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Linear, RmsNorm};
use super::rope::pixel_sincos;

/// `t_embedder`: sinusoidal features of t (max_period 10, cos first) -> Linear -> SiLU -> Linear.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    mlp_0: Linear,
    mlp_2: Linear,
}

impl TimestepEmbedder {
    pub const FREQ_DIM: usize = 256;

    pub fn new(vb: VarBuilder, hidden: usize, dtype: DType) -> Result<Self> {
        let vb = vb.pp("mlp");
        Ok(Self {
            mlp_0: Linear::new(vb.pp("0"), Self::FREQ_DIM, hidden, true, dtype)?,
            mlp_2: Linear::new(vb.pp("2"), hidden, hidden, true, dtype)?,
        })
    }

    /// `t`: `(B,)` timesteps already scaled by 1000; returns `(B, hidden)`.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let half = Self::FREQ_DIM / 2;
        // Same f32 steps as the reference: exp(-ln(10) * i / half).
        let ln10 = -(10f64.ln() as f32);
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((ln10 * i as f32) / half as f32).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let args = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
        self.mlp_2.forward(&self.mlp_0.forward(&emb)?.silu()?)
    }
}

/// `y_embedder`: Linear(txt_embed_dim -> hidden) then RMSNorm.
#[derive(Debug, Clone)]
pub struct CaptionEmbedder {
    proj: Linear,
    norm: RmsNorm,
}

impl CaptionEmbedder {
    pub fn new(vb: VarBuilder, txt_dim: usize, hidden: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(vb.pp("proj"), txt_dim, hidden, true, dtype)?,
            norm: RmsNorm::new(vb.pp("norm"), hidden)?,
        })
    }

    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.proj.forward(y)?)
    }
}

/// `s_embedder`: unfold 16x16 patches (index c*256 + ky*16 + kx) and project to hidden.
#[derive(Debug, Clone)]
pub struct PatchEmbedder {
    proj: Linear,
    patch: usize,
}

impl PatchEmbedder {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        patch: usize,
        hidden: usize,
        dtype: DType,
    ) -> Result<Self> {
        let proj = Linear::new(
            vb.pp("proj"),
            in_channels * patch * patch,
            hidden,
            true,
            dtype,
        )?;
        Ok(Self { proj, patch })
    }

    /// `x (B, C, H, W)` -> `(B, L, hidden)`, tokens row-major over the patch grid.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (hs, ws) = (h / p, w / p);
        let patches = x
            .reshape((b, c, hs, p, ws, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, hs * ws, c * p * p))?;
        self.proj.forward(&patches)
    }
}

/// `pixel_embedder`: per-pixel Linear(3 -> 16) plus the absolute sin-cos position table.
#[derive(Debug, Clone)]
pub struct PixelEmbedder {
    proj: Linear,
    dim: usize,
}

impl PixelEmbedder {
    pub fn new(vb: VarBuilder, in_channels: usize, dim: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(vb.pp("proj"), in_channels, dim, true, dtype)?,
            dim,
        })
    }

    /// The position table of the pixels `rows x cols`, `(rows, cols, dim)`; cache it across steps.
    pub fn position_table(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        pixel_sincos(self.dim, rows, cols, device)
    }

    /// `x (B, C, H, W)` -> pixel tokens `(B * L, P*P, dim)` grouped by patch (index ky*P + kx).
    pub fn forward(&self, x: &Tensor, pos: &Tensor, patch: usize) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let (hs, ws) = (h / patch, w / patch);
        let tokens = self.proj.forward(&x.permute((0, 2, 3, 1))?.contiguous()?)?; // (B, H, W, dim)
        tokens
            .broadcast_add(&pos.unsqueeze(0)?)?
            .reshape((b, hs, patch, ws, patch, self.dim))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b * hs * ws, patch * patch, self.dim))
    }
}
