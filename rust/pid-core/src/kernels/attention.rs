//! Scaled dot-product attention with bounded score memory, and the q/k/v pass before it
//! (pid_spec §3.1, §7).
//!
//! No mask anywhere in PiD. On the CPU (f32) one fused kernel takes a block of query rows
//! per task: with AVX2 and FMA, flash attention walking the keys a block at a time with an
//! online softmax (`flash.rs`), so scores never leave a per-thread scratch of
//! `24 x key block`; elsewhere the block's scores against all keys in a per-thread scratch
//! sized by [`AttentionBudget`]. CUDA bf16 runs the flash kernel. Everything else runs
//! [`sdpa_chunked`], which processes queries in chunks of candle ops so the
//! `(B, H, chunk, Lk)` score block never exceeds the budget (at a 4096² decode the full
//! patch-block score matrix would be ~200 GB), with scores and softmax in f32 whatever the
//! operands' dtype, as the reference's attention keeps them under autocast.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{cpu_slice, exp_f32, for_rows, inv_rms, with_f32_slices};
#[cfg(target_arch = "x86_64")]
use super::flash;
use super::{avx2_fma, use_cpu_kernel};

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

    /// Query rows per task and keys per block of the fused CPU kernel. With AVX2 (flash,
    /// whose scratch is a few tens of KB per thread whatever the budget) 96 queries and
    /// 128 keys keep a block's keys, values and probabilities in L1/L2; on a 2-core Zen 4 VM
    /// it ran 178-183 GF/s on 24 heads of 16684 keys, its 1-thread rate within noise of
    /// (96, 256), (192, 128) and (384, 128). Without AVX2 a task holds `rows x lk` scores
    /// through the gemm crate, which packs its operands again for every call, so there up
    /// to 128 rows amortise it (128 ran 10-15% faster than 64).
    fn fused_block(&self, threads: usize, lk: usize) -> (usize, usize) {
        if avx2_fma() {
            return (96, 128);
        }
        let rows = (self.0 / (threads * lk.max(1) * 4).max(1)).clamp(1, 128);
        (rows, lk)
    }
}

/// softmax(q k^T / sqrt(d)) v for `q (B, H, Lq, d)`, `k, v (B, H, Lk, d)`; returns `(B, H, Lq, d)`
/// in `v`'s dtype.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, budget: AttentionBudget) -> Result<Tensor> {
    if use_cpu_kernel(q) {
        let (rows, key_block) = budget.fused_block(rayon::current_num_threads(), k.dim(2)?);
        let op = FusedCpuAttention {
            scale: 1.0 / (q.dim(3)? as f32).sqrt(),
            rows,
            key_block,
        };
        return op.apply(q, k, v);
    }
    if super::flash_attention_applies(q) {
        return super::flash_attention(q, k, v);
    }
    sdpa_chunked(q, k, v, budget)
}

/// [`sdpa`] from candle ops, a block of query rows at a time (any device and dtype): scores
/// and softmax in f32, the probabilities then rounded to `v`'s dtype for the value product,
/// as flash attention does.
pub fn sdpa_chunked(q: &Tensor, k: &Tensor, v: &Tensor, budget: AttentionBudget) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let q = (q.to_dtype(DType::F32)? * (1.0 / (d as f64).sqrt()))?;
    let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?; // (B, H, d, Lk)
    let rows = budget.query_rows(b * h, lk, DType::F32.size_in_bytes());
    let block = |qc: &Tensor| -> Result<Tensor> {
        let scores = qc.contiguous()?.matmul(&kt)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        super::matmul_f32_acc(&p, v, v.dtype())
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

/// One stream of an attention's inputs: its fused projection `qkv (B, N, 3 * H * d)`, the
/// weights `(d,)` of the per-head RMSNorms of its queries and keys, and the cos/sin tables
/// `(N, d / 2)` (f32) of the rotation of its positions, if any.
pub struct QkvStream<'a> {
    pub qkv: &'a Tensor,
    pub q_norm: &'a Tensor,
    pub k_norm: &'a Tensor,
    pub rope: Option<(&'a Tensor, &'a Tensor)>,
}

