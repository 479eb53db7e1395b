//! The kernel pipeline: the one place where kernels are launched, on a GPU through cudarc or on the CPU
//! through the SIMT executor, with the same kernel, launch configuration and parameter struct.
//!
//! Pass 1 `vppo_perception_*` (kernels/perception.cu) -> pass 2a `vppo_select` and 2b `vppo_loss`
//! (kernels/select_loss.cu) -> pass 3 `vppo_backward_*` (kernels/backward.cu). Extra memory is O(N + B):
//! per-token and per-response vectors, never an [N, V] temporary.
//!
//! Everything here works on raw addresses (`u64`): device pointers on a GPU, host pointers on the SIMT
//! executor. The owners of the memory (the caller's slices, or the [`Buffer`]s made here) outlive every
//! launch that uses them; that is the invariant every `unsafe` block below relies on.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use crate::batch::{check_elements, check_in_place, Batch, ValidBatch};
use crate::config::{Aggregation, Perception, Shaping, TasScope, VppoConfig};
use crate::cuda::Gpu;
use crate::device::{Device, LaneOrder};
use crate::error::{Location, Result, Tensor, VppoError};
use crate::output::{ResponseOutputs, Stats, TokenOutputs, VppoOutput};
use crate::params::{
    VppoBackwardParams, VppoErrorCode, VppoLossParams, VppoLossTotals, VppoPerceptionParams,
    VppoSelectParams, VPPO_STATUS_CLEAR,
};
use crate::simt::{self, SimtEntry, SimtLaunch};
use crate::tensor::{on_dtype, DeviceLogits, DeviceLogitsMut, Dtype, Elem, GradMut, Logits};

// -------------------------------------------------------------------------------------------------
// Kernel table
// -------------------------------------------------------------------------------------------------

/// A kernel: its name in the fatbin and its entry point in the SIMT build.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    pub name: &'static str,
    pub simt: SimtEntry,
}

macro_rules! kernel_table {
    ($($konst:ident => $name:ident / $sym:ident;)*) => {
        extern "C" {
            $(fn $sym(launch: *const SimtLaunch, params: *const c_void, err: *mut c_char, err_len: usize) -> c_int;)*
        }
        $(pub(crate) const $konst: Kernel = Kernel { name: stringify!($name), simt: $sym };)*
        /// Every kernel of the table.
        const ALL_KERNELS: &[Kernel] = &[$($konst),*];
    };
}

kernel_table! {
    PERCEPTION_F32 => vppo_perception_f32 / vppo_simt_vppo_perception_f32;
    PERCEPTION_F16 => vppo_perception_f16 / vppo_simt_vppo_perception_f16;
    PERCEPTION_BF16 => vppo_perception_bf16 / vppo_simt_vppo_perception_bf16;
    SELECT => vppo_select / vppo_simt_vppo_select;
    LOSS => vppo_loss / vppo_simt_vppo_loss;
    BACKWARD_F32_F32 => vppo_backward_f32_f32 / vppo_simt_vppo_backward_f32_f32;
    BACKWARD_F16_F32 => vppo_backward_f16_f32 / vppo_simt_vppo_backward_f16_f32;
    BACKWARD_F16_F16 => vppo_backward_f16_f16 / vppo_simt_vppo_backward_f16_f16;
    BACKWARD_BF16_F32 => vppo_backward_bf16_f32 / vppo_simt_vppo_backward_bf16_f32;
    BACKWARD_BF16_BF16 => vppo_backward_bf16_bf16 / vppo_simt_vppo_backward_bf16_bf16;
    // Built for the SIMT executor only, with VPPO_MUTANT (every exp times 1.001): see `mutant_perception`.
    PERCEPTION_F32_MUTANT => vppo_perception_f32_mutant / vppo_simt_vppo_perception_f32_mutant;
    PERCEPTION_F16_MUTANT => vppo_perception_f16_mutant / vppo_simt_vppo_perception_f16_mutant;
    PERCEPTION_BF16_MUTANT => vppo_perception_bf16_mutant / vppo_simt_vppo_perception_bf16_mutant;
}

/// The SIMT entry point of the kernel called `name` in the fatbins (`vppo_perception_bf16`, ...), for
/// tests that stand in for the CUDA driver (tests/fake_cuda/); None for an unknown name.
pub(crate) fn simt_entry(name: &str) -> Option<SimtEntry> {
    ALL_KERNELS.iter().find(|k| k.name == name).map(|k| k.simt)
}

// Launch configuration of each kernel: the constants of kernels/vppo_params.h, which the kernels'
// __launch_bounds__ and static_asserts on their shared-memory structs use too.
const PERCEPTION_THREADS: u32 = crate::params::VPPO_PERCEPTION_THREADS;
const PERCEPTION_STATE_BYTES: u32 = crate::params::VPPO_PERCEPTION_STATE_BYTES;
const SELECT_THREADS: u32 = crate::params::VPPO_SELECT_THREADS;
const SELECT_SHARED_BYTES: u32 = crate::params::VPPO_SELECT_SHARED_BYTES;
const LOSS_THREADS: u32 = crate::params::VPPO_LOSS_THREADS;
const LOSS_SHARED_BYTES: u32 = crate::params::VPPO_LOSS_SHARED_BYTES;
const BACKWARD_THREADS: u32 = crate::params::VPPO_BACKWARD_THREADS;
/// Blocks of the row kernels loop over rows, so the grid is capped and any N runs. On the GPU the cap
/// is far above the blocks that fit at once (132 SMs x 8 blocks on an H100); on the SIMT executor a
/// small cap makes every test with more than 64 rows exercise the grid-stride loop.
const MAX_ROW_BLOCKS_GPU: usize = 65_535;
const MAX_ROW_BLOCKS_SIMT: usize = 64;

fn perception_kernel(dtype: Dtype) -> Kernel {
    match dtype {
        Dtype::F32 => PERCEPTION_F32,
        Dtype::F16 => PERCEPTION_F16,
        Dtype::Bf16 => PERCEPTION_BF16,
    }
}

fn backward_kernel(input: Dtype, output: Dtype) -> Result<Kernel> {
    Ok(match (input, output) {
        (Dtype::F32, Dtype::F32) => BACKWARD_F32_F32,
        (Dtype::F16, Dtype::F32) => BACKWARD_F16_F32,
        (Dtype::F16, Dtype::F16) => BACKWARD_F16_F16,
        (Dtype::Bf16, Dtype::F32) => BACKWARD_BF16_F32,
        (Dtype::Bf16, Dtype::Bf16) => BACKWARD_BF16_BF16,
        (i, o) => {
            return Err(VppoError::Shape {
                tensor: Tensor::GradLogits,
                detail: format!(
                    "dtype {} is neither f32 nor the logits dtype {}",
                    o.name(),
                    i.name()
                ),
            })
        }
    })
}

/// Marker for the parameter structs of kernels/vppo_params.h.
pub(crate) trait KernelParams: cudarc::driver::DeviceRepr {}
impl KernelParams for VppoPerceptionParams {}
impl KernelParams for VppoSelectParams {}
impl KernelParams for VppoLossParams {}
impl KernelParams for VppoBackwardParams {}

