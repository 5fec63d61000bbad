//! With the `cuda` feature, compiles `kernels/pid_kernels.cu` to PTX with nvcc (found through
//! `NVCC`, `CUDA_HOME`/`CUDA_PATH` or `PATH`) for `CUDA_COMPUTE_CAP` (default 80, the
//! minimum the tensor-core attention needs). The driver JIT-compiles the PTX for newer GPUs.

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
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
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
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().replace('.', "").parse().ok())
        .unwrap_or(80);
    if cap < 80 {
        panic!("pid-native's CUDA kernels need compute capability 8.0+ (bf16 tensor cores); CUDA_COMPUTE_CAP={cap}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("pid_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}")])
        .arg("-o")
        .arg(&out)
        .arg("kernels/pid_kernels.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): the cuda feature needs nvcc (CUDA 13.0); set NVCC or CUDA_HOME, \
                 or pip install nvidia-cuda-nvcc==13.0.88 and put its bin/ on PATH (see README)",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on kernels/pid_kernels.cu ({status})"
    );
}
