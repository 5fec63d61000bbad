//! Attention of the patch and PiT blocks (pid_spec §3.1): each stream's fused projection
//! split into heads, per-head RMSNorm of q and k, rotation, then scaled dot-product attention
//! without a mask and the heads merged back. The arithmetic lives in `kernels` (fused on the
//! CPU, flash attention on CUDA, candle ops elsewhere).

use candle_core::{DType, Result, Tensor};

pub use crate::kernels::AttentionBudget;
use crate::kernels::{self, QkvStream};

use super::layers::RmsNorm;
use super::Rope;

/// One stream's half of an attention: its projection `qkv (B, N, 3 * H * d)` with the norms
/// of its queries and keys and the rotation of its positions, if any.
pub fn stream<'a>(
    qkv: &'a Tensor,
    q_norm: &'a RmsNorm,
    k_norm: &'a RmsNorm,
    rope: Option<&'a Rope>,
) -> QkvStream<'a> {
    QkvStream {
        qkv,
        q_norm: q_norm.weight(),
        k_norm: k_norm.weight(),
        rope: rope.map(|r| (&r.cos, &r.sin)),
    }
}

/// Attention over the streams' tokens in order, with queries from `streams[q_from..]` only,
/// on q, k and v rounded to `dtype` (scores and softmax in f32); returns `(B, H, Nq, d)` in
/// `dtype`.
pub fn attention(
    streams: &[QkvStream],
    heads: usize,
    q_from: usize,
    dtype: DType,
    budget: AttentionBudget,
) -> Result<Tensor> {
    let (q, k, v) = kernels::qkv_heads(streams, heads, q_from, RmsNorm::EPS)?;
    let (q, k, v) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
    kernels::sdpa(&q, &k, &v, budget)
}

/// `(B, H, L, d)` -> `(B, L, H * d)`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, h * d))
}