// -------------------------------------------------------------------------------------------------
// The launcher and its memory
// -------------------------------------------------------------------------------------------------

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
    fn row_grid(&self, rows: usize) -> u32 {
        let cap = if self.is_host() {
            MAX_ROW_BLOCKS_SIMT
        } else {
            MAX_ROW_BLOCKS_GPU
        };
        rows.clamp(1, cap) as u32
    }

    fn is_host(&self) -> bool {
        matches!(self, Launcher::Simt(_))
    }

    /// Runs `kernel` over `grid` blocks of `block` threads with `shared` bytes of dynamic shared memory.
    ///
    /// # Safety
    /// Every address inside `params` must be valid, for this launcher's memory space, for every access
    /// the kernel makes with these dimensions, and stay valid until the launch completes (the launch
    /// is synchronous on the SIMT executor; on a GPU the pipeline synchronizes before it reads results
    /// or drops buffers).
    unsafe fn launch<P: KernelParams>(
        &self,
        kernel: Kernel,
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

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        match self {
            Launcher::Simt(_) => Ok(Buffer::Host(vec![0u128; bytes.div_ceil(16).max(1)])),
            Launcher::Cuda(gpu) => Ok(Buffer::Cuda(gpu.alloc_zeros::<u8>(bytes.max(1))?)),
        }
    }

    /// A buffer of `bytes` the caller will overwrite entirely: no zeroing on a GPU.
    fn alloc_for_overwrite(&self, bytes: usize) -> Result<Buffer> {
        match self {
            Launcher::Simt(_) => self.alloc(bytes),
            Launcher::Cuda(gpu) => Ok(Buffer::Cuda(gpu.alloc_uninit::<u8>(bytes.max(1))?)),
        }
    }

    fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<Buffer> {
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

    fn addr(&self, buf: &Buffer) -> u64 {
        match (self, buf) {
            (_, Buffer::Host(v)) => v.as_ptr() as u64,
            (Launcher::Cuda(gpu), Buffer::Cuda(s)) => gpu.device_ptr_u64(s),
            (Launcher::Simt(_), Buffer::Cuda(_)) => {
                unreachable!("device buffer on the SIMT executor")
            }
        }
    }

    /// The first `n` elements of `buf` as T.
    fn download<T: bytemuck::Pod>(&self, buf: &Buffer, n: usize) -> Result<Vec<T>> {
        let raw = self.download_bytes(buf, 0, n * std::mem::size_of::<T>())?;
        Ok(bytemuck::pod_collect_to_vec(&raw))
    }

    /// The first `dst.len()` elements of `buf`, copied straight into `dst`.
    fn download_into<T: bytemuck::Pod>(&self, buf: &Buffer, dst: &mut [T]) -> Result<()> {
        self.read_at(buf, 0, bytemuck::cast_slice_mut(dst))
    }

    /// Bytes `offset .. offset + len` of `buf`, in one copy (on a GPU, after the work before it).
    fn download_bytes(&self, buf: &Buffer, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; len];
        self.read_at(buf, offset, &mut raw)?;
        Ok(raw)
    }

    /// Copies bytes `offset .. offset + dst.len()` of `buf` into `dst` (on a GPU, after the work
    /// before it): the one read path of the launcher's memory.
    fn read_at(&self, buf: &Buffer, offset: usize, dst: &mut [u8]) -> Result<()> {
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
    fn write_at<T: bytemuck::Pod>(
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
struct Input<'a> {
    _owned: Option<Buffer>,
    _borrowed: std::marker::PhantomData<&'a [u8]>,
    addr: u64,
}

impl<'a> Input<'a> {
    /// Memory at `addr` that the caller owns for `'a`, used in place. The PhantomData ties the
    /// address to the borrow, so the memory outlives the launches.
    fn borrowed(addr: u64) -> Input<'a> {
        Input {
            _owned: None,
            _borrowed: std::marker::PhantomData,
            addr,
        }
    }

    fn new<T: bytemuck::Pod>(launcher: &Launcher, data: &'a [T]) -> Result<Input<'a>> {
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

    fn logits(launcher: &Launcher, logits: &Logits<'a>) -> Result<Input<'a>> {
        on_dtype!(*logits, x => Input::new(launcher, x))
    }
}

// -------------------------------------------------------------------------------------------------
// Forward
// -------------------------------------------------------------------------------------------------

/// Where one output lives inside a [`Workspace`]'s arena: a byte offset and a length in bytes.
#[derive(Debug, Clone, Copy)]
struct Region {
    offset: usize,
    bytes: usize,
}

/// Lays regions out one after another in one buffer, each starting on an `align`-byte boundary.
struct ArenaLayout {
    end: usize,
    align: usize,
}

impl ArenaLayout {
    fn new(align: usize) -> ArenaLayout {
        ArenaLayout { end: 0, align }
    }

    /// The next region, of `bytes` bytes.
    fn region(&mut self, bytes: usize) -> Region {
        let r = Region {
            offset: self.end,
            bytes,
        };
        self.end = (self.end + bytes).next_multiple_of(self.align);
        r
    }

    /// The next region, for `count` values of T.
    fn array<T>(&mut self, count: usize) -> Region {
        self.region(count * std::mem::size_of::<T>())
    }
}

/// Per-token and per-response buffers of one forward pass, carved out of one allocation (the arena),
/// so that a forward allocates once, zeroes once and copies every output back in one transfer.
/// Regions start on 256-byte boundaries (the allocation's own alignment), so every per-token array
/// is aligned for vector loads and the totals' doubles for 8-byte access.
struct Workspace {
    n: usize,
    b: usize,
    arena: Buffer,
    /// Bytes of the arena in use (the end of the last region).
    bytes: usize,
    totals: Region,
    status: Region,
    lse: Region,
    lse_masked: Region,
    logp: Region,
    logp_masked: Region,
    kl: Region,
    k3: Region,
    entropy: Region,
    score: Region,
    dlogp: Region,
    mask: Region,
    k: Region,
    sbar: Region,
    alpha: Region,
}

impl Workspace {
    const ALIGN: usize = 256;

    fn new(l: &Launcher, n: usize, b: usize) -> Result<Workspace> {
        let mut layout = ArenaLayout::new(Self::ALIGN);
        let totals = layout.array::<VppoLossTotals>(1);
        let status = layout.array::<i64>(1);
        let [lse, lse_masked, logp, logp_masked, kl, k3, entropy, score, dlogp] =
            [(); 9].map(|_| layout.array::<f32>(n));
        let mask = layout.array::<u8>(n);
        let k = layout.array::<i32>(b);
        let [sbar, alpha] = [(); 2].map(|_| layout.array::<f32>(b));
        let end = layout.end;
        // Zeroed (not just allocated): after a bad row pass 2 still runs over every region before
        // the status is read (see `forward`), and zeros keep those reads defined and finite.
        let mut arena = l.alloc(end)?;
        l.write_at(&mut arena, status.offset, &[VPPO_STATUS_CLEAR as i64])?;
        Ok(Workspace {
            n,
            b,
            arena,
            bytes: end,
            totals,
            status,
            lse,
            lse_masked,
            logp,
            logp_masked,
            kl,
            k3,
            entropy,
            score,
            dlogp,
            mask,
            k,
            sbar,
            alpha,
        })
    }

    /// The address of `r` in the launcher's memory space.
    fn addr(&self, l: &Launcher, r: Region) -> u64 {
        l.addr(&self.arena) + r.offset as u64
    }

    /// [`Workspace::addr`] as the typed pointer a params struct holds.
    fn ptr<T>(&self, l: &Launcher, r: Region) -> *mut T {
        self.addr(l, r) as usize as *mut T
    }

    /// The whole arena, copied back in one transfer (on a GPU this waits for the work before it).
    fn download(&self, l: &Launcher) -> Result<ArenaCopy> {
        Ok(ArenaCopy(l.download_bytes(&self.arena, 0, self.bytes)?))
    }
}

/// A host copy of a buffer laid out by an [`ArenaLayout`] (a [`Workspace`], or the gathered small
/// tensors of a device batch), read region by region.
struct ArenaCopy(Vec<u8>);

impl ArenaCopy {
    /// The status word of the perception pass.
    fn status(&self, ws: &Workspace) -> i64 {
        self.get::<i64>(ws.status)[0]
    }

    /// Region `r` as T values (copied out: the arena bytes need not be aligned for T on the host).
    fn get<T: bytemuck::Pod>(&self, r: Region) -> Vec<T> {
        bytemuck::pod_collect_to_vec(&self.0[r.offset..r.offset + r.bytes])
    }
}

/// The exact parameters of the loss kernel for this config.
fn loss_params(cfg: &VppoConfig, n: usize, b: usize) -> VppoLossParams {
    use crate::params::{VppoAggregation as A, VppoScope as S, VppoShaping as Sh};
    let (has_range, (lo, hi)) = match cfg.tas_range {
        Some(r) => (1, r),
        None => (0, (0.0, 0.0)),
    };
    VppoLossParams {
        n_tokens: n as i64,
        n_responses: b as i64,
        group_size: cfg.group_size as i64,
        token_normalizer: cfg.token_normalizer.unwrap_or(n as f64),
        beta_min: cfg.beta_min,
        beta_max: cfg.beta_max,
        range_lo: lo,
        range_hi: hi,
        eps_low: cfg.eps_low,
        eps_high: cfg.eps_high,
        dual_clip: cfg.dual_clip.unwrap_or(0.0),
        logp_penalty: cfg.logp_penalty,
        shaping: match cfg.shaping {
            Shaping::MeanPreserving => Sh::VPPO_SHAPING_MEAN_PRESERVING,
            Shaping::Linear => Sh::VPPO_SHAPING_LINEAR,
            Shaping::None => Sh::VPPO_SHAPING_NONE,
        } as i32,
        scope: match cfg.scope() {
            TasScope::Batch => S::VPPO_SCOPE_BATCH,
            TasScope::Group => S::VPPO_SCOPE_GROUP,
        } as i32,
        aggregation: match cfg.aggregation {
            Aggregation::TokenMean => A::VPPO_AGG_TOKEN_MEAN,
            Aggregation::SeqMeanTokenMean => A::VPPO_AGG_SEQ_MEAN_TOKEN_MEAN,
            Aggregation::SeqMeanTokenSum => A::VPPO_AGG_SEQ_MEAN_TOKEN_SUM,
        } as i32,
        has_range,
        has_dual_clip: cfg.dual_clip.is_some() as i32,
        ..Default::default()
    }
}

/// Turns the status word of the perception kernel into the error the reference reports.
/// `row_of(tensor, row)` gives a logits row (widened to f64), to name the bad value.
fn status_error(
    status: i64,
    targets: &[i32],
    vocab: usize,
    temperature: f64,
    row_of: &dyn Fn(Tensor, usize) -> Result<Vec<f64>>,
) -> Result<()> {
    if status == VPPO_STATUS_CLEAR as i64 {
        return Ok(());
    }
    let row = (status >> 8) as usize;
    let code = (status & 0xff) as u32;
    let first_bad = |tensor: Tensor| -> Result<f64> {
        Ok(row_of(tensor, row)?
            .into_iter()
            .find(|x| x.is_nan() || *x == f64::INFINITY)
            .unwrap_or(f64::NAN))
    };
    let target = targets[row];
    use VppoErrorCode as C;
    Err(match code {
        c if c == C::VPPO_ERR_TARGET_OUT_OF_RANGE as u32 => {
            VppoError::TargetOutOfRange { row, target, vocab }
        }
        c if c == C::VPPO_ERR_LOGITS_NONFINITE as u32 => VppoError::NonFinite {
            tensor: Tensor::Logits,
            location: Location::Row(row),
            value: first_bad(Tensor::Logits)?,
        },
        c if c == C::VPPO_ERR_LOGITS_ALL_NEG_INF as u32 => VppoError::AllNegInf {
            tensor: Tensor::Logits,
            row,
        },
        c if c == C::VPPO_ERR_TARGET_NEG_INF as u32 => VppoError::TargetNegInf { row, target },
        c if c == C::VPPO_ERR_MASKED_NONFINITE as u32 => VppoError::NonFinite {
            tensor: Tensor::LogitsMasked,
            location: Location::Row(row),
            value: first_bad(Tensor::LogitsMasked)?,
        },
        c if c == C::VPPO_ERR_MASKED_ALL_NEG_INF as u32 => VppoError::AllNegInf {
            tensor: Tensor::LogitsMasked,
            row,
        },
        c if c == C::VPPO_ERR_LOGITS_OVERFLOW as u32 => {
            crate::reference::perception::overflow_error(
                &row_of(Tensor::Logits, row)?,
                &row_of(Tensor::LogitsMasked, row)?,
                row,
                temperature,
            )
        }
        other => VppoError::Kernel(format!(
            "perception kernel reported unknown code {other} at row {row}"
        )),
    })
}

/// Rows of a host batch for [`status_error`].
fn host_rows<'a>(batch: &'a Batch<'a>) -> impl Fn(Tensor, usize) -> Result<Vec<f64>> + 'a {
    move |tensor, row| {
        let logits = if tensor == Tensor::Logits {
            &batch.logits
        } else {
            &batch.logits_masked
        };
        Ok(logits.row_f64(row, batch.vocab))
    }
}

/// Pass 1 only: the per-token perception outputs (lse, logp, kl, k3, entropy, score), as the
/// reference's `perception` stage computes them. For stage-by-stage tests and benchmarks.
pub(crate) fn perception(valid: &ValidBatch, device: Device) -> Result<TokenOutputs> {
    perception_with(
        Launcher::for_device(device)?,
        perception_kernel(valid.batch().logits.dtype()),
        valid,
    )
}

/// Pass 1 through a deliberately wrong build of the perception kernel (every exp times 1.001), on the
/// SIMT executor. It exists so the tests can show that their tolerances catch a wrong kernel.
pub(crate) fn mutant_perception(valid: &ValidBatch, order: LaneOrder) -> Result<TokenOutputs> {
    let kernel = match valid.batch().logits.dtype() {
        Dtype::F32 => PERCEPTION_F32_MUTANT,
        Dtype::F16 => PERCEPTION_F16_MUTANT,
        Dtype::Bf16 => PERCEPTION_BF16_MUTANT,
    };
    perception_with(Launcher::Simt(order), kernel, valid)
}

fn perception_with(l: Launcher, kernel: Kernel, valid: &ValidBatch) -> Result<TokenOutputs> {
    let (batch, cfg) = (valid.batch(), valid.config());
    let ws = Workspace::new(&l, batch.n_tokens(), batch.n_responses())?;
    let inputs = Inputs::new(&l, batch)?;
    run_perception(&l, kernel, Dims::of(batch), cfg, &inputs, &ws)?;
    let copy = ws.download(&l)?;
    status_error(
        copy.status(&ws),
        batch.targets,
        batch.vocab,
        cfg.temperature,
        &host_rows(batch),
    )?;
    Ok(perception_outputs(&ws, &copy))
}

/// The per-token outputs of pass 1 in an arena copy; mask and dlogp (pass 2) are left empty.
fn perception_outputs(ws: &Workspace, c: &ArenaCopy) -> TokenOutputs {
    TokenOutputs {
        score: c.get(ws.score),
        kl: c.get(ws.kl),
        k3: c.get(ws.k3),
        entropy: c.get(ws.entropy),
        logp: c.get(ws.logp),
        logp_masked: c.get(ws.logp_masked),
        lse: c.get(ws.lse),
        lse_masked: c.get(ws.lse_masked),
        mask: Vec::new(),
        dlogp: Vec::new(),
    }
}

/// Pass 2a only: the top-k mask and k_b of given scores (the kernel's `vppo_select`), and Sbar.
/// `scores` [N] must be finite (the perception pass only produces values in [0, score_clamp]).
pub(crate) fn select(
    scores: &[f32],
    cu_seqlens: &[i32],
    top_fraction: f64,
    device: Device,
) -> Result<(Vec<u8>, Vec<u32>, Vec<f32>)> {
    let frac = crate::config::TopFraction::new(top_fraction)?;
    crate::batch::validate_cu_seqlens(cu_seqlens, scores.len())?;
    if let Some((row, &x)) = scores.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(VppoError::NonFinite {
            tensor: Tensor::Scores,
            location: Location::Row(row),
            value: x as f64,
        });
    }
    let l = Launcher::for_device(device)?;
    let (n, b) = (scores.len(), cu_seqlens.len() - 1);
    let score = Input::new(&l, scores)?;
    let cu = Input::new(&l, cu_seqlens)?;
    let mask = l.alloc(n)?;
    let k = l.alloc(b * 4)?;
    let sbar = l.alloc(b * 4)?;
    let p = VppoSelectParams {
        score: score.addr as *const f32,
        cu_seqlens: cu.addr as *const i32,
        mask: l.addr(&mask) as *mut u8,
        k: l.addr(&k) as *mut i32,
        sbar: l.addr(&sbar) as *mut f32,
        n_responses: b as i64,
        frac_num: frac.numerator(),
        frac_den: frac.denominator(),
    };
    // SAFETY: score [N], cu_seqlens [B+1] (validated: within [0, N], non-decreasing), mask [N],
    // k and sbar [B] are live buffers of this launcher's memory for the whole launch.
    unsafe { launch_select(&l, &p)? };
    let kk: Vec<i32> = l.download(&k, b)?;
    Ok((
        l.download(&mask, n)?,
        kk.into_iter().map(|x| x as u32).collect(),
        l.download(&sbar, b)?,
    ))
}

/// Launches `vppo_select` over the `p.n_responses` responses of `p`; nothing to launch when there
/// are none.
///
/// # Safety
/// As [`Launcher::launch`]: `score` and `mask` address N values, `cu_seqlens` B + 1 validated
/// boundaries (within [0, N], non-decreasing), `k` and `sbar` B values, all live for the launch.
unsafe fn launch_select(l: &Launcher, p: &VppoSelectParams) -> Result<()> {
    let b = p.n_responses as usize;
    if b == 0 {
        return Ok(());
    }
    // SAFETY: forwarded from this function's contract.
    unsafe {
        l.launch(
            SELECT,
            l.row_grid(b),
            SELECT_THREADS,
            SELECT_SHARED_BYTES,
            p,
        )
    }
}

/// The sizes of a batch.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    b: usize,
    vocab: usize,
    dtype: Dtype,
}

impl Dims {
    fn of(batch: &Batch) -> Dims {
        Dims {
            n: batch.n_tokens(),
            b: batch.n_responses(),
            vocab: batch.vocab,
            dtype: batch.logits.dtype(),
        }
    }
}

/// The inputs of a forward pass, resident where the kernels run.
struct Inputs<'a> {
    logits: Input<'a>,
    logits_masked: Input<'a>,
    targets: Input<'a>,
    old_logp: Input<'a>,
    advantages: Input<'a>,
    cu_seqlens: Input<'a>,
}

