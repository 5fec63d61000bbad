//! Devices, compute dtypes and the custom CUDA kernels' switch and self-check.

use candle_core::{DType, Device};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::PyPidError;
use pid_core::Error;

/// "bf16" | "bfloat16", "f16" | "float16" or "f32" | "float32".
pub fn parse_dtype(name: &str) -> Result<DType, PyPidError> {
    match name {
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        "f32" | "float32" => Ok(DType::F32),
        other => Err(PyPidError(Error::input(
            "dtype",
            format!("unknown dtype {other:?}; use \"bf16\", \"f16\" or \"f32\""),
        ))),
    }
}

/// "cpu", "cuda" or "cuda:N".
pub fn parse_device(name: &str) -> Result<Device, PyPidError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse::<usize>)
                .map_err(|_| {
                    PyPidError(Error::input(
                        "device",
                        format!("bad device {name:?}; use \"cpu\" or \"cuda:N\""),
                    ))
                })?;
            Ok(pid_core::cuda_device::open(ordinal)?)
        }
        other => Err(PyPidError(Error::input(
            "device",
            format!("unknown device {other:?}; use \"cpu\" or \"cuda:N\""),
        ))),
    }
}

/// The activation dtype for `name` on `device`; `None` picks f32 on the CPU, bf16 on CUDA.
pub fn compute_dtype(name: Option<&str>, device: &Device) -> Result<DType, PyPidError> {
    let dtype = match name {
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
        Some(name) => parse_dtype(name)?,
    };
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(PyPidError(Error::input(
            "compute_dtype",
            "bf16 compute needs a CUDA device (candle's CPU matmul has no bf16); use compute_dtype=\"f32\" or \"f16\" on the CPU",
        )));
    }
    Ok(dtype)
}

/// Turn pid-native's custom CUDA kernels on or off for this process (the candle-ops
/// fallbacks run when off). Starts from the environment: `PID_CUDA_KERNELS=0` disables.
#[pyfunction]
pub fn set_custom_kernels(enabled: bool) {
    pid_core::kernels::set_enabled(enabled);
}

/// Whether the custom CUDA kernels are on (they only ever run on CUDA devices).
#[pyfunction]
pub fn custom_kernels() -> bool {
    pid_core::kernels::enabled()
}

/// Wait until all queued work on `device` has finished (no-op on the CPU), for timing.
#[pyfunction]
pub fn synchronize(py: Python<'_>, device: &str) -> Result<(), PyPidError> {
    let dev = parse_device(device)?;
    py.detach(|| dev.synchronize())?;
    Ok(())
}

/// Every custom CUDA kernel against its candle-ops fallback on `device`:
/// `[{"name", "max_abs_diff", "tolerance", "passed"}, ...]`.
#[pyfunction]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn kernel_self_check<'py>(py: Python<'py>, device: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let dev = parse_device(device)?;
    #[cfg(feature = "cuda")]
    {
        let checks = py
            .detach(|| pid_core::kernels::self_check(&dev))
            .map_err(PyPidError::from)?;
        checks
            .iter()
            .map(|c| {
                let d = PyDict::new(py);
                d.set_item("name", &c.name)?;
                d.set_item("max_abs_diff", c.max_abs_diff)?;
                d.set_item("tolerance", c.tolerance)?;
                d.set_item("passed", c.passed())?;
                Ok(d)
            })
            .collect()
    }
    #[cfg(not(feature = "cuda"))]
    Err(PyPidError(Error::input(
        "device",
        "the custom kernels exist only in the CUDA build, on CUDA devices",
    ))
    .into())
}

/// `(free, total)` bytes of a CUDA device's memory (all processes), or None on the CPU.
#[pyfunction]
pub fn device_memory(device: &str) -> Result<Option<(usize, usize)>, PyPidError> {
    match parse_device(device)? {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use candle_core::cuda_backend::WrapErr;
            Ok(Some(dev.cuda_stream().context().mem_get_info().w()?))
        }
        _ => Ok(None),
    }
}
