//! [`NcclGroup`]: a [`Collective`] over NCCL, through cudarc's `nccl` module (its `result` layer),
//! one rank per GPU, the ranks in one process (threads) or in several.
//!
//! Building a group: rank 0 makes an [`NcclId`] and sends its bytes ([`NcclId::to_bytes`]) to the
//! other ranks by any channel (a file, a socket, the launcher's environment); every rank then calls
//! [`NcclGroup::new`] with its GPU, its rank, the group size and that id. The call blocks until every
//! rank of the group has made it (NCCL's `ncclCommInitRank`).
//!
//! What crosses ranks: only `ncclAllGather` of f64 values, on the stream of the rank's [`Gpu`] (the
//! one the pipeline's kernels run on). [`Collective::all_reduce`] is an all-gather followed by the
//! rank-order reduction on the host ([`super::combine`], the same as [`super::ThreadGroup`] and the
//! torch.distributed group), not `ncclAllReduce`: NCCL's floating-point reduction adds in the order
//! of its algorithm (ring, tree, NVLS; the channel count and the protocol), which is not rank order
//! and may change with the topology or the NCCL version, so its sums would differ from the other
//! engines' and from run to run of another layout. The values are a few scalars per call, or one
//! gather that the vocabulary and sequence layouts need anyway, so gathering `size` times the bytes
//! costs nothing that matters. Each call first gathers the ranks' lengths (one f64 each), so ranks
//! that disagree get an error on every rank, never an NCCL call with mismatched counts.
//!
//! Loading: cudarc opens libnccl at first use (dynamic loading; a build needs no NCCL). This module
//! checks that the library can be opened before the first NCCL call ([`VppoError::NoNccl`]
//! otherwise, where cudarc would panic), and turns cudarc's panic on a missing symbol into
//! [`VppoError::Nccl`].
//!
//! Tests: tests/nccl_parallel.rs, on the fake CUDA driver and the fake NCCL library
//! (tests/fake_nccl/libnccl.c).

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{DevicePtr, DevicePtrMut};
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;

use super::{combine, Collective, ReduceOp};
use crate::cuda::{cuda_err, Gpu};
use crate::error::{Result, VppoError};

/// Whether libnccl can be loaded, checked once per process.
fn nccl_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present dlopens the library names cudarc would open (and closes them again),
    // which runs that library's initialisers: the library cudarc itself loads for every NCCL call.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn need_nccl() -> Result<()> {
    if nccl_present() {
        return Ok(());
    }
    Err(VppoError::NoNccl(format!(
        "the NCCL library could not be loaded (cudarc looks for {} on the library path; NCCL from \
         pip, nvidia-nccl-cu12/13, ships only libnccl.so.2: add a libnccl.so link to it on \
         LD_LIBRARY_PATH)",
        cudarc::get_lib_name_candidates("nccl")
            .first()
            .map_or("libnccl.so", String::as_str)
    )))
}

/// NCCL's text for the last error, on `comm` (or of the library, with a null comm).
fn last_error(comm: sys::ncclComm_t) -> String {
    let text = catch_unwind(|| {
        // SAFETY: ncclGetLastError accepts a live communicator or null and returns null or a
        // NUL-terminated string owned by NCCL, copied here before any other NCCL call.
        let p = unsafe { sys::ncclGetLastError(comm) };
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: non-null and NUL-terminated, see above.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    });
    text.unwrap_or_default()
}

/// Runs one NCCL call (`what`, on `rank`), with cudarc's panic on a missing symbol and any result
/// but success made a [`VppoError::Nccl`] naming the call, the result code and NCCL's last error.
fn call(
    what: &str,
    rank: usize,
    comm: sys::ncclComm_t,
    f: impl FnOnce() -> std::result::Result<NcclStatus, NcclError>,
) -> Result<()> {
    let outcome = catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        VppoError::Nccl(format!(
            "{what} (rank {rank}): the NCCL library could not be used: {msg}"
        ))
    })?;
    match outcome {
        Ok(NcclStatus::Success) => Ok(()),
        Ok(status) => Err(VppoError::Nccl(format!(
            "{what} (rank {rank}): unexpected status {} of a blocking communicator",
            match status {
                NcclStatus::InProgress => "ncclInProgress",
                _ => "ncclNumResults",
            }
        ))),
        Err(e) => {
            let text = last_error(comm);
            Err(VppoError::Nccl(format!(
                "{what} (rank {rank}): {:?}{}",
                e.0,
                if text.is_empty() {
                    String::new()
                } else {
                    format!(" ({text})")
                }
            )))
        }
    }
}

/// The id of one NCCL group, made by one rank ([`NcclId::new`]) and given to every rank.
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A new group id (`ncclGetUniqueId`), on the rank that sets the group up.
    /// [`VppoError::NoNccl`] when libnccl cannot be loaded.
    pub fn new() -> Result<NcclId> {
        need_nccl()?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        call("ncclGetUniqueId", 0, std::ptr::null_mut(), || {
            // SAFETY: a valid out-pointer to an ncclUniqueId.
            unsafe { sys::ncclGetUniqueId(&mut id) }.result()
        })?;
        Ok(NcclId(id))
    }

    /// The id's 128 bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal.map(|c| c as u8)
    }

    /// The id another rank made, from its [`NcclId::to_bytes`].
    pub fn from_bytes(bytes: [u8; 128]) -> NcclId {
        NcclId(sys::ncclUniqueId {
            internal: bytes.map(|b| b as std::ffi::c_char),
        })
    }
}

