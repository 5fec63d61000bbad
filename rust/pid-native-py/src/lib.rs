//! `pid_native._native`: the thin PyO3 layer over `pid-core`.
//!
//! Arguments are copied into owned Rust values while attached, heavy work runs with
//! the GIL released, and every core error maps to one class of `pid_native.errors`.

mod alloc;
mod caption;
mod checkpoint;
mod convert;
mod decoder;
mod device;
mod errors;
mod net;
mod vae;

use numpy::{IntoPyArray, PyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use errors::{input_error, PyPidError};
use pid_core::noise::Stream;
use pid_core::NetConfig;

/// What this extension was built with: crate version, cargo features, candle version, target.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    d.set_item("features", features)?;
    d.set_item("candle_version", env!("PID_CANDLE_VERSION"))?;
    d.set_item("target", env!("PID_TARGET"))?;
    d.set_item(
        "profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    Ok(d)
}

/// Check that files are complete, readable safetensors (header and length), naming what is wrong.
#[pyfunction]
fn check_safetensors(paths: Vec<std::path::PathBuf>) -> Result<(), PyPidError> {
    pid_core::weights::open_safetensors(&paths)?;
    Ok(())
}

/// Validate a network config JSON and return it with every field filled in.
#[pyfunction]
fn normalize_config(config: &str) -> Result<String, PyPidError> {
    Ok(NetConfig::from_json(config)?.to_json())
}

/// The memory plan (see `pid_core::plan`) for `batch` latents of `h x w` of a network config,
/// so every backend plans identically. Raises BudgetError when nothing fits.
#[pyfunction]
#[pyo3(signature = (config, batch, h, w, weight_bytes, budget_bytes, tile=None))]
#[allow(clippy::too_many_arguments)]
fn plan_decode(
    config: &str,
    batch: usize,
    h: usize,
    w: usize,
    weight_bytes: usize,
    budget_bytes: u64,
    tile: Option<usize>,
) -> Result<decoder::PyPlan, PyPidError> {
    let cfg = NetConfig::from_json(config)?;
    let dt = pid_core::plan::DTypes {
        activation: 4,
        weight: weight_bytes,
    };
    Ok(decoder::make_plan(
        &cfg,
        (batch, h, w),
        dt,
        budget_bytes,
        tile,
    )?)
}

/// Tile blend weights along one axis (see `pid_core::plan::feather`).
#[pyfunction]
fn feather(length: usize, ramp_start: bool, ramp_end: bool) -> Vec<f32> {
    pid_core::plan::feather(length, ramp_start, ramp_end)
}

/// The latent pixels the tile `(y, x, h, w)` (output pixels, `f` per latent pixel) is
/// conditioned on within a `(zh, zw)` latent, with a halo of up to `halo` latent pixels:
/// `((y, x, h, w), (row, col))`, the crop and where the tile starts in it (latent pixels).
#[pyfunction]
fn latent_crop(
    tile: (usize, usize, usize, usize),
    f: usize,
    halo: usize,
    latent: (usize, usize),
) -> ((usize, usize, usize, usize), (usize, usize)) {
    let (y, x, h, w) = tile;
    let (crop, offset) = pid_core::plan::Tile { y, x, h, w }.latent_crop(f, halo, latent);
    ((crop.y, crop.x, crop.h, crop.w), offset)
}

/// The sampler's t ladder for `steps` network evaluations.
#[pyfunction]
fn t_ladder(steps: usize) -> Result<Vec<f32>, PyPidError> {
    Ok(pid_core::sampler::t_ladder(steps)?)
}

/// The JSON config of a named network preset (`sdxl-2kto4k`, `sdxl-mini`).
#[pyfunction]
fn preset_config(name: &str) -> Result<String, PyPidError> {
    Ok(NetConfig::preset(name)?.to_json())
}

/// Standard normal noise from the shared counter-based generator (see `pid_core::noise`).
///
/// `stream` 0 is a decode's initial noise, `k + 1` the re-noising after step k. A value
/// depends only on (seed, stream, flat index), so every backend draws the same numbers.
///
/// With a CUDA `device` the values are drawn on the GPU (bit-identical to the CPU's).
#[pyfunction]
#[pyo3(signature = (seed, stream, shape, device="cpu"))]
fn gaussian_noise<'py>(
    py: Python<'py>,
    seed: u64,
    stream: u32,
    shape: Vec<usize>,
    device: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let n: usize = shape.iter().product();
    let s = if stream == 0 {
        Stream::Initial
    } else {
        Stream::Renoise(stream - 1)
    };
    let dev = device::parse_device(device)?;
    let data = py
        .detach(|| pid_core::kernels::normal(seed, s, n, &dev)?.to_vec1::<f32>())
        .map_err(PyPidError::from)?;
    let arr = numpy::ndarray::ArrayD::from_shape_vec(numpy::ndarray::IxDyn(&shape), data)
        .map_err(|e| input_error("shape", e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    alloc::tune();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::checkpoint_layout, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::released_config, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::check_pth, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::convert_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::checkpoint_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(gaussian_noise, m)?)?;
    m.add_function(wrap_pyfunction!(preset_config, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::inspect_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(check_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_config, m)?)?;
    m.add_function(wrap_pyfunction!(plan_decode, m)?)?;
    m.add_function(wrap_pyfunction!(feather, m)?)?;
    m.add_function(wrap_pyfunction!(latent_crop, m)?)?;
    m.add_function(wrap_pyfunction!(t_ladder, m)?)?;
    m.add_function(wrap_pyfunction!(device::set_custom_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(device::custom_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(device::synchronize, m)?)?;
    m.add_function(wrap_pyfunction!(device::kernel_self_check, m)?)?;
    m.add_function(wrap_pyfunction!(device::device_memory, m)?)?;
    m.add_class::<net::PyPidNet>()?;
    m.add_class::<decoder::PyDecoder>()?;
    m.add_class::<decoder::PyCancelToken>()?;
    m.add_class::<decoder::PyPlan>()?;
    m.add_class::<decoder::PyDecodeRequest>()?;
    m.add_class::<decoder::PyProgressEvent>()?;
    m.add_class::<caption::PyCaptionEncoder>()?;
    m.add_class::<caption::PyCaptionCache>()?;
    m.add_class::<vae::PyVae>()?;
    Ok(())
}
