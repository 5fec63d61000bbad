//! Opening and validating weight files before any model is built.
//!
//! Everything here reads only headers (memory-mapped safetensors, a `.pth`'s pickle and zip
//! directory), so a wrong, truncated or corrupt file is reported by name before a single
//! tensor is materialised.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::{LatentHint, NetConfig, IGNORED_PREFIXES};
use crate::pth::PthFile;
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

/// Whether `path` names a shard index (`*.safetensors.index.json`) rather than weights.
fn is_shard_index(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"))
}

/// The shard files a Hugging Face style `*.safetensors.index.json` names in its `weight_map`,
/// relative to the index's directory, each once and sorted.
pub fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let bad = |why: String| Error::weights(index, "shard_index", format!("{why}; re-download it"));
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?
        .values()
        .map(|f| {
            f.as_str()
                .map(|f| dir.join(f))
                .ok_or_else(|| bad(format!("`weight_map` holds {f}, not a file name")))
        })
        .collect::<Result<Vec<PathBuf>>>()?;
    files.sort();
    files.dedup();
    Ok(files)
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

/// The prefixes upstream's trainer saves beside the student (`net.`): its EMA copy, the DMD
/// fake-score network and the GAN discriminator. Inference drops them
/// (`pid_distill_model_infer.py:369-379`, nv-tlabs/PiD @2c8814c).
pub const TRAINING_PREFIXES: &[&str] = &["net_ema.", "fake_score.", "discriminator."];

/// Bare student names from a checkpoint's stored names, the way upstream's inference loader
/// reads them: `net.X` is `X`, the training-only networks are dropped, any other name is kept
/// as it is (a converted file's bare keys). Bare name -> stored name.
///
/// Errors when two stored names give the same bare one (`net.X` beside `X`).
pub fn student_names<'a>(
    path: &Path,
    stored: impl IntoIterator<Item = &'a String>,
) -> Result<BTreeMap<String, String>> {
    let mut names = BTreeMap::new();
    for name in stored {
        if TRAINING_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let bare = name.strip_prefix("net.").unwrap_or(name);
        if let Some(other) = names.insert(bare.to_string(), name.clone()) {
            return Err(Error::weights(
                path,
                "duplicate_tensor",
                format!("tensors `{other}` and `{name}` are both the student's `{bare}`; the file is not one checkpoint"),
            ));
        }
    }
    Ok(names)
}

/// A PiD student checkpoint: a converted `pid_*.safetensors` (bare keys), or the upstream
/// layout (`net.*` keys beside training-only ones, see [`student_names`]) as safetensors or as
/// the released PyTorch `model_ema_bf16.pth` (read by [`crate::pth`], without pickle); or the
/// shards a `*.safetensors.index.json` lists, as one checkpoint.
pub struct Checkpoint {
    tensors: TensorSet,
}

impl Checkpoint {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let files = if is_shard_index(path) {
            shard_files(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let storage = Storage::open(path, &files)?;
        let names = student_names(path, storage.index().keys())?;
        Ok(Self {
            tensors: TensorSet::new(path, storage, names)?,
        })
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

    /// Bare name -> (dtype, shape) of every student tensor.
    pub fn index(&self) -> &BTreeMap<String, (DType, Vec<usize>)> {
        self.tensors.index()
    }

    /// The stored bytes of student tensor `name` (little-endian, its own dtype).
    pub fn raw_bytes(&self, name: &str) -> Result<std::borrow::Cow<'_, [u8]>> {
        self.tensors.raw_bytes(name)
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

    /// Write every student tensor under its bare name, byte for byte as stored (same dtype and
    /// shape), to the safetensors file `out` with `metadata` in its header: the lossless
    /// equivalent of this checkpoint. Written to a temporary name and renamed at the end.
    pub fn save_safetensors(
        &self,
        out: &Path,
        metadata: std::collections::HashMap<String, String>,
    ) -> Result<()> {
        let mut views = Vec::with_capacity(self.tensors.index.len());
        for (name, (dtype, shape)) in &self.tensors.index {
            let dtype = match dtype {
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F16 => safetensors::Dtype::F16,
                DType::F32 => safetensors::Dtype::F32,
                DType::F64 => safetensors::Dtype::F64,
                other => {
                    return Err(Error::weights(
                        self.path(),
                        "tensor_dtype",
                        format!("tensor `{name}` has dtype {other:?}, not a weight dtype"),
                    ))
                }
            };
            let data = self.tensors.raw_bytes(name)?;
            views.push((
                name.clone(),
                RawView {
                    dtype,
                    shape: shape.clone(),
                    data,
                },
            ));
        }
        let partial = out.with_file_name(format!(
            "{}.{}.partial",
            out.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("checkpoint"),
            std::process::id()
        ));
        safetensors::serialize_to_file(views, Some(metadata), &partial)
            .map_err(|e| Error::weights(out, "write_failed", e.to_string()))?;
        std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))
    }

