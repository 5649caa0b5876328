//! The GPU for tests, or a visible SKIPPED line without one.

use std::io::Write;
use std::sync::OnceLock;

use sparsectr_attn::cuda::GpuDevice;
use sparsectr_attn::Error;

/// The GPU, or `None` after a SKIPPED line on the terminal (written past libtest's capture).
/// With `SPARSECTR_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu(test: &str) -> Option<&'static GpuDevice> {
    static GPU: OnceLock<Result<GpuDevice, Error>> = OnceLock::new();
    match GPU.get_or_init(|| GpuDevice::new(0)) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            if std::env::var("SPARSECTR_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("SPARSECTR_REQUIRE_GPU=1 but no GPU: {e}");
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no GPU ({e})");
            None
        }
    }
}

/// Property-test cases for a GPU test: `SPARSECTR_GPU_CASES` if set (compute-sanitizer runs use
/// a few), else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("SPARSECTR_GPU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
