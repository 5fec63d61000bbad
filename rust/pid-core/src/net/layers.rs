//! Small building blocks shared by every PiD module (pid_spec §3.1).
//!
//! Parameters stay in the checkpoint's storage dtype and are cast at use. Activations are
//! f32; a linear's operands and product take the network's compute dtype (see
//! [`kernels::linear`]).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

pub use crate::kernels::gated_add;
use crate::kernels::{self, cast_param};

/// `nn.Linear`: y = x W^T + b over the last axis, for inputs of any rank and dtype, with the
/// product in `dtype` (see [`kernels::linear`]); returns f32.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor, // (out, in)
    bias: Option<Tensor>,
    dtype: DType,
}

impl Linear {
    pub fn new(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::from_parts(weight, bias, dtype))
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, dtype: DType) -> Self {
        Self {
            weight,
            bias,
            dtype,
        }
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

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = x.dim(D::Minus1)?;
        let rows = x.reshape(((), in_dim))?;
        let y = kernels::linear(&rows, &self.weight, self.bias.as_ref(), self.dtype)?;
        if let Some(last) = dims.last_mut() {
            *last = self.out_dim();
        }
        y.reshape(dims)
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

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The norm of a residual stream `x` followed by adaLN modulation,
    /// `norm(x) * (1 + scale) + shift`, fused (see [`kernels::rms_norm_modulate`] for the shapes).
    pub fn forward_modulated(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        let weight = cast_param(&self.weight, x.dtype())?;
        kernels::rms_norm_modulate(x, &weight, shift, scale, Self::EPS)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::rms_norm(x, &self.weight, Self::EPS)
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
