//! The GPU side: the kernels nvcc compiled at build time, loaded through cudarc, and the one launch
//! path every kernel goes through.
//!
//! - [`Gpu::new`] probes for the driver library before touching cudarc (cudarc panics when libcuda is
//!   missing), creates the context once per device ordinal, and loads every embedded fatbin once.
//! - [`Gpu::launch`] is the only place a kernel is launched: one `unsafe` block, with the shape checks
//!   before it.
//! - Everything goes on the context's default stream, so the order of the calls is the order of the
//!   work on the device; cudarc's per-buffer event tracking is turned off for that reason (see
//!   [`Gpu::new`]).
//!
//! Without nvcc at build time [`FATBINS`] is empty, the cfg `vppo_kernels_built` is unset, and
//! [`Gpu::new`] returns [`VppoError::KernelsNotBuilt`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use crate::error::{CudaError, Result, VppoError};
use crate::params::{
    VppoBackwardParams, VppoKlDivBackwardParams, VppoLossParams, VppoLossTotals,
    VppoPerceptionParams, VppoSelectParams,
};

pub mod fatbin;
pub mod foreign;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));
}

pub use fatbin::{fatbin_entries, FatbinEntry};
pub use foreign::Borrowed;
pub use generated::{CUDA_ARCHS, CUDA_PTX_ARCH, FATBINS, NVCC_VERSION, RESOURCE_REPORT};

// SAFETY: each of these is the bindgen mirror of a struct in kernels/vppo_params.h: #[repr(C)],
// plain data (fixed-width integers, floats and raw pointers, explicit padding fields), with the
// layout checked against the C header by bindgen's layout tests. The kernels take them by value, so
// the bytes cudarc copies into the launch are exactly the struct the kernel reads. The pointers are
// device addresses the caller put there; `Gpu::launch` documents who guarantees them.
unsafe impl DeviceRepr for VppoPerceptionParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for VppoSelectParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for VppoLossParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for VppoBackwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for VppoKlDivBackwardParams {}
// SAFETY: as above; VppoLossTotals is the device-side output of the loss kernel (doubles and i64).
unsafe impl DeviceRepr for VppoLossTotals {}
// SAFETY: VppoLossTotals holds only f64 and i64 fields, for which all-zero bytes are 0.0 and 0.
unsafe impl ValidAsZeroBits for VppoLossTotals {}

/// True when this build compiled the kernels with nvcc (so a GPU can run them).
pub fn kernels_built() -> bool {
    cfg!(vppo_kernels_built)
}

/// Dynamic shared memory a block may use without opting in through a function attribute.
const DEFAULT_DYNAMIC_SHARED_LIMIT: u32 = 48 * 1024;

/// Maps a cudarc driver error to the crate's error, saying what was being done.
/// The driver's error stays the error's source.
pub(crate) fn cuda_err(what: &str, e: DriverError) -> VppoError {
    VppoError::Cuda(CudaError::driver(what, e))
}

/// A kernel function looked up once, with the dynamic shared memory limit already set for it.
struct CachedFunction {
    function: CudaFunction,
    /// Largest dynamic shared memory (bytes) the function attribute allows so far.
    shared_limit: u32,
}

/// One GPU with the vppo kernels loaded: a context, its default stream, and the kernel modules.
///
/// Shared: [`Gpu::new`] returns the same `Arc<Gpu>` for the same ordinal, so the modules are loaded
/// once per process and device. All methods take `&self` and may be called from several threads; the
/// work of all threads goes on the one stream, in call order.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: Mutex<HashMap<String, CachedFunction>>,
    name: String,
    compute_capability: (i32, i32),
    multiprocessors: u32,
    max_shared_optin: u32,
    /// Bytes of every buffer allocated through this Gpu since it was created (see
    /// [`Gpu::allocated_bytes`]).
    allocated: AtomicU64,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .field(
                "modules",
                &self.modules.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The process-wide GPUs, one per ordinal, created on first use.
fn registry() -> &'static Mutex<HashMap<usize, Arc<Gpu>>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    GPUS.get_or_init(Default::default)
}

