//! Device memory and streams the crate does not own: a framework's tensors and its current stream
//! (the PyTorch entry point, SPEC section 13, hands us raw addresses and a raw `cudaStream_t`).
//!
//! - [`Borrowed`] views a caller's allocation as a `CudaSlice` on this [`Gpu`]'s stream without
//!   taking ownership: dropping it never frees the memory.
//! - [`Gpu::wait_for_foreign_stream`] orders this GPU's stream after the work already queued on a
//!   caller's stream, and [`Gpu::order_foreign_stream_after`] the caller's stream after ours (an event
//!   recorded on one, waited for on the other). cudarc 0.19 cannot adopt a foreign stream as a
//!   `CudaStream`, so the crate keeps launching on its own stream and joins the two with events.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};

use cudarc::driver::sys::{CUevent_wait_flags, CUstream};
use cudarc::driver::{result, CudaSlice};

use super::{cuda_err, Gpu};
use crate::error::Result;

/// A caller's device allocation of `len` elements of `T`, viewed as a [`CudaSlice`] of this GPU's
/// stream. It derefs to the slice, so every API taking `&CudaSlice<T>` (a
/// [`DeviceBatch`](crate::DeviceBatch)) takes it; dropping it leaves the memory to its owner.
pub struct Borrowed<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T> Borrowed<T> {
    /// The `len` elements of `T` at device address `ptr` (any address when `len` is 0).
    ///
    /// # Safety
    /// When `len` > 0, `ptr` must be the address of `len * size_of::<T>()` bytes of device memory,
    /// aligned for `T`, allocated in `gpu`'s context (the primary context of its device, as the CUDA
    /// runtime and PyTorch allocate), and that memory must stay allocated while the `Borrowed` lives
    /// and until the work queued on it has finished (the crate's calls synchronize before they return).
    /// Nothing may write it on another stream while a call that reads it runs, unless that stream is
    /// joined first ([`Gpu::wait_for_foreign_stream`]).
    pub unsafe fn new(gpu: &Gpu, ptr: u64, len: usize) -> Borrowed<T> {
        // SAFETY: the caller guarantees a live allocation of `len` elements in this context. With
        // event tracking off (Gpu::new) the slice carries no events, and it is never dropped as a
        // CudaSlice (which would free it): Drop below leaks it back to the caller.
        let slice = unsafe { gpu.stream().upgrade_device_ptr::<T>(ptr, len) };
        Borrowed {
            slice: ManuallyDrop::new(slice),
        }
    }
}

impl<T> Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken exactly once, here, and not used afterwards.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        // Gives the address back without freeing it (the caller owns the allocation).
        let _ = slice.leak();
    }
}

impl<T> std::fmt::Debug for Borrowed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Borrowed")
            .field("len", &self.slice.len())
            .finish()
    }
}

impl Gpu {
    /// Orders this GPU's stream after the work queued so far on `stream`, a caller's raw stream
    /// handle (`torch.cuda.current_stream().cuda_stream`; 0 is the legacy default stream): kernels
    /// queued afterwards do not read a tensor the caller's stream is still writing.
    ///
    /// # Safety
    /// `stream` must be 0 or a live stream of this GPU's context.
    pub unsafe fn wait_for_foreign_stream(&self, stream: u64) -> Result<()> {
        let err = |e| cuda_err("ordering after the caller's stream", e);
        let event = self.context().new_event(None).map_err(err)?;
        // SAFETY: the event is live (dropped after the wait is queued; the wait keeps what it
        // captured) and the caller guarantees the stream.
        unsafe { result::event::record(event.cu_event(), stream as CUstream) }.map_err(err)?;
        self.stream().wait(&event).map_err(err)
    }

    /// Orders the caller's raw stream `stream` after the work queued so far on this GPU's stream:
    /// what the caller queues there next sees every buffer the crate wrote.
    ///
    /// # Safety
    /// `stream` must be 0 or a live stream of this GPU's context.
    pub unsafe fn order_foreign_stream_after(&self, stream: u64) -> Result<()> {
        let err = |e| cuda_err("ordering the caller's stream after ours", e);
        let event = self.stream().record_event(None).map_err(err)?;
        // SAFETY: as above: a live event, and the caller guarantees the stream.
        unsafe {
            result::stream::wait_event(
                stream as CUstream,
                event.cu_event(),
                CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(err)
    }
}
