//! PiT pixel block, `pixel_blocks.{j}` (pid_spec §3.6; upstream `PiTBlock`,
//! `pixeldit_official.py:445-542`), and the final layer that folds pixels back.
//!
//! Pixel tokens `x (B*L, P*P, 16)` are modulated per pixel from the patch condition
//! `s (B*L, D)`, compressed to one `1152`-wide token per patch for global attention,
//! and expanded back. Everything but the attention is local to a patch, so it runs
//! in token chunks: the full per-pixel modulation would be 3.2 GB at 4096².

use std::f32::consts::FRAC_1_SQRT_2;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::attention::{merge_heads, qkv_heads, sdpa, AttentionBudget, QkvStream};
use super::layers::{gated_add, map_row_chunks, Linear, RmsNorm};
use super::Rope;
use crate::kernels::cpu::{cpu_slice, exp_f32, f32_vec};
use crate::kernels::use_cpu_kernel;

/// Patches processed at once in the token-local passes.
const PATCH_ROWS: usize = 1024;

/// `nn.Linear(16, 64) -> GELU (exact erf) -> nn.Linear(64, 16)`.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    /// The same weights for the fused CPU kernel, widened and transposed once at load.
    fused: PixelMlp,
}

impl Mlp {
    fn new(fc1: Linear, fc2: Linear) -> Result<Self> {
        let bias = |l: &Linear| match l.bias() {
            Some(b) => f32_vec(b),
            None => Ok(vec![0.0; l.out_dim()]),
        };
        let fused = PixelMlp {
            w1_t: f32_vec(&fc1.weight().t()?)?,
            b1: bias(&fc1)?,
            w2_t: f32_vec(&fc2.weight().t()?)?,
            b2: bias(&fc2)?,
        };
        Ok(Self { fc1, fc2, fused })
    }

    /// The MLP from candle ops: other devices and dtypes, and the fused kernel's reference.
    fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if use_cpu_kernel(x) {
            // Two matmuls with 16-wide operands are mostly packing overhead and a 4x wider
            // intermediate; per pixel the whole MLP fits in registers.
            return x.contiguous()?.apply_op1_no_bwd(&self.fused);
        }
        self.forward_ops(x)
    }
}

/// [`Mlp`] fused on the CPU, one pixel at a time: `W2 gelu_erf(W1 x + b1) + b2`, with the
/// weights transposed (`w1_t (dim, hidden)`, `w2_t (hidden, dim)`) so each step is a
/// vectorisable axpy over contiguous outputs.
#[derive(Debug, Clone)]
struct PixelMlp {
    w1_t: Vec<f32>,
    b1: Vec<f32>,
    w2_t: Vec<f32>,
    b2: Vec<f32>,
}

