//! Records what `build_info()` reports: the compile target and the locked candle version.

fn main() {
    println!(
        "cargo:rustc-env=PID_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    let lock = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let candle = text
        .split("[[package]]")
        .find(|p| p.contains("name = \"candle-core\""))
        .and_then(|p| {
            p.lines().find_map(|l| {
                l.strip_prefix("version = \"")?
                    .strip_suffix('"')
                    .map(str::to_string)
            })
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PID_CANDLE_VERSION={candle}");
}
