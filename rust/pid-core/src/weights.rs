//! Opening and validating safetensors weight files before any model is built.
//!
//! Everything here reads only headers (memory-mapped), so a wrong, truncated or
//! corrupt file is reported by name before a single tensor is materialised.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::{LatentHint, NetConfig, IGNORED_PREFIXES};
use crate::{cuda_device, Error, Result};

/// Memory-map one or more safetensors files (a sharded set is one logical file).
pub fn open_safetensors(paths: &[PathBuf]) -> Result<MmapedSafetensors> {
    for p in paths {
        let header = read_header(p)?;
        let data_end = header
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.get("data_offsets")?.as_array()?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        let file_len = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
        if header.header_len + 8 + data_end > file_len {
            return Err(Error::weights(
                p,
                "truncated",
                format!(
                    "file is truncated: the header describes {} bytes but the file has {file_len}; \
                     re-download it",
                    header.header_len + 8 + data_end
                ),
            ));
        }
    }
    // SAFETY: the files are opened read-only; like every mmap user we rely on them
    // not being truncated while the decoder is alive.
    unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| {
        Error::weights(
            paths.first().cloned().unwrap_or_default(),
            "not_safetensors",
            format!("cannot read safetensors ({e}); the file is corrupt, re-download it"),
        )
    })
}

/// A parsed safetensors header and its byte length.
pub struct Header {
    pub header_len: u64,
    json: serde_json::Value,
}

impl std::ops::Deref for Header {
    type Target = serde_json::Value;
    fn deref(&self) -> &serde_json::Value {
        &self.json
    }
}

/// Read and parse the JSON header of a safetensors file, with errors that say what is wrong.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::weights(
            path,
            "not_a_file",
            "expected a .safetensors file, got a directory",
        ));
    }
    let not_st = |why: String| {
        Error::weights(
            path,
            "not_safetensors",
            format!("not a safetensors file ({why}); convert the checkpoint to .safetensors or re-download it"),
        )
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| not_st("shorter than the 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 100 * 1024 * 1024 || n + 8 > meta.len() {
        return Err(not_st(format!(
            "header length {n} does not fit a {} byte file",
            meta.len()
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| not_st(format!("header is not JSON: {e}")))?;
    if !json.is_object() {
        return Err(not_st("header is not a JSON object".into()));
    }
    Ok(Header {
        header_len: n,
        json,
    })
}

/// Name -> (dtype, shape) for every tensor in the files.
pub fn tensor_index(st: &MmapedSafetensors) -> BTreeMap<String, (DType, Vec<usize>)> {
    st.tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let dtype = DType::try_from(view.dtype()).ok()?;
            Some((name, (dtype, view.shape().to_vec())))
        })
        .collect()
}

/// A PiD student checkpoint: a converted `pid_*.safetensors` (bare keys) or the raw
/// upstream layout (`net.*` keys, with EMA/teacher/discriminator tensors ignored).
pub struct Checkpoint {
    tensors: TensorSet,
}

impl Checkpoint {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let tensors = TensorSet::open(&path, std::slice::from_ref(&path), &["net."])?;
        Ok(Self { tensors })
    }

    /// Open, take the config (given JSON, else detected from the tensors) and validate.
    pub fn open_validated(
        path: impl AsRef<Path>,
        config: Option<&str>,
        hint: Option<LatentHint>,
    ) -> Result<(Self, NetConfig)> {
        let ckpt = Self::open(path)?;
        let cfg = match config {
            Some(json) => NetConfig::from_json(json)?,
            None => ckpt.detect_config(hint)?,
        };
        ckpt.validate(&cfg)?;
        Ok((ckpt, cfg))
    }

    pub fn path(&self) -> &Path {
        &self.tensors.path
    }

    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .index
            .iter()
            .map(|(k, (_, s))| (k.clone(), s.clone()))
            .collect()
    }

    /// Recover the network configuration from the tensors (see [`NetConfig::from_tensor_shapes`]).
    pub fn detect_config(&self, hint: Option<LatentHint>) -> Result<NetConfig> {
        NetConfig::from_tensor_shapes(&self.shapes(), hint).map_err(|e| self.wrap(e))
    }

    /// Check presence, shape and dtype of every tensor `cfg` needs, and that nothing unknown is there.
    pub fn validate(&self, cfg: &NetConfig) -> Result<()> {
        let ignored = self
            .tensors
            .check(&cfg.expected_tensors(), "a PiD student", |name| {
                IGNORED_PREFIXES.iter().any(|p| name.starts_with(p))
            })?;
        if ignored > 0 {
            log::debug!(
                "{}: ignoring {ignored} training-only tensors (lq_aux_rgb_head)",
                self.path().display()
            );
        }
        Ok(())
    }

    /// A VarBuilder over the bare tensor names, producing tensors in `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.tensors.var_builder(dtype, device)
    }

    fn wrap(&self, e: Error) -> Error {
        match e {
            Error::InvalidInput { code, message } => Error::weights(self.path(), code, message),
            other => other,
        }
    }
}