impl<'a> Inputs<'a> {
    /// The caller's device buffers, used in place (no copy).
    fn device(gpu: &Gpu, batch: &DeviceBatch<'a>) -> Inputs<'a> {
        let at = Input::borrowed;
        Inputs {
            logits: at(batch.logits.addr(gpu)),
            logits_masked: at(batch.logits_masked.addr(gpu)),
            targets: at(gpu.device_ptr_u64(batch.targets)),
            old_logp: at(gpu.device_ptr_u64(batch.old_logp)),
            advantages: at(gpu.device_ptr_u64(batch.advantages)),
            cu_seqlens: at(gpu.device_ptr_u64(batch.cu_seqlens)),
        }
    }

    fn new(l: &Launcher, batch: &Batch<'a>) -> Result<Inputs<'a>> {
        Ok(Inputs {
            logits: Input::logits(l, &batch.logits)?,
            logits_masked: Input::logits(l, &batch.logits_masked)?,
            targets: Input::new(l, batch.targets)?,
            old_logp: Input::new(l, batch.old_logp)?,
            advantages: Input::new(l, batch.advantages)?,
            cu_seqlens: Input::new(l, batch.cu_seqlens)?,
        })
    }
}

fn run_perception(
    l: &Launcher,
    kernel: Kernel,
    dims: Dims,
    cfg: &VppoConfig,
    inp: &Inputs,
    ws: &Workspace,
) -> Result<()> {
    let n = dims.n;
    if n == 0 {
        return Ok(());
    }
    let a = |r: Region| ws.ptr::<f32>(l, r);
    let p = VppoPerceptionParams {
        logits: inp.logits.addr as *const c_void,
        logits_masked: inp.logits_masked.addr as *const c_void,
        targets: inp.targets.addr as *const i32,
        old_logp: inp.old_logp.addr as *const f32,
        lse: a(ws.lse),
        lse_masked: a(ws.lse_masked),
        logp: a(ws.logp),
        logp_masked: a(ws.logp_masked),
        kl: a(ws.kl),
        k3: a(ws.k3),
        entropy: a(ws.entropy),
        score: a(ws.score),
        status: ws.ptr(l, ws.status),
        n_tokens: n as i64,
        vocab: dims.vocab as i64,
        inv_temperature: (1.0 / cfg.temperature) as f32,
        score_clamp: cfg.score_clamp as f32,
        perception: match cfg.perception {
            Perception::FullKl => crate::params::VppoPerception::VPPO_PERCEPTION_FULL_KL,
            Perception::K3 => crate::params::VppoPerception::VPPO_PERCEPTION_K3,
        } as i32,
        ..Default::default()
    };
    // SAFETY: logits and logits_masked hold N * V elements of the kernel's dtype (checked by
    // validate_small), targets and old_logp N, every output N, status 1; all live for the launch.
    unsafe {
        l.launch(
            kernel,
            l.row_grid(n),
            PERCEPTION_THREADS,
            PERCEPTION_THREADS * PERCEPTION_STATE_BYTES,
            &p,
        )?
    };
    Ok(())
}

fn run_select_loss(
    l: &Launcher,
    dims: Dims,
    cfg: &VppoConfig,
    inp: &Inputs,
    ws: &Workspace,
) -> Result<()> {
    let (n, b) = (dims.n, dims.b);
    let frac = cfg.top_fraction_exact()?;
    let p = VppoSelectParams {
        score: ws.ptr(l, ws.score),
        cu_seqlens: inp.cu_seqlens.addr as *const i32,
        mask: ws.ptr(l, ws.mask),
        k: ws.ptr(l, ws.k),
        sbar: ws.ptr(l, ws.sbar),
        n_responses: b as i64,
        frac_num: frac.numerator(),
        frac_den: frac.denominator(),
    };
    // SAFETY: score and mask [N], cu_seqlens [B+1] validated, k and sbar [B]; all live.
    unsafe { launch_select(l, &p)? };
    let p = VppoLossParams {
        logp: ws.ptr(l, ws.logp),
        old_logp: inp.old_logp.addr as *const f32,
        mask: ws.ptr(l, ws.mask),
        sbar: ws.ptr(l, ws.sbar),
        cu_seqlens: inp.cu_seqlens.addr as *const i32,
        advantages: inp.advantages.addr as *const f32,
        alpha: ws.ptr(l, ws.alpha),
        dlogp: ws.ptr(l, ws.dlogp),
        totals: ws.ptr(l, ws.totals),
        ..loss_params(cfg, n, b)
    };
    // SAFETY: logp, old_logp, mask, dlogp [N]; sbar, advantages, alpha [B]; cu_seqlens [B+1]; totals 1;
    // B % G == 0 when the group scope is used (validate_small). One block.
    unsafe { l.launch(LOSS, 1, LOSS_THREADS, LOSS_SHARED_BYTES, &p) }
}

/// The whole forward pass on the kernels, over a batch validated for its config.
pub(crate) fn forward(valid: &ValidBatch, device: Device) -> Result<VppoOutput> {
    let (batch, cfg) = (valid.batch(), valid.config());
    let l = Launcher::for_device(device)?;
    let (n, b) = (batch.n_tokens(), batch.n_responses());
    let z = cfg.token_normalizer.unwrap_or(n as f64);
    if n == 0 {
        return Ok(empty_output(z, b));
    }
    let inputs = Inputs::new(&l, batch)?;
    let ws = Workspace::new(&l, n, b)?;
    let dims = Dims::of(batch);
    run_passes(
        &l,
        dims,
        cfg,
        &inputs,
        &ws,
        batch.targets,
        &host_rows(batch),
    )
}

/// Passes 1 and 2 over `inputs` into `ws`, then every output of the forward, or the error of the
/// first bad row (`row_of` gives a logits row to name the bad value).
///
/// Pass 2 is queued before pass 1's status is read, so a forward waits for the GPU once. After a bad
/// row pass 2 computes on meaningless (possibly NaN) per-token values: it takes no index from them
/// (only from cu_seqlens, validated on the host) and its radix select ends after a fixed number of
/// digits for any bits, so it finishes, and its results are discarded with the error.
fn run_passes(
    l: &Launcher,
    dims: Dims,
    cfg: &VppoConfig,
    inputs: &Inputs,
    ws: &Workspace,
    targets: &[i32],
    row_of: &dyn Fn(Tensor, usize) -> Result<Vec<f64>>,
) -> Result<VppoOutput> {
    run_perception(l, perception_kernel(dims.dtype), dims, cfg, inputs, ws)?;
    run_select_loss(l, dims, cfg, inputs, ws)?;
    let copy = ws.download(l)?;
    status_error(
        copy.status(ws),
        targets,
        dims.vocab,
        cfg.temperature,
        row_of,
    )?;
    let z = cfg.token_normalizer.unwrap_or(dims.n as f64);
    Ok(output_from(ws, &copy, z))
}

/// The output of a forward over no tokens (N = 0) and `b` empty responses: loss 0, Sbar 0, k 0,
/// alpha 1.
fn empty_output(z: f64, b: usize) -> VppoOutput {
    VppoOutput {
        token_normalizer: z,
        responses: ResponseOutputs {
            sbar: vec![0.0; b],
            k: vec![0; b],
            alpha: vec![1.0; b],
        },
        ..Default::default()
    }
}

/// Every output of a forward, from a copy of its workspace ([`Workspace::download`]).
fn output_from(ws: &Workspace, c: &ArenaCopy, z: f64) -> VppoOutput {
    let n = ws.n;
    let t: VppoLossTotals = c.get(ws.totals)[0];
    VppoOutput {
        loss: t.loss,
        pg_loss: t.pg,
        token_normalizer: z,
        tokens: TokenOutputs {
            mask: c.get(ws.mask),
            dlogp: c.get(ws.dlogp),
            ..perception_outputs(ws, c)
        },
        responses: ResponseOutputs {
            sbar: c.get(ws.sbar),
            k: c.get::<i32>(ws.k).into_iter().map(|x| x as u32).collect(),
            alpha: c.get(ws.alpha),
        },
        stats: Stats {
            clip_fraction: if t.n_selected > 0 {
                t.n_clipped as f64 / t.n_selected as f64
            } else {
                0.0
            },
            mean_ratio: t.ratio_sum / n as f64,
            selected_fraction: t.n_selected as f64 / n as f64,
        },
    }
}

// -------------------------------------------------------------------------------------------------
// Backward
// -------------------------------------------------------------------------------------------------

/// dloss/dlogits into `grad` from a forward's saved lse and dlogp (`out`, checked against the
/// batch and for finite values by [`backward_host`]).
pub(crate) fn backward_into(
    valid: &ValidBatch,
    out: &VppoOutput,
    grad: GradMut,
    device: Device,
) -> Result<()> {
    let batch = valid.batch();
    backward_host(
        device,
        Some(&batch.logits),
        batch.targets,
        batch.vocab,
        out,
        grad,
        valid.config(),
    )
}

/// dloss/dlogits written IN PLACE over host `logits` ([N, V], the forward's logits): afterwards the
/// buffer holds the gradient in the logits dtype. Lengths, targets and `out` are checked by
/// [`backward_host`]. On a GPU the buffer is uploaded, overwritten there by the same kernel, and
/// copied back.
pub(crate) fn backward_in_place(
    logits: GradMut,
    vocab: usize,
    targets: &[i32],
    out: &VppoOutput,
    cfg: &VppoConfig,
    device: Device,
) -> Result<()> {
    backward_host(device, None, targets, vocab, out, logits, cfg)
}

/// The backward kernel into the caller's host buffer `grad` ([N, V], N = `targets.len()`), reading
/// `logits`, or, when `logits` is None, reading the logits from `grad` itself and overwriting them
/// (in place). On the SIMT executor the kernel writes the caller's buffer directly; on a GPU it
/// writes a device buffer (a copy of `grad` in place, zeros otherwise) that is then copied back.
///
/// Everything the launch indexes with is checked here first, whatever the caller checked: N * V
/// (the product checked) against the lengths of `logits` and `grad`, the targets' range, and N
/// finite values of lse and dlogp in `out`.
fn backward_host(
    device: Device,
    logits: Option<&Logits>,
    targets: &[i32],
    vocab: usize,
    out: &VppoOutput,
    mut grad: GradMut,
    cfg: &VppoConfig,
) -> Result<()> {
    let n = targets.len();
    check_in_place(logits.map_or(grad.len(), |x| x.len()), vocab, targets, out)?;
    let nv = check_elements(Tensor::GradLogits, grad.len(), n, vocab)?;
    if n == 0 {
        return Ok(());
    }
    let l = &Launcher::for_device(device)?;
    let input_dtype = logits.map_or(grad.dtype(), |x| x.dtype());
    let kernel = backward_kernel(input_dtype, grad.dtype())?;
    let logits = logits.map(|x| Input::logits(l, x)).transpose()?;
    let targets = Input::new(l, targets)?;
    let lse = Input::new(l, &out.tokens.lse)?;
    let dlogp = Input::new(l, &out.tokens.dlogp)?;
    let device_grad = match (l, &logits) {
        (Launcher::Simt(_), _) => None,
        (Launcher::Cuda(_), None) => Some(on_dtype!(&grad, g => l.upload(&g[..]))?),
        // The kernel writes every element of grad (kernels/backward.cu): no zeroing.
        (Launcher::Cuda(_), Some(_)) => Some(l.alloc_for_overwrite(nv * grad.dtype().size())?),
    };
    let grad_addr = match &device_grad {
        Some(buf) => l.addr(buf),
        None => on_dtype!(&mut grad, g => g.as_mut_ptr() as u64),
    };
    let addrs = BackwardAddrs {
        logits: logits.as_ref().map_or(grad_addr, |x| x.addr),
        lse: lse.addr,
        dlogp: dlogp.addr,
        targets: targets.addr,
        grad: grad_addr,
    };
    // SAFETY: logits [N, V] of the input dtype (the caller's batch, or the one buffer at grad_addr
    // in place), lse/dlogp/targets [N], targets in [0, V), grad [N, V] of the output dtype: all
    // checked at the top of this function. In place, each element is
    // loaded and then stored by the same thread, and no two threads touch one element
    // (kernels/backward.cu). The caller's grad slice is borrowed mutably for this whole function, so
    // nothing else reads or writes it while the kernel does.
    unsafe { launch_backward_kernel(l, kernel, &addrs, n, vocab, cfg)? };
    if let Some(buf) = device_grad {
        on_dtype!(grad, g => l.download_into(&buf, g)?);
    }
    Ok(())
}

/// The buffers of one backward launch, as addresses of the launcher's memory space. `logits` and
/// `grad` are the same address for the in-place backward.
struct BackwardAddrs {
    logits: u64,
    lse: u64,
    dlogp: u64,
    targets: u64,
    grad: u64,
}

/// Launches the backward kernel over `n` rows of `vocab` logits.
///
/// # Safety
/// As [`Launcher::launch`]: `logits` and `grad` hold `n * vocab` elements of the kernel's input and
/// output dtypes, `lse`, `dlogp` and `targets` hold `n` values, and nothing else accesses `grad`
/// while the kernel runs (it may alias `logits`: each element is loaded, then stored, by one thread).
unsafe fn launch_backward_kernel(
    l: &Launcher,
    kernel: Kernel,
    a: &BackwardAddrs,
    n: usize,
    vocab: usize,
    cfg: &VppoConfig,
) -> Result<()> {
    let p = VppoBackwardParams {
        logits: a.logits as *const c_void,
        lse: a.lse as *const f32,
        dlogp: a.dlogp as *const f32,
        targets: a.targets as *const i32,
        grad: a.grad as *mut c_void,
        n_tokens: n as i64,
        vocab: vocab as i64,
        inv_temperature: (1.0 / cfg.temperature) as f32,
        ..Default::default()
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { l.launch(kernel, l.row_grid(n), BACKWARD_THREADS, 0, &p) }
}

// -------------------------------------------------------------------------------------------------
// GPU-resident batches: the caller's device buffers, no copies of the logits
// -------------------------------------------------------------------------------------------------

use cudarc::driver::CudaSlice;

impl DeviceLogits<'_> {
    fn addr(&self, gpu: &Gpu) -> u64 {
        on_dtype!(self, s => gpu.device_ptr_u64(s))
    }

    /// Row `row` of a [N, V] tensor, copied back and widened to f64 (to name a bad value).
    fn row_f64(&self, gpu: &Gpu, row: usize, vocab: usize) -> Result<Vec<f64>> {
        fn copy<T: Elem>(
            gpu: &Gpu,
            s: &CudaSlice<T>,
            row: usize,
            vocab: usize,
        ) -> Result<Vec<f64>> {
            let host = gpu
                .stream()
                .clone_dtoh(&s.slice(row * vocab..(row + 1) * vocab))
                .map_err(|e| VppoError::Cuda(format!("copying logits row {row} back: {e:?}")))?;
            Ok(host.into_iter().map(T::to_f64).collect())
        }
        on_dtype!(self, s => copy(gpu, s, row, vocab))
    }
}

impl DeviceLogitsMut<'_> {
    fn addr(&self, gpu: &Gpu) -> u64 {
        self.as_ref().addr(gpu)
    }
}

/// A packed batch (SPEC section 1) whose tensors live on the GPU, borrowed from the caller.
///
/// Streams: vppo runs its kernels on its own stream of the GPU's context. Before it reads or writes
/// a caller's buffer it waits for the work already queued on that buffer's stream (so logits still
/// being written are not read early), and every call synchronizes before it returns. Every buffer
/// must belong to the same context as the `Vppo`'s GPU (`vppo::cuda::Gpu::context`); a buffer of
/// another context is an error, not a launch.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBatch<'a> {
    /// [N, V] logits given the real image.
    pub logits: DeviceLogits<'a>,
    /// [N, V] logits given the masked image; same dtype.
    pub logits_masked: DeviceLogits<'a>,
    /// [N] sampled token ids.
    pub targets: &'a CudaSlice<i32>,
    /// [N] old log-probs.
    pub old_logp: &'a CudaSlice<f32>,
    /// [B] advantages.
    pub advantages: &'a CudaSlice<f32>,
    /// [B+1] response boundaries.
    pub cu_seqlens: &'a CudaSlice<i32>,
    /// V.
    pub vocab: usize,
}

