//! With the `cuda` feature, compiles `kernels/pid_kernels.cu` with nvcc (found through `NVCC`,
//! `CUDA_HOME`/`CUDA_PATH` or `PATH`) into a fatbin holding PTX for `CUDA_COMPUTE_CAP`
//! (default 80, the minimum the tensor-core attention needs), which the driver JIT-compiles for
//! any newer GPU, and machine code for each architecture in `PID_CUDA_SASS` (e.g. `90` or
//! `80,90`; none by default), which loads without the JIT where it matches the GPU.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels();
    }
}

fn compile_kernels() {
    use std::path::PathBuf;
    use std::process::Command;

    for f in ["kernels/pid_kernels.cu", "kernels/noise_math.cuh"] {
        println!("cargo:rerun-if-changed={f}");
    }
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_COMPUTE_CAP",
        "PID_CUDA_SASS",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            ["CUDA_HOME", "CUDA_PATH"]
                .iter()
                .filter_map(std::env::var_os)
                .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let arch = |name: &str, value: &str| -> u32 {
        // "90a" (arch-specific, as candle's build accepts it) compiles our kernels for plain sm_90.
        let digits = value
            .trim()
            .trim_end_matches(char::is_alphabetic)
            .replace('.', "");
        let cap = digits.parse().unwrap_or_else(|_| {
            panic!("{name}: {value:?} is not a compute capability such as 80 or 9.0")
        });
        if cap < 80 {
            panic!("pid-native's CUDA kernels need compute capability 8.0+ (bf16 tensor cores); {name}={cap}");
        }
        cap
    };
    let ptx = arch(
        "CUDA_COMPUTE_CAP",
        &std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into()),
    );
    let mut gencode = vec![format!("arch=compute_{ptx},code=compute_{ptx}")];
    for sass in std::env::var("PID_CUDA_SASS")
        .unwrap_or_default()
        .split(',')
    {
        if !sass.trim().is_empty() {
            let sm = arch("PID_CUDA_SASS", sass);
            gencode.push(format!("arch=compute_{sm},code=sm_{sm}"));
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("pid_kernels.fatbin");
    let status = Command::new(&nvcc)
        .args(["--fatbin", "-O3", "-std=c++17"])
        .args(gencode.iter().flat_map(|g| ["-gencode", g.as_str()]))
        .arg("-o")
        .arg(&out)
        .arg("kernels/pid_kernels.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): the cuda feature needs nvcc (CUDA 13.0); set NVCC or CUDA_HOME, \
                 or pip install -r scripts/gpu/toolkit.txt and put its bin/ on PATH (see README)",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on kernels/pid_kernels.cu ({status})"
    );
}