/// One rank of an NCCL group: a communicator on one GPU (module docs).
pub struct NcclGroup {
    comm: sys::ncclComm_t,
    gpu: Arc<Gpu>,
    rank: usize,
    size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; NcclGroup is not
// Sync, so only the thread that owns it calls NCCL on it. The Gpu is Send + Sync.
unsafe impl Send for NcclGroup {}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("gpu", &self.gpu.ordinal())
            .finish()
    }
}

impl NcclGroup {
    /// This process's rank `rank` of a group of `size`, on GPU `ordinal` (the device its
    /// [`crate::Vppo`] runs on: `Device::Cuda(ordinal)`), joining the group `id` names. Blocks until
    /// every rank has joined. Each rank of a group needs a GPU of its own (NCCL refuses two ranks on
    /// one device).
    ///
    /// Errors: the GPU's ([`Gpu::new`]), [`VppoError::NoNccl`] without libnccl, [`VppoError::Config`]
    /// for a rank not below a size of at least 1, [`VppoError::Nccl`] when NCCL refuses.
    pub fn new(ordinal: usize, rank: usize, size: usize, id: &NcclId) -> Result<NcclGroup> {
        let bad = |value: String, expected| VppoError::Config {
            field: "NCCL rank",
            value,
            expected,
        };
        if size == 0 || rank >= size {
            return Err(bad(
                format!("rank {rank} of {size}"),
                "a rank in 0..size, size at least 1",
            ));
        }
        let nranks = i32::try_from(size).map_err(|_| {
            bad(
                format!("a group of {size}"),
                "at most 2^31 - 1 ranks (NCCL counts in int)",
            )
        })?;
        let gpu = Gpu::new(ordinal)?;
        need_nccl()?;
        // NCCL takes the device of the current context.
        gpu.context()
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the GPU's context for NCCL", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        call("ncclCommInitRank", rank, std::ptr::null_mut(), || {
            // SAFETY: a valid out-pointer; nranks and rank are in range (checked above); the id is
            // an ncclUniqueId by value.
            unsafe { nccl::comm_init_rank(&mut comm, nranks, id.0, rank as i32) }
        })?;
        let group = NcclGroup {
            comm,
            gpu,
            rank,
            size,
        };
        // The communicator must be the one asked for (a wrong id joins another group).
        let (mut count, mut user_rank) = (0, 0);
        call("ncclCommCount", rank, comm, || {
            // SAFETY: a live communicator and a valid out-pointer.
            unsafe { sys::ncclCommCount(comm, &mut count) }.result()
        })?;
        call("ncclCommUserRank", rank, comm, || {
            // SAFETY: as above.
            unsafe { sys::ncclCommUserRank(comm, &mut user_rank) }.result()
        })?;
        if (count, user_rank) != (nranks, rank as i32) {
            return Err(VppoError::Nccl(format!(
                "ncclCommInitRank (rank {rank}): the communicator is rank {user_rank} of {count}, \
                 not {rank} of {size}"
            )));
        }
        Ok(group)
    }

    /// The GPU this rank's collectives run on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Every rank's `values` (the same length on every rank, checked by the caller), in rank order.
    fn gather(&self, values: &[f64]) -> Result<Vec<f64>> {
        let total = values.len().checked_mul(self.size).ok_or_else(|| {
            VppoError::Nccl(format!(
                "{} values from each of {} ranks overflow usize",
                values.len(),
                self.size
            ))
        })?;
        let stream = self.gpu.stream();
        let send = stream
            .clone_htod(values)
            .map_err(|e| cuda_err("copying the values to gather to the GPU", e))?;
        let mut recv = stream
            .alloc_zeros::<f64>(total)
            .map_err(|e| cuda_err("allocating the gathered values", e))?;
        {
            let (src, _src_done) = send.device_ptr(stream);
            let (dst, _dst_done) = recv.device_ptr_mut(stream);
            call("ncclAllGather", self.rank, self.comm, || {
                // SAFETY: src holds values.len() f64 and dst size times as many, both live device
                // buffers of this rank's GPU until the gather has run (the copy back below waits for
                // the stream); the communicator is live; the stream is the GPU's.
                unsafe {
                    nccl::all_gather(
                        src as *const c_void,
                        dst as *mut c_void,
                        values.len(),
                        sys::ncclDataType_t::ncclFloat64,
                        self.comm,
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                }
            })?;
        }
        stream
            .clone_dtoh(&recv)
            .map_err(|e| cuda_err("copying the gathered values back", e))
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // Every collective of this group has completed (each copies its result back), so aborting
        // frees the communicator without waiting on other ranks, which destroy may do; cudarc's Comm
        // does the same. Errors cannot be returned from here.
        let _ = self.gpu.stream().synchronize();
        let comm = self.comm;
        let _ = catch_unwind(|| {
            // SAFETY: the live communicator of this group, used by nothing after this.
            unsafe { nccl::comm_abort(comm) }
        });
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, values: &[f64]) -> Result<Vec<f64>> {
        let lengths = self.gather(&[values.len() as f64])?;
        if let Some(other) = lengths.iter().position(|&l| l != values.len() as f64) {
            return Err(VppoError::Kernel(format!(
                "ranks exchange different lengths: rank {} gave {} values, rank {other} gave {}",
                self.rank,
                values.len(),
                lengths[other]
            )));
        }
        if values.is_empty() {
            return Ok(Vec::new());
        }
        self.gather(values)
    }

    fn all_reduce(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        let all = self.all_gather(values)?;
        if values.is_empty() {
            return Ok(());
        }
        let slots: Vec<&[f64]> = all.chunks(values.len()).collect();
        combine(values, &slots, op);
        Ok(())
    }
}