/// q, k, v `(B, H, N, d)` f32 over the streams' tokens in order — keys and values of every
/// stream, queries of `streams[q_from..]` only: each `qkv` split in three and into heads, q
/// and k normed per head (eps `eps`) and rotated. On the CPU in f32 one parallel pass per
/// output; elsewhere candle ops ([`qkv_heads_ops`], the kernel's reference).
pub fn qkv_heads(
    streams: &[QkvStream],
    heads: usize,
    q_from: usize,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    match streams.first() {
        Some(s) if use_cpu_kernel(s.qkv) => qkv_heads_cpu(streams, heads, q_from, eps),
        _ => qkv_heads_ops(streams, heads, q_from, eps),
    }
}

/// `(B, L, H * d)` -> `(B, H, L, d)`, contiguous.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    x.reshape((b, l, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// [`super::rms_norm`] of `x`, then rotated (f32).
fn norm_and_rotate(
    x: &Tensor,
    weight: &Tensor,
    rope: Option<(&Tensor, &Tensor)>,
    eps: f32,
) -> Result<Tensor> {
    let normed = super::rms_norm(x, weight, eps)?;
    match rope {
        Some((cos, sin)) => candle_nn::rotary_emb::rope_i(&normed, cos, sin),
        None => Ok(normed),
    }
}

fn qkv_heads_ops(
    streams: &[QkvStream],
    heads: usize,
    q_from: usize,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
    for (i, s) in streams.iter().enumerate() {
        let parts = s.qkv.chunk(3, D::Minus1)?;
        let k = norm_and_rotate(&split_heads(&parts[1], heads)?, s.k_norm, s.rope, eps)?;
        if i >= q_from {
            qs.push(norm_and_rotate(
                &split_heads(&parts[0], heads)?,
                s.q_norm,
                s.rope,
                eps,
            )?);
        }
        ks.push(k);
        vs.push(split_heads(&parts[2].to_dtype(DType::F32)?, heads)?);
    }
    Ok((
        Tensor::cat(&qs, 2)?,
        Tensor::cat(&ks, 2)?,
        Tensor::cat(&vs, 2)?,
    ))
}

fn qkv_heads_cpu(
    streams: &[QkvStream],
    heads: usize,
    q_from: usize,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, _, width) = streams[0].qkv.dims3()?;
    let hd = width / 3;
    let d = hd / heads;
    let mut tokens = Vec::with_capacity(streams.len());
    // Per stream: qkv, q_norm and k_norm weights, then cos and sin if rotated.
    let mut operands = Vec::new();
    let mut weights = Vec::new();
    for s in streams {
        let (sb, n, sw) = s.qkv.dims3()?;
        if sb != b || sw != width || width != 3 * heads * d {
            bail!(
                "qkv streams {:?} and {:?} do not split into {heads} heads",
                streams[0].qkv.dims(),
                s.qkv.dims()
            )
        }
        tokens.push(n);
        weights.push(s.q_norm.to_dtype(DType::F32)?);
        weights.push(s.k_norm.to_dtype(DType::F32)?);
    }
    for (i, s) in streams.iter().enumerate() {
        operands.extend([s.qkv, &weights[2 * i], &weights[2 * i + 1]]);
        if let Some((cos, sin)) = s.rope {
            operands.extend([cos, sin]);
        }
    }
    let n_all: usize = tokens.iter().sum();
    let n_q: usize = tokens[q_from..].iter().sum();
    let (q, k, v) = with_f32_slices(&operands, |data| {
        // The operands of each stream, in the order pushed above.
        let mut srcs = Vec::with_capacity(streams.len());
        let mut at = 0;
        for (s, &n) in streams.iter().zip(&tokens) {
            let rope = s.rope.map(|_| (data[at + 3], data[at + 4]));
            srcs.push((n, data[at], data[at + 1], data[at + 2], rope));
            at += if rope.is_some() { 5 } else { 3 };
        }
        // Output row (b, h, n) of `part` (0 q, 1 k, 2 v) over `srcs[first..]`.
        let fill = |part: usize, first: usize, n_out: usize| {
            let mut out = vec![0f32; b * heads * n_out * d];
            for_rows(&mut out, d, |row, o| {
                let (bh, mut n) = (row / n_out, row % n_out);
                let (bi, h) = (bh / heads, bh % heads);
                let mut s = first;
                while n >= srcs[s].0 {
                    n -= srcs[s].0;
                    s += 1;
                }
                let (len, qkv, qw, kw, rope) = srcs[s];
                let x = &qkv[((bi * len + n) * 3 + part) * hd + h * d..][..d];
                if part == 2 {
                    o.copy_from_slice(x);
                    return;
                }
                let w = if part == 0 { qw } else { kw };
                let inv = inv_rms(x, eps);
                for i in 0..d {
                    o[i] = x[i] * inv * w[i];
                }
                if let Some((cos, sin)) = rope {
                    let (cos, sin) = (&cos[n * d / 2..][..d / 2], &sin[n * d / 2..][..d / 2]);
                    for p in 0..d / 2 {
                        let (x0, x1) = (o[2 * p], o[2 * p + 1]);
                        o[2 * p] = x0 * cos[p] - x1 * sin[p];
                        o[2 * p + 1] = x0 * sin[p] + x1 * cos[p];
                    }
                }
            });
            out
        };
        Ok((fill(0, q_from, n_q), fill(1, 0, n_all), fill(2, 0, n_all)))
    })?;
    let dev = streams[0].qkv.device();
    Ok((
        Tensor::from_vec(q, (b, heads, n_q, d), dev)?,
        Tensor::from_vec(k, (b, heads, n_all, d), dev)?,
        Tensor::from_vec(v, (b, heads, n_all, d), dev)?,
    ))
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

