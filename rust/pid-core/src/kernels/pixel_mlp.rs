//! The PiT blocks' per-pixel MLP `fc2(gelu_erf(fc1 x))` fused into one CPU pass.
//!
//! Two matmuls with 16-wide operands are mostly packing overhead and a 4x wider
//! intermediate; per pixel the whole MLP fits in registers.

use std::f32::consts::FRAC_1_SQRT_2;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{cpu_slice, exp_f32, f32_vec};

/// `W2 gelu_erf(W1 x + b1) + b2` on f32 CPU pixels `x (..., dim)`, one pixel at a time, with
/// the weights widened and transposed once (`w1_t (dim, hidden)`, `w2_t (hidden, dim)`) so
/// each step is a vectorisable axpy over contiguous outputs.
#[derive(Debug, Clone)]
pub struct PixelMlp {
    w1_t: Vec<f32>,
    b1: Vec<f32>,
    w2_t: Vec<f32>,
    b2: Vec<f32>,
}

impl PixelMlp {
    /// From `fc1 (hidden, dim)` and `fc2 (dim, hidden)` in any dtype, with their biases.
    pub fn new(w1: &Tensor, b1: Option<&Tensor>, w2: &Tensor, b2: Option<&Tensor>) -> Result<Self> {
        let bias = |b: Option<&Tensor>, w: &Tensor| match b {
            Some(b) => f32_vec(b),
            None => Ok(vec![0.0; w.dim(0)?]),
        };
        Ok(Self {
            w1_t: f32_vec(&w1.t()?)?,
            b1: bias(b1, w1)?,
            w2_t: f32_vec(&w2.t()?)?,
            b2: bias(b2, w2)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn fused_pixel_mlp_equals_the_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (w1, b1) = (
            Tensor::randn(0f32, 0.5, (64, 16), &dev)?,
            Tensor::randn(0f32, 0.5, 64, &dev)?,
        );
        let (w2, b2) = (
            Tensor::randn(0f32, 0.5, (16, 64), &dev)?,
            Tensor::randn(0f32, 0.5, 16, &dev)?,
        );
        let mlp = PixelMlp::new(&w1, Some(&b1), &w2, Some(&b2))?;
        // Rows that do not fill the kernel's 1024-pixel tasks; large inputs reach erf's tails.
        let x = (Tensor::randn(0f32, 1., (3, 700, 16), &dev)? * 3.0)?;
        let reference = x
            .broadcast_matmul(&w1.t()?)?
            .broadcast_add(&b1)?
            .gelu_erf()?
            .broadcast_matmul(&w2.t()?)?
            .broadcast_add(&b2)?;
        let scale = max_abs_diff(&reference, &reference.zeros_like()?)?;
        // Outputs reach ~50 here; the two summation orders differ by a few f32 ulps of that.
        let err = max_abs_diff(&mlp.forward(&x)?, &reference)? / scale;
        assert!(
            err < 2e-6,
            "max abs error {err} relative to the largest output"
        );
        Ok(())
    }

    #[test]
    fn gelu_erf_matches_the_libm_erf_form() {
        for i in -120_000..=120_000 {
            let x = i as f32 * 1e-4;
            let exact = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
            let err = (gelu_erf(x) as f64 - exact).abs() / (1.0 + exact.abs());
            assert!(err < 3e-7, "gelu_erf({x}) relative error {err:e}");
        }
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}
