//! Shared helpers for the golden parity tests: where the goldens are, and the
//! seeded-v1 weights they reference (generated once by the NumPy recipe and cached).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use pid_core::weights::read_metadata;

pub mod mini;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The golden fixtures bundled with the repository.
pub fn bundled_goldens_dir() -> PathBuf {
    workspace_root().join("tests/goldens")
}

/// The bundled goldens, then every directory of `PID_GOLDENS` (separated like `PATH`): a
/// directory there adds its files, of any kinds, to the bundled ones.
pub fn golden_dirs() -> Vec<PathBuf> {
    let extra = std::env::var_os("PID_GOLDENS").unwrap_or_default();
    std::iter::once(bundled_goldens_dir())
        .chain(std::env::split_paths(&extra).filter(|d| !d.as_os_str().is_empty()))
        .collect()
}

/// Every golden file of `kind` in every directory of [`golden_dirs`] whose name contains
/// `PID_GOLDENS_MATCH` (when set: CI's emulated aarch64 run keeps to the `_mini` files), a
/// file whose bytes another already has counted once. Panics when there are none: a parity
/// suite that silently checks nothing is worse than a failing one.
pub fn golden_files(kind: &str) -> Vec<PathBuf> {
    let matching = std::env::var("PID_GOLDENS_MATCH").unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::new();
    for dir in golden_dirs() {
        let mut here: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read goldens directory {}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(&matching))
            })
            .filter(|p| {
                read_metadata(p)
                    .map(|m| m.get("kind").map(String::as_str) == Some(kind))
                    .unwrap_or(false)
            })
            .collect();
        here.sort();
        for path in here {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&bytes, &mut hasher);
            if seen.insert(std::hash::Hasher::finish(&hasher)) {
                files.push(path);
            }
        }
    }
    assert!(
        !files.is_empty(),
        "no golden files of kind {kind} matching {matching:?} in {:?}",
        golden_dirs()
    );
    files
}

/// Run `check` on every golden file of `kind` and report each file's result; panics after
/// the last file when any failed (a panic inside `check` fails that file only).
pub fn check_every_golden(kind: &str, check: impl Fn(&Path) -> Result<String, String>) {
    let mut failed = Vec::new();
    for path in golden_files(kind) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&path)))
            .unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("panicked: {msg}"))
            });
        match outcome {
            Ok(report) => eprintln!("ok     {}: {report}", path.display()),
            Err(why) => {
                eprintln!("FAILED {}: {why}", path.display());
                failed.push(format!("{}: {why}", path.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} {kind} golden file(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

pub struct Golden {
    pub path: PathBuf,
    pub st: MmapedSafetensors,
}

impl Golden {
    pub fn open(path: &Path) -> Self {
        let st = unsafe { MmapedSafetensors::new(path) }.expect("golden file");
        Self {
            path: path.to_path_buf(),
            st,
        }
    }

    pub fn get(&self, name: &str) -> Tensor {
        self.st
            .load(name, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", self.path.display()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.st.tensors().into_iter().map(|(k, _)| k).collect();
        n.sort();
        n
    }

    /// Case names that have inputs `in.<case>.<input>`.
    pub fn cases_with(&self, input: &str) -> Vec<String> {
        let suffix = format!(".{input}");
        let mut cases: Vec<String> = self
            .names()
            .iter()
            .filter_map(|n| {
                n.strip_prefix("in.")?
                    .strip_suffix(&suffix)
                    .map(str::to_string)
            })
            .collect();
        cases.sort();
        cases
    }
}

/// Largest |x| over all elements, in f32; infinite when any element is NaN or infinite, so
/// that every bound on it fails (candle's `max` skips NaN).
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| {
            if x.is_finite() {
                x.abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

/// Largest |a - b|, infinite when either holds a non-finite value (see [`max_abs`]).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    let (fa, fb) = (f32(a), f32(b));
    if !max_abs(&fa).is_finite() || !max_abs(&fb).is_finite() {
        return f32::INFINITY;
    }
    max_abs(&(fa - fb).unwrap())
}

/// FNV-1a over "name" + "d0,d1,...;" per tensor: the cache key the Python side uses too.
pub fn layout_key(layout: &[(String, Vec<usize>)]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, shape) in layout {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        for b in format!("{name}{};", dims.join(",")).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// A cached seeded-v1 checkpoint for `layout` (a file, or the shard index of a full-size
/// layout), generated by the NumPy recipe on first use: `seeded.py` keeps the cache and
/// prints the path; each layout is asked once per test process.
///
/// Needs a Python with NumPy: `PID_PYTHON`, else `python3` on PATH.
pub fn seeded_checkpoint(layout: &[(String, Vec<usize>)], salt: &str) -> PathBuf {
    static ASKED: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let key = format!("{salt}-{}", layout_key(layout));
    // Held while generating: two tests needing the same network wait for one writer.
    let mut asked = ASKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = asked.get(&key) {
        return path.clone();
    }
    let dir = std::env::var_os("PID_SEEDED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/pid-seeded"));
    std::fs::create_dir_all(&dir).expect("seeded cache dir");
    let layout_json = dir.join(format!("{}.layout.json", layout_key(layout)));
    std::fs::write(&layout_json, serde_json::to_string(layout).unwrap()).unwrap();
    let python = std::env::var("PID_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = workspace_root().join("python/pid_native/testing/seeded.py");
    let done = Command::new(&python)
        .arg(&script)
        .arg("--layout")
        .arg(&layout_json)
        .arg("--cache")
        .arg(&dir)
        .arg("--salt")
        .arg(salt)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} (set PID_PYTHON to a Python with NumPy): {e}")
        });
    assert!(
        done.status.success(),
        "seeded weight generation failed; {python} needs NumPy (set PID_PYTHON)"
    );
    let path = PathBuf::from(String::from_utf8(done.stdout).unwrap().trim());
    asked.insert(key, path.clone());
    path
}