/// The result of a forward pass on GPU-resident inputs: every output copied to the host (O(N + B)),
/// and the per-token buffers the backward reads kept on the GPU.
pub struct DeviceForward {
    /// All outputs of SPEC section 8 but the gradient.
    pub output: VppoOutput,
    gpu: Arc<Gpu>,
    ws: Option<Workspace>,
    targets: Vec<i32>,
    vocab: usize,
    dtype: Dtype,
}

impl DeviceForward {
    /// Checks that logits given to a backward have the dtype the forward read.
    fn check_logits_dtype(&self, dtype: Dtype) -> Result<()> {
        if dtype != self.dtype {
            return Err(VppoError::Shape {
                tensor: Tensor::Logits,
                detail: "dtype differs from the forward's".into(),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for DeviceForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceForward")
            .field("output", &self.output)
            .field("gpu", &self.gpu)
            .finish()
    }
}

/// Host copies of the O(N + B) tensors of a device batch.
struct SmallHost {
    targets: Vec<i32>,
    old_logp: Vec<f32>,
    advantages: Vec<f32>,
    cu_seqlens: Vec<i32>,
}

/// The O(N + B) tensors of a device batch (targets, old_logp, advantages, cu_seqlens), gathered on
/// the device into one buffer and copied back in one transfer: one wait for the GPU, not four.
fn download_small_tensors(gpu: &Gpu, batch: &DeviceBatch) -> Result<SmallHost> {
    let mut layout = ArenaLayout::new(16);
    let targets = layout.array::<i32>(batch.targets.len());
    let old_logp = layout.array::<f32>(batch.old_logp.len());
    let advantages = layout.array::<f32>(batch.advantages.len());
    let cu_seqlens = layout.array::<i32>(batch.cu_seqlens.len());
    let mut raw = vec![0u8; layout.end];
    if layout.end > 0 {
        let mut staging = gpu.alloc_uninit::<u8>(layout.end)?;
        gpu.copy_bytes_on_device(batch.targets, &mut staging, targets.offset)?;
        gpu.copy_bytes_on_device(batch.old_logp, &mut staging, old_logp.offset)?;
        gpu.copy_bytes_on_device(batch.advantages, &mut staging, advantages.offset)?;
        gpu.copy_bytes_on_device(batch.cu_seqlens, &mut staging, cu_seqlens.offset)?;
        gpu.download_range_into(&staging, 0, &mut raw)?;
    }
    let copy = ArenaCopy(raw);
    Ok(SmallHost {
        targets: copy.get(targets),
        old_logp: copy.get(old_logp),
        advantages: copy.get(advantages),
        cu_seqlens: copy.get(cu_seqlens),
    })
}

/// Where a caller's buffer lives: its context and the stream its pending work is queued on.
type Residence<'a> = (
    Tensor,
    &'a Arc<cudarc::driver::CudaContext>,
    &'a Arc<cudarc::driver::CudaStream>,
);

fn residence<T>(tensor: Tensor, s: &CudaSlice<T>) -> Residence<'_> {
    (tensor, s.context(), s.stream())
}

impl<'a> DeviceLogits<'a> {
    fn residence(&self, tensor: Tensor) -> Residence<'a> {
        on_dtype!(*self, s => residence(tensor, s))
    }
}

