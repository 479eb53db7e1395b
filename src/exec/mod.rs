//! The kernel pipeline: the one place where kernels are launched, on a GPU through cudarc or on the CPU
//! through the SIMT executor, with the same kernel, launch configuration and parameter struct.
//!
//! Pass 1 `vppo_perception_*` (kernels/perception.cu) -> pass 2a `vppo_select` and 2b
//! `vppo_loss_prep`, `vppo_loss`, `vppo_loss_finish` (kernels/select_loss.cu) -> pass 3
//! `vppo_backward_*` (kernels/backward.cu). Extra memory is O(N + B):
//! per-token and per-response vectors, never an [N, V] temporary.
//!
//! One file per kernel source, named after it: perception.rs (kernels/perception.cu), select_loss.rs
//! (kernels/select_loss.cu), backward.rs (kernels/backward.cu), kl_div.rs (the KL op: the perception
//! kernel in partial mode and kernels/kl_div.cu); launcher.rs runs a kernel and owns
//! its memory, workspace.rs lays out a forward's per-token buffers, resident.rs takes the caller's
//! GPU-resident tensors. Every entry point takes a [`ValidBatch`] or checks what it is given first.
//!
//! Everything here works on raw addresses (`u64`): device pointers on a GPU, host pointers on the SIMT
//! executor. The owners of the memory (the caller's slices, or the [`Buffer`]s made here) outlive every
//! launch that uses them; that is the invariant every `unsafe` block below relies on.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use crate::batch::{check_elements, Batch, ValidBatch};
use crate::config::{
    Aggregation, KlPenalty, LossType, MaskBy, Perception, Shaping, TasScope, VppoConfig,
};
use crate::cuda::Gpu;
use crate::device::{Device, LaneOrder};
use crate::error::{Location, Result, Tensor, VppoError};
use crate::output::{ResponseOutputs, Stats, TokenOutputs, VppoOutput};
use crate::params::{
    status_report, VppoBackwardParams, VppoErrorCode, VppoKlDivBackwardParams, VppoLossParams,
    VppoLossResponse, VppoLossTotals, VppoPerceptionParams, VppoSelectParams,
    VPPO_MAX_ROW_BLOCKS_GPU, VPPO_MAX_ROW_BLOCKS_SIMT, VPPO_PARTIAL_STATE_FLOATS,
    VPPO_STATUS_CLEAR,
};
use crate::simt::{self, SimtEntry, SimtLaunch};
use crate::tensor::{on_dtype, DeviceLogits, DeviceLogitsMut, Dtype, Elem, GradMut, Logits};

mod backward;
mod full_kl;
mod kl_div;
mod launcher;
mod perception;
mod resident;
mod select_loss;
mod stages;
mod workspace;

pub(crate) use backward::backward_saved_full;
use backward::*;
pub(crate) use backward::{backward_in_place, backward_into, backward_saved, backward_shard};
pub use backward::{FullKlSaved, SavedForward};
pub(crate) use kl_div::{
    kl_div_backward, kl_div_backward_device, kl_div_forward, kl_div_forward_device,
};
pub use kl_div::{DeviceKlBatch, DeviceKlSaved, KlSaved};
use launcher::*;
use perception::*;
pub(crate) use perception::{mutant_perception, perception, perception_partial};
pub(crate) use resident::{
    backward_device, backward_device_in_place, backward_saved_device, device_small_tensors,
    device_token_row, forward_device, forward_device_then, perception_device,
    perception_partial_device, SmallHost, ThenFn,
};
pub use resident::{DeviceBatch, DeviceForward, DeviceFullKlSaved, DeviceSaved, DeviceStages};
pub(crate) use select_loss::select;
use select_loss::*;
pub use stages::HostStages;
use workspace::*;

// -------------------------------------------------------------------------------------------------
// Kernel table
// -------------------------------------------------------------------------------------------------

