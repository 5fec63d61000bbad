//! numpy <-> candle conversion. Arrays are copied into owned tensors while the GIL is held,
//! so the heavy work can run detached.

use candle_core::{Device, Tensor};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{input_error, PyPidError};

/// A float32 numpy array as a CPU tensor (copied).
pub fn to_tensor(name: &str, a: &PyReadonlyArrayDyn<'_, f32>) -> PyResult<Tensor> {
    let shape = a.shape().to_vec();
    let data: Vec<f32> = a.as_array().iter().copied().collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .map_err(|e| input_error("array", format!("{name}: {e}")))
}

/// A tensor as a new float32 numpy array.
pub fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = t.dims().to_vec();
    let data = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(PyPidError::from)?;
    let arr = ArrayD::from_shape_vec(IxDyn(&shape), data)
        .map_err(|e| input_error("array", e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

/// A float32 numpy array as a tensor on `device` (copied).
pub fn on(device: &Device, name: &str, a: &PyReadonlyArrayDyn<'_, f32>) -> PyResult<Tensor> {
    to_tensor(name, a)?
        .to_device(device)
        .map_err(|e| PyPidError::from(e).into())
}
