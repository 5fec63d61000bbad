//! Small building blocks shared by every PiD module (pid_spec §3.1).
//!
//! Parameters stay in the checkpoint's storage dtype (bf16 on CPU halves resident
//! memory) and are cast to the activation dtype at use: candle's CPU matmul has no bf16.

use std::cell::Cell;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, D,
};
use candle_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

use crate::kernels::cpu::{cpu_slice, f32_vec};
pub use crate::kernels::gated_add;
use crate::kernels::{self, gemm};

/// `param` in the dtype of the activations `x`. A forward casts every bf16 weight once and
/// candle's cast is single-threaded, so bf16 -> f32 on the CPU runs on all threads instead.
pub fn cast_param(param: &Tensor, x: &Tensor) -> Result<Tensor> {
    if param.dtype() == DType::BF16 && x.dtype() == DType::F32 && param.device().is_cpu() {
        param.contiguous()?.apply_op1_no_bwd(&ParallelBf16ToF32)
    } else {
        param.to_dtype(x.dtype())
    }
}

struct ParallelBf16ToF32;

impl CustomOp1 for ParallelBf16ToF32 {
    fn name(&self) -> &'static str {
        "pid-bf16-to-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = cpu_slice::<bf16>(storage, layout, self.name())?;
        let out = data.par_iter().map(|v| v.to_f32()).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `nn.Linear`: y = x W^T + b over the last axis, for inputs of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor, // (out, in)
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// Up to this many rows, a CPU f32 linear with bf16 weights streams the weights once
/// ([`bf16_matvec`]) instead of packing them for a matrix product.
const MATVEC_ROWS: usize = 4;

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let cpu_op = kernels::use_cpu_kernel(x)
            && match self.weight.dtype() {
                DType::BF16 => rows <= MATVEC_ROWS || gemm::available(),
                DType::F32 => gemm::available(),
                _ => false,
            };
        let y = if cpu_op {
            let bias = match &self.bias {
                Some(b) => Some(f32_vec(b)?),
                None => None,
            };
            let op = CpuLinear { bias };
            x2.contiguous()?
                .apply_op2_no_bwd(&self.weight.contiguous()?, &op)?
        } else {
            let y = x2.matmul(&cast_param(&self.weight, x)?.t()?)?;
            match &self.bias {
                Some(b) => y.broadcast_add(&cast_param(b, x)?)?,
                None => y,
            }
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_dim();
        y.reshape(out)
    }
}

