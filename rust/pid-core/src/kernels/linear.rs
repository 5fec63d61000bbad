//! `y = x W^T + b` and the weight casts around it.
//!
//! Parameters stay in the checkpoint's storage dtype (bf16 on CPU halves resident memory)
//! and are cast to the arithmetic's dtype at use. On the CPU in f32 the product runs our
//! packed GEMM (`gemm.rs`, x86-64 with AVX2 and FMA), or for a few rows against bf16 weights
//! a matrix-vector kernel that streams each weight once (every CPU); elsewhere candle's matmul.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::cpu::{cpu_slice, f32_vec};
#[cfg(target_arch = "x86_64")]
use super::gemm;
use super::{avx2_fma, use_cpu_kernel};

/// `param` in `dtype`. A forward casts every bf16 weight once and candle's cast is
/// single-threaded, so bf16 -> f32 on the CPU runs on all threads instead.
pub fn cast_param(param: &Tensor, dtype: DType) -> Result<Tensor> {
    if param.dtype() == DType::BF16 && dtype == DType::F32 && param.device().is_cpu() {
        param.contiguous()?.apply_op1_no_bwd(&ParallelBf16ToF32)
    } else {
        param.to_dtype(dtype)
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

/// Up to this many rows, a CPU f32 linear with bf16 weights streams the weights once
/// ([`bf16_matvec`]) instead of packing them for a matrix product.
pub(crate) const MATVEC_ROWS: usize = 4;

/// `x W^T + b` for rows `x (m, k)` and a weight `W (n, k)`; returns `(m, n)` f32.
///
/// In a reduced `dtype`, `x` and `W` are rounded to it and multiplied with f32 accumulation,
/// the reference's autocast matmul, but the product is kept in f32 (not rounded to `dtype`)
/// and `b` added in f32: a bf16 decode then errs about two thirds as much as the reference's
/// own autocast. On CUDA a bf16 GEMM with an f32 result; elsewhere, and with the custom
/// kernels off, an f32 product of the rounded operands.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
    if dtype != DType::F32 {
        #[cfg(feature = "cuda")]
        let y = if dtype == DType::BF16 && super::use_kernel(x) {
            super::cuda::bf16_matmul_f32(x, weight)?
        } else {
            widened_matmul(x, weight, dtype)?
        };
        #[cfg(not(feature = "cuda"))]
        let y = widened_matmul(x, weight, dtype)?;
        return match bias {
            Some(b) => y.broadcast_add(&cast_param(b, DType::F32)?),
            None => Ok(y),
        };
    }
    let x = x.to_dtype(DType::F32)?;
    let rows = x.dim(0)?;
    let cpu_op = use_cpu_kernel(&x)
        && match weight.dtype() {
            DType::BF16 => rows <= MATVEC_ROWS || avx2_fma(),
            DType::F32 => avx2_fma(),
            _ => false,
        };
    if cpu_op {
        let op = CpuLinear {
            bias: bias.map(f32_vec).transpose()?,
        };
        return x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op);
    }
    let y = x.matmul(&cast_param(weight, DType::F32)?.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(&cast_param(b, DType::F32)?),
        None => Ok(y),
    }
}

/// `x W^T` f32 for `x (m, k)` and `W (n, k)` rounded to `dtype`: the f32 product of the rounded
/// operands (exact products, f32 accumulation).
pub(crate) fn widened_matmul(x: &Tensor, weight: &Tensor, dtype: DType) -> Result<Tensor> {
    let wide = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
    wide(x)?.matmul(&wide(weight)?.t()?)
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
            #[cfg(target_arch = "x86_64")]
            CpuStorage::BF16(_) => {
                gemm::linear(x, m, k, cpu_slice::<bf16>(ws, wl, self.name())?, n, bias)
            }
            #[cfg(target_arch = "x86_64")]
            _ => gemm::linear(x, m, k, cpu_slice::<f32>(ws, wl, self.name())?, n, bias),
            #[cfg(not(target_arch = "x86_64"))]
            _ => candle_core::bail!(
                "{}: {m} rows need the packed GEMM (x86-64 only)",
                self.name()
            ),
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs_diff;
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
                (1, Some(&bias)),
                (MATVEC_ROWS, Some(&bias)),
                (2, None),
                (45, Some(&bias)),
                (13, None),
            ] {
                let x = Tensor::randn(0f32, 1., (rows, k), &dev)?;
                let w32 = weight.to_dtype(DType::F32)?;
                let mut want = x.matmul(&w32.t()?)?;
                if let Some(b) = bias {
                    want = want.broadcast_add(&b.to_dtype(DType::F32)?)?;
                }
                let got = linear(&x, &weight, bias, DType::F32)?;
                assert_eq!(got.dims(), &[rows, n]);
                let err = max_abs_diff(&got, &want)?;
                assert!(
                    err < 1e-5,
                    "{:?} rows {rows}: max abs error {err}",
                    weight.dtype()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn reduced_precision_linear_rounds_only_its_operands() -> Result<()> {
        // f16 operands, f32 accumulation and result, the bias added in f32: the f64 product
        // of the rounded operands to f32 accuracy. One row too, where candle's own f16
        // product would accumulate in f16.
        let dev = Device::Cpu;
        for rows in [1, 9] {
            let x = Tensor::randn(0f32, 1., (rows, 512), &dev)?;
            let w = Tensor::randn(0f32, 0.05, (40, 512), &dev)?.to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1., 40, &dev)?;
            let got = linear(&x, &w, Some(&b), DType::F16)?;
            assert_eq!(got.dtype(), DType::F32);
            let round = |t: &Tensor| t.to_dtype(DType::F16)?.to_dtype(DType::F64);
            let want = round(&x)?
                .matmul(&round(&w)?.t()?)?
                .broadcast_add(&b.to_dtype(DType::F64)?)?
                .to_dtype(DType::F32)?;
            let err = max_abs_diff(&got, &want)?;
            assert!(err < 1e-5, "{rows} rows: max abs error {err}");
            // Not the product of the unrounded x: f16 rounding shows.
            let unrounded = linear(&x, &w, Some(&b), DType::F32)?;
            assert!(max_abs_diff(&got, &unrounded)? > 1e-4);
        }
        Ok(())
    }
}
