//! The fake NCCL library (tests/fake_nccl/libnccl.c): NCCL for ranks that are threads of one process,
//! each on its own device of the fake CUDA driver, so `vppo::NcclGroup` (src/parallel/nccl.rs) runs in
//! CI without GPUs or NCCL.
//!
//! [`install`] loads the fake driver ([`super::fake_cuda::install`]) and then this library, under the
//! SONAME cudarc opens ("libnccl.so"). The driver must be told how many devices to have
//! (VPPO_FAKE_CUDA_DEVICES) in the environment of the process, before it is loaded: tests run in a
//! child process for that (tests/nccl_parallel.rs).

use std::sync::OnceLock;

/// The value of VPPO_TEST_NCCL that selects the fake NCCL library.
pub const MODE: &str = "fake";

/// True when this process runs its NCCL tests on the fake library.
pub fn active() -> bool {
    std::env::var("VPPO_TEST_NCCL").as_deref() == Ok(MODE)
}

/// Loads the fake driver and the fake NCCL library into this process (once). Must run before
/// anything in the process loads a CUDA driver or NCCL.
pub fn install() {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    super::fake_cuda::install();
    let loaded = LOADED.get_or_init(|| {
        super::fake_cuda::load_global("tests/fake_nccl/libnccl.c", "libnccl.so").map(|_| ())
    });
    if let Err(e) = loaded {
        panic!("the fake NCCL library could not be loaded: {e}");
    }
}
