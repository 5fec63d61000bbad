//! Our own kernels — CUDA (`kernels/pid_kernels.cu`) and CPU — for the operations where
//! candle's ops are slow or take too much memory, each beside its candle-ops twin.
//!
//! Each function computes the same result on every device. On a CUDA tensor of a supported
//! dtype, with custom kernels enabled, it launches one kernel; on a CPU f32 tensor it runs
//! one parallel pass; otherwise it runs the candle-ops twin, which is also the reference the
//! kernels are tested against (`self_check` on CUDA builds, unit tests on the CPU). Custom
//! CUDA kernels are on by default; `PID_CUDA_KERNELS=0` in the environment or [`set_enabled`]
//! turns them off for the whole process.
//!
//! Operands of mixed precision combine in the wider dtype, as PyTorch's type promotion does.
//!
//! This module knows nothing of the network: `net` calls it, never the reverse.

mod attention;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(target_arch = "x86_64")]
mod flash;
#[cfg(target_arch = "x86_64")]
mod gemm;
mod linear;
mod pixel_mlp;

pub use attention::{qkv_heads, sdpa, AttentionBudget, QkvStream};
#[cfg(feature = "cuda")]
pub use cuda::{self_check, KernelCheck};
pub use linear::{cast_param, linear};
pub use pixel_mlp::PixelMlp;

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, DType, Device, Result, Tensor};

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

/// Whether this CPU runs our AVX2/FMA kernels (`gemm.rs`, `flash.rs`), which exist on x86-64
/// only; elsewhere linear layers take candle's matmul and attention the gemm crate.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return gemm::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether an op on `t` runs one of our CPU kernels.
pub(crate) fn use_cpu_kernel(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `t` as a contiguous f32 operand of a [`cpu`] kernel.
fn f32_operand(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// The last axis of a custom op's operand (1 for a scalar).
fn last_dim(l: &candle_core::Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// Rows of `x` per modulation row, checking that `m_elems` modulation values cover `rows x d`.
fn rows_per_mod(what: &str, rows: usize, d: usize, m_elems: usize) -> Result<usize> {
    let m = m_elems / d.max(1);
    if m == 0 || m * d != m_elems || !rows.is_multiple_of(m) {
        bail!("{what}: {m_elems} modulation values do not tile {rows} rows of {d}")
    }
    Ok(rows / m)
}

/// `rmsnorm(x) * weight * (1 + scale) + shift`, the adaLN-modulated norm of every block, in
/// `x`'s dtype (f32 for the network's residual streams), `shift` and `scale` cast to it.
///
/// `x (..., D)`; `shift` and `scale` hold `M` rows of `D` with `M` dividing the rows of `x`,
/// shaped to broadcast against it: `(B, 1, D)` for a patch block's per-image modulation of
/// `(B, L, D)`, or `x`'s own shape for a PiT block's per-pixel one. `weight (D,)`.
pub fn rms_norm_modulate(
    x: &Tensor,
    weight: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (shift, scale) = (shift.to_dtype(x.dtype())?, scale.to_dtype(x.dtype())?);
    #[cfg(feature = "cuda")]
    if use_kernel(x) {
        return cuda::rms_norm_modulate(x, weight, &shift, &scale, eps);
    }
    if use_cpu_kernel(x) {
        let op = cpu::RmsNormModulate {
            weight: cpu::f32_vec(weight)?,
            eps,
        };
        return x
            .contiguous()?
            .apply_op3_no_bwd(&shift.contiguous()?, &scale.contiguous()?, &op);
    }
    rms_norm_modulate_ops(x, weight, &shift, &scale, eps)
}

fn rms_norm_modulate_ops(
    x: &Tensor,
    weight: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, &weight.to_dtype(x.dtype())?, eps)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)
}

/// `x + gate * y`, the gated residual of every block, in `x`'s dtype (`gate` and `y` are cast
/// to it); `gate` broadcasts like `shift` in [`rms_norm_modulate`].
pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernel(x) {
        return cuda::gated_add(x, gate, y);
    }
    if use_cpu_kernel(x) {
        return x.contiguous()?.apply_op3_no_bwd(
            &f32_operand(gate)?,
            &f32_operand(y)?,
            &cpu::GatedAdd,
        );
    }
    gated_add_ops(x, gate, y)
}

fn gated_add_ops(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    x + y.to_dtype(dt)?.broadcast_mul(&gate.to_dtype(dt)?)?
}

/// The sigma-aware LQ gate `s + f * sigmoid(logit - offset)`, evaluated and returned in f32
/// (the gate is f32, so the reference's update promotes a bf16 stream to f32).
///
/// `s, f (B, L, D)`, `logit (B, L, D or 1)`, `offset (B,)` f32.
pub fn sigma_gate(s: &Tensor, f: &Tensor, logit: &Tensor, offset: &Tensor) -> Result<Tensor> {
    let s = s.to_dtype(DType::F32)?;
    #[cfg(feature = "cuda")]
    if use_kernel(&s) {
        return cuda::sigma_gate(&s, f, logit, offset);
    }
    if use_cpu_kernel(&s) {
        let op = cpu::SigmaGate {
            offset: cpu::f32_vec(offset)?,
        };
        return s
            .contiguous()?
            .apply_op3_no_bwd(&f32_operand(f)?, &f32_operand(logit)?, &op);
    }
    sigma_gate_ops(&s, f, logit, offset)
}