impl DeviceLogitsMut<'_> {
    fn residence(&self, tensor: Tensor) -> Residence<'_> {
        self.as_ref().residence(tensor)
    }
}

impl<'a> DeviceBatch<'a> {
    /// Where each of the batch's buffers lives, for [`join_caller_streams`].
    fn residences(&self) -> [Residence<'a>; 6] {
        [
            self.logits.residence(Tensor::Logits),
            self.logits_masked.residence(Tensor::LogitsMasked),
            residence(Tensor::Targets, self.targets),
            residence(Tensor::OldLogp, self.old_logp),
            residence(Tensor::Advantages, self.advantages),
            residence(Tensor::CuSeqlens, self.cu_seqlens),
        ]
    }
}

/// Checks that every caller buffer lives in this GPU's context, and orders this GPU's stream after
/// the work already queued on the buffers' own streams (an event recorded there, waited for here):
/// logits still being written on the caller's stream are not read early, and a gradient buffer still
/// being read there is not overwritten early. Our work is synchronized before the API returns.
fn join_caller_streams(gpu: &Gpu, buffers: &[Residence]) -> Result<()> {
    // One wait per distinct stream, by driver handle (a batch's tensors usually share one; the
    // crate's own stream needs none).
    let mut joined = vec![gpu.stream().cu_stream()];
    for (tensor, ctx, stream) in buffers {
        if ***ctx != **gpu.context() {
            return Err(VppoError::Shape {
                tensor: *tensor,
                detail: format!(
                    "lives on GPU {} (another CUDA context), this Vppo runs on GPU {}",
                    ctx.ordinal(),
                    gpu.ordinal()
                ),
            });
        }
        if !joined.contains(&stream.cu_stream()) {
            joined.push(stream.cu_stream());
            let err = |e: cudarc::driver::DriverError| {
                VppoError::Cuda(format!("ordering after the stream of {tensor}: {e:?}"))
            };
            let event = stream.record_event(None).map_err(err)?;
            gpu.stream().wait(&event).map_err(err)?;
        }
    }
    Ok(())
}

