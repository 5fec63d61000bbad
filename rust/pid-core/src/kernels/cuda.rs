//! Launchers of `kernels/pid_kernels.cu` (a fatbin built by `build.rs`), as candle custom ops.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor, WithDType,
};
use half::bf16;

use super::attention::{attention_dims, sdpa_chunked};
use super::linear::widened_matmul;
use super::{
    gated_add_ops, last_dim, max_abs_diff, rms_norm_modulate_ops, rows_per_mod, sigma_gate_ops,
};
use crate::noise::{self, Stream};

/// PTX for `CUDA_COMPUTE_CAP` (JIT-compiled by the driver on newer GPUs) and machine code for
/// the architectures in `PID_CUDA_SASS`, which the driver prefers where it matches the GPU.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pid_kernels.fatbin"));

/// Threads per block of the elementwise and row kernels.
const THREADS: u32 = 256;

/// One of our kernels and the stream it launches on.
struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Kernel `name` of our module, which is loaded once per GPU (candle's module cache takes PTX
/// text only, not a fatbin).
fn kernel(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    static MODULES: Mutex<Vec<(usize, Arc<CudaModule>)>> = Mutex::new(Vec::new());
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let module = {
        let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
        match modules
            .iter()
            .find(|(ordinal, _)| *ordinal == ctx.ordinal())
        {
            Some((_, module)) => module.clone(),
            None => {
                let module = ctx.load_module(Ptx::from_binary(FATBIN.to_vec())).w()?;
                modules.push((ctx.ordinal(), module.clone()));
                module
            }
        }
    };
    let func = module.load_function(name).w()?;
    Ok(Kernel { func, stream })
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("pid-native's CUDA kernels take f32 or bf16, not {other:?}"),
    }
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("pid-native's CUDA kernels need contiguous inputs"),
    }
}

/// A grid-stride launch over `n` work items.
fn stride_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// These custom ops run on the GPU only; on the CPU the dispatchers in `mod.rs` pick the
/// `cpu` kernels or the candle-ops twins.
/// `no_cpu!(_a, _b)` for a two-operand op, `no_cpu!(_a, _b, _c)` for three.
macro_rules! no_cpu {
    ($($operand:ident),+) => {
        fn cpu_fwd(
            &self,
            $($operand: &candle_core::CpuStorage, _: &Layout),+
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            bail!(
                "{} is a CUDA kernel; the CPU runs its own kernel or the candle-ops twin",
                self.name()
            )
        }
    };
}

struct RmsNormModulate {
    weight: Tensor,
    eps: f32,
}

