//! The engine contract of the core's decoder: `Plan`, `DecodeRequest` (validated once, at
//! construction), `ProgressEvent`, `CancelToken`, and `Decoder`, which decodes requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use numpy::{PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::convert::{to_numpy, to_tensor};
use crate::device::{self, parse_device, parse_dtype};
use crate::errors::{input_error, PyPidError};

use pid_core::decoder::{self, Event, Inputs, Progress, Request};
use pid_core::plan::{self, DTypes, Plan, Tile};
use pid_core::weights::Checkpoint;
use pid_core::{Error, LatentHint, NetConfig, PidNet};

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

/// One progress report. `str(event)` reads like `"step 2/4"`.
///
/// `phase`: `caption` (encoding captions), `image` (image `index` of `count` starts), `step`
/// (sampler step `index` of `count`), `tile` (tile `index` of `count` of the current step),
/// `done`. `index` is 1-based; `count` is the size of the phase (0 for `done`).
#[pyclass(
    name = "ProgressEvent",
    module = "pid_native._native",
    frozen,
    eq,
    hash,
    skip_from_py_object
)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PyProgressEvent {
    #[pyo3(get)]
    phase: &'static str,
    #[pyo3(get)]
    index: usize,
    #[pyo3(get)]
    count: usize,
}

const PHASES: [&str; 5] = ["caption", "image", "step", "tile", "done"];

#[pymethods]
impl PyProgressEvent {
    #[new]
    #[pyo3(signature = (phase, index=0, count=0))]
    fn new(phase: &str, index: usize, count: usize) -> PyResult<Self> {
        let Some(phase) = PHASES.iter().find(|p| **p == phase) else {
            return Err(input_error(
                "phase",
                format!("unknown progress phase {phase:?}; one of {PHASES:?}"),
            ));
        };
        Ok(Self {
            phase,
            index,
            count,
        })
    }

    fn __str__(&self) -> String {
        if self.count == 0 {
            self.phase.to_string()
        } else {
            format!("{} {}/{}", self.phase, self.index, self.count)
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "ProgressEvent(phase={:?}, index={}, count={})",
            self.phase, self.index, self.count
        )
    }
}

impl From<Event> for PyProgressEvent {
    fn from(event: Event) -> Self {
        let (phase, index, count) = match event {
            Event::Image { index, count } => ("image", index, count),
            Event::Step { step, total } => ("step", step, total),
            Event::Tile { tile, tiles } => ("tile", tile, tiles),
        };
        Self {
            phase,
            index: index + 1,
            count,
        }
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
                cb.call1(py, (PyProgressEvent::from(event),))?;
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

/// How a decode runs: the whole image, or tiles of the velocity forward, priced against a
/// memory budget before anything is allocated.
#[pyclass(
    name = "Plan",
    module = "pid_native._native",
    frozen,
    eq,
    skip_from_py_object
)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyPlan(pub Plan);

#[pymethods]
impl PyPlan {
    /// Output pixels.
    #[getter]
    fn height(&self) -> usize {
        self.0.height
    }

    #[getter]
    fn width(&self) -> usize {
        self.0.width
    }

    /// One tile equal to the image: a whole-image decode.
    #[getter]
    fn whole(&self) -> bool {
        self.0.is_whole()
    }

    /// `(y, x, h, w)` of each tile, in output pixels.
    #[getter]
    fn tiles(&self) -> Vec<(usize, usize, usize, usize)> {
        self.0.tiles.iter().map(|t| (t.y, t.x, t.h, t.w)).collect()
    }

    #[getter]
    fn predicted_peak_bytes(&self) -> u64 {
        self.0.predicted_peak_bytes
    }

    #[getter]
    fn budget_bytes(&self) -> u64 {
        self.0.budget_bytes
    }