/// The `__metadata__` string map of a safetensors file (empty when absent).
pub fn read_metadata(path: impl AsRef<Path>) -> Result<BTreeMap<String, String>> {
    let header = read_header(path.as_ref())?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Check that `index` holds every tensor of `expected` with that shape and a float dtype, and
/// nothing else except names `ignore` accepts; `what` names the model in messages ("a PiD student").
/// Returns how many tensors were ignored.
pub fn check_layout(
    path: &Path,
    index: &BTreeMap<String, (DType, Vec<usize>)>,
    expected: &[(String, Vec<usize>)],
    what: &str,
    ignore: impl Fn(&str) -> bool,
) -> Result<usize> {
    for (name, shape) in expected {
        let Some((dtype, got)) = index.get(name) else {
            return Err(Error::weights(
                path,
                "missing_tensor",
                format!("tensor `{name}` (shape {shape:?}) is missing; the file is incomplete or not {what}"),
            ));
        };
        if got != shape {
            return Err(Error::weights(
                path,
                "tensor_shape",
                format!("tensor `{name}` has shape {got:?}, expected {shape:?}"),
            ));
        }
        if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
            return Err(Error::weights(
                path,
                "tensor_dtype",
                format!("tensor `{name}` has dtype {dtype:?}, expected bf16, f16 or f32"),
            ));
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut ignored = 0usize;
    for name in index.keys() {
        if known.contains(name.as_str()) {
            continue;
        }
        if !ignore(name) {
            return Err(Error::weights(
                path,
                "unexpected_tensor",
                format!("unexpected tensor `{name}`: the file does not match the expected layout of {what}"),
            ));
        }
        ignored += 1;
    }
    Ok(ignored)
}

/// The tensors of a set of safetensors files (a sharded checkpoint is one set), addressed by
/// their names without a prefix: `model.` in a Hugging Face checkpoint, `weights.` in a golden
/// file, nothing in a bare one.
pub struct TensorSet {
    /// What messages name: the file, or the directory of a sharded set.
    path: PathBuf,
    st: MmapedSafetensors,
    prefix: String,
    index: BTreeMap<String, (DType, Vec<usize>)>,
}

impl TensorSet {
    /// Open `files`; the prefix is the first of `prefixes` (each ending in `.`) that some
    /// tensor name starts with, else none. Names without the prefix are left out.
    pub fn open(path: impl Into<PathBuf>, files: &[PathBuf], prefixes: &[&str]) -> Result<Self> {
        let path = path.into();
        let st = open_safetensors(files)?;
        let all = tensor_index(&st);
        let prefix = prefixes
            .iter()
            .find(|p| all.keys().any(|k| k.starts_with(*p)))
            .copied()
            .unwrap_or_default();
        let index: BTreeMap<_, _> = all
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v)))
            .collect();
        if index.is_empty() {
            return Err(Error::weights(
                &path,
                "no_tensors",
                "the file holds no tensors",
            ));
        }
        Ok(Self {
            path,
            st,
            prefix: prefix.to_string(),
            index,
        })
    }

    /// The prefix found in the file (`""` when none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// [`check_layout`] over this set.
    pub fn check(
        &self,
        expected: &[(String, Vec<usize>)],
        what: &str,
        ignore: impl Fn(&str) -> bool,
    ) -> Result<usize> {
        check_layout(&self.path, &self.index, expected, what, ignore)
    }

    /// A VarBuilder over the names without the prefix, producing tensors in `dtype` on `device`.
    /// Refuses a GPU without the free memory the tensors take in `dtype`, before loading any.
    pub fn var_builder(self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let elements: usize = self
            .index
            .values()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        let bytes = (elements * dtype.size_in_bytes()) as u64;
        cuda_device::ensure_fits(
            device,
            bytes,
            &format!("the weights in {}", self.path.display()),
        )?;
        let vb = VarBuilder::from_backend(Box::new(self.st), dtype, device.clone());
        Ok(match self.prefix.as_str() {
            "" => vb,
            p => vb.pp(p.trim_end_matches('.')),
        })
    }
}
