//! PyTorch `.pth` checkpoints (`torch.save` zip archives), read without running pickle.
//!
//! A `.pth` is a zip of `<root>/data.pkl`, the pickled object, and `<root>/data/<key>`, one raw
//! storage per tensor, stored uncompressed. The pickle is parsed by candle's reader
//! (`candle_core::pickle`), which only builds a tree of values: it imports and calls nothing.
//! This module then accepts exactly one tree: a dict from names to tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` (optionally wrapped in `_rebuild_parameter`) from a
//! float storage, plus the `_metadata` version table `Module.state_dict()` attaches. Any other
//! value, class or call is refused by name, before a byte of tensor data is read. The data is
//! memory-mapped, so opening a file costs its pickle and zip directory only.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The calls a state dict may contain: rebuilding a tensor, and wrapping it as a parameter.
const REBUILD_TENSOR: (&str, &str) = ("torch._utils", "_rebuild_tensor_v2");
const REBUILD_PARAMETER: (&str, &str) = ("torch._utils", "_rebuild_parameter");
/// What `Module.state_dict()` attaches to its OrderedDict: `{module: {"version": n}}`.
const METADATA_KEY: &str = "_metadata";

/// Whether `path` starts like a zip archive (every `torch.save` file since torch 1.6).
pub fn is_pth(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"PK\x03\x04"
}

/// One tensor of a `.pth`: dtype, shape and where its bytes start in the file.
#[derive(Debug, Clone)]
struct PthTensor {
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
}

/// A validated `.pth` state dict: every entry is a contiguous float tensor inside the archive.
pub struct PthFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    tensors: BTreeMap<String, PthTensor>,
}

impl std::fmt::Debug for PthFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PthFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl PthFile {
    /// Open and validate a `.pth`; refuses (code `pth_not_tensors`, `pth_unsupported`, ...)
    /// anything but a state dict of tensors.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |code: &'static str, msg: String| Error::weights(&path, code, msg);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
            bad(
                "not_pth",
                format!("not a PyTorch zip checkpoint ({e}); re-save it with torch.save (torch >= 1.6) or re-download it"),
            )
        })?;
        let pickles: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok())
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .map(|n| n.into_owned())
            .collect();
        let [pickle] = pickles.as_slice() else {
            return Err(bad(
                "not_pth",
                format!(
                    "expected one <root>/data.pkl in the archive, found {}; not a torch.save checkpoint",
                    pickles.len()
                ),
            ));
        };
        let root = pickle.trim_end_matches("data.pkl").to_string();
        if let Ok(mut order) = zip.by_name(&format!("{root}byteorder")) {
            let mut s = String::new();
            order
                .read_to_string(&mut s)
                .map_err(|e| Error::io(&path, e))?;
            if s.trim() != "little" {
                return Err(bad(
                    "pth_unsupported",
                    format!("tensors are stored {s:?}-endian; only little-endian checkpoints are supported"),
                ));
            }
        }
        let object = {
            let entry = zip
                .by_name(pickle)
                .map_err(|e| bad("not_pth", e.to_string()))?;
            let mut stack = Stack::empty();
            stack
                .read_loop(&mut BufReader::new(entry))
                .and_then(|()| stack.finalize())
                .map_err(|e| {
                    bad(
                        "pth_unsupported",
                        format!("its pickle uses something a weights file never needs ({e}); refusing to read it"),
                    )
                })?
        };
        let records = state_dict(object).map_err(|m| bad("pth_not_tensors", m))?;
        let mut tensors = BTreeMap::new();
        for (name, rec) in records {
            let entry = format!("{root}data/{}", rec.storage_key);
            let (size, start) = {
                let f = zip.by_name(&entry).map_err(|_| {
                    bad(
                        "truncated",
                        format!("tensor `{name}`: its storage {entry} is missing from the archive; re-download it"),
                    )
                })?;
                if f.compression() != zip::CompressionMethod::Stored {
                    return Err(bad(
                        "pth_unsupported",
                        format!(
                            "storage {entry} is compressed; torch.save stores tensors uncompressed"
                        ),
                    ));
                }
                (f.size() as usize, f.data_start().unwrap_or(0) as usize)
            };
            let elem = rec.dtype.size_in_bytes();
            if size != rec.storage_numel * elem {
                return Err(bad(
                    "truncated",
                    format!(
                        "storage {entry} of tensor `{name}` holds {size} bytes, its header says {}; re-download it",
                        rec.storage_numel * elem
                    ),
                ));
            }
            let numel: usize = rec.shape.iter().product();
            if rec.offset + numel > rec.storage_numel {
                return Err(bad(
                    "pth_not_tensors",
                    format!("tensor `{name}` reaches past the end of its storage"),
                ));
            }
            tensors.insert(
                name,
                PthTensor {
                    dtype: rec.dtype,
                    shape: rec.shape,
                    start: start + rec.offset * elem,
                },
            );
        }
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only mapping; like every mmap user we rely on the file not being
        // truncated while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        if let Some((name, _)) = tensors
            .iter()
            .find(|(_, t)| t.start + t.byte_len() > mmap.len())
        {
            return Err(bad(
                "truncated",
                format!(
                    "the data of tensor `{name}` lies past the end of the file; re-download it"
                ),
            ));
        }
        Ok(Self {
            path,
            mmap,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Name -> (dtype, shape) of every tensor, as stored (no renaming).
    pub fn index(&self) -> BTreeMap<String, (DType, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|(k, t)| (k.clone(), (t.dtype, t.shape.clone())))
            .collect()
    }

    /// The raw little-endian bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensors.get(name)?;
        self.mmap.get(t.start..t.start + t.byte_len())
    }

    /// Tensor `name` on `device`, in its stored dtype.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (Some(t), Some(bytes)) = (self.tensors.get(name), self.bytes(name)) else {
            return Err(Error::weights(
                &self.path,
                "missing_tensor",
                format!("tensor `{name}` is not in the file"),
            ));
        };
        Ok(Tensor::from_raw_buffer(bytes, t.dtype, &t.shape, device)?)
    }
}