/// A kernel whose one argument is a `P` (a struct of kernels/vppo_params.h): its name in the fatbin
/// and its entry point in the SIMT build. [`Launcher::launch`] takes a `Kernel<P>` and a `&P`, so a
/// launch with another kernel's parameter struct does not compile.
pub(crate) struct Kernel<P> {
    pub name: &'static str,
    pub simt: SimtEntry,
    params: std::marker::PhantomData<fn(&P)>,
}

// Copy and Clone by hand: derived ones would require P: Copy.
impl<P> Clone for Kernel<P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P> Copy for Kernel<P> {}

macro_rules! kernel_table {
    ($($konst:ident: $params:ty => $name:ident / $sym:ident;)*) => {
        extern "C" {
            $(fn $sym(launch: *const SimtLaunch, params: *const c_void, err: *mut c_char, err_len: usize) -> c_int;)*
        }
        $(pub(crate) const $konst: Kernel<$params> = Kernel {
            name: stringify!($name),
            simt: $sym,
            params: std::marker::PhantomData,
        };)*
        /// The name and SIMT entry point of every kernel of the table.
        const ALL_KERNELS: &[(&str, SimtEntry)] = &[$(($konst.name, $konst.simt)),*];
    };
}

kernel_table! {
    PERCEPTION_F32: VppoPerceptionParams => vppo_perception_f32 / vppo_simt_vppo_perception_f32;
    PERCEPTION_F16: VppoPerceptionParams => vppo_perception_f16 / vppo_simt_vppo_perception_f16;
    PERCEPTION_BF16: VppoPerceptionParams => vppo_perception_bf16 / vppo_simt_vppo_perception_bf16;
    SELECT: VppoSelectParams => vppo_select / vppo_simt_vppo_select;
    LOSS_PREP: VppoLossParams => vppo_loss_prep / vppo_simt_vppo_loss_prep;
    LOSS: VppoLossParams => vppo_loss / vppo_simt_vppo_loss;
    LOSS_FINISH: VppoLossParams => vppo_loss_finish / vppo_simt_vppo_loss_finish;
    BACKWARD_F32_F32: VppoBackwardParams => vppo_backward_f32_f32 / vppo_simt_vppo_backward_f32_f32;
    BACKWARD_F16_F32: VppoBackwardParams => vppo_backward_f16_f32 / vppo_simt_vppo_backward_f16_f32;
    BACKWARD_F16_F16: VppoBackwardParams => vppo_backward_f16_f16 / vppo_simt_vppo_backward_f16_f16;
    BACKWARD_BF16_F32: VppoBackwardParams => vppo_backward_bf16_f32 / vppo_simt_vppo_backward_bf16_f32;
    BACKWARD_BF16_BF16: VppoBackwardParams => vppo_backward_bf16_bf16 / vppo_simt_vppo_backward_bf16_bf16;
    BACKWARD_FULL_F32_F32: VppoBackwardParams => vppo_backward_full_f32_f32 / vppo_simt_vppo_backward_full_f32_f32;
    BACKWARD_FULL_F16_F32: VppoBackwardParams => vppo_backward_full_f16_f32 / vppo_simt_vppo_backward_full_f16_f32;
    BACKWARD_FULL_F16_F16: VppoBackwardParams => vppo_backward_full_f16_f16 / vppo_simt_vppo_backward_full_f16_f16;
    BACKWARD_FULL_BF16_F32: VppoBackwardParams => vppo_backward_full_bf16_f32 / vppo_simt_vppo_backward_full_bf16_f32;
    BACKWARD_FULL_BF16_BF16: VppoBackwardParams => vppo_backward_full_bf16_bf16 / vppo_simt_vppo_backward_full_bf16_bf16;
    KL_DIV_BACKWARD_F32: VppoKlDivBackwardParams => vppo_kl_div_backward_f32 / vppo_simt_vppo_kl_div_backward_f32;
    KL_DIV_BACKWARD_F16: VppoKlDivBackwardParams => vppo_kl_div_backward_f16 / vppo_simt_vppo_kl_div_backward_f16;
    KL_DIV_BACKWARD_BF16: VppoKlDivBackwardParams => vppo_kl_div_backward_bf16 / vppo_simt_vppo_kl_div_backward_bf16;
    // Built for the SIMT executor only, with VPPO_MUTANT (every exp times 1.001): see `mutant_perception`.
    PERCEPTION_F32_MUTANT: VppoPerceptionParams => vppo_perception_f32_mutant / vppo_simt_vppo_perception_f32_mutant;
    PERCEPTION_F16_MUTANT: VppoPerceptionParams => vppo_perception_f16_mutant / vppo_simt_vppo_perception_f16_mutant;
    PERCEPTION_BF16_MUTANT: VppoPerceptionParams => vppo_perception_bf16_mutant / vppo_simt_vppo_perception_bf16_mutant;
}

