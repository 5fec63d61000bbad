//! Fused operations with our own CUDA kernels (`kernels/pid_kernels.cu`) and their candle-ops
//! twins.
//!
//! Each function computes the same result on every device. On a CUDA tensor of a supported
//! dtype, with custom kernels enabled, it launches one kernel; otherwise it runs the candle-ops
//! twin, which is also the reference `self_check` (CUDA builds) compares the kernels against. Custom
//! kernels are on by default; `PID_CUDA_KERNELS=0` in the environment or [`set_enabled`]
//! turns them off for the whole process.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::{self_check, KernelCheck};

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Device, Result, Tensor};

use crate::noise::{self, Stream};

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static SWITCH: AtomicU8 = AtomicU8::new(UNSET);

/// Whether custom CUDA kernels are used where they apply.
pub fn enabled() -> bool {
    match SWITCH.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("PID_CUDA_KERNELS").map_or(true, |v| v.trim() != "0");
            SWITCH.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Turn custom CUDA kernels on or off for this process (overrides `PID_CUDA_KERNELS`).
pub fn set_enabled(on: bool) {
    SWITCH.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// Whether an op on `t` goes to a custom kernel.
fn use_kernel(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16)
        && enabled()
}

/// `rmsnorm(x) * weight * (1 + scale) + shift`, the adaLN-modulated norm of every block.
///
/// `x (..., D)`; `shift` and `scale` hold `M` rows of `D` with `M` dividing the rows of `x`,
/// shaped to broadcast against it: `(B, 1, D)` for a patch block's per-image modulation of
/// `(B, L, D)`, or `x`'s own shape for a PiT block's per-pixel one. `weight (D,)` in `x`'s dtype.
pub fn rms_norm_modulate(
    x: &Tensor,
    weight: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernel(x) {
        return cuda::rms_norm_modulate(x, weight, shift, scale, eps);
    }
    rms_norm_modulate_ops(x, weight, shift, scale, eps)
}

fn rms_norm_modulate_ops(
    x: &Tensor,
    weight: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)
}

/// `x + gate * y`, the gated residual of every block; `gate` broadcasts like `shift` in
/// [`rms_norm_modulate`].
pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernel(x) {
        return cuda::gated_add(x, gate, y);
    }
    gated_add_ops(x, gate, y)
}

fn gated_add_ops(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    x + y.broadcast_mul(gate)?
}

/// The sigma-aware LQ gate `s + f * sigmoid(logit - offset)`, evaluated in f32.
///
/// `s, f (B, L, D)`, `logit (B, L, D or 1)`, `offset (B,)` f32; returns `s`'s dtype.
pub fn sigma_gate(s: &Tensor, f: &Tensor, logit: &Tensor, offset: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernel(s) {
        return cuda::sigma_gate(s, f, logit, offset);
    }
    sigma_gate_ops(s, f, logit, offset)
}

fn sigma_gate_ops(s: &Tensor, f: &Tensor, logit: &Tensor, offset: &Tensor) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let gate = candle_nn::ops::sigmoid(
        &f32(logit)?.broadcast_sub(&offset.to_dtype(DType::F32)?.reshape(((), 1, 1))?)?,
    )?;
    (f32(s)? + f32(f)?.broadcast_mul(&gate)?)?.to_dtype(s.dtype())
}

/// Whether [`flash_attention`] handles `q (B, H, L, d)`: CUDA, bf16, head dim 64 or 72.
pub fn flash_attention_applies(q: &Tensor) -> bool {
    use_kernel(q) && q.dtype() == DType::BF16 && matches!(q.dims().last(), Some(64 | 72))
}

/// Fused attention without a score matrix (CUDA only; see [`flash_attention_applies`]).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::flash_attention(q, k, v);
    #[cfg(not(feature = "cuda"))]
    candle_core::bail!("flash attention needs the cuda feature")
}

/// `n` standard normals of `stream` for `seed` on `device` (see [`crate::noise`]): drawn on
/// the GPU by a kernel that reproduces the CPU generator bit for bit, elsewhere on the CPU.
pub fn normal(seed: u64, stream: Stream, n: usize, device: &Device) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(dev), true) = (device, enabled()) {
        return cuda::normal(dev, seed, stream.id(), n);
    }
    Tensor::from_vec(noise::normal(seed, stream, n), n, device)
}
