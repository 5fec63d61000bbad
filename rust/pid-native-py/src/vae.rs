//! `Vae`: the SDXL VAE, image <-> the latent PiD decodes (pid_spec §2.2).

use std::path::PathBuf;

use numpy::{PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::convert::{to_numpy, to_tensor};
use crate::device::parse_device;
use crate::errors::PyPidError;
use pid_core::vae::Vae;

/// The SDXL VAE (diffusers ``AutoencoderKL`` layout), weights in float32.
#[pyclass(name = "Vae", module = "pid_native._native", frozen)]
pub struct PyVae {
    vae: Vae,
}

#[pymethods]
impl PyVae {
    /// Open a diffusers VAE directory (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    /// or a ``kind=sdxl_vae`` golden file.
    ///
    /// Raises:
    ///     MissingFileError: a needed file is absent. WeightsError: the tensors do not match
    ///         the config, or the VAE is not SDXL-style.
    #[staticmethod]
    #[pyo3(signature = (path, device="cpu"))]
    fn open(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        let device = parse_device(device)?;
        let vae = py
            .detach(|| Vae::open(&path, &device))
            .map_err(PyPidError::from)?;
        Ok(Self { vae })
    }

    /// The latent scale (0.13025 for SDXL): PiD decodes ``posterior_mean * scaling_factor``.
    #[getter]
    fn scaling_factor(&self) -> f64 {
        self.vae.config().scaling_factor
    }

    #[getter]
    fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels
    }

    /// Image pixels per latent pixel along each axis (8 for SDXL).
    #[getter]
    fn down_factor(&self) -> usize {
        self.vae.config().down_factor()
    }

    /// Encode ``image (B, 3, H, W)`` float32 in [-1, 1] to its posterior mean.
    ///
    /// Args:
    ///     raw: return the mean itself instead of the scaled latent PiD decodes.
    ///
    /// Returns:
    ///     ``(B, 4, H/8, W/8)`` float32, ``mean * scaling_factor`` unless ``raw``.
    #[pyo3(signature = (image, raw=false))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        image: PyReadonlyArrayDyn<'py, f32>,
        raw: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let image = to_tensor("image", &image)?;
        let latent = py
            .detach(|| {
                if raw {
                    self.vae.encode_mean(&image)
                } else {
                    self.vae.encode(&image)
                }
            })
            .map_err(PyPidError::from)?;
        to_numpy(py, &latent)
    }

    /// Decode a latent ``(B, 4, h, w)`` to an image ``(B, 3, 8h, 8w)`` float32, about
    /// [-1, 1] and not clamped.
    ///
    /// Args:
    ///     raw: the latent is unscaled (a posterior sample), not ``mean * scaling_factor``.
    #[pyo3(signature = (latent, raw=false))]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        latent: PyReadonlyArrayDyn<'py, f32>,
        raw: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let latent = to_tensor("latent", &latent)?;
        let image = py
            .detach(|| {
                if raw {
                    self.vae.decode_raw(&latent)
                } else {
                    self.vae.decode(&latent)
                }
            })
            .map_err(PyPidError::from)?;
        to_numpy(py, &image)
    }
}