/// The forward pass on the caller's device buffers. The O(N + B) tensors (targets, old_logp,
/// advantages, cu_seqlens) are copied back once and validated on the host before any launch; the
/// logits are only read by the perception kernel.
pub(crate) fn forward_device(
    gpu: &Arc<Gpu>,
    batch: &DeviceBatch,
    cfg: &VppoConfig,
) -> Result<DeviceForward> {
    cfg.validate()?;
    join_caller_streams(gpu, &batch.residences())?;
    let SmallHost {
        targets,
        old_logp,
        advantages,
        cu_seqlens,
    } = download_small_tensors(gpu, batch)?;
    crate::batch::SmallTensors {
        logits: (batch.logits.dtype(), batch.logits.len()),
        logits_masked: (batch.logits_masked.dtype(), batch.logits_masked.len()),
        targets: &targets,
        old_logp: &old_logp,
        advantages: &advantages,
        cu_seqlens: &cu_seqlens,
        vocab: batch.vocab,
    }
    .validate(cfg.group_size, cfg.needs_groups())?;
    let (n, b) = (targets.len(), advantages.len());
    let dims = Dims {
        n,
        b,
        vocab: batch.vocab,
        dtype: batch.logits.dtype(),
    };
    let z = cfg.token_normalizer.unwrap_or(n as f64);
    if n == 0 {
        return Ok(DeviceForward {
            output: empty_output(z, b),
            gpu: gpu.clone(),
            ws: None,
            targets,
            vocab: batch.vocab,
            dtype: dims.dtype,
        });
    }
    let l = Launcher::Cuda(gpu.clone());
    let inputs = Inputs::device(gpu, batch);
    let ws = Workspace::new(&l, n, b)?;
    let rows = |tensor: Tensor, row: usize| {
        let logits = if tensor == Tensor::Logits {
            &batch.logits
        } else {
            &batch.logits_masked
        };
        logits.row_f64(gpu, row, batch.vocab)
    };
    let output = run_passes(&l, dims, cfg, &inputs, &ws, &targets, &rows)?;
    Ok(DeviceForward {
        output,
        gpu: gpu.clone(),
        ws: Some(ws),
        targets,
        vocab: batch.vocab,
        dtype: dims.dtype,
    })
}

