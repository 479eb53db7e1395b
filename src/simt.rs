//! The SIMT executor: the crate's CUDA kernels, compiled as host C++ (kernels/simt/), run on the CPU.
//!
//! Each block's threads run as fibers on the calling OS thread, blocks one after another; warp lanes are
//! threads 32w .. 32w+31 in linear order (x fastest). Barriers, shuffles and votes follow the CUDA
//! Programming Guide and the PTX ISA, and misuse (divergent `__syncthreads`, a deadlock, bad warp masks
//! or widths) stops the launch with [`VppoError::Kernel`] naming the kernel, block, thread and source
//! line instead of hanging. Lanes run in forward or reverse order, or one warp runs ahead of the others
//! ([`LaneOrder`]), so code that is right only by luck of scheduling fails in one of them; shared memory
//! is poisoned (every byte 0xFF) at each block's start.
//!
//! Test settings ([`TestMode`], per OS thread): a grid cap, so that every block of a kernel that loops
//! over the grid handles many rows; and a race check that reports two threads' accesses to one byte of
//! shared memory that no barrier, warp operation or atomic orders (kernels/simt/simt.h).
//!
//! Launches from several OS threads at once are independent: the executor's state is per OS thread.

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::device::LaneOrder;
use crate::error::{Result, VppoError};

/// One launch, as the C entry points take it (kernels/simt/simt_abi.h, `VppoSimtLaunch`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimtLaunch {
    /// Blocks in x.
    pub grid_x: u32,
    /// Blocks in y.
    pub grid_y: u32,
    /// Blocks in z.
    pub grid_z: u32,
    /// Threads per block in x.
    pub block_x: u32,
    /// Threads per block in y.
    pub block_y: u32,
    /// Threads per block in z.
    pub block_z: u32,
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// 0: threads run in forward order; 1: in reverse order; 2: run-ahead ([`LaneOrder::RunAhead`]).
    pub schedule: i32,
}

/// The executor's test settings on one OS thread (kernels/simt/simt_abi.h, `VppoSimtTestMode`). A
/// thread starts with `VPPO_SIMT_GRID_CAP` (a block count) and `VPPO_SIMT_RACE_CHECK` (0 or 1) from the
/// environment, unset meaning 0, which is how a whole child process (the fake CUDA driver's reruns)
/// is put in a mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestMode {
    /// 0: launches run as given; n > 0: a grid of more than n blocks runs n (`gridDim.x` = n), so each
    /// block of a kernel that loops over the grid does the work of many and reuses its shared memory.
    pub grid_cap: u32,
    /// Run each kernel's race-checked build: a launch stops with [`VppoError::Kernel`] naming the
    /// kernel, block, byte, both threads and both source lines of the first race on shared memory.
    pub race_check: bool,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawTestMode {
    grid_cap: u32,
    race_check: i32,
}

extern "C" {
    fn vppo_simt_set_test_mode(mode: *const RawTestMode, previous: *mut RawTestMode) -> c_int;
}

/// Sets the test mode of the calling OS thread and returns the previous one.
pub fn set_test_mode(mode: TestMode) -> TestMode {
    let raw = RawTestMode {
        grid_cap: mode.grid_cap,
        race_check: i32::from(mode.race_check),
    };
    let mut prev = RawTestMode {
        grid_cap: 0,
        race_check: 0,
    };
    // SAFETY: both pointers are valid for the call; the mode is valid (race_check is 0 or 1), so the
    // call cannot fail.
    let rc = unsafe { vppo_simt_set_test_mode(&raw, &mut prev) };
    debug_assert_eq!(rc, 0);
    TestMode {
        grid_cap: prev.grid_cap,
        race_check: prev.race_check != 0,
    }
}

/// Runs `f` with the calling OS thread in test mode `mode`, then restores the previous mode (also when
/// `f` panics).
pub fn with_test_mode<R>(mode: TestMode, f: impl FnOnce() -> R) -> R {
    struct Restore(TestMode);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_test_mode(self.0);
        }
    }
    let _restore = Restore(set_test_mode(mode));
    f()
}

/// The C entry point `vppo_simt_<kernel>` that `VPPO_EXPORT_KERNEL` defines: runs the kernel over the
/// grid with `*(const ParamsT *)params`, returns 0, or non-zero with a NUL-terminated message in the
/// error buffer.
pub type SimtEntry =
    unsafe extern "C" fn(*const SimtLaunch, *const c_void, *mut c_char, usize) -> c_int;