/// The CPU kernel behind [`sdpa`]: one task per (batch-head, block of `rows` queries). With
/// AVX2 and FMA each batch-head's keys are packed once and [`flash::attend`] walks them
/// `key_block` at a time; elsewhere a task holds its rows' scores against all keys.
struct FusedCpuAttention {
    scale: f32,
    rows: usize,
    /// Keys per block of flash attention, which runs on x86-64 only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    key_block: usize,
}

thread_local! {
    /// Per-thread scratch of a task's scores (without AVX2), reused across tasks and calls.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl FusedCpuAttention {
    fn apply(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        q.contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, self)
    }
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
        if lk == 0 || d == 0 {
            bail!("attention over {lk} keys of {d} dims")
        }
        let mut out = vec![0f32; b * h * lq * d];
        out.par_chunks_mut(lq * d)
            .enumerate()
            .for_each(|(bh, out_bh)| {
                let (k, v) = (&k[bh * lk * d..][..lk * d], &v[bh * lk * d..][..lk * d]);
                #[cfg(target_arch = "x86_64")]
                let packed = avx2_fma().then(|| flash::PackedKeys::new(k, v, d, self.key_block));
                out_bh
                    .par_chunks_mut(self.rows * d)
                    .enumerate()
                    .for_each(|(blk, o)| {
                        let r0 = (bh * lq + blk * self.rows) * d;
                        let q = &q[r0..r0 + o.len()];
                        #[cfg(target_arch = "x86_64")]
                        if let Some(keys) = &packed {
                            return flash::attend(q, keys, o, self.scale);
                        }
                        attend_all_keys(q, k, v, o, d, self.scale)
                    });
            });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// `out (r, d) = softmax(scale q (r, d) k^T) v` for `k, v (lk, d)` on one thread, through