/// Queues the backward kernel of a [`forward_device`] on the GPU's stream: dloss/dlogits into `grad`
/// (f32, or the logits dtype) from the logits at `logits_addr`, which with `targets` must be the
/// buffers the forward read (lengths are checked). It does not wait: the caller synchronizes (or
/// records an event and waits for it) before any of the buffers is dropped or read on the host.
fn launch_backward(
    fwd: &DeviceForward,
    logits_addr: u64,
    logits_len: usize,
    logits_residence: Residence,
    targets: &CudaSlice<i32>,
    grad: &DeviceLogitsMut,
    cfg: &VppoConfig,
) -> Result<()> {
    let n = fwd.targets.len();
    check_elements(Tensor::Logits, logits_len, n, fwd.vocab)?;
    check_elements(Tensor::GradLogits, grad.len(), n, fwd.vocab)?;
    if targets.len() != n {
        return Err(VppoError::Shape {
            tensor: Tensor::Targets,
            detail: format!("has {} elements, the forward had N = {n}", targets.len()),
        });
    }
    let Some(ws) = &fwd.ws else { return Ok(()) };
    let gpu = &fwd.gpu;
    join_caller_streams(
        gpu,
        &[
            logits_residence,
            residence(Tensor::Targets, targets),
            grad.residence(Tensor::GradLogits),
        ],
    )?;
    let l = Launcher::Cuda(gpu.clone());
    let kernel = backward_kernel(fwd.dtype, grad.dtype())?;
    let addrs = BackwardAddrs {
        logits: logits_addr,
        lse: ws.addr(&l, ws.lse),
        dlogp: ws.addr(&l, ws.dlogp),
        targets: gpu.device_ptr_u64(targets),
        grad: grad.addr(gpu),
    };
    // SAFETY: logits and grad hold N * V elements of their dtypes (checked above), lse, dlogp and
    // targets N; grad is borrowed mutably by the caller for this call; the kernel is queued on the
    // one stream every buffer of this Gpu lives on, and a CudaSlice is freed in stream order (or
    // after a synchronize), so every buffer outlives the kernel even when the caller does not wait.
    unsafe { launch_backward_kernel(&l, kernel, &addrs, n, fwd.vocab, cfg) }
}

