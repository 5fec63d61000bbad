//! `Decoder` and `CancelToken`: the decode pipeline with planning, progress and cancellation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use numpy::{PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{to_numpy, to_tensor};
use crate::device::{self, parse_device, parse_dtype};
use crate::errors::{input_error, PyPidError};

use pid_core::decoder::{self, Event, Progress, Request};
use pid_core::plan::{self, DTypes, Plan};
use pid_core::weights::Checkpoint;
use pid_core::{Error, LatentHint, PidNet};

/// A thread-safe flag: `cancel()` stops a running decode at its next step or tile boundary.
#[pyclass(name = "CancelToken", module = "pid_native._native", frozen)]
#[derive(Default)]
pub struct PyCancelToken(Arc<AtomicBool>);

#[pymethods]
impl PyCancelToken {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Ask every decode watching this token to stop.
    fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    #[getter]
    fn cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Bridges core progress events to a Python callable, a cancel token and Ctrl-C.
struct PyProgress {
    callback: Option<Py<PyAny>>,
    cancel: Option<Arc<AtomicBool>>,
    /// A Python exception raised by the callback or by a signal, re-raised after the decode.
    raised: Mutex<Option<PyErr>>,
}

impl Progress for PyProgress {
    fn report(&mut self, event: Event) -> pid_core::Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            return Err(Error::Cancelled);
        }
        Python::attach(|py| -> PyResult<()> {
            py.check_signals()?;
            if let Some(cb) = &self.callback {
                let d = PyDict::new(py);
                match event {
                    Event::Image { index, count } => {
                        d.set_item("phase", "image")?;
                        d.set_item("index", index)?;
                        d.set_item("count", count)?;
                    }
                    Event::Step { step, total } => {
                        d.set_item("phase", "step")?;
                        d.set_item("step", step)?;
                        d.set_item("total", total)?;
                    }
                    Event::Tile { tile, tiles } => {
                        d.set_item("phase", "tile")?;
                        d.set_item("tile", tile)?;
                        d.set_item("tiles", tiles)?;
                    }
                }
                cb.call1(py, (d,))?;
            }
            Ok(())
        })
        .map_err(|e| {
            let msg = e.to_string();
            *self.raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            Error::Callback(msg)
        })
    }
}

pub fn plan_dict<'py>(py: Python<'py>, p: &Plan) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("height", p.height)?;
    d.set_item("width", p.width)?;
    d.set_item("whole", p.is_whole())?;
    let tiles: Vec<(usize, usize, usize, usize)> =
        p.tiles.iter().map(|t| (t.y, t.x, t.h, t.w)).collect();
    d.set_item("tiles", tiles)?;
    d.set_item("predicted_peak_bytes", p.predicted_peak_bytes)?;
    d.set_item("budget_bytes", p.budget_bytes)?;
    Ok(d)
}

/// The candle decoder: PiD network (plus, when given, caption encoder and VAE).
#[pyclass(name = "Decoder", module = "pid_native._native", frozen)]
pub struct PyDecoder {
    net: PidNet,
    weight_bytes: usize,
    activation_bytes: usize,
}

impl PyDecoder {
    fn dtypes(&self) -> DTypes {
        DTypes {
            activation: self.activation_bytes,
            weight: self.weight_bytes,
        }
    }

    fn make_plan(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        budget: u64,
        tile: Option<usize>,
    ) -> pid_core::Result<Plan> {
        let (oh, ow) = decoder::output_size(self.net.config(), h, w);
        plan::plan(
            self.net.config(),
            batch,
            oh,
            ow,
            self.dtypes(),
            budget,
            tile,
        )
    }
}