impl CustomOp1 for PixelMlp {
    fn name(&self) -> &'static str {
        "pid-pixel-mlp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(storage, layout, self.name())?;
        let (dim, hidden) = (self.b2.len(), self.b1.len());
        if layout.dims().last() != Some(&dim) {
            bail!("pixel MLP input {:?} is not {dim} wide", layout.dims())
        }
        const PIXELS: usize = 1024;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(PIXELS * dim)
            .zip(x.par_chunks(PIXELS * dim))
            .for_each(|(out, x)| {
                let mut h = vec![0f32; hidden];
                for (o, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                    h.copy_from_slice(&self.b1);
                    for (xc, w) in x.iter().zip(self.w1_t.chunks_exact(hidden)) {
                        h.iter_mut().zip(w).for_each(|(h, w)| *h += xc * w);
                    }
                    h.iter_mut().for_each(|h| *h = gelu_erf(*h));
                    o.copy_from_slice(&self.b2);
                    for (g, w) in h.iter().zip(self.w2_t.chunks_exact(dim)) {
                        o.iter_mut().zip(w).for_each(|(o, w)| *o += g * w);
                    }
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
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
        let stream = QkvStream {
            qkv: &self.qkv.forward(x)?,
            q_norm: &self.q_norm,
            k_norm: &self.k_norm,
            rope: Some(rope),
        };
        let (q, k, v) = qkv_heads(&[stream], self.heads, 0)?;
        self.proj.forward(&merge_heads(&sdpa(&q, &k, &v, budget)?)?)
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
    ) -> Result<Self> {
        let p2 = patch * patch;
        let head_dim = attn_dim / heads;
        let ada = Linear::new(vb.pp("adaLN_modulation.0"), cond_dim, 6 * dim * p2, true)?;
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
                Ok(Linear::from_parts(w, b))
            })
            .collect::<Result<Vec<_>>>()?;
        let attn = vb.pp("attn");
        let mh = 4 * dim;
        Ok(Self {
            compress_to_attn: Linear::new(vb.pp("compress_to_attn"), p2 * dim, attn_dim, true)?,
            expand_from_attn: Linear::new(vb.pp("expand_from_attn"), attn_dim, p2 * dim, true)?,
            norm1: RmsNorm::new(vb.pp("norm1"), dim)?,
            norm2: RmsNorm::new(vb.pp("norm2"), dim)?,
            attn: PixelAttention {
                qkv: Linear::new(attn.pp("qkv"), attn_dim, 3 * attn_dim, false)?,
                q_norm: RmsNorm::new(attn.pp("q_norm"), head_dim)?,
                k_norm: RmsNorm::new(attn.pp("k_norm"), head_dim)?,
                proj: Linear::new(attn.pp("proj"), attn_dim, attn_dim, true)?,
                heads,
            },
            mlp: Mlp::new(
                Linear::new(vb.pp("mlp.fc1"), dim, mh, true)?,
                Linear::new(vb.pp("mlp.fc2"), mh, dim, true)?,
            )?,
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

/// GELU with the exact erf, `x/2 (1 + erf(x/sqrt 2))`, branch-free so a loop over it vectorises
/// (libm's erff is scalar and was most of the MLP's time). erf by Abramowitz & Stegun 7.1.26
/// (|error| <= 1.5e-7, a few f32 ulps of 1) with the attention kernel's vectorisable exp.
fn gelu_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let z = (x * FRAC_1_SQRT_2).abs().min(4.0);
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf_abs = 1.0 - poly * exp_f32(-z * z);
    0.5 * x * (1.0 + erf_abs.copysign(x))
}

/// `final_layer`: RMSNorm(16) -> Linear(16 -> 3) per pixel.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    norm: RmsNorm,
    linear: Linear,
}

impl FinalLayer {
    pub fn new(vb: VarBuilder, dim: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(vb.pp("norm"), dim)?,
            linear: Linear::new(vb.pp("linear"), dim, out_channels, true)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_pixel_mlp_equals_the_candle_ops() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let linear = |i: usize, o: usize| -> Result<Linear> {
            Ok(Linear::from_parts(
                Tensor::randn(0f32, 0.5, (o, i), &dev)?,
                Some(Tensor::randn(0f32, 0.5, o, &dev)?),
            ))
        };
        let mlp = Mlp::new(linear(16, 64)?, linear(64, 16)?)?;
        // Rows that do not fill the kernel's 1024-pixel tasks; large inputs reach erf's tails.
        let x = (Tensor::randn(0f32, 1., (3, 700, 16), &dev)? * 3.0)?;
        let reference = mlp.forward_ops(&x)?;
        let max_abs = |t: &Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
        // Outputs reach ~50 here; the two summation orders differ by a few f32 ulps of that.
        let err = max_abs(&(mlp.forward(&x)? - &reference)?)? / max_abs(&reference)?;
        assert!(
            err < 2e-6,
            "max abs error {err} relative to the largest output"
        );
        Ok(())
    }

    #[test]
    fn gelu_erf_matches_the_libm_erf_form() {
        let mut worst = 0f64;
        for i in -120_000..=120_000 {
            let x = i as f32 * 1e-4;
            let exact = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
            let err = (gelu_erf(x) as f64 - exact).abs() / (1.0 + exact.abs());
            worst = worst.max(err);
        }
        assert!(worst < 3e-7, "gelu_erf relative error {worst:e}");
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}
