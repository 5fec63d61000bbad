//! Opening a CUDA device: a driver or GPU this build cannot run on is refused with the reason
//! before anything is loaded onto it, instead of failing later with a PTX or launch error.

use candle_core::Device;

use crate::{Error, Result};

/// The CUDA version the build's PTX needs from the driver: the 13.0 toolkit it is compiled
/// with (`scripts/gpu/toolkit.txt`), which R580 drivers provide.
pub const BUILD_CUDA_VERSION: i32 = 13_000;
/// bf16 arithmetic and tensor-core instructions in candle's kernels and ours.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);
/// Kept free beside the weights when they are loaded: cuBLAS workspaces and the first
/// activations come right after.
pub const LOAD_HEADROOM_BYTES: u64 = 256 << 20;

const GIB: f64 = (1u64 << 30) as f64;

fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// Whether GPU `ordinal` of `count`, named `gpu`, with a driver supporting CUDA
/// `driver_version` (1000 * major + 10 * minor) and compute `capability`, can run this build.
pub fn check_support(
    ordinal: usize,
    count: usize,
    gpu: &str,
    driver_version: i32,
    capability: (i32, i32),
) -> Result<()> {
    if driver_version < BUILD_CUDA_VERSION {
        return Err(Error::unsupported(
            "cuda_driver_too_old",
            format!(
                "the NVIDIA driver supports CUDA {}, but this build of pid-native needs CUDA {} \
                 (driver 580 or newer): update the NVIDIA driver, or use device=\"cpu\"",
                cuda_version(driver_version),
                cuda_version(BUILD_CUDA_VERSION)
            ),
        ));
    }
    if count == 0 {
        return Err(Error::unsupported(
            "no_gpu",
            "no CUDA GPU is visible to this process (check nvidia-smi and CUDA_VISIBLE_DEVICES), \
             or use device=\"cpu\"",
        ));
    }
    if ordinal >= count {
        return Err(Error::input(
            "device",
            format!(
                "there is no cuda:{ordinal}: {count} CUDA GPU(s) are visible (cuda:0 to cuda:{})",
                count - 1
            ),
        ));
    }
    if capability < MIN_COMPUTE_CAPABILITY {
        return Err(Error::unsupported(
            "gpu_too_old",
            format!(
                "{gpu} (cuda:{ordinal}) has compute capability {}.{}; pid-native's CUDA build needs \
                 {}.{} or newer (A100, RTX 30 series and later: bf16 tensor cores); use device=\"cpu\"",
                capability.0, capability.1, MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
            ),
        ));
    }
    Ok(())
}

/// Whether `bytes` of `what` fit a GPU with `free` of `total` bytes free, with
/// [`LOAD_HEADROOM_BYTES`] to spare: a [`Error::Budget`] stating the numbers otherwise.
pub fn check_fits(what: &str, bytes: u64, device: &str, free: u64, total: u64) -> Result<()> {
    let needed = bytes + LOAD_HEADROOM_BYTES;
    if needed <= free {
        return Ok(());
    }
    Err(Error::Budget {
        needed_bytes: needed,
        budget_bytes: free,
        message: format!(
            "{what} take {:.2} GiB on {device} ({:.2} GiB with headroom), but only {:.2} of its \
             {:.2} GiB are free: free GPU memory (other processes: nvidia-smi), load fewer components \
             (without gemma= and pass caption_embs; without vae=), or use device=\"cpu\"",
            bytes as f64 / GIB,
            needed as f64 / GIB,
            free as f64 / GIB,
            total as f64 / GIB,
        ),
    })
}

/// [`check_fits`] against what the driver reports free on a CUDA `device`; the CPU loads
/// weights by mapping their files, and is not checked.
pub fn ensure_fits(device: &Device, bytes: u64, what: &str) -> Result<()> {
    match free_memory(device)? {
        Some((name, free, total)) => check_fits(what, bytes, &name, free, total),
        None => Ok(()),
    }
}

/// `(name, free, total)` bytes of a CUDA device's memory; None on other devices.
fn free_memory(device: &Device) -> Result<Option<(String, u64, u64)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use candle_core::cuda_backend::WrapErr;
            let ctx = dev.cuda_stream().context().clone();
            let (free, total) = ctx.mem_get_info().w()?;
            Ok(Some((
                format!("cuda:{}", ctx.ordinal()),
                free as u64,
                total as u64,
            )))
        }
        _ => Ok(None),
    }
}