/// The SIMT entry point of the kernel called `name` in the fatbins (`vppo_perception_bf16`, ...), for
/// tests that stand in for the CUDA driver (tests/fake_cuda/); None for an unknown name.
pub(crate) fn simt_entry(name: &str) -> Option<SimtEntry> {
    ALL_KERNELS.iter().find(|k| k.0 == name).map(|k| k.1)
}

// Launch configuration of each kernel: the constants of kernels/vppo_params.h, which the kernels'
// __launch_bounds__ and static_asserts on their shared-memory structs use too.
const PERCEPTION_THREADS: u32 = crate::params::VPPO_PERCEPTION_THREADS;
const PERCEPTION_STATE_BYTES: u32 = crate::params::VPPO_PERCEPTION_STATE_BYTES;
const SELECT_THREADS: u32 = crate::params::VPPO_SELECT_THREADS;
const SELECT_SHARED_BYTES: u32 = crate::params::VPPO_SELECT_SHARED_BYTES;
const LOSS_THREADS: u32 = crate::params::VPPO_LOSS_THREADS;
const LOSS_SHARED_BYTES: u32 = crate::params::VPPO_LOSS_SHARED_BYTES;
const LOSS_TILE_THREADS: u32 = crate::params::VPPO_LOSS_TILE_THREADS;
const LOSS_TILE_SHARED_BYTES: u32 = crate::params::VPPO_LOSS_TILE_SHARED_BYTES;
const LOSS_TILE_TOKENS: usize = crate::params::VPPO_LOSS_TILE_TOKENS as usize;
const BACKWARD_THREADS: u32 = crate::params::VPPO_BACKWARD_THREADS;
const KL_DIV_THREADS: u32 = crate::params::VPPO_KL_DIV_THREADS;
/// Blocks of the row kernels loop over rows, so the grid is capped and any N runs (the caps and why
/// they are what they are: kernels/vppo_params.h).
const MAX_ROW_BLOCKS_GPU: usize = VPPO_MAX_ROW_BLOCKS_GPU as usize;
const MAX_ROW_BLOCKS_SIMT: usize = VPPO_MAX_ROW_BLOCKS_SIMT as usize;

/// Marker for the parameter structs of kernels/vppo_params.h, the `P` of a [`Kernel<P>`].
pub(crate) trait KernelParams: cudarc::driver::DeviceRepr {}
impl KernelParams for VppoPerceptionParams {}
impl KernelParams for VppoSelectParams {}
impl KernelParams for VppoLossParams {}
impl KernelParams for VppoBackwardParams {}
impl KernelParams for VppoKlDivBackwardParams {}

