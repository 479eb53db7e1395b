//! The fake CUDA driver (tests/fake_cuda/libcuda.c): the driver API on the SIMT executor, so the GPU
//! backend's host code (cudarc calls, buffers, offsets, launches, timing) runs in CI without a GPU.
//!
//! `VPPO_TEST_DEVICE=fake-cuda` makes a test binary that supports it call [`install`] before anything
//! touches cudarc and then test `Device::Cuda(0)`. [`rerun_self`] is how `cargo test` gets there: a
//! test re-runs its own binary in that mode, in a child process (the driver library is loaded once per
//! process and cannot be swapped back).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use vppo::simt::SimtEntry;

/// What the fake driver counted since it was loaded (`VppoFakeCudaStats` in libcuda.c).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub launches: u64,
    pub htod_copies: u64,
    pub dtoh_copies: u64,
    pub htod_bytes: u64,
    pub dtoh_bytes: u64,
    pub dtod_bytes: u64,
    pub memset_bytes: u64,
    pub allocs: u64,
    pub live_allocs: u64,
    pub live_bytes: u64,
    pub alloc_bytes: u64,
}

impl Stats {
    /// What was counted between `earlier` and `self` (the live counts may go down: wrapping).
    pub fn since(&self, earlier: &Stats) -> Stats {
        Stats {
            launches: self.launches - earlier.launches,
            htod_copies: self.htod_copies - earlier.htod_copies,
            dtoh_copies: self.dtoh_copies - earlier.dtoh_copies,
            htod_bytes: self.htod_bytes - earlier.htod_bytes,
            dtoh_bytes: self.dtoh_bytes - earlier.dtoh_bytes,
            dtod_bytes: self.dtod_bytes - earlier.dtod_bytes,
            memset_bytes: self.memset_bytes - earlier.memset_bytes,
            allocs: self.allocs - earlier.allocs,
            live_allocs: self.live_allocs.wrapping_sub(earlier.live_allocs),
            live_bytes: self.live_bytes.wrapping_sub(earlier.live_bytes),
            alloc_bytes: self.alloc_bytes - earlier.alloc_bytes,
        }
    }
}

type ResolveFn = unsafe extern "C" fn(*const c_char) -> Option<SimtEntry>;
type PointerFieldsFn = unsafe extern "C" fn(*const c_char, *mut *const usize, *mut usize) -> usize;
type InstallFn = unsafe extern "C" fn(ResolveFn, PointerFieldsFn, c_int) -> c_int;
type StatsFn = unsafe extern "C" fn(*mut Stats);

const RTLD_NOW: c_int = 2;
const RTLD_NOLOAD: c_int = 4;
const RTLD_GLOBAL: c_int = 0x100;

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}

/// The value of VPPO_TEST_DEVICE that selects the fake driver.
pub const MODE: &str = "fake-cuda";

/// True when this process runs its tests on the fake driver.
pub fn active() -> bool {
    std::env::var("VPPO_TEST_DEVICE").as_deref() == Ok(MODE)
}

struct Loaded {
    stats: StatsFn,
}

// SAFETY: the only field is a function pointer into a library that is never unloaded.
unsafe impl Send for Loaded {}
// SAFETY: as above; the C side locks its own state.
unsafe impl Sync for Loaded {}