    fn wrap(&self, e: Error) -> Error {
        match e {
            Error::InvalidInput { code, message } => Error::weights(self.path(), code, message),
            other => other,
        }
    }
}

/// One tensor's stored bytes, for writing them unchanged.
struct RawView<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: std::borrow::Cow<'a, [u8]>,
}

impl safetensors::View for RawView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
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

/// Where a set's tensors live: memory-mapped safetensors files, or one `.pth` archive.
enum Storage {
    Safetensors(MmapedSafetensors),
    Pth(PthFile),
}

impl Storage {
    /// `.pth` (zip) or safetensors, told by the file's first bytes.
    fn open(path: &Path, files: &[PathBuf]) -> Result<Self> {
        match files {
            [one] if crate::pth::is_pth(one) => Ok(Self::Pth(PthFile::open(one)?)),
            _ => {
                let st = open_safetensors(files)?;
                log::trace!("{}: safetensors", path.display());
                Ok(Self::Safetensors(st))
            }
        }
    }

    fn index(&self) -> BTreeMap<String, (DType, Vec<usize>)> {
        match self {
            Self::Safetensors(st) => tensor_index(st),
            Self::Pth(pth) => pth.index(),
        }
    }

    fn load(&self, stored: &str, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Safetensors(st) => st.load(stored, device),
            Self::Pth(pth) => pth
                .tensor(stored, device)
                .map_err(|e| candle_core::Error::Msg(e.to_string())),
        }
    }
}

/// The tensors of a set of weight files (a sharded checkpoint is one set), addressed by bare
/// names: without `model.` in a Hugging Face checkpoint, `weights.` in a golden file, `net.` in
/// an upstream checkpoint.
pub struct TensorSet {
    /// What messages name: the file, or the directory of a sharded set.
    path: PathBuf,
    storage: Storage,
    /// The prefix [`TensorSet::open`] found (`""` for none, and for a checkpoint).
    prefix: String,
    /// Bare name -> name in the files.
    names: BTreeMap<String, String>,
    index: BTreeMap<String, (DType, Vec<usize>)>,
}

impl TensorSet {
    /// Open `files`; the prefix is the first of `prefixes` (each ending in `.`) that some
    /// tensor name starts with, else none. Names without the prefix are left out.
    pub fn open(path: impl Into<PathBuf>, files: &[PathBuf], prefixes: &[&str]) -> Result<Self> {
        let path = path.into();
        let storage = Storage::open(&path, files)?;
        let stored = storage.index();
        let prefix = prefixes
            .iter()
            .find(|p| stored.keys().any(|k| k.starts_with(*p)))
            .copied()
            .unwrap_or_default();
        let names = stored
            .keys()
            .filter_map(|k| Some((k.strip_prefix(prefix)?.to_string(), k.clone())))
            .collect();
        let mut set = Self::new(path, storage, names)?;
        set.prefix = prefix.to_string();
        Ok(set)
    }

    fn new(
        path: impl Into<PathBuf>,
        storage: Storage,
        names: BTreeMap<String, String>,
    ) -> Result<Self> {
        let path = path.into();
        let stored = storage.index();
        let index: BTreeMap<_, _> = names
            .iter()
            .filter_map(|(bare, s)| Some((bare.clone(), stored.get(s)?.clone())))
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
            storage,
            prefix: String::new(),
            names,
            index,
        })
    }

    /// The prefix found in the file (`""` when none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Bare name -> (dtype, shape).
    pub fn index(&self) -> &BTreeMap<String, (DType, Vec<usize>)> {
        &self.index
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

    /// The raw bytes of tensor `bare` as stored (little-endian, its own dtype).
    pub fn raw_bytes(&self, bare: &str) -> Result<std::borrow::Cow<'_, [u8]>> {
        let missing = || {
            Error::weights(
                &self.path,
                "missing_tensor",
                format!("tensor `{bare}` is not in the file"),
            )
        };
        let stored = self.names.get(bare).ok_or_else(missing)?;
        match &self.storage {
            Storage::Pth(pth) => pth
                .bytes(stored)
                .map(std::borrow::Cow::Borrowed)
                .ok_or_else(missing),
            Storage::Safetensors(st) => {
                let view = st
                    .get(stored)
                    .map_err(|e| Error::weights(&self.path, "not_safetensors", e.to_string()))?;
                Ok(std::borrow::Cow::Borrowed(view.data()))
            }
        }
    }

    /// A VarBuilder over the bare names, producing tensors in `dtype` on `device`.
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
        Ok(VarBuilder::from_backend(
            Box::new(self),
            dtype,
            device.clone(),
        ))
    }
}

impl SimpleBackend for TensorSet {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, expected {shape:?}",
                self.path.display(),
                tensor.dims()
            )
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(stored) = self.names.get(name) else {
            candle_core::bail!("{}: no tensor `{name}`", self.path.display())
        };
        self.storage.load(stored, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
}