/// `y = x W^T + b` on the CPU for f32 rows `x (m, k)` and a weight `W (n, k)`: a few rows
/// against a bf16 weight stream it once ([`bf16_matvec`]); more go to our packed GEMM.
struct CpuLinear {
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for CpuLinear {
    fn name(&self) -> &'static str {
        "pid-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(xs, xl, self.name())?;
        let (m, k) = xl.shape().dims2()?;
        let n = wl.shape().dims2()?.0;
        let bias = self.bias.as_deref();
        let out = match ws {
            CpuStorage::BF16(_) if m <= MATVEC_ROWS => {
                bf16_matvec(x, m, k, cpu_slice::<bf16>(ws, wl, self.name())?, n, bias)
            }
            CpuStorage::BF16(_) => {
                packed_linear(x, m, k, cpu_slice::<bf16>(ws, wl, self.name())?, n, bias)
            }
            _ => packed_linear(x, m, k, cpu_slice::<f32>(ws, wl, self.name())?, n, bias),
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

thread_local! {
    /// The last packed weight's buffer, reused by the next linear on this thread: it grows to
    /// the widest weight once (150 MB in PiD) where a fresh allocation per layer costs more in
    /// page faults than the packing.
    static PACKED_WEIGHT: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `x (m, k) W^T + b` by our packed GEMM for a weight `W (n, k)`.
fn packed_linear<T: gemm::Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let packed = gemm::PackedB::from_transposed(w, n, k, PACKED_WEIGHT.take());
    let mut out = vec![0f32; m * n];
    let product = gemm::Product {
        a: x,
        lda: k,
        m,
        alpha: 1.0,
        bias,
    };
    gemm::matmul(&product, &packed, &mut out, n, true);
    PACKED_WEIGHT.set(packed.into_buffer());
    out
}

/// `y = x W^T + b` for a few f32 rows `x (m, k)` and bf16 `W (n, k)`, each weight read once
/// and widened in registers. The adaLN modulations (one row per image, a third of PiD's
/// weights) run this way: upcasting those weights for a matmul cost ~10x more than the product.
fn bf16_matvec(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    // Output features in parallel blocks, written feature-major then transposed (m is tiny).
    const FEATURES: usize = 64;
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(FEATURES * m)
        .enumerate()
        .for_each(|(blk, out)| {
            for (jj, out_j) in out.chunks_exact_mut(m).enumerate() {
                let j = blk * FEATURES + jj;
                let w_j = &w[j * k..(j + 1) * k];
                let b = bias.map_or(0.0, |b| b[j]);
                for (r, o) in out_j.iter_mut().enumerate() {
                    *o = b + dot_bf16(&x[r * k..(r + 1) * k], w_j);
                }
            }
        });
    if m == 1 {
        out_t
    } else {
        (0..m * n).map(|i| out_t[(i % n) * m + i / n]).collect()
    }
}

/// `sum x[i] * w[i]` with 16 independent lanes, which the compiler vectorises.
fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(wc.remainder())
        .map(|(a, b)| a * b.to_f32())
        .sum();
    for (xs, ws) in xc.zip(wc) {
        for i in 0..LANES {
            acc[i] += xs[i] * ws[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// PiD RMSNorm: `w * (x * rsqrt(mean(x^2) + eps))`, eps 1e-6 — not Gemma's (1 + w).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    pub const EPS: f32 = 1e-6;

    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl RmsNorm {
    /// The norm followed by adaLN modulation, `norm(x) * (1 + scale) + shift`, fused on CUDA
    /// (see [`kernels::rms_norm_modulate`] for the shapes).
    pub fn forward_modulated(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        kernels::rms_norm_modulate(x, &cast_param(&self.weight, x)?, shift, scale, Self::EPS)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &cast_param(&self.weight, x)?, Self::EPS)
    }
}

/// Split the last axis into `n` equal contiguous chunks.
pub fn chunk_last(x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    x.chunk(n, D::Minus1)?
        .into_iter()
        .map(|c| c.contiguous())
        .collect()
}

/// Process the rows (axis 0) of `x` in slices of at most `rows` and concatenate the results,
/// so token-local work never materialises its widest intermediate for every token at once.
pub fn map_row_chunks(
    x: &Tensor,
    rows: usize,
    mut f: impl FnMut(&Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n <= rows {
        return f(x, 0);
    }
    let mut outs = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        outs.push(f(&x.narrow(0, start, len)?, start)?);
        start += len;
    }
    Tensor::cat(&outs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_linear_equals_the_matmul_of_the_widened_weights() -> Result<()> {
        let dev = Device::Cpu;
        // In-width off the 16-lane grid, out-width off the 16-column panels; one row (adaLN),
        // the most rows the matvec takes, and rows for the packed GEMM.
        let (k, n) = (37, 70);
        let weight = Tensor::randn(0f32, 1., (n, k), &dev)?.to_dtype(DType::BF16)?;
        let bias = Tensor::randn(0f32, 1., n, &dev)?.to_dtype(DType::BF16)?;
        for weight in [weight.clone(), weight.to_dtype(DType::F32)?] {
            for (rows, bias) in [
                (1, Some(bias.clone())),
                (MATVEC_ROWS, Some(bias.clone())),
                (2, None),
                (45, Some(bias.clone())),
                (13, None),
            ] {
                let x = Tensor::randn(0f32, 1., (rows, 1, k), &dev)?;
                let linear = Linear::from_parts(weight.clone(), bias.clone());
                let w32 = weight.to_dtype(DType::F32)?;
                let mut want = x.reshape((rows, k))?.matmul(&w32.t()?)?;
                if let Some(b) = &bias {
                    want = want.broadcast_add(&b.to_dtype(DType::F32)?)?;
                }
                let got = linear.forward(&x)?;
                assert_eq!(got.dims(), &[rows, 1, n]);
                let err = (got.reshape((rows, n))? - want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(
                    err < 1e-5,
                    "{:?} rows {rows}: max abs error {err}",
                    weight.dtype()
                );
            }
        }
        Ok(())
    }
}
