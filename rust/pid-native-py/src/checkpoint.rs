//! PiD checkpoints: layouts, validation, conversion to safetensors, and raw tensors for MLX.

use std::collections::HashMap;
use std::path::PathBuf;

use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::PyPidError;
use candle_core::DType;
use pid_core::pth::PthFile;
use pid_core::weights::Checkpoint;
use pid_core::{LatentHint, NetConfig};

fn hint(channels: Option<usize>, down_factor: usize) -> Option<LatentHint> {
    channels.map(|channels| LatentHint {
        channels,
        spatial_down_factor: down_factor,
    })
}

/// Every tensor a network config reads: `[(name, shape), ...]` in upstream names.
#[pyfunction]
pub fn checkpoint_layout(config: &str) -> Result<Vec<(String, Vec<usize>)>, PyPidError> {
    Ok(NetConfig::from_json(config)?.expected_tensors())
}

/// The network JSON of a released student: its latent space's channels and spatial factor,
/// flux2 v1.5's 2x2 un-packing factor, and its generation (v1 or v1.5); `shrunk`: its mini
/// version (test mirrors, see `NetConfig::shrunk`).
#[pyfunction]
#[pyo3(signature = (latent_channels, latent_down_factor, unpatchify, v15, shrunk=false))]
pub fn released_config(
    latent_channels: usize,
    latent_down_factor: usize,
    unpatchify: usize,
    v15: bool,
    shrunk: bool,
) -> Result<String, PyPidError> {
    let latent = LatentHint {
        channels: latent_channels,
        spatial_down_factor: latent_down_factor,
    };
    let cfg = NetConfig::released(latent, unpatchify, v15);
    let cfg = if shrunk { cfg.shrunk() } else { cfg };
    cfg.validate()?;
    Ok(cfg.to_json())
}

/// Validate a PiD checkpoint (safetensors or `.pth`) from its header (no tensor is read) and
/// return its config JSON: the given `config`, else the one detected from the tensors for the
/// latent space.
#[pyfunction]
#[pyo3(signature = (path, config=None, latent_channels=None, latent_down_factor=8))]
pub fn inspect_checkpoint(
    py: Python<'_>,
    path: PathBuf,
    config: Option<String>,
    latent_channels: Option<usize>,
    latent_down_factor: usize,
) -> Result<String, PyPidError> {
    let hint = hint(latent_channels, latent_down_factor);
    let (_, cfg) = py.detach(|| Checkpoint::open_validated(&path, config.as_deref(), hint))?;
    Ok(cfg.to_json())
}

/// Check that a `.pth` is a state dict of tensors whose storages are all in the archive
/// (reads the pickle and the zip directory, no tensor data).
#[pyfunction]
pub fn check_pth(py: Python<'_>, path: PathBuf) -> Result<(), PyPidError> {
    py.detach(|| PthFile::open(&path))?;
    Ok(())
}

/// Validate `src` (safetensors or `.pth`) against `config` (else the one detected for the
/// latent space) and write its student tensors, bare-named and byte for byte, to the
/// safetensors file `dst` with `metadata`. Returns the config JSON.
#[pyfunction]
#[pyo3(signature = (src, dst, metadata, config=None, latent_channels=None, latent_down_factor=8))]
pub fn convert_checkpoint(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    metadata: HashMap<String, String>,
    config: Option<String>,
    latent_channels: Option<usize>,
    latent_down_factor: usize,
) -> Result<String, PyPidError> {
    let hint = hint(latent_channels, latent_down_factor);
    let cfg = py.detach(|| -> pid_core::Result<NetConfig> {
        let (ckpt, cfg) = Checkpoint::open_validated(&src, config.as_deref(), hint)?;
        let mut metadata = metadata;
        metadata.insert("pid_config".into(), cfg.to_json());
        ckpt.save_safetensors(&dst, metadata)?;
        Ok(cfg)
    })?;
    Ok(cfg.to_json())
}

/// The student tensors of a checkpoint (bare names), each as `(dtype, array)`: `"bf16"` and
/// `"f16"` as uint16 bit patterns, `"f32"` as float32. For backends that load weights themselves.
#[pyfunction]
pub fn checkpoint_arrays<'py>(py: Python<'py>, path: PathBuf) -> Result<Bound<'py, PyDict>, PyErr> {
    let ckpt = py
        .detach(|| Checkpoint::open(&path))
        .map_err(PyPidError::from)?;
    let out = PyDict::new(py);
    for (name, (dtype, shape)) in ckpt.index() {
        let bytes = ckpt.raw_bytes(name).map_err(PyPidError::from)?;
        let shape = numpy::ndarray::IxDyn(shape);
        let (tag, array) = match dtype {
            DType::BF16 => ("bf16", to_array::<u16>(py, &bytes, shape)?),
            DType::F16 => ("f16", to_array::<u16>(py, &bytes, shape)?),
            DType::F32 => ("f32", to_array::<f32>(py, &bytes, shape)?),
            other => {
                return Err(PyPidError(pid_core::Error::weights(
                    &path,
                    "tensor_dtype",
                    format!("tensor `{name}` has dtype {other:?}, expected bf16, f16 or f32"),
                ))
                .into())
            }
        };
        out.set_item(name, (tag, array))?;
    }
    Ok(out)
}

/// Little-endian bytes as a new numpy array of `T` with `shape`.
fn to_array<'py, T: numpy::Element + Copy + FromLeBytes>(
    py: Python<'py>,
    bytes: &[u8],
    shape: numpy::ndarray::IxDyn,
) -> PyResult<Bound<'py, pyo3::PyAny>> {
    let values: Vec<T> = bytes
        .chunks_exact(std::mem::size_of::<T>())
        .map(T::from_le)
        .collect();
    let array = numpy::ndarray::ArrayD::from_shape_vec(shape, values)
        .map_err(|e| crate::errors::input_error("array", e.to_string()))?;
    Ok(array.into_pyarray(py).into_any())
}

trait FromLeBytes {
    fn from_le(b: &[u8]) -> Self;
}

impl FromLeBytes for u16 {
    fn from_le(b: &[u8]) -> Self {
        u16::from_le_bytes([b[0], b[1]])
    }
}

impl FromLeBytes for f32 {
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}