impl PthTensor {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// What a tensor entry of the pickle says: its storage and the view into it.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
    storage_key: String,
    storage_numel: usize,
}

/// The tensors of an unpickled state dict, or why the object is not one (a message naming
/// the offending entry).
fn state_dict(object: Object) -> std::result::Result<Vec<(String, Record)>, String> {
    let Object::Dict(items) = object else {
        return Err(format!(
            "the pickled object is {}, not a dict of tensors (a state dict); refusing it",
            describe(&object)
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let Object::Unicode(name) = key else {
            return Err(format!("a key is {}, not a tensor name", describe(&key)));
        };
        if name == METADATA_KEY && is_version_table(&value) {
            continue;
        }
        let record = tensor(value).map_err(|why| {
            format!("entry `{name}` {why}; refusing the file: only tensors are accepted")
        })?;
        out.push((name, record));
    }
    Ok(out)
}

/// `{module name: {field: int or str}}`: torch's per-module version numbers, pure data.
fn is_version_table(value: &Object) -> bool {
    let Object::Dict(modules) = value else {
        return false;
    };
    modules.iter().all(|(k, v)| {
        matches!(k, Object::Unicode(_))
            && matches!(v, Object::Dict(fields) if fields.iter().all(|(f, x)| {
                matches!(f, Object::Unicode(_))
                    && matches!(x, Object::Int(_) | Object::Long(_) | Object::Unicode(_) | Object::None)
            }))
    })
}

fn is_call(callable: &Object, (module, name): (&str, &str)) -> bool {
    matches!(callable, Object::Class { module_name, class_name } if module_name == module && class_name == name)
}

/// A tensor rebuilt from a storage, or why the value is not one.
fn tensor(value: Object) -> std::result::Result<Record, String> {
    let Object::Reduce { callable, args } = value else {
        return Err(format!("is {}", describe(&value)));
    };
    if is_call(&callable, REBUILD_PARAMETER) {
        // (tensor, requires_grad, backward_hooks)
        return match *args {
            Object::Tuple(mut a)
                if a.len() == 3 && matches!(a[1], Object::Bool(_)) && is_empty_dict(&a[2]) =>
            {
                tensor(a.swap_remove(0))
            }
            other => Err(format!(
                "is a parameter with unexpected arguments {}",
                describe(&other)
            )),
        };
    }
    if !is_call(&callable, REBUILD_TENSOR) {
        return Err(format!("is a call of {}", describe(&callable)));
    }
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    let Object::Tuple(a) = *args else {
        return Err("is a tensor with malformed arguments".into());
    };
    let [storage, offset, size, stride, requires_grad, hooks, rest @ ..] = a.as_slice() else {
        return Err(format!(
            "is a tensor with {} arguments instead of 6",
            a.len()
        ));
    };
    let extra_ok = match rest {
        [] => true,
        [Object::None] => true,
        [d] => is_empty_dict(d),
        _ => false,
    };
    if !matches!(requires_grad, Object::Bool(_)) || !is_empty_dict(hooks) || !extra_ok {
        return Err("is a tensor with hooks or extra state".into());
    }
    let shape = ints(size).ok_or("has a malformed size")?;
    let strides = ints(stride).ok_or("has a malformed stride")?;
    let offset = int(offset).ok_or("has a malformed storage offset")?;
    let (dtype, storage_key, storage_numel) = storage_ref(storage)?;
    if shape.len() != strides.len() || !contiguous(&shape, &strides) {
        return Err(format!(
            "is stored with strides {strides:?} for shape {shape:?}; save it contiguous (tensor.contiguous())"
        ));
    }
    Ok(Record {
        dtype,
        shape,
        offset,
        storage_key,
        storage_numel,
    })
}

/// `persistent_load(("storage", torch.<Type>Storage, key, location, numel))`.
fn storage_ref(storage: &Object) -> std::result::Result<(DType, String, usize), String> {
    let Object::PersistentLoad(id) = storage else {
        return Err(format!("has {} instead of a storage", describe(storage)));
    };
    let Object::Tuple(parts) = id.as_ref() else {
        return Err("has a malformed storage reference".into());
    };
    let [Object::Unicode(kind), Object::Class {
        module_name,
        class_name,
    }, Object::Unicode(key), Object::Unicode(_location), numel] = parts.as_slice()
    else {
        return Err("has a malformed storage reference".into());
    };
    if kind != "storage" || module_name != "torch" {
        return Err(format!("has a storage of type {module_name}.{class_name}"));
    }
    let dtype = match class_name.as_str() {
        "FloatStorage" => DType::F32,
        "BFloat16Storage" => DType::BF16,
        "HalfStorage" => DType::F16,
        "DoubleStorage" => DType::F64,
        other => return Err(format!("has a {other}, not a floating-point storage")),
    };
    // The key names a file inside the archive: digits only, never a path.
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("names storage {key:?}, which is not a storage key"));
    }
    let numel = int(numel).ok_or("has a malformed storage size")?;
    Ok((dtype, key.clone(), numel))
}