/// Whether the CUDA driver library (libcuda) can be loaded, checked once per process.
fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present dlopens libcuda (and closes it again), which runs the library's
    // initialisers: the same library cudarc itself loads for every driver call, nothing else.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

impl Gpu {
    /// The GPU `ordinal` (0 is the first), with every kernel module loaded.
    ///
    /// Errors: [`VppoError::KernelsNotBuilt`] when this build had no nvcc; [`VppoError::NoCudaDriver`]
    /// when libcuda cannot be loaded; [`VppoError::NoGpu`] when the driver reports no device or fewer
    /// than `ordinal + 1`; [`VppoError::Cuda`] for any other driver error (a fatbin with no code for
    /// this card, a driver too old for the embedded PTX, ...).
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        if !kernels_built() {
            return Err(VppoError::KernelsNotBuilt);
        }
        if !driver_present() {
            return Err(VppoError::NoCudaDriver);
        }
        let mut gpus = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gpu) = gpus.get(&ordinal) {
            return Ok(gpu.clone());
        }
        // cudarc resolves driver symbols lazily and panics when one is missing (a driver older than
        // the CUDA version cudarc was built for): turn that into an error, never a panic.
        let created = std::panic::catch_unwind(|| Gpu::create(ordinal)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(VppoError::cuda(format!(
                "the CUDA driver library could not be used: {msg}"
            )))
        })?;
        let gpu = Arc::new(created);
        gpus.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    fn create(ordinal: usize) -> Result<Gpu> {
        let count = match CudaContext::device_count() {
            Ok(n) => n,
            Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(cuda_err("cuInit / cuDeviceGetCount", e)),
        };
        if count <= 0 {
            return Err(VppoError::NoGpu("the CUDA driver reports no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(VppoError::NoGpu(format!(
                "GPU {ordinal} was asked for, but the CUDA driver reports {count} GPU(s) (ordinals 0..{count})"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda_err(&format!("creating a context on GPU {ordinal}"), e))?;
        // SAFETY: every buffer this Gpu hands out lives on `stream`, the context's default stream,
        // and every copy and launch goes on that same stream, so stream order alone orders all
        // reads and writes; no buffer is used on another stream. cudarc's per-buffer events would
        // add two events per allocation and a record per use without ordering anything more.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx
            .name()
            .map_err(|e| cuda_err("reading the device name", e))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| cuda_err("reading the compute capability", e))?;
        let attr = |a: CUdevice_attribute, what: &str| {
            ctx.attribute(a)
                .map(|v| v.max(0) as u32)
                .map_err(|e| cuda_err(what, e))
        };
        let multiprocessors = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "reading the multiprocessor count",
        )?;
        let max_shared_optin = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "reading the shared memory limit",
        )?;

        let mut modules = Vec::with_capacity(FATBINS.len());
        for (module, bytes) in FATBINS {
            let loaded = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                .map_err(|e| module_load_error(module, &name, compute_capability, e))?;
            modules.push((*module, loaded));
        }
        Ok(Gpu {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            name,
            compute_capability,
            multiprocessors,
            max_shared_optin,
            allocated: AtomicU64::new(0),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability, e.g. (9, 0).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Number of streaming multiprocessors (for sizing persistent grids).
    pub fn multiprocessor_count(&self) -> u32 {
        self.multiprocessors
    }

    /// Largest dynamic shared memory per block (bytes) a kernel may opt in to.
    pub fn max_shared_per_block(&self) -> u32 {
        self.max_shared_optin
    }

    /// The cudarc context (for work this module has no helper for).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The one stream all of this Gpu's work goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The names of the loaded modules (the kernels/*.cu file stems).
    pub fn modules(&self) -> Vec<&'static str> {
        self.modules.iter().map(|(n, _)| *n).collect()
    }

    /// Looks a kernel up by its `extern "C"` name in the loaded modules (cached by name).
    pub fn function(&self, kernel_name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.cached(&mut cache, kernel_name)?.function.clone())
    }

    fn cached<'a>(
        &self,
        cache: &'a mut HashMap<String, CachedFunction>,
        kernel_name: &str,
    ) -> Result<&'a mut CachedFunction> {
        if !cache.contains_key(kernel_name) {
            if kernel_name.is_empty() || kernel_name.contains('\0') {
                return Err(VppoError::cuda(format!(
                    "invalid kernel name {kernel_name:?}"
                )));
            }
            // Lookups run on whichever thread asks first: make this context current there.
            self.ctx
                .bind_to_thread()
                .map_err(|e| cuda_err("binding the CUDA context to this thread", e))?;
            let mut found = None;
            for (_, module) in &self.modules {
                match module.load_function(kernel_name) {
                    Ok(f) => {
                        found = Some(f);
                        break;
                    }
                    Err(e) if e.0 == CUresult::CUDA_ERROR_NOT_FOUND => continue,
                    Err(e) => return Err(cuda_err(&format!("looking up kernel {kernel_name}"), e)),
                }
            }
            let function = found.ok_or_else(|| {
                VppoError::cuda(format!(
                    "kernel {kernel_name} is in none of the loaded modules ({})",
                    self.modules().join(", ")
                ))
            })?;
            cache.insert(
                kernel_name.to_string(),
                CachedFunction {
                    function,
                    shared_limit: DEFAULT_DYNAMIC_SHARED_LIMIT,
                },
            );
        }
        Ok(cache.get_mut(kernel_name).expect("inserted above"))
    }

    /// Launches `kernel_name` over `grid` blocks of `block` threads with `shared_bytes` of dynamic
    /// shared memory, passing `params` by value as the kernel's only argument.
    ///
    /// The launch is asynchronous: errors inside the kernel show up at the next
    /// [`Gpu::synchronize`] (or copy back). Shapes are checked first: every dimension at least 1,
    /// at most 1024 threads per block, grid y and z at most 65535, shared memory within the device's
    /// limit (above 48 KiB the kernel's limit is raised once through its function attribute).
    ///
    /// # Safety
    /// `params` must be the parameter struct of `kernel_name`, and every pointer inside it a device
    /// address of this GPU valid for every access the kernel makes for this grid (normally: taken
    /// with [`Gpu::device_ptr_u64`] from buffers that outlive the work on the stream). A safe wrapper
    /// cannot check this: a wrong pointer is an out-of-bounds write on the device.
    pub unsafe fn launch<P: DeviceRepr>(
        &self,
        kernel_name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        check_launch_shape(kernel_name, grid, block)?;
        if shared_bytes > self.max_shared_optin {
            return Err(VppoError::cuda(format!(
                "kernel {kernel_name}: {shared_bytes} bytes of dynamic shared memory asked for, \
                 the device allows {} per block",
                self.max_shared_optin
            )));
        }
        let function = {
            let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
            let entry = self.cached(&mut cache, kernel_name)?;
            if shared_bytes > entry.shared_limit {
                // SAFETY: the handle comes from a module this Gpu keeps loaded (the CudaFunction
                // holds an Arc of it), and the value is within the device's opt-in limit.
                unsafe {
                    cudarc::driver::result::function::set_function_attribute(
                        entry.function.cu_function(),
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        shared_bytes as i32,
                    )
                }
                .map_err(|e| {
                    cuda_err(
                        &format!("raising the shared memory limit of {kernel_name}"),
                        e,
                    )
                })?;
                entry.shared_limit = shared_bytes;
            }
            entry.function.clone()
        };
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (block[0], block[1], block[2]),
            shared_mem_bytes: shared_bytes,
        };
        let mut builder = self.stream.launch_builder(&function);
        builder.arg(params);
        // SAFETY: every kernel in kernels/*.cu takes exactly one argument, a params struct by value
        // (`extern "C" __global__ void k(const ParamsT p)`), and P is one of the #[repr(C)] mirrors
        // of those structs, so the argument cudarc copies has the size and layout the kernel reads.
        // Which struct goes with which kernel, and that every pointer inside it is a valid device
        // address of this context for the accesses this grid makes, is the caller's guarantee (see
        // the doc comment). The shapes were checked above, and `params` outlives this call, which
        // is all cuLaunchKernel needs of it (the argument bytes are copied at launch).
        unsafe { builder.launch(cfg) }
            .map_err(|e| cuda_err(&format!("launching {kernel_name}"), e))?;
        Ok(())
    }

    /// Bytes of every buffer the crate has allocated on this GPU since it was first used (through
    /// [`Gpu::alloc_zeros`], [`Gpu::upload`] and [`Gpu::alloc_uninit`], the only ways it allocates),
    /// a count that never goes down when buffers are freed. The difference across a call is therefore
    /// an upper bound on the device memory the crate held during it, whatever the caching allocator of
    /// the framework around it reports: python/tests/test_cuda.py and tests/device_stages.rs use it to
    /// show that a forward and backward allocate O(N + B) bytes, no [N, V] buffer.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    fn count_allocation<T>(&self, n: usize) {
        // check_len has checked that n * size_of::<T>() does not overflow usize.
        let bytes = n.saturating_mul(std::mem::size_of::<T>()) as u64;
        self.allocated.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A device buffer of `n` zeroed elements (`n` must be at least 1).
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        check_len::<T>("alloc_zeros", n)?;
        self.count_allocation::<T>(n);
        self.stream
            .alloc_zeros::<T>(n)
            .map_err(|e| cuda_err(&format!("allocating {n} elements on the GPU"), e))
    }

    /// A device copy of `data` (which must not be empty).
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        check_len::<T>("upload", data.len())?;
        self.count_allocation::<T>(data.len());
        self.stream
            .clone_htod(data)
            .map_err(|e| cuda_err(&format!("copying {} elements to the GPU", data.len()), e))
    }

    /// Copies `data` into the existing buffer `dst`, which must have the same length.
    pub fn upload_into<T: DeviceRepr>(&self, data: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if data.len() != dst.len() {
            return Err(VppoError::cuda(format!(
                "upload_into: {} host elements into a device buffer of {}",
                data.len(),
                dst.len()
            )));
        }
        self.stream
            .memcpy_htod(data, dst)
            .map_err(|e| cuda_err(&format!("copying {} elements to the GPU", data.len()), e))
    }

    /// A host copy of `src` (waits for the work before it on the stream).
    pub fn download<T: DeviceRepr>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(src)
            .map_err(|e| cuda_err(&format!("copying {} elements from the GPU", src.len()), e))
    }

    /// Copies `src` into `dst`, which must have the same length.
    pub fn download_into<T: DeviceRepr>(&self, src: &CudaSlice<T>, dst: &mut [T]) -> Result<()> {
        if dst.len() != src.len() {
            return Err(VppoError::cuda(format!(
                "download_into: a device buffer of {} into {} host elements",
                src.len(),
                dst.len()
            )));
        }
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(|e| cuda_err(&format!("copying {} elements from the GPU", src.len()), e))
    }

    /// A device buffer of `n` elements whose contents are unspecified, for output the caller will
    /// overwrite entirely (`n` must be at least 1). It saves the memset of [`Gpu::alloc_zeros`]; T is
    /// `Pod`, so whatever bits are there are a valid T if they are ever read back.
    pub fn alloc_uninit<T: DeviceRepr + bytemuck::Pod>(&self, n: usize) -> Result<CudaSlice<T>> {
        check_len::<T>("alloc_uninit", n)?;
        self.count_allocation::<T>(n);
        // SAFETY: cudarc marks this unsafe because the memory is not initialised. Device memory is
        // never a Rust reference; reading it back copies bytes into host Ts, and every bit pattern is
        // a valid T (Pod). The slice's length is n elements of T, as allocated.
        unsafe { self.stream.alloc::<T>(n) }
            .map_err(|e| cuda_err(&format!("allocating {n} elements on the GPU"), e))
    }

    /// Bytes `offset .. offset + len` of `src` (waits for the work before it on the stream).
    pub fn download_range(
        &self,
        src: &CudaSlice<u8>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut dst = vec![0u8; len];
        self.download_range_into(src, offset, &mut dst)?;
        Ok(dst)
    }

    /// Copies bytes `offset .. offset + dst.len()` of `src` into `dst` (waits for the work before it).
    pub fn download_range_into(
        &self,
        src: &CudaSlice<u8>,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<()> {
        let len = dst.len();
        let end = byte_range_end("download_range", offset, len, src.len())?;
        if len == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtoh(&src.slice(offset..end), dst)
            .map_err(|e| cuda_err(&format!("copying {len} bytes from the GPU"), e))
    }

    /// Copies `data` into `dst` at byte `offset` (queued on the stream).
    pub fn upload_range(&self, data: &[u8], dst: &mut CudaSlice<u8>, offset: usize) -> Result<()> {
        let end = byte_range_end("upload_range", offset, data.len(), dst.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(data, &mut dst.slice_mut(offset..end))
            .map_err(|e| cuda_err(&format!("copying {} bytes to the GPU", data.len()), e))
    }

    /// Copies the bytes of device buffer `src` into `dst` at byte `offset`, on the device (queued on
    /// the stream): to gather several buffers into one before a single copy back.
    pub fn copy_bytes_on_device<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<u8>,
        offset: usize,
    ) -> Result<()> {
        let len = src.len() * std::mem::size_of::<T>();
        let end = byte_range_end("copy_bytes_on_device", offset, len, dst.len())?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a view of `src`'s own bytes (`len` is exactly its size in bytes) as u8, for which
        // every bit pattern is valid; it is only read, by a device-to-device copy.
        let bytes = unsafe { src.transmute::<u8>(len) }.expect("len is src's size in bytes");
        self.stream
            .memcpy_dtod(&bytes, &mut dst.slice_mut(offset..end))
            .map_err(|e| cuda_err(&format!("copying {len} bytes on the GPU"), e))
    }

    /// Copies device buffer `src` into `dst` (same length) on the device.
    pub fn copy_on_device<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        if dst.len() != src.len() {
            return Err(VppoError::cuda(format!(
                "copy_on_device: {} elements into a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        self.stream
            .memcpy_dtod(src, dst)
            .map_err(|e| cuda_err(&format!("copying {} elements on the GPU", src.len()), e))
    }

    /// The device address of `buf`, to put into a params struct.
    ///
    /// cudarc's `device_ptr` returns the address with a guard that records a "read" event when
    /// dropped; with event tracking off (see [`Gpu::new`]) the guard holds no event and dropping it
    /// here does nothing, so the address can outlive it. Ordering comes from the one stream. The
    /// buffer must stay alive until the work using the address has finished (drop it after
    /// [`Gpu::synchronize`] or a download).
    pub fn device_ptr_u64<T>(&self, buf: &CudaSlice<T>) -> u64 {
        let (ptr, guard) = buf.device_ptr(&self.stream);
        drop(guard);
        ptr
    }

    /// [`Gpu::device_ptr_u64`] as a typed pointer, the form the params structs hold.
    pub fn device_ptr<T>(&self, buf: &CudaSlice<T>) -> *const T {
        self.device_ptr_u64(buf) as usize as *const T
    }

    /// [`Gpu::device_ptr_u64`] as a mutable typed pointer.
    pub fn device_ptr_mut<T>(&self, buf: &CudaSlice<T>) -> *mut T {
        self.device_ptr_u64(buf) as usize as *mut T
    }

    /// [`Gpu::device_ptr_u64`] as an untyped pointer (`const void *logits`).
    pub fn device_ptr_void<T>(&self, buf: &CudaSlice<T>) -> *const c_void {
        self.device_ptr_u64(buf) as usize as *const c_void
    }

    /// Waits for all work on the stream; reports any error a kernel hit.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronizing the GPU stream", e))?;
        self.ctx
            .check_err()
            .map_err(|e| cuda_err("an earlier asynchronous GPU operation", e))
    }

    /// Runs `f` (which queues work on this Gpu's stream) between two CUDA events and returns its
    /// result with the device time between them in milliseconds. Waits for the work to finish.
    pub fn time_ms<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, f32)> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .ctx
            .new_event(timing)
            .map_err(|e| cuda_err("creating an event", e))?;
        let end = self
            .ctx
            .new_event(timing)
            .map_err(|e| cuda_err("creating an event", e))?;
        start
            .record(&self.stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        let r = f()?;
        end.record(&self.stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        end.synchronize()
            .map_err(|e| cuda_err("waiting for the timed work", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| cuda_err("reading the event timer", e))?;
        Ok((r, ms))
    }
}

/// What [`copy_bandwidth`] measured: `reps` device-to-device copies of a `bytes`-byte buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyBandwidth {
    /// Size of the copied buffer (each copy reads and writes this many bytes).
    pub bytes: usize,
    /// Every timed copy, in milliseconds, sorted fastest first.
    pub samples_ms: Vec<f64>,
}

impl CopyBandwidth {
    /// GB/s (10^9 bytes per second) of a copy that took `ms`, counting bytes read plus written.
    pub fn gbs(&self, ms: f64) -> f64 {
        2.0 * self.bytes as f64 / (ms * 1e-3) / 1e9
    }

    /// The fastest copy, ms.
    pub fn best_ms(&self) -> f64 {
        self.samples_ms[0]
    }

    /// The median copy, ms (the upper middle sample for an even count).
    pub fn median_ms(&self) -> f64 {
        self.samples_ms[self.samples_ms.len() / 2]
    }

    /// The slowest copy, ms.
    pub fn worst_ms(&self) -> f64 {
        self.samples_ms[self.samples_ms.len() - 1]
    }

    /// GB/s of the fastest copy.
    pub fn best_gbs(&self) -> f64 {
        self.gbs(self.best_ms())
    }

    /// GB/s of the median copy: the ceiling the benchmarks compare the kernels with.
    pub fn median_gbs(&self) -> f64 {
        self.gbs(self.median_ms())
    }

    /// GB/s of the slowest copy.
    pub fn worst_gbs(&self) -> f64 {
        self.gbs(self.worst_ms())
    }
}

/// The device-to-device copy bandwidth of `gpu`: the memory ceiling the kernels are measured against.
///
/// Fills a buffer of `bytes` bytes (rounded down to whole 4-byte words, at least one) with a pattern
/// (not zeros), copies it into a second buffer 3 times untimed, then `reps` times (at least 1), each
/// copy (cuMemcpyDtoD) between two CUDA events; then checks the destination against the pattern, so a
/// copy that skipped or misplaced data is an error, not a fast number. Uses 2 x `bytes` of GPU memory
/// while it runs; use a buffer far larger than the L2 cache (1 GiB or more).
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize, reps: usize) -> Result<CopyBandwidth> {
    if reps == 0 {
        return Err(VppoError::Config {
            field: "reps",
            value: "0".into(),
            expected: "at least 1",
        });
    }
    let n = (bytes / 4).max(1);
    let host: Vec<u32> = (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) ^ 0x5bd1_e995)
        .collect();
    let src = gpu.upload(&host)?;
    let mut dst = gpu.alloc_zeros::<u32>(n)?;
    for _ in 0..3 {
        gpu.copy_on_device(&src, &mut dst)?;
    }
    gpu.synchronize()?;
    let mut samples_ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let ((), t) = gpu.time_ms(|| gpu.copy_on_device(&src, &mut dst))?;
        samples_ms.push(t as f64);
    }
    let back = gpu.download(&dst)?;
    if let Some(i) = back.iter().zip(&host).position(|(a, b)| a != b) {
        return Err(VppoError::cuda(format!(
            "copy check failed at element {i}: {} != {}",
            back[i], host[i]
        )));
    }
    samples_ms.sort_by(f64::total_cmp);
    Ok(CopyBandwidth {
        bytes: n * 4,
        samples_ms,
    })
}

