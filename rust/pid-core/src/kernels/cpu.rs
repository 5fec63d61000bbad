//! CPU kernels of the fused operations (f32), as candle custom ops.
//!
//! candle runs every CPU elementwise op, copy and reduction on one thread, one pass per op:
//! an adaLN norm was five single-threaded passes over the activations. Each kernel here is
//! one pass over rows of the last axis, in parallel; `super` holds the candle-ops twins
//! they are tested against.

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{last_dim, rows_per_mod};

/// The elements of a CPU custom op's operand as `&[T]`: it must be contiguous and of dtype `T`.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op} needs contiguous operands")
    };
    match storage.as_slice::<T>() {
        Ok(data) => Ok(&data[start..end]),
        Err(_) => bail!("{op} expects {:?} operands", T::DTYPE),
    }
}

/// Run `f` on the data of f32 CPU tensors (made contiguous first), for kernels whose
/// operands do not fit a candle custom op's one to three inputs and one output.
pub(crate) fn with_f32_slices<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(s) => cpu_slice::<f32>(s, layout, "a CPU kernel"),
            _ => bail!("a CPU kernel got a tensor on another device"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
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
    let r = mul_add(-n, LN2_LO, mul_add(-n, LN2_HI, x));
    let p = 1.987_569_1e-4_f32;
    let p = mul_add(p, r, 1.398_199_9e-3);
    let p = mul_add(p, r, 8.333_452e-3);
    let p = mul_add(p, r, 4.166_579_6e-2);
    let p = mul_add(p, r, 1.666_666_5e-1);
    let p = mul_add(p, r, 0.5);
    let e = mul_add(p, r * r, r + 1.0);
    let two_n = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    e * f32::from_bits(two_n)
}

/// `a * b + c`, fused where the target has FMA (one instruction, one rounding; without
/// hardware FMA `mul_add` would call the C library's slow software fma).
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `1 / (1 + exp(-x))`, branch-free: exp only ever sees `-|x|`.
#[inline(always)]
fn sigmoid_f32(x: f32) -> f32 {
    let e = exp_f32(-x.abs());
    let num = if x >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

/// The elements of `t` (any device, dtype and shape) as f32 values: a kernel's small
/// parameters (norm weights, biases, per-image offsets).
pub(crate) fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// `1 / sqrt(mean(x^2) + eps)`, the scale of an RMSNorm over `x`.
#[inline]
pub(crate) fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt()
}

/// About this many elements per rayon task: large enough to amortise scheduling, small
/// enough to balance two to sixteen cores on a 512² PiT chunk.
const TASK_ELEMS: usize = 1 << 15;

/// `out[r] = f(r, ..)` for every row `r` of width `d`, rows split across threads.
pub(crate) fn for_rows(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows_per_task = (TASK_ELEMS / d.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * d)
        .enumerate()
        .for_each(|(task, block)| {
            for (i, row) in block.chunks_exact_mut(d).enumerate() {
                f(task * rows_per_task + i, row);
            }
        });
}

