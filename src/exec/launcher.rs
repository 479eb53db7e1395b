//! Where kernels run (the SIMT executor or a GPU), the memory the pipeline makes there, and the
//! inputs it reads in place or uploads.

#[allow(unused_imports)]
use super::*;

/// Where kernels run.
#[derive(Clone)]
pub(crate) enum Launcher {
    /// On the CPU, through the SIMT executor, in the given lane order.
    Simt(LaneOrder),
    /// On a GPU.
    Cuda(Arc<Gpu>),
}

/// Memory made by the pipeline: host memory for the SIMT executor (16-byte aligned, as cudaMalloc's
/// is at least), device memory on a GPU.
pub(crate) enum Buffer {
    Host(Vec<u128>),
    Cuda(cudarc::driver::CudaSlice<u8>),
}

impl Launcher {
    pub(crate) fn for_device(device: Device) -> Result<Launcher> {
        match device {
            Device::Simt(order) => Ok(Launcher::Simt(order)),
            Device::Cuda(ordinal) => Ok(Launcher::Cuda(Gpu::new(ordinal)?)),
            Device::Reference => Err(VppoError::Kernel("the reference runs no kernels".into())),
        }
    }

    /// Blocks for a kernel that loops over `rows` rows (or responses).
    pub(super) fn row_grid(&self, rows: usize) -> u32 {
        let cap = if self.is_host() {
            MAX_ROW_BLOCKS_SIMT
        } else {
            MAX_ROW_BLOCKS_GPU
        };
        rows.clamp(1, cap) as u32
    }

    pub(super) fn is_host(&self) -> bool {
        matches!(self, Launcher::Simt(_))
    }

    /// Runs `kernel` over `grid` blocks of `block` threads with `shared` bytes of dynamic shared memory.
    ///
    /// # Safety
    /// Every address inside `params` must be valid, for this launcher's memory space, for every access
    /// the kernel makes with these dimensions, and stay valid until the launch completes (the launch
    /// is synchronous on the SIMT executor; on a GPU the pipeline synchronizes before it reads results
    /// or drops buffers).
    pub(super) unsafe fn launch<P: KernelParams>(
        &self,
        kernel: Kernel<P>,
        grid: u32,
        block: u32,
        shared: u32,
        params: &P,
    ) -> Result<()> {
        match self {
            // SAFETY: forwarded from this function's contract.
            Launcher::Simt(order) => unsafe {
                simt::launch(
                    kernel.simt,
                    [grid, 1, 1],
                    [block, 1, 1],
                    shared,
                    *order,
                    params,
                )
            },
            // SAFETY: forwarded from this function's contract.
            Launcher::Cuda(gpu) => unsafe {
                gpu.launch(kernel.name, [grid, 1, 1], [block, 1, 1], shared, params)
            },
        }
    }

    pub(super) fn alloc(&self, bytes: usize) -> Result<Buffer> {
        match self {
            Launcher::Simt(_) => Ok(Buffer::Host(vec![0u128; bytes.div_ceil(16).max(1)])),
            Launcher::Cuda(gpu) => Ok(Buffer::Cuda(gpu.alloc_zeros::<u8>(bytes.max(1))?)),
        }
    }

    /// A buffer of `bytes` the caller will overwrite entirely: no zeroing on a GPU.
    pub(super) fn alloc_for_overwrite(&self, bytes: usize) -> Result<Buffer> {
        match self {
            Launcher::Simt(_) => self.alloc(bytes),
            Launcher::Cuda(gpu) => Ok(Buffer::Cuda(gpu.alloc_uninit::<u8>(bytes.max(1))?)),
        }
    }