/// Checks a launch's grid and block the way the hardware limits them, before the driver does.
fn check_launch_shape(kernel_name: &str, grid: [u32; 3], block: [u32; 3]) -> Result<()> {
    let bad = |what: String| Err(VppoError::cuda(format!("kernel {kernel_name}: {what}")));
    if grid.contains(&0) || block.contains(&0) {
        return bad(format!(
            "grid {grid:?} and block {block:?} must have every dimension >= 1"
        ));
    }
    let threads = block.iter().map(|&d| d as u64).product::<u64>();
    if threads > 1024 {
        return bad(format!(
            "block {block:?} has {threads} threads, more than 1024"
        ));
    }
    if block[2] > 64 {
        return bad(format!("block z = {} is more than 64", block[2]));
    }
    if grid[0] > i32::MAX as u32 || grid[1] > 65535 || grid[2] > 65535 {
        return bad(format!(
            "grid {grid:?} is over the limits (2^31-1, 65535, 65535)"
        ));
    }
    Ok(())
}

/// The end of bytes `offset .. offset + len` of a device buffer of `size` bytes, or an error naming
/// `what` when the range does not fit (cudarc's slicing would panic).
fn byte_range_end(what: &str, offset: usize, len: usize, size: usize) -> Result<usize> {
    offset
        .checked_add(len)
        .filter(|&end| end <= size)
        .ok_or_else(|| {
            VppoError::cuda(format!(
                "{what}: bytes {offset}..+{len} do not fit a device buffer of {size} bytes"
            ))
        })
}

