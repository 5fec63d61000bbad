//! `CaptionEncoder` and `CaptionCache`: the Gemma-2 caption stage (pid_spec §5).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyUserWarning;
use pyo3::prelude::*;

use crate::convert::to_numpy;
use crate::device::parse_device;
use crate::errors::{input_error, PyPidError};
use pid_core::caption::{CaptionCache, CaptionEncoder, GemmaWeights, TEXT_TOKENS};

/// A bounded LRU of caption features that several encoders may share.
///
/// Entries are keyed by (encoder identity, caption); the identity covers the weight,
/// config and tokenizer files and the softcap switch, so different weights never share an
/// entry, and an encoder reopened on unchanged files finds its earlier captions.
#[pyclass(name = "CaptionCache", module = "pid_native._native", frozen)]
pub struct PyCaptionCache(Arc<CaptionCache>);

#[pymethods]
impl PyCaptionCache {
    /// Args:
    ///     capacity: how many captions to keep (0 disables caching).
    #[new]
    #[pyo3(signature = (capacity=CaptionCache::DEFAULT_CAPACITY))]
    fn new(capacity: usize) -> Self {
        Self(Arc::new(CaptionCache::new(capacity)))
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.0.stats().capacity
    }

    /// Lookups answered from the cache since it was created.
    #[getter]
    fn hits(&self) -> u64 {
        self.0.stats().hits
    }

    /// Lookups that had to run Gemma.
    #[getter]
    fn misses(&self) -> u64 {
        self.0.stats().misses
    }

    fn __len__(&self) -> usize {
        self.0.stats().len
    }

    /// Drop every entry (the hit and miss counts stay).
    fn clear(&self) {
        self.0.clear();
    }
}

/// Gemma-2 with its tokenizer and a caption cache: captions -> PiD's caption features.
#[pyclass(name = "CaptionEncoder", module = "pid_native._native", frozen)]
pub struct PyCaptionEncoder {
    encoder: CaptionEncoder,
}

fn resolve_cache(
    cache_size: Option<usize>,
    cache: Option<PyRef<'_, PyCaptionCache>>,
) -> PyResult<Arc<CaptionCache>> {
    match (cache_size, cache) {
        (Some(_), Some(_)) => Err(input_error(
            "cache",
            "give either cache_size or cache (a shared CaptionCache), not both",
        )),
        (_, Some(shared)) => Ok(shared.0.clone()),
        (size, None) => Ok(Arc::new(CaptionCache::new(
            size.unwrap_or(CaptionCache::DEFAULT_CAPACITY),
        ))),
    }
}

impl PyCaptionEncoder {
    fn build(
        py: Python<'_>,
        weights: impl FnOnce() -> pid_core::Result<GemmaWeights> + Send,
        tokenizer: &Path,
        softcap: bool,
        cache: Arc<CaptionCache>,
        device: &str,
    ) -> PyResult<Self> {
        let device = parse_device(device)?;
        let encoder = py
            .detach(|| CaptionEncoder::new(weights()?, tokenizer, softcap, cache, &device))
            .map_err(PyPidError::from)?;
        Ok(Self { encoder })
    }
}

/// `tokenize`'s result: input ids, attention mask, tokens dropped per caption.
type Tokenized<'py> = (
    Bound<'py, PyArray2<i32>>,
    Bound<'py, PyArray2<i32>>,
    Vec<usize>,
);

/// A `(B, L)` integer array (int32 or int64) as a tensor.
#[derive(FromPyObject)]
enum TokenArray<'py> {
    I32(PyReadonlyArrayDyn<'py, i32>),
    I64(PyReadonlyArrayDyn<'py, i64>),
}

impl TokenArray<'_> {
    fn to_tensor(&self, name: &str) -> PyResult<Tensor> {
        let (shape, data): (Vec<usize>, Vec<i64>) = match self {
            Self::I32(a) => (
                a.shape().to_vec(),
                a.as_array().iter().map(|&v| i64::from(v)).collect(),
            ),
            Self::I64(a) => (a.shape().to_vec(), a.as_array().iter().copied().collect()),
        };
        Tensor::from_vec(data, shape, &Device::Cpu)
            .map_err(|e| input_error("array", format!("{name}: {e}")))
    }
}

#[pymethods]
impl PyCaptionEncoder {
    /// Open a Hugging Face Gemma-2 directory (``config.json``, ``tokenizer.json`` and
    /// ``model.safetensors`` or the shards of ``model.safetensors.index.json``).
    ///
    /// Args:
    ///     gemma_dir: the model directory (gemma-2-2b-it for the released students).
    ///     softcap: apply the attention-logit softcap. The reference does not (its SDPA
    ///         attention ignores it, pid_spec §5.7), so keep False to match PiD's training.
    ///     cache_size: captions to keep in a new private cache (default 32).
    ///     cache: a ``CaptionCache`` to share instead.
    ///     device: "cpu" or "cuda:N".
    ///
    /// Raises:
    ///     MissingFileError: a needed file is absent. WeightsError: the files do not
    ///         describe a Gemma-2 model, or the tokenizer does not add ``<bos>``.
    #[staticmethod]
    #[pyo3(signature = (gemma_dir, softcap=false, cache_size=None, cache=None, device="cpu"))]
    fn open(
        py: Python<'_>,
        gemma_dir: PathBuf,
        softcap: bool,
        cache_size: Option<usize>,
        cache: Option<PyRef<'_, PyCaptionCache>>,
        device: &str,
    ) -> PyResult<Self> {
        let cache = resolve_cache(cache_size, cache)?;
        let tokenizer = gemma_dir.join("tokenizer.json");
        Self::build(
            py,
            || GemmaWeights::open_dir(&gemma_dir),
            &tokenizer,
            softcap,
            cache,
            device,
        )
    }