// -------------------------------------------------------------------------------------------------
// The whole forward: passes 1 and 2 (perception.rs, select_loss.rs)
// -------------------------------------------------------------------------------------------------

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
    /// The row indices of SPEC section 10 (address 0: none, token t reads row t).
    rows: Input<'a>,
    masked_rows: Input<'a>,
    /// The KL penalty's reference log-probs (address 0: none given, or none needed).
    ref_logp: Input<'a>,
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
            rows: at(batch.rows.map_or(0, |r| gpu.device_ptr_u64(r))),
            masked_rows: at(batch.masked_index().map_or(0, |r| gpu.device_ptr_u64(r))),
            ref_logp: at(batch.ref_logp.map_or(0, |r| gpu.device_ptr_u64(r))),
        }
    }

    /// The batch's tensors where the kernels of `l` read them; `ref_logp` only `with_ref_logp` (the
    /// loss pass of a config with a KL penalty), else address 0.
    fn new(l: &Launcher, batch: &Batch<'a>, with_ref_logp: bool) -> Result<Inputs<'a>> {
        Ok(Inputs {
            logits: Input::logits(l, &batch.logits)?,
            logits_masked: Input::logits(l, &batch.logits_masked)?,
            targets: Input::new(l, batch.targets)?,
            old_logp: Input::new(l, batch.old_logp)?,
            advantages: Input::new(l, batch.advantages)?,
            cu_seqlens: Input::new(l, batch.cu_seqlens)?,
            rows: Input::optional(l, batch.rows)?,
            masked_rows: Input::optional(l, batch.masked_index())?,
            ref_logp: Input::optional(l, batch.ref_logp.filter(|_| with_ref_logp))?,
        })
    }
}

/// The whole forward pass on the kernels, over a batch validated for its config.
pub(crate) fn forward(valid: &ValidBatch, device: Device) -> Result<VppoOutput> {
    forward_then(valid, device, &mut |_| Ok(None))
}

/// The forward of [`forward`], then pass 2 once more under the config `then` derives from its output,
/// if it returns one: data parallel (src/parallel.rs) reduces across ranks what pass 2 normalizes by
/// and reruns only pass 2 (select and loss, O(N + B)); pass 1 and its stream of both logits tensors run
/// once. The second config must differ from the first only in what pass 2 reads (shaping, range and
/// normalizers): pass 2 rereads pass 1's scores from the workspace.
pub(crate) fn forward_then(
    valid: &ValidBatch,
    device: Device,
    then: &mut dyn FnMut(&VppoOutput) -> Result<Option<VppoConfig>>,
) -> Result<VppoOutput> {
    let (batch, cfg) = (valid.batch(), valid.config());
    let l = Launcher::for_device(device)?;
    let (n, b) = (batch.n_tokens(), batch.n_responses());
    if n == 0 {
        let first = empty_output(cfg.token_normalizer.unwrap_or(0.0), b);
        return Ok(match then(&first)? {
            Some(c) => empty_output(c.token_normalizer.unwrap_or(0.0), b),
            None => first,
        });
    }
    let inputs = Inputs::new(&l, batch, cfg.needs_ref_logp())?;
    let ws = Workspace::new(&l, n, b)?;
    let dims = Dims::of(batch);
    let mut first = run_passes(
        &l,
        dims,
        cfg,
        &inputs,
        &ws,
        batch.targets,
        &host_rows(batch),
    )?;
    // kl_penalty = full: the reference launch of pass 1 (exec/full_kl.rs), added on the host
    let full = if cfg.needs_ref_logits() {
        let full = full_kl::full_kl_pass(&l, dims, cfg, &inputs, batch)?;
        full_kl::apply_full_kl(&mut first, &full, batch.cu_seqlens, cfg);
        Some(full)
    } else {
        None
    };
    let Some(second) = then(&first)? else {
        return Ok(first);
    };
    run_select_loss(&l, dims, &second, &inputs, &ws)?;
    let copy = ws.download(&l)?;
    let mut out = output_from(&ws, &copy, second.token_normalizer.unwrap_or(n as f64));
    if let Some(full) = &full {
        full_kl::apply_full_kl(&mut out, full, batch.cu_seqlens, &second);
    }
    Ok(out)
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
        kl_loss: t.kl,
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
