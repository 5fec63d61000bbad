//! Scaled dot-product attention with bounded score memory (pid_spec §3.1, §7).
//!
//! Queries are processed in chunks so the `(B, H, chunk, Lk)` score block never
//! exceeds [`AttentionBudget`]; at a 4096² decode the full patch-block score
//! matrix would be ~200 GB. No mask anywhere in PiD.

use candle_core::{Result, Tensor};

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
}

/// softmax(q k^T / sqrt(d)) v for `q (B, H, Lq, d)`, `k, v (B, H, Lk, d)`; returns `(B, H, Lq, d)`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, budget: AttentionBudget) -> Result<Tensor> {
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

/// Interleaved-pair rotation of `x (B, H, L, d)` by tables `(L, d/2)`, in f32.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
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

    #[test]
    fn chunked_attention_equals_unchunked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 41, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 41, 8), &dev)?;
        let whole = sdpa_reference(&q, &k, &v)?;
        // A budget so small that every block holds a single query row.
        let chunked = sdpa(&q, &k, &v, AttentionBudget(1))?;
        let err = (whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }
}