    /// Open the weights embedded in a ``kind=gemma2`` golden file, with a separate tokenizer.
    ///
    /// Args:
    ///     path: the golden ``.safetensors`` (config in its metadata, tensors ``weights.*``).
    ///     tokenizer: a ``tokenizer.json`` whose ids fit the golden's vocabulary, e.g. from
    ///         ``pid_native.testing.tokenizer.build_tiny_gemma_tokenizer``.
    ///     softcap, cache_size, cache, device: as for :meth:`open`.
    #[staticmethod]
    #[pyo3(signature = (path, tokenizer, softcap=false, cache_size=None, cache=None, device="cpu"))]
    fn from_golden(
        py: Python<'_>,
        path: PathBuf,
        tokenizer: PathBuf,
        softcap: bool,
        cache_size: Option<usize>,
        cache: Option<PyRef<'_, PyCaptionCache>>,
        device: &str,
    ) -> PyResult<Self> {
        let cache = resolve_cache(cache_size, cache)?;
        Self::build(
            py,
            || GemmaWeights::open_embedded(&path),
            &tokenizer,
            softcap,
            cache,
            device,
        )
    }

    /// Fingerprint of the weight, config and tokenizer files and the softcap switch (hex).
    #[getter]
    fn identity(&self) -> String {
        self.encoder.id().hex()
    }

    #[getter]
    fn softcap(&self) -> bool {
        self.encoder.softcap()
    }

    /// Gemma's hidden size: the last axis of the features.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.encoder.config().hidden_size
    }

    /// Tokens of the CHI prompt alone, ``<bos>`` included.
    #[getter]
    fn num_chi(&self) -> usize {
        self.encoder.prompt_tokenizer().num_chi()
    }

    /// The padded prompt length, ``num_chi + 298``.
    #[getter]
    fn max_length(&self) -> usize {
        self.encoder.prompt_tokenizer().max_len()
    }

    /// The cache this encoder reads and fills.
    #[getter]
    fn cache(&self) -> PyCaptionCache {
        PyCaptionCache(self.encoder.cache().clone())
    }

    /// Tokenize CHI + caption for each caption, as the reference does.
    ///
    /// Returns:
    ///     ``(input_ids, attention_mask, dropped)``: int32 arrays ``(B, num_chi + 298)``,
    ///     right padded with id 0 (mask 0), and per caption how many tokens right
    ///     truncation dropped from its end.
    fn tokenize<'py>(&self, py: Python<'py>, captions: Vec<String>) -> PyResult<Tokenized<'py>> {
        let tokens = py
            .detach(|| self.encoder.tokenize(&captions))
            .map_err(PyPidError::from)?;
        let shape = (tokens.batch, tokens.len);
        let as_i32 = |v: &[u32]| -> PyResult<Array2<i32>> {
            let data = v
                .iter()
                .map(|&x| {
                    i32::try_from(x).map_err(|_| input_error("token_id", "token id exceeds int32"))
                })
                .collect::<PyResult<Vec<i32>>>()?;
            Array2::from_shape_vec(shape, data).map_err(|e| input_error("array", e.to_string()))
        };
        Ok((
            as_i32(&tokens.ids)?.into_pyarray(py),
            as_i32(&tokens.mask)?.into_pyarray(py),
            tokens.dropped,
        ))
    }

    /// Gemma's last hidden state ``(B, L, hidden)`` float32, after the final norm, pad
    /// positions included.
    ///
    /// Args:
    ///     input_ids, attention_mask: int32 or int64 ``(B, L)``, right padded (mask 1 then 0).
    ///     softcap: override the encoder's softcap switch for this call.
    #[pyo3(signature = (input_ids, attention_mask, softcap=None))]
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        input_ids: TokenArray<'py>,
        attention_mask: TokenArray<'py>,
        softcap: Option<bool>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let ids = input_ids.to_tensor("input_ids")?;
        let mask = attention_mask.to_tensor("attention_mask")?;
        let softcap = softcap.unwrap_or(self.encoder.softcap());
        let hidden = py
            .detach(|| self.encoder.hidden_states(&ids, &mask, softcap))
            .map_err(PyPidError::from)?;
        to_numpy(py, &hidden)
    }

    /// PiD's caption features ``(B, 300, hidden)`` float32 (``""`` is a valid caption).
    ///
    /// Cached captions skip Gemma. A caption longer than the prompt window loses its tail;
    /// a ``UserWarning`` says how many tokens were dropped.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        captions: Vec<String>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let encoded = py
            .detach(|| self.encoder.encode(&captions))
            .map_err(PyPidError::from)?;
        let window = self.encoder.prompt_tokenizer().max_len() - self.num_chi();
        for (i, &dropped) in encoded.dropped.iter().enumerate() {
            if dropped > 0 {
                let msg = format!(
                    "caption {i} is too long: its last {dropped} tokens were dropped \
                     (the prompt window holds {window} caption tokens; PiD reads {TEXT_TOKENS} positions)"
                );
                let msg = CString::new(msg).map_err(|e| input_error("caption", e.to_string()))?;
                PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1)?;
            }
        }
        to_numpy(py, &encoded.embeddings)
    }
}