/// dloss/dlogits of a [`forward_device`] into the caller's device buffer `grad`.
pub(crate) fn backward_device(
    fwd: &DeviceForward,
    batch: &DeviceBatch,
    grad: DeviceLogitsMut,
    cfg: &VppoConfig,
) -> Result<()> {
    fwd.check_logits_dtype(batch.logits.dtype())?;
    launch_backward(
        fwd,
        batch.logits.addr(&fwd.gpu),
        batch.logits.len(),
        batch.logits.residence(Tensor::Logits),
        batch.targets,
        &grad,
        cfg,
    )?;
    fwd.gpu.synchronize()
}

/// dloss/dlogits of a [`forward_device`] written IN PLACE over `logits`: after this call the buffer
/// holds the gradient (in the logits dtype), not the logits. Nothing else may read those logits as
/// logits afterwards: an autograd framework that saved them for another op must not use this.
pub(crate) fn backward_device_in_place(
    fwd: &DeviceForward,
    logits: DeviceLogitsMut,
    targets: &CudaSlice<i32>,
    cfg: &VppoConfig,
) -> Result<()> {
    fwd.check_logits_dtype(logits.dtype())?;
    let addr = logits.addr(&fwd.gpu);
    launch_backward(
        fwd,
        addr,
        logits.len(),
        logits.residence(Tensor::Logits),
        targets,
        &logits,
        cfg,
    )?;
    fwd.gpu.synchronize()
}

// -------------------------------------------------------------------------------------------------
// Stage-level launches, for the benchmarks
// -------------------------------------------------------------------------------------------------

/// A validated GPU-resident batch whose passes can be queued one at a time, for the benchmarks
/// (benches/vppo.rs): pass 1 alone, pass 2 (select + loss) alone, pass 3 (the backward) alone.
///
/// [`DeviceStages::new`] runs [`forward_device`] once, which validates the batch (the O(N + B)
/// tensors on the host, the logits rows in pass 1) and leaves the per-token workspace on the GPU; every
/// method after that only queues the pass's kernels on the GPU's stream, with no copy and no wait, so
/// that CUDA events around it ([`Gpu::time_ms`]) time the kernels alone. Re-running a pass rewrites the
/// same workspace with the same values. Not part of the supported API.
#[doc(hidden)]
pub struct DeviceStages<'a> {
    batch: DeviceBatch<'a>,
    fwd: DeviceForward,
    cfg: VppoConfig,
}

impl<'a> DeviceStages<'a> {
    /// Validates `batch` and runs the whole forward once ([`forward_device`]).
    pub fn new(gpu: &Arc<Gpu>, batch: &DeviceBatch<'a>, cfg: &VppoConfig) -> Result<Self> {
        let fwd = forward_device(gpu, batch, cfg)?;
        Ok(DeviceStages {
            batch: *batch,
            fwd,
            cfg: cfg.clone(),
        })
    }

    /// The forward the constructor ran (its outputs, and the state the backward reads).
    pub fn forward(&self) -> &DeviceForward {
        &self.fwd
    }

    fn parts(&self) -> Option<(Launcher, Dims, &Workspace)> {
        let ws = self.fwd.ws.as_ref()?;
        let dims = Dims {
            n: ws.n,
            b: ws.b,
            vocab: self.fwd.vocab,
            dtype: self.fwd.dtype,
        };
        Some((Launcher::Cuda(self.fwd.gpu.clone()), dims, ws))
    }

    /// Orders the GPU's stream after work queued on the batch's own streams (as [`forward_device`]).
    fn join_batch(&self) -> Result<()> {
        join_caller_streams(&self.fwd.gpu, &self.batch.residences())
    }

    /// Queues pass 1 (`vppo_perception_*`) over the batch. Nothing to do when N = 0.
    pub fn perception(&self) -> Result<()> {
        let Some((l, dims, ws)) = self.parts() else {
            return Ok(());
        };
        self.join_batch()?;
        let inputs = Inputs::device(&self.fwd.gpu, &self.batch);
        run_perception(
            &l,
            perception_kernel(dims.dtype),
            dims,
            &self.cfg,
            &inputs,
            ws,
        )
    }

    /// Queues pass 2 (`vppo_select`, then `vppo_loss`) on the scores pass 1 left in the workspace.
    pub fn select_loss(&self) -> Result<()> {
        let Some((l, dims, ws)) = self.parts() else {
            return Ok(());
        };
        self.join_batch()?;
        let inputs = Inputs::device(&self.fwd.gpu, &self.batch);
        run_select_loss(&l, dims, &self.cfg, &inputs, ws)
    }

    /// Queues pass 3: dloss/dlogits of the batch's logits into `grad` ([N, V], f32 or the logits
    /// dtype).
    pub fn backward(&self, grad: DeviceLogitsMut) -> Result<()> {
        launch_backward(
            &self.fwd,
            self.batch.logits.addr(&self.fwd.gpu),
            self.batch.logits.len(),
            self.batch.logits.residence(Tensor::Logits),
            self.batch.targets,
            &grad,
            &self.cfg,
        )
    }

    /// Queues pass 3 in place over `logits`, a buffer of the batch's shape and dtype that the caller
    /// filled with a copy of the batch's logits (the values are the caller's business: the forward's
    /// lse is used as is). Afterwards `logits` holds the gradient.
    pub fn backward_in_place(&self, logits: DeviceLogitsMut) -> Result<()> {
        self.fwd.check_logits_dtype(logits.dtype())?;
        let addr = logits.addr(&self.fwd.gpu);
        launch_backward(
            &self.fwd,
            addr,
            logits.len(),
            logits.residence(Tensor::Logits),
            self.batch.targets,
            &logits,
            &self.cfg,
        )
    }
}