impl RmsNormModulate {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (hs, hl): (&CudaStorage, &Layout),
        (ss, sl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = xs.device();
        let d = last_dim(xl);
        let rows = xl.shape().elem_count() / d;
        let per_mod = rows_per_mod(self.name(), rows, d, hl.shape().elem_count())? as i32;
        let (ws, wl) = self.weight.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            bail!("rms_norm_modulate: the weight is not on the GPU")
        };
        let (x, w, shift, scale) = (
            view::<T>(xs, xl)?,
            view::<T>(ws, wl)?,
            view::<T>(hs, hl)?,
            view::<T>(ss, sl)?,
        );
        let out = unsafe { dev.alloc::<T>(rows * d)? };
        let func = kernel(dev, &format!("pid_rms_norm_modulate_{}", suffix(T::DTYPE)?))?;
        let (rows_i, d_i, eps) = (rows as i32, d as i32, self.eps);
        let warps_per_block = THREADS as usize / 32;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&x).arg(&w).arg(&shift).arg(&scale).arg(&out);
        b.arg(&rows_i).arg(&d_i).arg(&per_mod).arg(&eps);
        // SAFETY: the argument list matches the kernel's signature; every view holds the
        // element counts the kernel reads (checked above) and `out` rows * d.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for RmsNormModulate {
    fn name(&self) -> &'static str {
        "pid-rms-norm-modulate"
    }

    no_cpu!(_a, _b, _c);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        shift: &CudaStorage,
        hl: &Layout,
        scale: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((x, xl), (shift, hl), (scale, sl));
        let out = match x.dtype() {
            DType::F32 => self.launch::<f32>(args.0, args.1, args.2)?,
            DType::BF16 => self.launch::<bf16>(args.0, args.1, args.2)?,
            other => bail!("rms_norm_modulate: unsupported dtype {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

pub fn rms_norm_modulate(
    x: &Tensor,
    weight: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let op = RmsNormModulate {
        weight: weight.to_dtype(x.dtype())?.contiguous()?,
        eps,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&shift.contiguous()?, &scale.contiguous()?, &op)
}

struct GatedAdd;

impl GatedAdd {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        (xs, xl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
        (ys, yl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = xs.device();
        let n = xl.shape().elem_count();
        if yl.shape() != xl.shape() {
            bail!(
                "gated_add: x {:?} and y {:?} differ",
                xl.shape(),
                yl.shape()
            )
        }
        let d = last_dim(xl);
        let per_mod = rows_per_mod("gated_add", n / d, d, gl.shape().elem_count())? as i32;
        let (x, g, y) = (view::<T>(xs, xl)?, view::<T>(gs, gl)?, view::<T>(ys, yl)?);
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = kernel(dev, &format!("pid_gated_add_{}", suffix(T::DTYPE)?))?;
        let d_i = d as i32;
        let mut b = func.builder();
        b.arg(&x)
            .arg(&g)
            .arg(&y)
            .arg(&out)
            .arg(&n)
            .arg(&d_i)
            .arg(&per_mod);
        // SAFETY: signature (x, gate, y, out, n, d, rows_per_mod); sizes checked above.
        unsafe { b.launch(stride_config(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "pid-gated-add"
    }

    no_cpu!(_a, _b, _c);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        gate: &CudaStorage,
        gl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => Self::launch::<f32>((x, xl), (gate, gl), (y, yl))?,
            DType::BF16 => Self::launch::<bf16>((x, xl), (gate, gl), (y, yl))?,
            other => bail!("gated_add: unsupported dtype {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    x.contiguous()?.apply_op3_no_bwd(
        &gate.to_dtype(dt)?.contiguous()?,
        &y.to_dtype(dt)?.contiguous()?,
        &GatedAdd,
    )
}

struct SigmaGate {
    /// `(B,)` f32 on the device.
    offset: Tensor,
}

impl SigmaGate {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        (ss, sl): (&CudaStorage, &Layout),
        (fs, fl): (&CudaStorage, &Layout),
        (ls, ll): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = ss.device();
        let (b, l, d) = sl.shape().dims3()?;
        let gw = ll.shape().dims3()?.2;
        if fl.shape() != sl.shape() || ll.shape().dims3()? != (b, l, gw) || !(gw == d || gw == 1) {
            bail!(
                "sigma_gate: s {:?}, f {:?}, logit {:?} do not match",
                sl.shape(),
                fl.shape(),
                ll.shape()
            )
        }
        let (os, ol) = self.offset.storage_and_layout();
        let Storage::Cuda(os) = &*os else {
            bail!("sigma_gate: the offset is not on the GPU")
        };
        if ol.shape().elem_count() != b {
            bail!(
                "sigma_gate: {} offsets for a batch of {b}",
                ol.shape().elem_count()
            )
        }
        let (s, f, logit, offset) = (
            view::<T>(ss, sl)?,
            view::<T>(fs, fl)?,
            view::<T>(ls, ll)?,
            view::<f32>(os, ol)?,
        );
        let n = b * l * d;
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = kernel(dev, &format!("pid_sigma_gate_{}", suffix(T::DTYPE)?))?;
        let (d_i, gw_i, l_i) = (d as i32, gw as i32, l as i32);
        let mut bld = func.builder();
        bld.arg(&s).arg(&f).arg(&logit).arg(&offset).arg(&out);
        bld.arg(&n).arg(&d_i).arg(&gw_i).arg(&l_i);
        // SAFETY: signature (s, f, logit, offset, out, n, d, gw, rows_per_batch); shapes checked.
        unsafe { bld.launch(stride_config(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for SigmaGate {
    fn name(&self) -> &'static str {
        "pid-sigma-gate"
    }

    no_cpu!(_a, _b, _c);

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        sl: &Layout,
        f: &CudaStorage,
        fl: &Layout,
        logit: &CudaStorage,
        ll: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.launch::<f32>((s, sl), (f, fl), (logit, ll))?,
            DType::BF16 => self.launch::<bf16>((s, sl), (f, fl), (logit, ll))?,
            other => bail!("sigma_gate: unsupported dtype {other:?}"),
        };
        Ok((out, sl.shape().clone()))
    }
}

pub fn sigma_gate(s: &Tensor, f: &Tensor, logit: &Tensor, offset: &Tensor) -> Result<Tensor> {
    let dt = s.dtype();
    let op = SigmaGate {
        offset: offset.to_dtype(DType::F32)?.contiguous()?,
    };
    s.contiguous()?.apply_op3_no_bwd(
        &f.to_dtype(dt)?.contiguous()?,
        &logit.to_dtype(dt)?.contiguous()?,
        &op,
    )
}

/// Must match `FA_BR` and `FA_WARPS` in the kernel source.
const FA_ROWS: u32 = 64;
const FA_THREADS: u32 = 128;

struct FlashAttention {
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "pid-flash-attention"
    }

    no_cpu!(_a, _b, _c);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = qs.device();
        let (b, h, lq, lk, d) = attention_dims(ql, kl, vl)?;
        if qs.dtype() != DType::BF16 || !matches!(d, 64 | 72) {
            bail!(
                "flash attention takes bf16 with head dim 64 or 72, got {:?} / {d}",
                qs.dtype()
            )
        }
        let (q, k, v) = (
            view::<bf16>(qs, ql)?,
            view::<bf16>(ks, kl)?,
            view::<bf16>(vs, vl)?,
        );
        let out = unsafe { dev.alloc::<bf16>(b * h * lq * d)? };
        let func = kernel(dev, &format!("pid_flash_attention_bf16_d{d}"))?;
        let (lq_i, lk_i, scale) = (lq as i32, lk as i32, self.scale);
        let cfg = LaunchConfig {
            grid_dim: ((lq as u32).div_ceil(FA_ROWS), (b * h) as u32, 1),
            block_dim: (FA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&out)
            .arg(&lq_i)
            .arg(&lk_i)
            .arg(&scale);
        // SAFETY: signature (q, k, v, out, lq, lk, scale); shapes checked above.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            ql.shape().clone(),
        ))
    }
}

pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let op = FlashAttention {
        scale: 1.0 / (q.dim(3)? as f32).sqrt(),
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// `x W^T` for bf16 rows `x (m, k)` and a bf16 weight `W (n, k)`, accumulated and returned in
/// f32 (cuBLAS GemmEx on the tensor cores): the reference's bf16 autocast matmul without the
/// rounding of its product.
struct Bf16MatmulF32;

impl CustomOp2 for Bf16MatmulF32 {
    fn name(&self) -> &'static str {
        "pid-bf16-matmul-f32"
    }

    no_cpu!(_a, _b);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let ((m, k), (n, kw)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        if kw != k || xs.dtype() != DType::BF16 || ws.dtype() != DType::BF16 {
            bail!(
                "bf16 matmul of {:?} {:?} by {:?} {:?}",
                xs.dtype(),
                xl.dims(),
                ws.dtype(),
                wl.dims()
            )
        }
        let (x, w) = (view::<bf16>(xs, xl)?, view::<bf16>(ws, wl)?);
        let mut out = unsafe { dev.alloc::<f32>(m * n)? };
        let blas = dev.cublas_handle();
        let stream = out.stream().clone();
        let (alpha, beta) = (1f32, 0f32);
        let dims = [n, m, k].map(|v| v as i32);
        {
            let (xp, _x) = x.device_ptr(&stream);
            let (wp, _w) = w.device_ptr(&stream);
            let (op, _o) = out.device_ptr_mut(&stream);
            // Row-major `out (m, n)` is column-major `out^T (n, m) = W x^T`: `W` read
            // transposed from its column-major `(k, n)` buffer, `x` as column-major `(k, m)`.
            // SAFETY: the pointers address x (m k), W (n k) and out (m n) elements as stated,
            // on the stream the handle runs on; alpha and beta outlive the call.
            unsafe {
                cublas::gemm_ex(
                    *blas.handle(),
                    cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                    dims[0],
                    dims[1],
                    dims[2],
                    &alpha as *const f32 as *const _,
                    wp as *const _,
                    cublas_sys::cudaDataType_t::CUDA_R_16BF,
                    dims[2],
                    xp as *const _,
                    cublas_sys::cudaDataType_t::CUDA_R_16BF,
                    dims[2],
                    &beta as *const f32 as *const _,
                    op as *mut _,
                    cublas_sys::cudaDataType_t::CUDA_R_32F,
                    dims[0],
                    cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((m, n)),
        ))
    }
}

/// `x W^T` f32 for bf16-rounded `x (m, k)` and `W (n, k)` (see [`Bf16MatmulF32`]).
pub fn bf16_matmul_f32(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let bf = |t: &Tensor| t.to_dtype(DType::BF16)?.contiguous();
    bf(x)?.apply_op2_no_bwd(&bf(w)?, &Bf16MatmulF32)
}

/// `n` normals of stream `stream` drawn on `dev` (bit-identical to `noise::normal`).
pub fn normal(dev: &CudaDevice, seed: u64, stream: u32, n: usize) -> Result<Tensor> {
    let out = unsafe { dev.alloc::<f32>(n)? };
    let func = kernel(dev, "pid_normal_f32")?;
    let offset = 0u64;
    let mut b = func.builder();
    b.arg(&out).arg(&n).arg(&seed).arg(&stream).arg(&offset);
    // SAFETY: signature (out, n, seed, stream, offset); the kernel writes exactly n values.
    unsafe { b.launch(stride_config(n.div_ceil(4))) }.w()?;
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
}
/// One custom kernel measured against its candle-ops twin on the same inputs; the largest
/// difference is infinite when either output holds a non-finite value.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub name: String,
    pub max_abs_diff: f32,
    pub tolerance: f32,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.max_abs_diff <= self.tolerance
    }
}

/// Run every custom kernel and its candle-ops twin on random inputs of PiD's shapes on a CUDA
/// `device` (f32 and bf16) and report the largest difference of each pair; the noise kernel
/// must reproduce the CPU generator exactly. Ignores the on/off switch.
pub fn self_check(device: &Device) -> Result<Vec<KernelCheck>> {
    let Device::Cuda(cuda) = device else {
        bail!("the custom kernels run on CUDA devices only, not {device:?}")
    };
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        // f32: the same arithmetic in another order; bf16: one output rounding apart.
        let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
        let r = |shape: &[usize], k: f64| -> Result<Tensor> {
            (Tensor::randn(0f32, 1.0, shape, device)? * k)?.to_dtype(dtype)
        };
        let mut check = |name: &str, fused: Tensor, twin: Tensor, tol: f32| -> Result<()> {
            out.push(KernelCheck {
                name: format!("{name}/{dtype:?}").to_lowercase(),
                max_abs_diff: max_abs_diff(&fused, &twin)?,
                tolerance: tol,
            });
            Ok(())
        };
        // Patch block (per-image modulation) and PiT block (per-pixel modulation).
        for (name, xs, ms) in [
            (
                "rms_norm_modulate.patch",
                vec![2, 300, 1152],
                vec![2, 1, 1152],
            ),
            (
                "rms_norm_modulate.pixel",
                vec![64, 256, 16],
                vec![64, 256, 16],
            ),
        ] {
            let (x, w) = (r(&xs, 1.0)?, r(&xs[2..], 1.0)?);
            let (shift, scale) = (r(&ms, 0.5)?, r(&ms, 0.5)?);
            let twin = rms_norm_modulate_ops(&x, &w, &shift, &scale, 1e-6)?;
            check(
                name,
                rms_norm_modulate(&x, &w, &shift, &scale, 1e-6)?,
                twin,
                tol,
            )?;
            let (gate, y) = (r(&ms, 0.5)?, r(&xs, 1.0)?);
            let name = name.replace("rms_norm_modulate", "gated_add");
            check(
                &name,
                gated_add(&x, &gate, &y)?,
                gated_add_ops(&x, &gate, &y)?,
                tol,
            )?;
        }
        for (name, gw) in [("sigma_gate.per_dim", 1152), ("sigma_gate.per_token", 1)] {
            let (s, f, logit) = (
                r(&[2, 300, 1152], 1.0)?,
                r(&[2, 300, 1152], 1.0)?,
                r(&[2, 300, gw], 2.0)?,
            );
            let offset = Tensor::new(&[0.0f32, 3.0], device)?;
            let twin = sigma_gate_ops(&s, &f, &logit, &offset)?;
            check(name, sigma_gate(&s, &f, &logit, &offset)?, twin, tol)?;
        }
        if dtype == DType::BF16 {
            // Rows and widths off every tile; outputs of about unit size.
            let (x, w) = (r(&[300, 1152], 1.0)?, r(&[1000, 1152], 1.0 / 34.0)?);
            let twin = widened_matmul(&x, &w, DType::BF16)?;
            check("linear", bf16_matmul_f32(&x, &w)?, twin, 1e-4)?;
            // Keys not a multiple of the 32-key tile, queries not of the 64-query block.
            for d in [64, 72] {
                let (q, k, v) = (
                    r(&[2, 3, 333, d], 1.0)?,
                    r(&[2, 3, 301, d], 1.0)?,
                    r(&[2, 3, 301, d], 1.0)?,
                );
                let twin = sdpa_chunked(&q, &k, &v, Default::default())?;
                check(
                    &format!("flash_attention.d{d}"),
                    flash_attention(&q, &k, &v)?,
                    twin,
                    tol,
                )?;
            }
        }
    }
    let n = 3 * 777 + 2;
    let cpu = Tensor::from_vec(noise::normal(42, Stream::Renoise(1), n), n, &Device::Cpu)?;
    let dev = normal(cuda, 42, Stream::Renoise(1).id(), n)?.to_device(&Device::Cpu)?;
    out.push(KernelCheck {
        name: "normal/f32".into(),
        max_abs_diff: max_abs_diff(&cpu, &dev)?,
        tolerance: 0.0,
    });
    Ok(out)
}