    fn __repr__(&self) -> String {
        format!(
            "Plan({}x{}, {} tile(s), peak {:.2} of {:.2} GiB)",
            self.0.width,
            self.0.height,
            self.0.tiles.len(),
            plan::gib(self.0.predicted_peak_bytes),
            plan::gib(self.0.budget_bytes)
        )
    }
}

/// The plan for `batch` latents of `h x w` of the network `cfg` within `budget` bytes.
pub fn make_plan(
    cfg: &NetConfig,
    (batch, h, w): (usize, usize, usize),
    dtypes: DTypes,
    budget: u64,
    tile: Option<usize>,
) -> pid_core::Result<PyPlan> {
    let (oh, ow) = decoder::output_size(cfg, h, w);
    plan::plan(cfg, batch, oh, ow, dtypes, budget, tile).map(PyPlan)
}

/// A decode request the core accepted: latents, caption embeddings, per-image sigma and
/// seeds, steps and the plan, checked once against a network config (its JSON) when made.
/// Every backend decodes it as it is.
#[pyclass(name = "DecodeRequest", module = "pid_native._native", frozen)]
pub struct PyDecodeRequest {
    request: Request,
    config: NetConfig,
}

#[pymethods]
impl PyDecodeRequest {
    #[new]
    #[pyo3(signature = (config, latents, caption_embs, sigma, seeds, steps, plan))]
    fn new(
        config: &str,
        latents: PyReadonlyArrayDyn<'_, f32>,
        caption_embs: PyReadonlyArrayDyn<'_, f32>,
        sigma: Vec<f32>,
        seeds: Vec<u64>,
        steps: usize,
        plan: PyRef<'_, PyPlan>,
    ) -> PyResult<Self> {
        let config = NetConfig::from_json(config).map_err(PyPidError::from)?;
        let inputs = Inputs {
            latents: to_tensor("latents", &latents)?,
            captions: to_tensor("caption_embs", &caption_embs)?,
            sigma,
            seeds,
            steps,
        };
        let request = Request::new(&config, inputs, plan.0.clone()).map_err(PyPidError::from)?;
        Ok(Self { request, config })
    }

    /// The network config (JSON) the request was checked against.
    #[getter]
    fn config(&self) -> String {
        self.config.to_json()
    }

    /// `(B, C, h, w)` float32.
    #[getter]
    fn latents<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        to_numpy(py, &self.request.inputs().latents)
    }

    /// `(B, N, D)` float32.
    #[getter]
    fn caption_embs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        to_numpy(py, &self.request.inputs().captions)
    }

    #[getter]
    fn sigma(&self) -> Vec<f32> {
        self.request.inputs().sigma.clone()
    }

    #[getter]
    fn seeds(&self) -> Vec<u64> {
        self.request.inputs().seeds.clone()
    }

    #[getter]
    fn steps(&self) -> usize {
        self.request.inputs().steps
    }

    #[getter]
    fn plan(&self) -> PyPlan {
        PyPlan(self.request.plan().clone())
    }

    /// The tiles as `(y, x, h, w)`, the order a tiled decode visits them.
    #[getter]
    fn tiles(&self) -> Vec<(usize, usize, usize, usize)> {
        let tiles = &self.request.plan().tiles;
        tiles
            .iter()
            .map(|&Tile { y, x, h, w }| (y, x, h, w))
            .collect()
    }
}

/// The candle decoder: the PiD network on one device.
#[pyclass(name = "Decoder", module = "pid_native._native", frozen)]
pub struct PyDecoder {
    net: PidNet,
    weight_bytes: usize,
    activation_bytes: usize,
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
    ///     compute_dtype: the dtype of matmuls and attention, "f32", "bf16" (CUDA) or "f16";
    ///         None: f32 on the CPU, bf16 on CUDA. Norms, residual streams, RoPE, gates and the
    ///         sampler stay in f32.
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
    fn plan(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        budget_bytes: u64,
        tile: Option<usize>,
    ) -> PyResult<PyPlan> {
        let dtypes = DTypes {
            activation: self.activation_bytes,
            weight: self.weight_bytes,
        };
        let plan = make_plan(self.net.config(), (batch, h, w), dtypes, budget_bytes, tile);
        Ok(plan.map_err(PyPidError::from)?)
    }

    /// Decode a request made for this network; returns float32 `(B, 3, H, W)` in [-1, 1].
    ///
    /// `progress(event: ProgressEvent)` is called at every image, step and tile boundary;
    /// `cancel` (a CancelToken) and Ctrl-C stop the decode there.
    #[pyo3(signature = (request, progress=None, cancel=None))]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        request: PyRef<'py, PyDecodeRequest>,
        progress: Option<Py<PyAny>>,
        cancel: Option<PyRef<'py, PyCancelToken>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        if request.config != *self.net.config() {
            return Err(input_error(
                "request",
                "the request was made for another network config; make it with this decoder's config",
            ));
        }
        let mut sink = PyProgress {
            callback: progress,
            cancel: cancel.map(|c| c.0.clone()),
            raised: Mutex::new(None),
        };
        let req = &request.request;
        let result = py.detach(|| {
            let image = decoder::decode(&self.net, req, &mut sink);
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
