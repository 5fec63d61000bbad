//! Scaled dot-product attention with bounded score memory (pid_spec §3.1, §7).
//!
//! No mask anywhere in PiD. On the CPU (f32) one fused kernel computes each block of query
//! rows against all keys, softmax included, on one thread per block: scores never leave a
//! per-thread scratch of `rows x Lk`, and the softmax's exponentials are vectorised. Elsewhere
//! queries are processed in chunks of candle ops so the `(B, H, chunk, Lk)` score block never
//! exceeds [`AttentionBudget`]; at a 4096² decode the full patch-block score matrix would be
//! ~200 GB.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::layers::cpu_slice;

/// Upper bound on the bytes one score block may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionBudget(pub usize);

impl Default for AttentionBudget {
    fn default() -> Self {
        Self(256 << 20)
    }
}

impl AttentionBudget {
    /// How many query rows fit in one block for `bh` batch-heads and `lk` keys.
    pub fn query_rows(&self, bh: usize, lk: usize, elem_bytes: usize) -> usize {
        // Scores and their softmax live at the same time.
        (self.0 / (2 * bh * lk * elem_bytes).max(1)).max(1)
    }

    /// Query rows per task of the fused CPU kernel: each of `threads` tasks holds one
    /// `(rows, lk)` f32 score block, softmaxed in place; at most 64 so tasks stay many.
    fn fused_rows(&self, threads: usize, lk: usize) -> usize {
        (self.0 / (threads * lk * 4).max(1)).clamp(1, 64)
    }
}

/// softmax(q k^T / sqrt(d)) v for `q (B, H, Lq, d)`, `k, v (B, H, Lk, d)`; returns `(B, H, Lq, d)`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, budget: AttentionBudget) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let op = FusedCpuAttention {
            scale: 1.0 / (q.dim(3)? as f32).sqrt(),
            rows: budget.fused_rows(rayon::current_num_threads(), k.dim(2)?),
        };
        return q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    if crate::kernels::flash_attention_applies(q) {
        return crate::kernels::flash_attention(q, k, v);
    }
    sdpa_chunked(q, k, v, budget)
}

/// [`sdpa`] from candle ops, a block of query rows at a time (any device and dtype).
pub fn sdpa_chunked(q: &Tensor, k: &Tensor, v: &Tensor, budget: AttentionBudget) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let kt = k.t()?.contiguous()?; // (B, H, d, Lk)
    let rows = budget.query_rows(b * h, lk, q.dtype().size_in_bytes());
    let block = |qc: &Tensor| -> Result<Tensor> {
        let scores = qc.contiguous()?.matmul(&kt)?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
    };
    if rows >= lq {
        return block(&q);
    }
    let mut outs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let len = rows.min(lq - start);
        outs.push(block(&q.narrow(2, start, len)?)?);
        start += len;
    }
    Tensor::cat(&outs, 2)
}

/// `(B, L, H * d)` -> `(B, H, L, d)`, contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    x.reshape((b, l, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `(B, H, L, d)` -> `(B, L, H * d)`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, h * d))
}

/// Interleaved-pair rotation of `x (B, H, L, d)` by f32 tables `(L, d/2)`, evaluated in f32
/// whatever `x`'s dtype (as the reference does under autocast).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // Both casts are no-ops (a shared clone) on the f32 path.
    candle_nn::rotary_emb::rope_i(&x.to_dtype(cos.dtype())?.contiguous()?, cos, sin)?
        .to_dtype(x.dtype())
}

/// `(B, H, Lq, Lk, d)` of `q (B, H, Lq, d)` and `k, v (B, H, Lk, d)`, or an error naming the shapes.
pub(crate) fn attention_dims(
    ql: &Layout,
    kl: &Layout,
    vl: &Layout,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, lq, d) = ql.shape().dims4()?;
    let lk = kl.shape().dims4()?.2;
    if kl.shape().dims4()? != (b, h, lk, d) || vl.shape() != kl.shape() {
        bail!(
            "attention shapes q {:?}, k {:?}, v {:?} do not match",
            ql.shape(),
            kl.shape(),
            vl.shape()
        )
    }
    Ok((b, h, lq, lk, d))
}

/// The CPU kernel behind [`sdpa`]: one task per (batch-head, block of `rows` queries).
struct FusedCpuAttention {
    scale: f32,
    rows: usize,
}