fn sigma_gate_ops(s: &Tensor, f: &Tensor, logit: &Tensor, offset: &Tensor) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let gate = candle_nn::ops::sigmoid(
        &f32(logit)?.broadcast_sub(&offset.to_dtype(DType::F32)?.reshape(((), 1, 1))?)?,
    )?;
    f32(s)? + f32(f)?.broadcast_mul(&gate)?
}

/// `a @ b` with both operands rounded to `dtype` and f32 accumulation, in `dtype` (the
/// reference's autocast matmul). On the CPU a reduced `dtype` runs on the widened operands:
/// candle's CPU half-precision product accumulates in half precision for a single row.
fn matmul_f32_acc(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
    if dtype == DType::F32 || !a.device().is_cpu() {
        return a.matmul(&b);
    }
    a.to_dtype(DType::F32)?
        .matmul(&b.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// PiD's RMSNorm `weight * (x * rsqrt(mean(x^2) + eps))` over the last axis, in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    candle_nn::ops::rms_norm(&x, &cast_param(weight, DType::F32)?, eps)
}

/// `silu(a) * b`, the gate of a SwiGLU feed-forward (`a`, `b` of one shape).
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if use_cpu_kernel(a) && b.dtype() == DType::F32 {
        return a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &cpu::Swiglu);
    }
    swiglu_ops(a, b)
}

fn swiglu_ops(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.silu()? * b
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

/// The largest `|a - b|` over all elements (any device, same shape), infinite when either
/// holds a NaN or an infinity, so that every bound on it fails (candle's `max` skips NaN).
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        bail!("comparing shapes {:?} and {:?}", a.dims(), b.dims())
    }
    let values = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    Ok(values(a)?
        .iter()
        .zip(&values(b)?)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_finite() {
                d
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
    }

    /// Largest |a - b| relative to the largest |b| (infinite for any non-finite value).
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok(max_abs_diff(a, b)? / max_abs_diff(b, &b.zeros_like()?)?)
    }

    #[test]
    fn comparisons_fail_on_any_non_finite_value() -> Result<()> {
        let good = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[1f32, bad, 3.0], &Device::Cpu)?;
            assert_eq!(max_abs_diff(&t, &good)?, f32::INFINITY);
            assert_eq!(max_abs_diff(&good, &t)?, f32::INFINITY);
        }
        assert_eq!(max_abs_diff(&good, &good)?, 0.0);
        Ok(())
    }

    #[test]
    fn cpu_kernels_equal_their_candle_ops_twins() -> Result<()> {
        // Per-image modulation of (B, L, D) and per-pixel modulation of (N, P*P, 16); rows
        // that do not fill a rayon task.
        for (x_shape, mod_shape) in [
            (vec![2, 37, 96], vec![2, 1, 96]),
            (vec![5, 256, 16], vec![5, 256, 16]),
        ] {
            let x = (randn(&x_shape)? * 3.0)?;
            let (shift, scale, gate) = (randn(&mod_shape)?, randn(&mod_shape)?, randn(&mod_shape)?);
            let w = randn(&[x_shape[2]])?;
            let y = randn(&x_shape)?;
            let norm = rms_norm_modulate(&x, &w, &shift, &scale, 1e-6)?;
            let err = rel_err(&norm, &rms_norm_modulate_ops(&x, &w, &shift, &scale, 1e-6)?)?;
            assert!(err < 1e-6, "rms_norm_modulate {x_shape:?}: {err}");
            let err = rel_err(&gated_add(&x, &gate, &y)?, &gated_add_ops(&x, &gate, &y)?)?;
            assert!(err < 1e-6, "gated_add {x_shape:?}: {err}");
        }
        // Per-dim and per-token gates; two images with their own sigma offsets.
        let (s, f) = (randn(&[2, 33, 64])?, randn(&[2, 33, 64])?);
        let offset = Tensor::new(&[0.3f32, 2.5], &Device::Cpu)?;
        for gw in [64, 1] {
            let logit = (randn(&[2, 33, gw])? * 4.0)?;
            let got = sigma_gate(&s, &f, &logit, &offset)?;
            let err = rel_err(&got, &sigma_gate_ops(&s, &f, &logit, &offset)?)?;
            assert!(err < 1e-6, "sigma_gate, gate width {gw}: {err}");
        }
        // Beyond +-20 silu's exp saturates on either side.
        let (a, b) = ((randn(&[3, 50_001])? * 12.0)?, randn(&[3, 50_001])?);
        let err = rel_err(&swiglu(&a, &b)?, &swiglu_ops(&a, &b)?)?;
        assert!(err < 1e-6, "swiglu: {err}");
        Ok(())
    }

    #[test]
    fn cpu_kernels_refuse_modulations_that_do_not_tile_the_rows() -> Result<()> {
        let (x, m) = (randn(&[2, 6, 8])?, randn(&[5, 8])?);
        let w = randn(&[8])?;
        let err = rms_norm_modulate(&x, &w, &m, &m, 1e-6)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not tile"), "{err}");
        let err = gated_add(&x, &m, &x).unwrap_err().to_string();
        assert!(err.contains("do not tile"), "{err}");
        Ok(())
    }
}
