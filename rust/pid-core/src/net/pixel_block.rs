//! PiT pixel block, `pixel_blocks.{j}` (pid_spec §3.6; upstream `PiTBlock`,
//! `pixeldit_official.py:445-542`), and the final layer that folds pixels back.
//!
//! Pixel tokens `x (B*L, P*P, 16)` are modulated per pixel from the patch condition
//! `s (B*L, D)`, compressed to one `1152`-wide token per patch for global attention,
//! and expanded back. Everything but the attention is local to a patch, so it runs
//! in token chunks: the full per-pixel modulation would be 3.2 GB at 4096².

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{attention, merge_heads, stream, AttentionBudget};
use super::layers::{gated_add, map_row_chunks, Linear, RmsNorm};
use super::Rope;
use crate::kernels::{self, PixelMlp};

/// Patches processed at once in the token-local passes.
const PATCH_ROWS: usize = 1024;

/// `nn.Linear(16, 64) -> GELU (exact erf) -> nn.Linear(64, 16)`.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    /// The same weights for the fused CPU kernel.
    fused: PixelMlp,
}

impl Mlp {
    fn new(vb: VarBuilder, dim: usize, hidden: usize, dtype: DType) -> Result<Self> {
        let fc1 = Linear::new(vb.pp("fc1"), dim, hidden, true, dtype)?;
        let fc2 = Linear::new(vb.pp("fc2"), hidden, dim, true, dtype)?;
        let fused = PixelMlp::new(fc1.weight(), fc1.bias(), fc2.weight(), fc2.bias())?;
        Ok(Self { fc1, fc2, fused })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::use_cpu_kernel(x) && self.fc1.dtype() == DType::F32 {
            return self.fused.forward(x);
        }
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

/// Global attention over patch tokens (`RotaryAttention`): qkv, per-head q/k RMSNorm, 2-D RoPE, proj.
#[derive(Debug, Clone)]
struct PixelAttention {
    qkv: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    proj: Linear,
    heads: usize,
}

impl PixelAttention {
    fn forward(&self, x: &Tensor, rope: &Rope, budget: AttentionBudget) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let streams = [stream(&qkv, &self.q_norm, &self.k_norm, Some(rope))];
        let out = attention(&streams, self.heads, 0, self.qkv.dtype(), budget)?;
        self.proj.forward(&merge_heads(&out)?)
    }
}

#[derive(Debug, Clone)]
pub struct PixelBlock {
    compress_to_attn: Linear,
    expand_from_attn: Linear,
    norm1: RmsNorm,
    norm2: RmsNorm,
    attn: PixelAttention,
    mlp: Mlp,
    /// `adaLN_modulation.0` split at load into its six per-pixel modulations
    /// (shift_msa .. gate_mlp), each producing `(n, P*P * dim)` laid out `[p][ch]`.
    modulation: Vec<Linear>,
    p2: usize,
    dim: usize,
}

impl PixelBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        cond_dim: usize,
        patch: usize,
        attn_dim: usize,
        heads: usize,
        dtype: DType,
    ) -> Result<Self> {
        let p2 = patch * patch;
        let head_dim = attn_dim / heads;
        let ada = Linear::new(
            vb.pp("adaLN_modulation.0"),
            cond_dim,
            6 * dim * p2,
            true,
            dtype,
        )?;
        // Upstream views the output as (n, P*P, 6*dim) and chunks the last axis, so row
        // p*6*dim + k*dim + ch feeds modulation k at pixel p, channel ch (pid_spec §8.3).
        let modulation = (0..6)
            .map(|k| {
                let rows: Vec<u32> = (0..p2)
                    .flat_map(|p| (0..dim).map(move |ch| (p * 6 * dim + k * dim + ch) as u32))
                    .collect();
                let idx = Tensor::new(rows.as_slice(), ada.weight().device())?;
                let w = ada.weight().index_select(&idx, 0)?;
                let b = ada.bias().map(|b| b.index_select(&idx, 0)).transpose()?;
                Ok(Linear::from_parts(w, b, dtype))
            })
            .collect::<Result<Vec<_>>>()?;
        let attn = vb.pp("attn");
        let linear =
            |vb: VarBuilder, i: usize, o: usize, bias: bool| Linear::new(vb, i, o, bias, dtype);
        Ok(Self {
            compress_to_attn: linear(vb.pp("compress_to_attn"), p2 * dim, attn_dim, true)?,
            expand_from_attn: linear(vb.pp("expand_from_attn"), attn_dim, p2 * dim, true)?,
            norm1: RmsNorm::new(vb.pp("norm1"), dim)?,
            norm2: RmsNorm::new(vb.pp("norm2"), dim)?,
            attn: PixelAttention {
                qkv: linear(attn.pp("qkv"), attn_dim, 3 * attn_dim, false)?,
                q_norm: RmsNorm::new(attn.pp("q_norm"), head_dim)?,
                k_norm: RmsNorm::new(attn.pp("k_norm"), head_dim)?,
                proj: linear(attn.pp("proj"), attn_dim, attn_dim, true)?,
                heads,
            },
            mlp: Mlp::new(vb.pp("mlp"), dim, 4 * dim, dtype)?,
            modulation,
            p2,
            dim,
        })
    }

    /// Modulation `k` for the patches `s (n, D)`: `(n, P*P, dim)`.
    fn modulation(&self, k: usize, s: &Tensor) -> Result<Tensor> {
        self.modulation[k]
            .forward(s)?
            .reshape((s.dim(0)?, self.p2, self.dim))
    }

    /// `x (B*L, P*P, dim)`, `s (B*L, D)`; `batch` = B.
    pub fn forward(
        &self,
        x: &Tensor,
        s: &Tensor,
        batch: usize,
        rope: &Rope,
        budget: AttentionBudget,
    ) -> Result<Tensor> {
        let bl = x.dim(0)?;
        // Pass 1 (token-local): modulate, flatten [p][ch], compress to one token per patch.
        let compressed = map_row_chunks(x, PATCH_ROWS, |xc, start| {
            let sc = s.narrow(0, start, xc.dim(0)?)?;
            let xn = self.norm1.forward_modulated(
                xc,
                &self.modulation(0, &sc)?,
                &self.modulation(1, &sc)?,
            )?;
            self.compress_to_attn
                .forward(&xn.reshape((xc.dim(0)?, self.p2 * self.dim))?)
        })?;
        let attn_dim = compressed.dim(1)?;
        let attn = self
            .attn
            .forward(
                &compressed.reshape((batch, bl / batch, attn_dim))?,
                rope,
                budget,
            )?
            .reshape((bl, attn_dim))?;
        // Pass 2 (token-local): expand, gated residual, then the per-pixel MLP half.
        map_row_chunks(x, PATCH_ROWS, |xc, start| {
            let n = xc.dim(0)?;
            let sc = s.narrow(0, start, n)?;
            let expanded = self
                .expand_from_attn
                .forward(&attn.narrow(0, start, n)?)?
                .reshape((n, self.p2, self.dim))?;
            let xc = gated_add(xc, &self.modulation(2, &sc)?, &expanded)?;
            let h = self.norm2.forward_modulated(
                &xc,
                &self.modulation(3, &sc)?,
                &self.modulation(4, &sc)?,
            )?;
            gated_add(&xc, &self.modulation(5, &sc)?, &self.mlp.forward(&h)?)
        })
    }
}

/// `final_layer`: RMSNorm(16) -> Linear(16 -> 3) per pixel.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    norm: RmsNorm,
    linear: Linear,
}

impl FinalLayer {
    pub fn new(vb: VarBuilder, dim: usize, out_channels: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(vb.pp("norm"), dim)?,
            linear: Linear::new(vb.pp("linear"), dim, out_channels, true, dtype)?,
        })
    }
}

impl Module for FinalLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(&self.norm.forward(x)?)
    }
}

/// Fold `(B*L, P*P, C)` pixel outputs back to an image `(B, C, H, W)`:
/// out[b, c, hs*P + ky, ws*P + kx] = o[b*L + hs*Ws + ws, ky*P + kx, c].
pub fn fold(o: &Tensor, batch: usize, h: usize, w: usize, patch: usize) -> Result<Tensor> {
    let c = o.dim(2)?;
    o.reshape((batch, h / patch, w / patch, patch, patch, c))?
        .permute((0, 5, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((batch, c, h, w))
}