fn is_empty_dict(o: &Object) -> bool {
    matches!(o, Object::Dict(d) if d.is_empty())
}

fn int(o: &Object) -> Option<usize> {
    match o {
        Object::Int(v) => usize::try_from(*v).ok(),
        Object::Long(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

fn ints(o: &Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(v) => v.iter().map(int).collect(),
        _ => None,
    }
}

/// Row-major with no gaps (strides of size-1 axes do not matter).
fn contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// A short description of a pickled value for messages (never its full content).
fn describe(o: &Object) -> String {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => format!("{module_name}.{class_name}"),
        Object::Reduce { callable, .. } => format!("a call of {}", describe(callable)),
        Object::Build { callable, .. } => format!("an object built from {}", describe(callable)),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Bool(_) => "a bool".into(),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Mark => "a pickle mark".into(),
        Object::PersistentLoad(_) => "a persistent reference".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(m: &str, c: &str) -> Object {
        Object::Class {
            module_name: m.into(),
            class_name: c.into(),
        }
    }

    fn s(v: &str) -> Object {
        Object::Unicode(v.into())
    }

    fn tuple(v: Vec<Object>) -> Object {
        Object::Tuple(v)
    }

    fn ints_obj(v: &[i32]) -> Object {
        tuple(v.iter().map(|i| Object::Int(*i)).collect())
    }

    fn rebuild(storage_class: &str, key: &str, shape: &[i32], stride: &[i32]) -> Object {
        let storage = Object::PersistentLoad(Box::new(tuple(vec![
            s("storage"),
            class("torch", storage_class),
            s(key),
            s("cpu"),
            Object::Int(shape.iter().product()),
        ])));
        Object::Reduce {
            callable: Box::new(class("torch._utils", "_rebuild_tensor_v2")),
            args: Box::new(tuple(vec![
                storage,
                Object::Int(0),
                ints_obj(shape),
                ints_obj(stride),
                Object::Bool(false),
                Object::Dict(vec![]),
            ])),
        }
    }

    #[test]
    fn a_state_dict_of_tensors_and_its_version_table_is_accepted() {
        let version = Object::Dict(vec![(
            s(""),
            Object::Dict(vec![(s("version"), Object::Int(1))]),
        )]);
        let param = Object::Reduce {
            callable: Box::new(class("torch._utils", "_rebuild_parameter")),
            args: Box::new(tuple(vec![
                rebuild("FloatStorage", "1", &[], &[]),
                Object::Bool(true),
                Object::Dict(vec![]),
            ])),
        };
        let dict = Object::Dict(vec![
            (
                s("net.a"),
                rebuild("BFloat16Storage", "0", &[2, 3], &[3, 1]),
            ),
            (s("net.b"), param),
            (s(METADATA_KEY), version),
        ]);
        let got = state_dict(dict).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1.dtype, DType::BF16);
        assert_eq!(got[0].1.shape, vec![2, 3]);
        assert_eq!(got[1].1.shape, Vec::<usize>::new());
    }

    #[test]
    fn anything_but_tensors_is_refused_by_name() {
        let code = Object::Reduce {
            callable: Box::new(class("os", "system")),
            args: Box::new(tuple(vec![s("echo owned")])),
        };
        let cases = [
            (
                Object::Dict(vec![(s("evil"), code.clone())]),
                "is a call of os.system",
            ),
            (
                Object::Dict(vec![(s("n"), Object::Int(3))]),
                "entry `n` is an integer",
            ),
            (code.clone(), "a call of os.system"),
            (Object::List(vec![]), "a list"),
            (
                Object::Dict(vec![(
                    s("t"),
                    rebuild("FloatStorage", "0", &[2, 3], &[1, 2]),
                )]),
                "save it contiguous",
            ),
            (
                Object::Dict(vec![(s("t"), rebuild("LongStorage", "0", &[2], &[1]))]),
                "not a floating-point storage",
            ),
            (
                Object::Dict(vec![(s("t"), rebuild("FloatStorage", "../x", &[2], &[1]))]),
                "not a storage key",
            ),
            // A tensor whose hooks would run code on load.
            (
                Object::Dict(vec![(
                    s("t"),
                    match rebuild("FloatStorage", "0", &[2], &[1]) {
                        Object::Reduce { callable, args } => {
                            let Object::Tuple(mut a) = *args else {
                                unreachable!()
                            };
                            a[5] = code;
                            Object::Reduce {
                                callable,
                                args: Box::new(Object::Tuple(a)),
                            }
                        }
                        _ => unreachable!(),
                    },
                )]),
                "hooks",
            ),
        ];
        for (object, expected) in cases {
            let err = state_dict(object).unwrap_err();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn contiguity_ignores_unit_axes() {
        assert!(contiguous(&[2, 3], &[3, 1]));
        assert!(contiguous(&[1, 3], &[99, 1]));
        assert!(contiguous(&[], &[]));
        assert!(!contiguous(&[2, 3], &[1, 2]));
    }
}
