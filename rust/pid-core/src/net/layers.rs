//! Small building blocks shared by every PiD module (pid_spec §3.1).
//!
//! Parameters stay in the checkpoint's storage dtype (bf16 on CPU halves resident
//! memory) and are cast to the activation dtype at use: candle's CPU matmul has no bf16.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::kernels;
pub use crate::kernels::gated_add;

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
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::BF16(data), Some((start, end))) => {
                let out = data[start..end].par_iter().map(|v| v.to_f32()).collect();
                Ok((CpuStorage::F32(out), layout.shape().clone()))
            }
            _ => bail!("bf16 -> f32 expects a contiguous bf16 tensor"),
        }
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

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let w = cast_param(&self.weight, x)?;
        let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&cast_param(b, x)?)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_dim();
        y.reshape(out)
    }
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
