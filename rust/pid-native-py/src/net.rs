//! `PidNet`: the bare network and sampler, for parity tests and other backends' conformance.

use candle_core::Tensor;
use numpy::{PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{on, to_numpy};
use crate::device::{parse_device, parse_dtype};
use crate::errors::{input_error, PyPidError};
use pid_core::net::{PidNet, Trace};
use pid_core::sampler::{self, StepObserver};
use pid_core::weights::Checkpoint;
use pid_core::LatentHint;

/// `(image, [x0 of every step])` from [`PyPidNet::sample`].
type Sampled<'py> = (
    Bound<'py, PyArrayDyn<f32>>,
    Vec<Bound<'py, PyArrayDyn<f32>>>,
);

/// The PiD network with its weights loaded.
#[pyclass(name = "PidNet", module = "pid_native._native", frozen)]
pub struct PyPidNet {
    net: PidNet,
}

#[pymethods]
impl PyPidNet {
    /// Open a PiD checkpoint (`.safetensors`, bare or `net.`-prefixed keys).
    ///
    /// Args:
    ///     path: checkpoint file.
    ///     config: network config JSON; detected from the tensors when omitted.
    ///     latent_channels, latent_down_factor: the latent space, needed to detect
    ///         un-patchifying students (flux2 v1.5).
    ///     weight_dtype: resident dtype of the weights ("bf16" halves memory).
    ///     device: "cpu" or "cuda[:N]"; inputs and outputs stay NumPy float32.
    ///     compute_dtype: the dtype of the matmul and attention operands, "f32" (default),
    ///         "bf16" (CUDA) or "f16"; everything else runs in f32.
    #[staticmethod]
    #[pyo3(signature = (path, config=None, latent_channels=None, latent_down_factor=None, weight_dtype="bf16", device="cpu", compute_dtype="f32"))]
    #[allow(clippy::too_many_arguments)]
    fn open(
        py: Python<'_>,
        path: std::path::PathBuf,
        config: Option<String>,
        latent_channels: Option<usize>,
        latent_down_factor: Option<usize>,
        weight_dtype: &str,
        device: &str,
        compute_dtype: &str,
    ) -> PyResult<Self> {
        let wdt = parse_dtype(weight_dtype)?;
        let device = parse_device(device)?;
        let cdt = crate::device::compute_dtype(Some(compute_dtype), &device)?;
        let hint = latent_channels.map(|c| LatentHint {
            channels: c,
            spatial_down_factor: latent_down_factor.unwrap_or(8),
        });
        let net = py.detach(|| -> Result<PidNet, PyPidError> {
            let (ckpt, cfg) = Checkpoint::open_validated(&path, config.as_deref(), hint)?;
            Ok(PidNet::new(&cfg, ckpt.var_builder(wdt, &device)?, cdt)?)
        })?;
        Ok(Self { net })
    }

    /// The network configuration as JSON (upstream argument names).
    #[getter]
    fn config(&self) -> String {
        self.net.config().to_json()
    }

    /// Velocity v = eps - x0 for noisy pixels `x (B,3,H,W)` at `t (B,)` (already x1000).
    ///
    /// With `trace=True` returns `(v, {name: array})` of intermediate module outputs
    /// named like the golden files' `trace.*` tensors.
    #[pyo3(signature = (x, t, y, lq_latent, sigma, trace=false))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f32>,
        t: PyReadonlyArrayDyn<'py, f32>,
        y: PyReadonlyArrayDyn<'py, f32>,
        lq_latent: PyReadonlyArrayDyn<'py, f32>,
        sigma: PyReadonlyArrayDyn<'py, f32>,
        trace: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let dev = self.net.device();
        let (x, t, y, z, s) = (
            on(dev, "x", &x)?,
            on(dev, "t", &t)?,
            on(dev, "y", &y)?,
            on(dev, "lq_latent", &lq_latent)?,
            on(dev, "sigma", &sigma)?,
        );
        let mut tr = if trace {
            Trace::enabled()
        } else {
            Trace::disabled()
        };
        let v = py
            .detach(|| {
                let v = self.net.forward(&x, &t, &y, &z, &s, &mut tr);
                crate::alloc::trim();
                v
            })
            .map_err(PyPidError::from)?;
        let v = to_numpy(py, &v)?.into_any();
        if !trace {
            return Ok(v);
        }
        let d = PyDict::new(py);
        for (name, tensor) in tr.into_entries() {
            d.set_item(name, to_numpy(py, &tensor)?)
                .map_err(|e| input_error("trace", e.to_string()))?;
        }
        Ok((v, d)
            .into_pyobject(py)
            .map_err(|e| input_error("trace", e.to_string()))?
            .into_any())
    }

    /// Run the sampler with injected noise: `eps[k]` re-noises after step k.
    ///
    /// Returns `(image, [x0_step0, ...])`.
    #[pyo3(signature = (noise, eps, y, lq_latent, sigma, t_list))]
    #[allow(clippy::too_many_arguments)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        noise: PyReadonlyArrayDyn<'py, f32>,
        eps: Vec<PyReadonlyArrayDyn<'py, f32>>,
        y: PyReadonlyArrayDyn<'py, f32>,
        lq_latent: PyReadonlyArrayDyn<'py, f32>,
        sigma: PyReadonlyArrayDyn<'py, f32>,
        t_list: Vec<f32>,
    ) -> PyResult<Sampled<'py>> {
        let dev = self.net.device();
        let noise = on(dev, "noise", &noise)?;
        let eps: Vec<Tensor> = eps
            .iter()
            .map(|e| on(dev, "eps", e))
            .collect::<PyResult<_>>()?;
        let (y, z, s) = (
            on(dev, "y", &y)?,
            on(dev, "lq_latent", &lq_latent)?,
            on(dev, "sigma", &sigma)?,
        );
        if t_list.len() < 2 || eps.len() + 2 < t_list.len() {
            return Err(input_error(
                "t_list",
                format!(
                    "{} steps need {} eps tensors, got {}",
                    t_list.len().saturating_sub(1),
                    t_list.len().saturating_sub(2),
                    eps.len()
                ),
            ));
        }
        struct Keep(Vec<Tensor>);
        impl StepObserver for Keep {
            fn after_step(&mut self, _step: usize, x0: &Tensor) {
                self.0.push(x0.clone());
            }
        }
        let (image, x0s) = py
            .detach(|| -> pid_core::Result<(Tensor, Vec<Tensor>)> {
                let (_, _, h, w) = noise.dims4()?;
                let cond = self
                    .net
                    .condition(&y, &z, &s, (h, w), &mut Trace::disabled())?;
                let mut keep = Keep(Vec::new());
                let image = sampler::run(
                    &noise,
                    &t_list,
                    sampler::net_velocity(&self.net, &cond),
                    |k| Ok(eps[k].clone()),
                    &mut keep,
                )?;
                crate::alloc::trim();
                Ok((image, keep.0))
            })
            .map_err(PyPidError::from)?;
        Ok((
            to_numpy(py, &image)?,
            x0s.iter()
                .map(|t| to_numpy(py, t))
                .collect::<PyResult<_>>()?,
        ))
    }
}