/// Largest dynamic shared memory per block the executor accepts (what an sm_90 block may have).
pub const MAX_SHARED_BYTES: u32 = 227 * 1024;

/// Length of the buffer the executor writes its error message into.
const ERR_LEN: usize = 2048;

/// Runs `entry` over `grid` blocks of `block` threads with `shared_bytes` of dynamic shared memory per
/// block, lanes in `order`, and `params` as the kernel's by-value parameter struct.
///
/// Errors: [`VppoError::Kernel`] for a bad launch shape (a zero dimension, more than 1024 threads per
/// block, block z over 64, grid y or z over 65535, shared memory over [`MAX_SHARED_BYTES`]) and for
/// whatever the executor reports while running the kernel.
///
/// # Safety
/// `entry` must be a `vppo_simt_*` entry whose kernel takes a `P`, and every pointer inside `params`
/// must be valid for the accesses the kernel makes for this grid (reads, and writes without aliasing
/// live Rust references).
pub unsafe fn launch<P>(
    entry: SimtEntry,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    order: LaneOrder,
    params: &P,
) -> Result<()> {
    if grid.contains(&0) || block.contains(&0) {
        return Err(VppoError::Kernel(format!(
            "invalid launch: grid {grid:?}, block {block:?}: every dimension must be >= 1"
        )));
    }
    let threads: u64 = block.iter().map(|&b| u64::from(b)).product();
    if threads > 1024 || block[2] > 64 || grid[1] > 65535 || grid[2] > 65535 {
        return Err(VppoError::Kernel(format!(
            "invalid launch: block {block:?} has {threads} threads (at most 1024, block z <= 64), \
             grid {grid:?} (y, z <= 65535)"
        )));
    }
    if shared_bytes > MAX_SHARED_BYTES {
        return Err(VppoError::Kernel(format!(
            "invalid launch: {shared_bytes} bytes of shared memory per block (at most {MAX_SHARED_BYTES})"
        )));
    }
    let desc = SimtLaunch {
        grid_x: grid[0],
        grid_y: grid[1],
        grid_z: grid[2],
        block_x: block[0],
        block_y: block[1],
        block_z: block[2],
        shared_bytes,
        schedule: match order {
            LaneOrder::Forward => 0,
            LaneOrder::Reverse => 1,
            LaneOrder::RunAhead => 2,
        },
    };
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: `desc` and `err` are live for the call and `err.len()` is its true length; `params`
    // points at a `P`, which the caller guarantees is the kernel's parameter type with valid pointers.
    let rc = unsafe {
        entry(
            &desc,
            (params as *const P).cast::<c_void>(),
            err.as_mut_ptr().cast::<c_char>(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&err).into_owned());
    Err(VppoError::Kernel(if msg.is_empty() {
        format!("the SIMT executor reported error {rc} without a message")
    } else {
        msg
    }))
}

/// The executor's self-test kernels (kernels/simt/tests/), for tests/simt_executor.rs.
#[doc(hidden)]
#[allow(missing_docs)]
pub mod selftest {
    use std::ffi::{c_char, c_int, c_void};

    use super::SimtLaunch;

    /// Mirror of `VppoSelftestParams` (kernels/simt/tests/selftest.h).
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct SelftestParams {
        pub in_a: *const i32,
        pub in_b: *const i32,
        pub in_mask: *const u32,
        pub in_f: *const f32,
        pub in_u64: *const u64,
        pub out_a: *mut i32,
        pub out_b: *mut i32,
        pub out_u: *mut u32,
        pub out_f: *mut f32,
        pub out_u64: *mut u64,
        pub mode: i32,
        pub width: i32,
        pub n: i32,
        pub pad0: i32,
    }

    extern "C" {
        pub fn vppo_simt_selftest_shfl(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_shfl_types(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_vote(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_activemask(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_bits(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_warp_error(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_divergent_barrier(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_deadlock(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_exit_barrier(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_reduce(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_scan(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_race(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_poison(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_atomics(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_convert(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_ordering(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn vppo_simt_selftest_dims(
            l: *const SimtLaunch,
            p: *const c_void,
            e: *mut c_char,
            n: usize,
        ) -> c_int;
    }
}