/// See [`super::rms_norm_modulate`].
pub(super) struct RmsNormModulate {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl CustomOp3 for RmsNormModulate {
    fn name(&self) -> &'static str {
        "pid-rms-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(xs, xl, self.name())?;
        let shift = cpu_slice::<f32>(hs, hl, self.name())?;
        let scale = cpu_slice::<f32>(ss, sl, self.name())?;
        let d = last_dim(xl);
        if self.weight.len() != d || shift.len() != scale.len() {
            bail!(
                "rms_norm_modulate: x {:?}, weight ({}), shift {:?}, scale {:?} do not match",
                xl.dims(),
                self.weight.len(),
                hl.dims(),
                sl.dims()
            )
        }
        let per_mod = rows_per_mod(self.name(), x.len() / d, d, shift.len())?;
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, d, |r, o| {
            let x = &x[r * d..(r + 1) * d];
            let m = (r / per_mod) * d;
            let (shift, scale) = (&shift[m..m + d], &scale[m..m + d]);
            let inv = inv_rms(x, self.eps);
            for i in 0..d {
                o[i] = x[i] * inv * self.weight[i] * (1.0 + scale[i]) + shift[i];
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// See [`super::gated_add`].
pub(super) struct GatedAdd;

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "pid-gated-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(xs, xl, self.name())?;
        let gate = cpu_slice::<f32>(gs, gl, self.name())?;
        let y = cpu_slice::<f32>(ys, yl, self.name())?;
        if xl.shape() != yl.shape() {
            bail!("gated_add: x {:?} and y {:?} differ", xl.dims(), yl.dims())
        }
        let d = last_dim(xl);
        let per_mod = rows_per_mod(self.name(), x.len() / d, d, gate.len())?;
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, d, |r, o| {
            let g = &gate[(r / per_mod) * d..][..d];
            let (x, y) = (&x[r * d..][..d], &y[r * d..][..d]);
            for i in 0..d {
                o[i] = x[i] + y[i] * g[i];
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// See [`super::sigma_gate`].
pub(super) struct SigmaGate {
    /// One offset per image.
    pub offset: Vec<f32>,
}

impl CustomOp3 for SigmaGate {
    fn name(&self) -> &'static str {
        "pid-sigma-gate"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        fs: &CpuStorage,
        fl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = cpu_slice::<f32>(ss, sl, self.name())?;
        let f = cpu_slice::<f32>(fs, fl, self.name())?;
        let logit = cpu_slice::<f32>(ls, ll, self.name())?;
        let (b, l, d) = sl.shape().dims3()?;
        let gw = last_dim(ll);
        if fl.shape() != sl.shape()
            || ll.shape().dims3()? != (b, l, gw)
            || !(gw == d || gw == 1)
            || self.offset.len() != b
        {
            bail!(
                "sigma_gate: s {:?}, f {:?}, logit {:?}, {} offsets do not match",
                sl.dims(),
                fl.dims(),
                ll.dims(),
                self.offset.len()
            )
        }
        let mut out = vec![0f32; s.len()];
        for_rows(&mut out, d, |r, o| {
            let offset = self.offset[r / l];
            let (s, f) = (&s[r * d..][..d], &f[r * d..][..d]);
            let logit = &logit[r * gw..][..gw];
            if gw == 1 {
                let g = sigmoid_f32(logit[0] - offset);
                for i in 0..d {
                    o[i] = s[i] + f[i] * g;
                }
            } else {
                for i in 0..d {
                    o[i] = s[i] + f[i] * sigmoid_f32(logit[i] - offset);
                }
            }
        });
        Ok((CpuStorage::F32(out), sl.shape().clone()))
    }
}

/// See [`super::swiglu`].
pub(super) struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "pid-swiglu"
    }

    fn cpu_fwd(
        &self,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = cpu_slice::<f32>(a_s, al, self.name())?;
        let b = cpu_slice::<f32>(b_s, bl, self.name())?;
        if al.shape() != bl.shape() {
            bail!("swiglu: {:?} and {:?} differ", al.dims(), bl.dims())
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(TASK_ELEMS)
            .zip(a.par_chunks(TASK_ELEMS).zip(b.par_chunks(TASK_ELEMS)))
            .for_each(|(o, (a, b))| {
                for i in 0..o.len() {
                    o[i] = a[i] * sigmoid_f32(a[i]) * b[i];
                }
            });
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorised_exp_matches_libm() {
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let rel = ((exp_f32(x) - x.exp()) / x.exp()).abs();
            assert!(rel < 3e-7, "exp_f32({x}) relative error {rel}");
        }
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn sigmoid_is_exact_to_a_few_ulps_on_both_sides() {
        for i in -2000..=2000 {
            let x = i as f32 / 40.0;
            let want = 1.0 / (1.0 + (-x as f64).exp());
            let err = ((sigmoid_f32(x) as f64 - want) / want).abs();
            assert!(err < 5e-7, "sigmoid({x}): relative error {err}");
        }
    }
}