/// CUDA device `ordinal`, after [`check_support`] passed on what the driver reports.
#[cfg(feature = "cuda")]
pub fn open(ordinal: usize) -> Result<Device> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    let driver = |e: result::DriverError| {
        Error::unsupported(
            "cuda_driver",
            format!("the NVIDIA driver cannot be used ({e}); is the GPU visible to this process?"),
        )
    };
    let mut version = 0;
    // SAFETY: writes one int; needs no initialised driver.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(driver)?;
    if version < BUILD_CUDA_VERSION {
        // Refused before cuInit, which an old driver may fail for this build's runtime.
        check_support(ordinal, 1, "", version, MIN_COMPUTE_CAPABILITY)?;
    }
    result::init().map_err(driver)?;
    let count = result::device::get_count().map_err(driver)?.max(0) as usize;
    let (name, capability) = if ordinal < count {
        let dev = result::device::get(ordinal as i32).map_err(driver)?;
        let attribute = |a| unsafe { result::device::get_attribute(dev, a) }.map_err(driver);
        let capability = (
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        (result::device::get_name(dev).map_err(driver)?, capability)
    } else {
        (String::new(), (0, 0))
    };
    check_support(ordinal, count, &name, version, capability)?;
    Ok(Device::new_cuda(ordinal)?)
}

/// Without the `cuda` feature there is no CUDA device to open.
#[cfg(not(feature = "cuda"))]
pub fn open(_ordinal: usize) -> Result<Device> {
    Err(Error::unsupported(
        "no_cuda_build",
        "this build of pid-native has no CUDA support; install the CUDA build (see README) or use device=\"cpu\"",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<()>) -> &'static str {
        r.err().map_or("ok", |e| e.code())
    }

    #[test]
    fn accepts_the_build_driver_and_ampere_or_newer() {
        assert_eq!(
            code(check_support(0, 1, "NVIDIA H100", 13_000, (9, 0))),
            "ok"
        );
        assert_eq!(
            code(check_support(1, 2, "NVIDIA A100", 13_020, (8, 0))),
            "ok"
        );
        assert_eq!(code(check_support(0, 1, "RTX 3090", 13_000, (8, 6))), "ok");
    }

    #[test]
    fn refuses_an_old_driver_naming_both_versions() {
        let err = check_support(0, 1, "NVIDIA H100", 12_080, (9, 0)).unwrap_err();
        assert_eq!(err.code(), "cuda_driver_too_old");
        let msg = err.to_string();
        assert!(
            msg.contains("CUDA 12.8") && msg.contains("CUDA 13.0") && msg.contains("580"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_a_gpu_below_sm80_naming_it() {
        let err = check_support(0, 1, "Tesla V100", 13_000, (7, 0)).unwrap_err();
        assert_eq!(err.code(), "gpu_too_old");
        let msg = err.to_string();
        assert!(
            msg.contains("Tesla V100") && msg.contains("7.0") && msg.contains("8.0"),
            "{msg}"
        );
        assert_eq!(
            code(check_support(0, 1, "T4", 13_000, (7, 5))),
            "gpu_too_old"
        );
    }

    #[test]
    fn refuses_an_ordinal_past_the_last_gpu() {
        let err = check_support(2, 2, "", 13_000, (0, 0)).unwrap_err();
        assert_eq!(err.code(), "device");
        assert!(err.to_string().contains("cuda:0 to cuda:1"), "{err}");
        assert_eq!(code(check_support(0, 0, "", 13_000, (0, 0))), "no_gpu");
    }

    #[test]
    fn weights_that_do_not_fit_the_free_memory_are_a_budget_error_with_the_numbers() {
        let gib = 1u64 << 30;
        assert!(check_fits("the weights", 2 * gib, "cuda:0", 3 * gib, 80 * gib).is_ok());
        let err = check_fits(
            "the weights in pid.safetensors",
            2 * gib,
            "cuda:1",
            2 * gib,
            24 * gib,
        )
        .unwrap_err();
        assert_eq!(err.code(), "memory_budget");
        let Error::Budget {
            needed_bytes,
            budget_bytes,
            ref message,
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(
            (needed_bytes, budget_bytes),
            (2 * gib + LOAD_HEADROOM_BYTES, 2 * gib)
        );
        for part in [
            "pid.safetensors",
            "2.00 GiB on cuda:1",
            "2.25 GiB with headroom",
            "2.00 of its 24.00 GiB",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn the_cpu_build_refuses_cuda_with_the_fix() {
        let err = open(0).unwrap_err();
        assert_eq!(err.code(), "no_cuda_build");
        assert!(err.to_string().contains("install the CUDA build"), "{err}");
    }
}
