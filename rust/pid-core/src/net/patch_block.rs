//! MMDiT dual-stream patch block, `patch_blocks.{i}` (pid_spec §3.5; upstream
//! `MMDiTBlockT2I` / `MMDiTJointAttention`, `pixeldit_official.py:550-728`).
//!
//! Image tokens `x (B, L, D)` and text tokens `y (B, Nt, D)` each get their own adaLN,
//! norms, QKV and MLP, and attend jointly over [text; image] with no mask.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{attention, merge_heads, stream, AttentionBudget};
use super::layers::{chunk_last, gated_add, map_row_chunks, Linear, RmsNorm};
use super::JointRope;
use crate::kernels;

/// Rows of token-local work (MLP) processed at once; bounds the SwiGLU hidden.
const TOKEN_ROWS: usize = 8192;

/// SwiGLU `w2(silu(w1 x) * w3 x)`, no biases.
#[derive(Debug, Clone)]
pub struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, hidden: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            w1: Linear::new(vb.pp("w1"), dim, hidden, false, dtype)?,
            w2: Linear::new(vb.pp("w2"), hidden, dim, false, dtype)?,
            w3: Linear::new(vb.pp("w3"), dim, hidden, false, dtype)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let rows = x.reshape((b * l, d))?;
        map_row_chunks(&rows, TOKEN_ROWS, |r, _| {
            self.w2.forward(&kernels::swiglu(
                &self.w1.forward(r)?,
                &self.w3.forward(r)?,
            )?)
        })?
        .reshape((b, l, d))
    }
}

/// One stream's half of the joint attention: QKV projection and per-head q/k RMSNorm.
#[derive(Debug, Clone)]
struct StreamQkv {
    qkv: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
}

#[derive(Debug, Clone)]
pub struct PatchBlock {
    norm_x1: RmsNorm,
    norm_y1: RmsNorm,
    norm_x2: RmsNorm,
    norm_y2: RmsNorm,
    attn_x: StreamQkv,
    attn_y: StreamQkv,
    proj_x: Linear,
    proj_y: Linear,
    mlp_x: FeedForward,
    mlp_y: FeedForward,
    ada_ln_modulation_img: Linear,
    ada_ln_modulation_txt: Linear,
    heads: usize,
}

impl PatchBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        ffn_hidden: usize,
        dtype: DType,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        let attn = vb.pp("attn");
        let linear =
            |vb: VarBuilder, i: usize, o: usize, bias: bool| Linear::new(vb, i, o, bias, dtype);
        let stream = |s: &str| -> Result<StreamQkv> {
            Ok(StreamQkv {
                qkv: linear(attn.pp(format!("qkv_{s}")), dim, 3 * dim, false)?,
                q_norm: RmsNorm::new(attn.pp(format!("q_norm_{s}")), head_dim)?,
                k_norm: RmsNorm::new(attn.pp(format!("k_norm_{s}")), head_dim)?,
            })
        };
        Ok(Self {
            norm_x1: RmsNorm::new(vb.pp("norm_x1"), dim)?,
            norm_y1: RmsNorm::new(vb.pp("norm_y1"), dim)?,
            norm_x2: RmsNorm::new(vb.pp("norm_x2"), dim)?,
            norm_y2: RmsNorm::new(vb.pp("norm_y2"), dim)?,
            attn_x: stream("x")?,
            attn_y: stream("y")?,
            proj_x: linear(attn.pp("proj_x"), dim, dim, true)?,
            proj_y: linear(attn.pp("proj_y"), dim, dim, true)?,
            mlp_x: FeedForward::new(vb.pp("mlp_x"), dim, ffn_hidden, dtype)?,
            mlp_y: FeedForward::new(vb.pp("mlp_y"), dim, ffn_hidden, dtype)?,
            ada_ln_modulation_img: linear(vb.pp("adaLN_modulation_img.0"), dim, 6 * dim, true)?,
            ada_ln_modulation_txt: linear(vb.pp("adaLN_modulation_txt.0"), dim, 6 * dim, true)?,
            heads,
        })
    }

    /// One block. `c (B, D)` is SiLU(t_emb). With `text_out = false` (the last block) the
    /// text stream's update is skipped: nothing downstream reads it (pid_spec §3.5).
    pub fn forward(
        &self,
        x: &Tensor,
        y: &Tensor,
        c: &Tensor,
        rope: &JointRope,
        text_out: bool,
        budget: AttentionBudget,
    ) -> Result<(Tensor, Option<Tensor>)> {
        // (B, 1, D) chunks in order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let mx = chunk_last(&self.ada_ln_modulation_img.forward(&c.unsqueeze(1)?)?, 6)?;
        let my = chunk_last(&self.ada_ln_modulation_txt.forward(&c.unsqueeze(1)?)?, 6)?;

        let xn = self.norm_x1.forward_modulated(x, &mx[0], &mx[1])?;
        let yn = self.norm_y1.forward_modulated(y, &my[0], &my[1])?;
        let (qkv_x, qkv_y) = (self.attn_x.qkv.forward(&xn)?, self.attn_y.qkv.forward(&yn)?);
        // Joint attention over [text; image]; the last block needs only the image queries.
        let (ax, ay) = (&self.attn_x, &self.attn_y);
        let streams = [
            stream(&qkv_y, &ay.q_norm, &ay.k_norm, rope.text.as_ref()),
            stream(&qkv_x, &ax.q_norm, &ax.k_norm, Some(&rope.image)),
        ];
        let q_from = if text_out { 0 } else { 1 };
        let out = attention(&streams, self.heads, q_from, ax.qkv.dtype(), budget)?;
        let (nt, lx) = (y.dim(1)?, x.dim(1)?);
        let (attn_x, attn_y) = if text_out {
            (out.narrow(2, nt, lx)?, Some(out.narrow(2, 0, nt)?))
        } else {
            (out, None)
        };

        let x = gated_add(x, &mx[2], &self.proj_x.forward(&merge_heads(&attn_x)?)?)?;
        let x = gated_add(
            &x,
            &mx[5],
            &self
                .mlp_x
                .forward(&self.norm_x2.forward_modulated(&x, &mx[3], &mx[4])?)?,
        )?;

        let y = match attn_y {
            None => None,
            Some(attn_y) => {
                let y = gated_add(y, &my[2], &self.proj_y.forward(&merge_heads(&attn_y)?)?)?;
                let h = self
                    .mlp_y
                    .forward(&self.norm_y2.forward_modulated(&y, &my[3], &my[4])?)?;
                Some(gated_add(&y, &my[5], &h)?)
            }
        };
        Ok((x, y))
    }
}