    pub(super) fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        match self {
            Launcher::Simt(_) => {
                let mut v = vec![0u128; bytes.len().div_ceil(16).max(1)];
                bytemuck::cast_slice_mut::<u128, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
                Ok(Buffer::Host(v))
            }
            Launcher::Cuda(gpu) => {
                if bytes.is_empty() {
                    return self.alloc(1);
                }
                Ok(Buffer::Cuda(gpu.upload(bytes)?))
            }
        }
    }

    pub(super) fn addr(&self, buf: &Buffer) -> u64 {
        match (self, buf) {
            (_, Buffer::Host(v)) => v.as_ptr() as u64,
            (Launcher::Cuda(gpu), Buffer::Cuda(s)) => gpu.device_ptr_u64(s),
            (Launcher::Simt(_), Buffer::Cuda(_)) => {
                unreachable!("device buffer on the SIMT executor")
            }
        }
    }

    /// The first `n` elements of `buf` as T.
    pub(super) fn download<T: bytemuck::Pod>(&self, buf: &Buffer, n: usize) -> Result<Vec<T>> {
        let raw = self.download_bytes(buf, 0, n * std::mem::size_of::<T>())?;
        Ok(bytemuck::pod_collect_to_vec(&raw))
    }

    /// The first `dst.len()` elements of `buf`, copied straight into `dst`.
    pub(super) fn download_into<T: bytemuck::Pod>(
        &self,
        buf: &Buffer,
        dst: &mut [T],
    ) -> Result<()> {
        self.read_at(buf, 0, bytemuck::cast_slice_mut(dst))
    }

    /// Bytes `offset .. offset + len` of `buf`, in one copy (on a GPU, after the work before it).
    pub(super) fn download_bytes(
        &self,
        buf: &Buffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; len];
        self.read_at(buf, offset, &mut raw)?;
        Ok(raw)
    }

    /// Copies bytes `offset .. offset + dst.len()` of `buf` into `dst` (on a GPU, after the work
    /// before it): the one read path of the launcher's memory.
    pub(super) fn read_at(&self, buf: &Buffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        match (self, buf) {
            (_, Buffer::Host(v)) => {
                dst.copy_from_slice(
                    &bytemuck::cast_slice::<u128, u8>(v)[offset..offset + dst.len()],
                );
                Ok(())
            }
            (Launcher::Cuda(gpu), Buffer::Cuda(s)) => gpu.download_range_into(s, offset, dst),
            (Launcher::Simt(_), Buffer::Cuda(_)) => {
                unreachable!("device buffer on the SIMT executor")
            }
        }
    }

    /// Writes `data` into `buf` at byte `offset` (on a GPU, queued on the stream).
    pub(super) fn write_at<T: bytemuck::Pod>(
        &self,
        buf: &mut Buffer,
        offset: usize,
        data: &[T],
    ) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        match (self, buf) {
            (_, Buffer::Host(v)) => {
                bytemuck::cast_slice_mut::<u128, u8>(v)[offset..offset + bytes.len()]
                    .copy_from_slice(bytes);
                Ok(())
            }
            (Launcher::Cuda(gpu), Buffer::Cuda(s)) => gpu.upload_range(bytes, s, offset),
            (Launcher::Simt(_), Buffer::Cuda(_)) => {
                unreachable!("device buffer on the SIMT executor")
            }
        }
    }
}

/// An input of the pipeline: borrowed host memory (used in place by the SIMT executor) or a buffer
/// uploaded to the GPU.
pub(super) struct Input<'a> {
    pub(super) _owned: Option<Buffer>,
    pub(super) _borrowed: std::marker::PhantomData<&'a [u8]>,
    pub(super) addr: u64,
}

impl<'a> Input<'a> {
    /// Memory at `addr` that the caller owns for `'a`, used in place. The PhantomData ties the
    /// address to the borrow, so the memory outlives the launches.
    pub(super) fn borrowed(addr: u64) -> Input<'a> {
        Input {
            _owned: None,
            _borrowed: std::marker::PhantomData,
            addr,
        }
    }

    pub(super) fn new<T: bytemuck::Pod>(launcher: &Launcher, data: &'a [T]) -> Result<Input<'a>> {
        if launcher.is_host() {
            // The SIMT executor reads host memory directly: no copy.
            Ok(Input::borrowed(data.as_ptr() as u64))
        } else {
            let buf = launcher.upload(data)?;
            let addr = launcher.addr(&buf);
            Ok(Input {
                _owned: Some(buf),
                _borrowed: std::marker::PhantomData,
                addr,
            })
        }
    }

    /// An optional tensor (a row index, ref_logp): address 0 (the kernels' NULL) when there is none.
    pub(super) fn optional<T: bytemuck::Pod>(
        launcher: &Launcher,
        data: Option<&'a [T]>,
    ) -> Result<Input<'a>> {
        match data {
            Some(r) => Input::new(launcher, r),
            None => Ok(Input::borrowed(0)),
        }
    }

    pub(super) fn logits(launcher: &Launcher, logits: &Logits<'a>) -> Result<Input<'a>> {
        on_dtype!(*logits, x => Input::new(launcher, x))
    }
}