/// Device buffers of zero elements do not exist on CUDA (cuMemAlloc rejects 0 bytes).
fn check_len<T>(what: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(VppoError::cuda(format!(
            "{what}: a device buffer of 0 elements (handle N = 0 before going to the GPU)"
        )));
    }
    if n.checked_mul(std::mem::size_of::<T>()).is_none() {
        return Err(VppoError::cuda(format!(
            "{what}: {n} elements overflow the address space"
        )));
    }
    Ok(())
}

/// Explains a failed module load: usually a card this build has no SASS for, or a driver too old
/// for the embedded PTX.
fn module_load_error(module: &str, card: &str, cc: (i32, i32), e: DriverError) -> VppoError {
    let base = CudaError::driver(format!("loading kernels/{module}.cu's fatbin on {card}"), e);
    let arch = format!("{}{}", cc.0, cc.1);
    let hint = match e.0 {
        CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
        | CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | CUresult::CUDA_ERROR_INVALID_PTX => format!(
            "; this build has SASS for [{}] and PTX {CUDA_PTX_ARCH} from nvcc {NVCC_VERSION} (PTX needs \
             a driver at least as new as that nvcc): rebuild with VPPO_CUDA_ARCHS including {arch}",
            CUDA_ARCHS.join(", ")
        ),
        _ => String::new(),
    };
    VppoError::Cuda(base.with_hint(hint))
}

#[cfg(test)]
mod tests;