#[pymethods]
impl PyDecoder {
    /// Open and validate a PiD checkpoint; the GIL is released while loading.
    ///
    /// Args:
    ///     checkpoint: the PiD `.safetensors` file.
    ///     latent_channels, latent_down_factor: the latent space (needed to detect flux2 v1.5).
    ///     weight_dtype: resident weight dtype, "bf16" (default, half the memory) or "f32".
    ///     device: "cpu" or "cuda[:N]" (CUDA builds only).
    ///     compute_dtype: activation dtype, "f32", "bf16" (CUDA) or "f16"; None: f32 on the
    ///         CPU, bf16 on CUDA. Norms, RoPE, gates and the sampler stay in f32.
    #[staticmethod]
    #[pyo3(signature = (checkpoint, latent_channels=None, latent_down_factor=8, weight_dtype="bf16", device="cpu", compute_dtype=None))]
    fn open(
        py: Python<'_>,
        checkpoint: std::path::PathBuf,
        latent_channels: Option<usize>,
        latent_down_factor: usize,
        weight_dtype: &str,
        device: &str,
        compute_dtype: Option<&str>,
    ) -> PyResult<Self> {
        let wdt = parse_dtype(weight_dtype)?;
        let device = parse_device(device)?;
        let cdt = device::compute_dtype(compute_dtype, &device)?;
        let hint = latent_channels.map(|channels| LatentHint {
            channels,
            spatial_down_factor: latent_down_factor,
        });
        let net = py.detach(|| -> Result<PidNet, PyPidError> {
            let (ckpt, cfg) = Checkpoint::open_validated(&checkpoint, None, hint)?;
            Ok(PidNet::new(&cfg, ckpt.var_builder(wdt, &device)?, cdt)?)
        })?;
        Ok(Self {
            net,
            weight_bytes: wdt.size_in_bytes(),
            activation_bytes: cdt.size_in_bytes(),
        })
    }

    /// The detected network configuration as JSON.
    #[getter]
    fn config(&self) -> String {
        self.net.config().to_json()
    }

    /// Output pixels per latent pixel (32 for SDXL).
    #[getter]
    fn scale(&self) -> usize {
        self.net.config().pixels_per_latent()
    }

    /// The memory plan for `batch` latents of `h x w` within `budget_bytes` (raises BudgetError).
    #[pyo3(signature = (batch, h, w, budget_bytes, tile=None))]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        batch: usize,
        h: usize,
        w: usize,
        budget_bytes: u64,
        tile: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let p = self
            .make_plan(batch, h, w, budget_bytes, tile)
            .map_err(PyPidError::from)?;
        plan_dict(py, &p)
    }

    /// Decode `latents (B, C, h, w)` with caption embeddings `(B, N, D)`.
    ///
    /// Returns float32 `(B, 3, H, W)` in [-1, 1]. `progress(event: dict)` is called at every
    /// image, step and tile boundary; `cancel` (a CancelToken) and Ctrl-C stop the decode there.
    #[pyo3(signature = (latents, caption_embs, sigma, seeds, steps, budget_bytes, tile=None, progress=None, cancel=None))]
    #[allow(clippy::too_many_arguments)]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        latents: PyReadonlyArrayDyn<'py, f32>,
        caption_embs: PyReadonlyArrayDyn<'py, f32>,
        sigma: Vec<f32>,
        seeds: Vec<u64>,
        steps: usize,
        budget_bytes: u64,
        tile: Option<usize>,
        progress: Option<Py<PyAny>>,
        cancel: Option<PyRef<'py, PyCancelToken>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let req = Request {
            latents: to_tensor("latents", &latents)?,
            captions: to_tensor("caption_embs", &caption_embs)?,
            sigma,
            seeds,
            steps,
        };
        let mut sink = PyProgress {
            callback: progress,
            cancel: cancel.map(|c| c.0.clone()),
            raised: Mutex::new(None),
        };
        let result = py.detach(|| -> pid_core::Result<candle_core::Tensor> {
            decoder::validate(self.net.config(), &req)?;
            let (b, _, h, w) = req.latents.dims4()?;
            let p = self.make_plan(b, h, w, budget_bytes, tile)?;
            let image = decoder::decode(&self.net, &req, &p, &mut sink);
            crate::alloc::trim();
            image
        });
        match result {
            Ok(image) => to_numpy(py, &image),
            Err(Error::Callback(_)) => {
                match sink.raised.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    Some(err) => Err(err),
                    None => Err(input_error("callback", "progress callback failed")),
                }
            }
            Err(e) => Err(PyPidError(e).into()),
        }
    }
}