thread_local! {
    /// Per-thread score scratch, reused across blocks and calls.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CustomOp3 for FusedCpuAttention {
    fn name(&self) -> &'static str {
        "pid-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            cpu_slice::<f32>(qs, ql, self.name())?,
            cpu_slice::<f32>(ks, kl, self.name())?,
            cpu_slice::<f32>(vs, vl, self.name())?,
        );
        let (b, h, lq, lk, d) = attention_dims(ql, kl, vl)?;
        let mut out = vec![0f32; b * h * lq * d];
        out.par_chunks_mut(lq * d)
            .enumerate()
            .for_each(|(bh, out_bh)| {
                let k = &k[bh * lk * d..(bh + 1) * lk * d];
                let v = &v[bh * lk * d..(bh + 1) * lk * d];
                out_bh
                    .par_chunks_mut(self.rows * d)
                    .enumerate()
                    .for_each(|(blk, o)| {
                        let r0 = (bh * lq + blk * self.rows) * d;
                        attend_block(&q[r0..r0 + o.len()], k, v, o, d, self.scale);
                    });
            });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// `out (r, d) = softmax(scale * q (r, d) k^T) v` for `k, v (lk, d)`, single-threaded.
fn attend_block(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], d: usize, scale: f32) {
    let (r, lk) = (q.len() / d, k.len() / d);
    SCORES.with_borrow_mut(|scores| {
        scores.resize(r * lk, 0.0);
        // SAFETY: every pointer/stride pair addresses a slice of exactly the stated shape:
        // scores (r, lk) row-major, q (r, d), k read as k^T (d, lk), v (lk, d), out (r, d).
        unsafe {
            gemm::gemm(
                r,
                lk,
                d,
                scores.as_mut_ptr(),
                1,
                lk as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                k.as_ptr(),
                d as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let mut sums = Vec::with_capacity(r);
        for row in scores.chunks_exact_mut(lk) {
            sums.push(exp_shifted_sum(row));
        }
        unsafe {
            gemm::gemm(
                r,
                d,
                lk,
                out.as_mut_ptr(),
                1,
                d as isize,
                false,
                scores.as_ptr(),
                1,
                lk as isize,
                v.as_ptr(),
                1,
                d as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (row, sum) in out.chunks_exact_mut(d).zip(sums) {
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    });
}

/// Replace `row` by `exp(row - max(row))` and return the sum (in 8 lanes, so it vectorises).
fn exp_shifted_sum(row: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    // Separate passes: a plain map and a plain lane-wise sum each vectorise at full width.
    for x in row.iter_mut() {
        *x = exp_f32(*x - max);
    }
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (acc, &x) in sums.iter_mut().zip(c) {
            *acc += x;
        }
    }
    chunks.remainder().iter().chain(&sums).sum()
}

/// exp(x) for x <= 0 to ~1 ulp, branch-free so loops over it vectorise: x = n ln2 + r with
/// |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by its degree-6 minimax polynomial (the
/// Cephes `expf` coefficients), 2^n by building the exponent bits with integer ops only.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: in `x * LOG2E + ROUND` the integer n = round(x log2 e) sits in the low
    // mantissa bits, so the bits of the sum minus those of ROUND are n.
    const ROUND: f32 = 12_582_912.0;
    let x = if x > -87.0 { x } else { -87.0 }; // keeps 2^n normal; exp(-87) ~ 1.6e-38
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let two_n = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    e * f32::from_bits(two_n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn sdpa_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let d = q.dim(D::Minus1)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn chunked_attention_equals_unchunked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 41, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 41, 8), &dev)?;
        let whole = sdpa_reference(&q, &k, &v)?;
        // A budget so small that every block holds a single query row.
        let err = max_abs(&whole, &sdpa_chunked(&q, &k, &v, AttentionBudget(1))?)?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }

    #[test]
    fn fused_cpu_attention_equals_the_reference() -> Result<()> {
        let dev = Device::Cpu;
        // Head dims of the patch (64) and PiT (72) blocks; key counts off the 8-lane grid;
        // large logits so the max shift matters.
        for (d, lq, lk, budget) in [(64, 70, 45, usize::MAX), (72, 37, 131, 1), (64, 5, 3, 4096)] {
            let q = (Tensor::randn(0f32, 1., (2, 3, lq, d), &dev)? * 4.0)?;
            let k = Tensor::randn(0f32, 1., (2, 3, lk, d), &dev)?;
            let v = Tensor::randn(0f32, 1., (2, 3, lk, d), &dev)?;
            let fused = sdpa(&q, &k, &v, AttentionBudget(budget))?;
            let f64_ref = sdpa_reference(
                &q.to_dtype(DType::F64)?,
                &k.to_dtype(DType::F64)?,
                &v.to_dtype(DType::F64)?,
            )?
            .to_dtype(DType::F32)?;
            let err = max_abs(&f64_ref, &fused)?;
            let chunked_err = max_abs(&f64_ref, &sdpa_chunked(&q, &k, &v, AttentionBudget(1))?)?;
            // As close to exact as candle's own ops in f32.
            assert!(
                err < 1e-5 && err <= 2.0 * chunked_err + 1e-6,
                "d {d}, lq {lq}, lk {lk}: max abs error {err} (candle ops: {chunked_err})"
            );
        }
        Ok(())
    }

    #[test]
    fn vectorised_exp_matches_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let rel = ((exp_f32(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
