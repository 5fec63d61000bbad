//! glibc malloc policy for decodes.
//!
//! By default glibc returns large freed blocks to the OS at once and faults fresh pages back in
//! on the next allocation; a forward frees and reallocates gigabytes (per-layer weight upcasts,
//! activations), and those page faults cost ~7% of a 512² decode on 2 cores (4-step loop
//! measured at 119-120 s with glibc's defaults, 110-113 s without). At import, freed memory is
//! kept in the heap for reuse, blocks of any size included (without that, blocks over glibc's
//! largest mmap threshold, 32 MiB, are mapped afresh each time: a 1024² forward faulted 1.66 M
//! pages instead of 0.94 M and took 41-44 s instead of 40-42; at 2048² page clearing was 6%
//! of a forward); after each decode it is trimmed, so an idle process shrinks back.
//! `PID_MALLOC_TUNING=0` keeps glibc's defaults.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    static TUNED: AtomicBool = AtomicBool::new(false);

    pub fn tune() {
        if std::env::var("PID_MALLOC_TUNING").is_ok_and(|v| v.trim() == "0") {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters. No mmap at all: every block
        // comes from (and goes back to) the heap; a thread arena too small for a block
        // falls back to the main one.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
        TUNED.store(true, Ordering::Relaxed);
    }

    pub fn trim() {
        if TUNED.load(Ordering::Relaxed) {
            // SAFETY: returns free heap memory to the OS; no allocation is touched.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn tune() {}
    pub fn trim() {}
}

pub use imp::{trim, tune};