/// the gemm crate: the scores against all keys, a row softmax, the value product.
fn attend_all_keys(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], d: usize, scale: f32) {
    let (r, lk) = (q.len() / d, k.len() / d);
    SCORES.with_borrow_mut(|scores| {
        scores.resize(r * lk, 0.0);
        // SAFETY: every pointer/stride pair addresses a slice of exactly the stated shape:
        // scores (r, lk) row-major, q (r, d), k read as k^T (d, lk).
        unsafe {
            ::gemm::gemm(
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
                ::gemm::Parallelism::None,
            )
        };
        for row in scores.chunks_exact_mut(lk) {
            let sum = exp_shifted_sum(row, row_max(row));
            row.iter_mut().for_each(|x| *x /= sum);
        }
        // SAFETY: p (r, lk), v (lk, d) and out (r, d), all row-major.
        unsafe {
            ::gemm::gemm(
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
                ::gemm::Parallelism::None,
            )
        };
    });
}

/// The largest value of `row` (in 8 lanes, so it vectorises).
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Replace `row` by `exp(row - max)` and return the sum (in 8 lanes, so it vectorises).
fn exp_shifted_sum(row: &mut [f32], max: f32) -> f32 {
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (acc, x) in sums.iter_mut().zip(c) {
            *x = exp_f32(*x - max);
            *acc += *x;
        }
    }
    let rest = chunks.into_remainder();
    rest.iter_mut().for_each(|x| *x = exp_f32(*x - max));
    rest.iter().chain(&sums).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs_diff;
    use crate::noise::Stream;
    use candle_core::Device;

    fn sdpa_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let d = q.dim(D::Minus1)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
    }

    /// [`attend_all_keys`] (the fused kernel's path without AVX2) over every batch-head.
    fn all_keys_per_head(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, h, lq, d) = q.dims4()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (qs, ks, vs) = (flat(q)?, flat(k)?, flat(v)?);
        let lk = ks.len() / (b * h * d);
        let mut out = vec![0f32; qs.len()];
        for (i, o) in out.chunks_exact_mut(lq * d).enumerate() {
            let (k, v) = (&ks[i * lk * d..][..lk * d], &vs[i * lk * d..][..lk * d]);
            let q = &qs[i * lq * d..][..lq * d];
            attend_all_keys(q, k, v, o, d, 1.0 / (d as f32).sqrt());
        }
        Tensor::from_vec(out, q.shape(), q.device())
    }

    #[test]
    fn chunked_attention_equals_unchunked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 41, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 41, 8), &dev)?;
        let whole = sdpa_reference(&q, &k, &v)?;
        // A budget so small that every block holds a single query row.
        let err = max_abs_diff(&whole, &sdpa_chunked(&q, &k, &v, AttentionBudget(1))?)?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }

    #[test]
    fn fused_cpu_attention_equals_the_reference() -> Result<()> {
        let dev = Device::Cpu;
        // Head dims of the patch (64) and PiT (72) blocks; key counts off the 8-lane grid;
        // large logits so the max shift matters.
        for (d, lq, lk, budget) in [
            (64, 70, 45, usize::MAX),
            (72, 37, 131, 1),
            (64, 5, 3, 4096),
            (64, 9, 1000, usize::MAX),
        ] {
            let q = (Tensor::randn(0f32, 1., (2, 3, lq, d), &dev)? * 4.0)?;
            let k = Tensor::randn(0f32, 1., (2, 3, lk, d), &dev)?;
            let v = Tensor::randn(0f32, 1., (2, 3, lk, d), &dev)?;
            let f64_ref = sdpa_reference(
                &q.to_dtype(DType::F64)?,
                &k.to_dtype(DType::F64)?,
                &v.to_dtype(DType::F64)?,
            )?
            .to_dtype(DType::F32)?;
            let chunked_err =
                max_abs_diff(&f64_ref, &sdpa_chunked(&q, &k, &v, AttentionBudget(1))?)?;
            // The blocks sdpa picks (with AVX2: 96 queries, 128 keys: one task of 3 query
            // panels, the last 22 queries live, at lq 70; 1000 keys end on a block of 104),
            // 20-key blocks in tasks of 7 queries (last blocks of 5, 11, 3 and 20 keys, so
            // padding keys in the last tile of 1, 3 and 3), and the kernel without AVX2.
            let blocks = [
                sdpa(&q, &k, &v, AttentionBudget(budget))?,
                FusedCpuAttention {
                    scale: 1.0 / (d as f32).sqrt(),
                    rows: 7,
                    key_block: 20,
                }
                .apply(&q, &k, &v)?,
                all_keys_per_head(&q, &k, &v)?,
            ];
            for (i, fused) in blocks.iter().enumerate() {
                let err = max_abs_diff(&f64_ref, fused)?;
                // As close to exact as candle's own ops in f32.
                assert!(
                    err < 1e-5 && err <= 2.0 * chunked_err + 1e-6,
                    "d {d}, lq {lq}, lk {lk}, blocks {i}: max abs error {err} (candle ops: {chunked_err})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn reduced_precision_attention_keeps_f32_scores() -> Result<()> {
        // Logits of a few units: rounded to f16 (an ulp of 2^-8 near 4) each probability
        // would be off by ~0.1-0.4%; with f32 scores only the operands' own rounding remains.
        // Seeded, with an error (6.7e-4) at the median of 60 seeds': the bound is not far
        // above the output's own f16 rounding, and 3 of those 60 crossed it.
        let dev = Device::Cpu;
        let normal = |stream, shape: (usize, usize, usize, usize)| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            Tensor::from_vec(crate::noise::normal(0, stream, n), shape, &dev)
        };
        let q = (normal(Stream::Initial, (1, 2, 33, 64))? * 2.0)?;
        let k = normal(Stream::Renoise(0), (1, 2, 300, 64))?;
        let v = normal(Stream::Renoise(1), (1, 2, 300, 64))?;
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let rounded = |t: &Tensor| half(t)?.to_dtype(DType::F32);
        let want = sdpa_reference(
            &rounded(&q)?.to_dtype(DType::F64)?,
            &rounded(&k)?.to_dtype(DType::F64)?,
            &rounded(&v)?.to_dtype(DType::F64)?,
        )?;
        let got = sdpa_chunked(&half(&q)?, &half(&k)?, &half(&v)?, AttentionBudget(1 << 12))?;
        assert_eq!(got.dtype(), DType::F16);
        let err = max_abs_diff(&got, &want.to_dtype(DType::F32)?)?;
        // The probabilities' and the output's f16 roundings: a few 1e-4 on outputs below 1.
        assert!(err < 1e-3, "f16 attention max abs error {err}");
        Ok(())
    }

    #[test]
    fn fused_qkv_heads_equal_the_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, heads, d) = (2, 3, 8);
        let norm = || Tensor::randn(1f32, 0.2, d, &dev);
        let (qn_y, kn_y, qn_x, kn_x) = (norm()?, norm()?, norm()?, norm()?);
        let (nt, l) = (5, 7);
        let qkv_y = Tensor::randn(0f32, 1., (b, nt, 3 * heads * d), &dev)?;
        let qkv_x = Tensor::randn(0f32, 1., (b, l, 3 * heads * d), &dev)?;
        let table = |n: usize| Tensor::randn(0f32, 1., (n, d / 2), &dev);
        let rope = (table(l)?, table(l)?);
        let text_rope = (table(nt)?, table(nt)?);
        for y_rope in [None, Some((&text_rope.0, &text_rope.1))] {
            let streams = [
                QkvStream {
                    qkv: &qkv_y,
                    q_norm: &qn_y,
                    k_norm: &kn_y,
                    rope: y_rope,
                },
                QkvStream {
                    qkv: &qkv_x,
                    q_norm: &qn_x,
                    k_norm: &kn_x,
                    rope: Some((&rope.0, &rope.1)),
                },
            ];
            for q_from in [0, 1] {
                let fused = qkv_heads(&streams, heads, q_from, 1e-6)?;
                let ops = qkv_heads_ops(&streams, heads, q_from, 1e-6)?;
                for (got, want) in [(fused.0, ops.0), (fused.1, ops.1), (fused.2, ops.2)] {
                    assert_eq!(got.dims(), want.dims());
                    let err = max_abs_diff(&got, &want)?;
                    assert!(
                        err < 1e-5,
                        "text rope {}, q_from {q_from}: {err}",
                        y_rope.is_some()
                    );
                }
            }
        }
        Ok(())
    }
}