static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, read before any other dl call.
    let e = unsafe { dlerror() };
    if e.is_null() {
        "unknown dl error".into()
    } else {
        // SAFETY: non-NULL, NUL-terminated (see above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Compiles `source` (a C file of tests/, relative to the crate) with the C compiler ($CC, which may
/// carry a wrapper such as ccache, else cc) into a shared object named `soname` (a file of this
/// process's own: the name has the pid and the time, so concurrent test processes never share one).
/// The fake NCCL library (fake_nccl.rs) is built the same way.
pub fn compile(source: &str, soname: &str) -> Result<PathBuf, String> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(source);
    let stem = soname.trim_end_matches(".so");
    let mut dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fake_cuda");
    if std::fs::create_dir_all(&dir).is_err() {
        dir = std::env::temp_dir();
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let out = dir.join(format!("{stem}-{}-{nanos}.so", std::process::id()));
    let cc = std::env::var("CC").ok().filter(|c| !c.trim().is_empty());
    let cc = cc.unwrap_or_else(|| "cc".into());
    let mut words = cc.split_whitespace();
    let program = words.next().unwrap_or("cc");
    let res = Command::new(program)
        .args(words)
        .args([
            "-shared", "-fPIC", "-O1", "-std=c11", "-Wall", "-Wextra", "-pthread",
        ])
        .arg(format!("-Wl,-soname,{soname}"))
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output()
        .map_err(|e| format!("running the C compiler {cc}: {e}"))?;
    if !res.status.success() {
        return Err(format!(
            "{cc} failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    Ok(out)
}

/// Compiles `source` ([`compile`]) and loads it into this process under `soname`, for every later
/// dlopen of that name (cudarc's): RTLD_GLOBAL, so a library loaded after it (the fake NCCL) links to
/// its functions. Never closed. Returns the handle.
pub fn load_global(source: &str, soname: &str) -> Result<*mut c_void, String> {
    let path = compile(source, soname)?;
    let c_path = CString::new(path.as_os_str().to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid C string; the library's only initialiser is the C runtime's. It is never closed,
    // so every pointer into it stays valid for the life of the process.
    let handle = unsafe { dlopen(c_path.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(format!("dlopen {}: {}", path.display(), dl_error()));
    }
    // Loaded under its SONAME; the file itself is no longer needed.
    let _ = std::fs::remove_file(&path);
    // The name cudarc opens first must now be this library, not a real one loaded earlier.
    let c_name = CString::new(soname).unwrap();
    // SAFETY: a valid C string; RTLD_NOLOAD loads nothing, it only looks the name up.
    let by_name = unsafe { dlopen(c_name.as_ptr(), RTLD_NOW | RTLD_NOLOAD) };
    if by_name != handle {
        return Err(format!(
            "dlopen(\"{soname}\") does not resolve to the fake library (a real one was loaded \
             before it, or this C library does not match loaded objects by SONAME): {by_name:?} != {handle:?}"
        ));
    }
    Ok(handle)
}

fn load(schedule: c_int) -> Result<Loaded, String> {
    let handle = load_global("tests/fake_cuda/libcuda.c", "libcuda.so")?;
    let sym = |name: &str| {
        let c = CString::new(name).unwrap();
        // SAFETY: a live handle and a valid C string.
        let p = unsafe { dlsym(handle, c.as_ptr()) };
        if p.is_null() {
            Err(format!("dlsym {name}: {}", dl_error()))
        } else {
            Ok(p)
        }
    };
    let install = sym("vppo_fake_cuda_install")?;
    let stats = sym("vppo_fake_cuda_stats")?;
    // SAFETY: the symbols are the functions of libcuda.c with exactly these signatures.
    let (install, stats) = unsafe {
        (
            std::mem::transmute::<*mut c_void, InstallFn>(install),
            std::mem::transmute::<*mut c_void, StatsFn>(stats),
        )
    };
    // SAFETY: the resolver (`vppo::hooks::simt_entry_of_c_name`, which the fake driver calls with
    // the NUL-terminated names cuModuleGetFunction is given) and `kernel_pointer_fields` are plain
    // extern "C" functions that live as long as the process.
    if unsafe {
        install(
            vppo::hooks::simt_entry_of_c_name,
            vppo::hooks::kernel_pointer_fields,
            schedule,
        )
    } != 0
    {
        return Err("vppo_fake_cuda_install refused the environment (see stderr)".into());
    }
    Ok(Loaded { stats })
}

/// Loads the fake driver into this process (once) so that cudarc's `dlopen("libcuda.so")` finds it.
/// Kernels run in forward lane order, or with VPPO_FAKE_CUDA_LANES=reverse in reverse order, or with
/// `ahead` one warp ahead of the others ([`vppo::LaneOrder::RunAhead`]).
///
/// Must run before anything in the process loads the CUDA driver.
pub fn install() {
    let schedule = match std::env::var("VPPO_FAKE_CUDA_LANES").as_deref() {
        Ok("reverse") => 1,
        Ok("ahead") => 2,
        _ => 0,
    };
    if let Err(e) = LOADED.get_or_init(|| load(schedule)) {
        panic!("the fake CUDA driver could not be loaded: {e}");
    }
}

/// The fake driver's counters ([`install`] first).
pub fn stats() -> Stats {
    install();
    let Some(Ok(l)) = LOADED.get() else {
        unreachable!("install panics unless loaded")
    };
    let mut s = Stats::default();
    // SAFETY: a valid out-pointer to a #[repr(C)] mirror of the C struct.
    unsafe { (l.stats)(&mut s) };
    s
}

/// A lock for tests that read the counters: hold it for the whole test, and take it in every other
/// test of the binary that uses the driver, so no other test's traffic lands between two reads.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Re-runs the current test binary with VPPO_TEST_DEVICE=fake-cuda (every test but `skip`), once per
/// lane order (forward lanes with guard pages after each allocation and the real grids, reverse lanes
/// with guard pages before and every grid capped at 3 blocks, so each block loops over many rows),
/// and panics with the child's output if it fails or runs over 600 s. Does nothing when this build has
/// no kernels (no nvcc) or when the process already runs in a device mode.
pub fn rerun_self(skip: &str) {
    if std::env::var_os("VPPO_TEST_DEVICE").is_some() {
        eprintln!("skipped: this process already runs under VPPO_TEST_DEVICE");
        return;
    }
    if !vppo::cuda::kernels_built() {
        eprintln!("skipped: this build has no CUDA kernels (nvcc was not found at build time)");
        return;
    }
    // Each run puts the guard pages on one side of every allocation (see libcuda.c).
    for (lanes, guard, cap) in [("forward", "end", "0"), ("reverse", "start", "3")] {
        let run = super::run_this_binary(
            &[
                ("VPPO_TEST_DEVICE", MODE),
                ("VPPO_FAKE_CUDA_LANES", lanes),
                ("VPPO_FAKE_CUDA_GUARD", guard),
                ("VPPO_SIMT_GRID_CAP", cap),
            ],
            &["--skip", skip, "--test-threads", "2"],
            std::time::Duration::from_secs(600),
        );
        let text = run.text();
        let status = run.status.unwrap_or_else(|| {
            panic!("the tests on the fake CUDA driver ({lanes} lanes) ran over 600 s:\n{text}")
        });
        assert!(
            status.success(),
            "the tests failed on the fake CUDA driver ({lanes} lanes):\n{text}"
        );
        let summary = text
            .lines()
            .filter(|l| l.starts_with("test result"))
            .collect::<Vec<_>>();
        eprintln!("fake CUDA driver, {lanes} lanes: {summary:?}");
    }
}
