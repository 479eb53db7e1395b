//! Hooks for the crate's own tests and benchmarks: single passes of the kernel pipeline, a
//! deliberately wrong kernel build, the SIMT entry points the fake CUDA driver runs, and the stage
//! launches the benchmarks time. Not part of the supported API.
//!
//! Every hook is as safe as the API: each validates what it is given (the config, the batch, the
//! forward output a backward reads) before anything is launched, so no input makes a kernel read or
//! write outside the caller's slices.

use crate::batch::Batch;
use crate::config::VppoConfig;
use crate::error::Result;
use crate::output::{TokenOutputs, VppoOutput};
use crate::simt::SimtEntry;
use crate::{Device, GradMut, LaneOrder};

pub use crate::exec::{DeviceStages, HostStages};

/// The whole forward on `device` (a kernel device), as [`crate::Vppo::forward`] runs it for N > 0.
pub fn forward(batch: &Batch, cfg: &VppoConfig, device: Device) -> Result<VppoOutput> {
    crate::exec::forward(&batch.validate(cfg)?, device)
}

/// Pass 1 alone on `device` (a kernel device): the per-token perception outputs (lse, logp, kl,
/// k3, entropy, score), with mask and dlogp left empty.
pub fn perception(batch: &Batch, cfg: &VppoConfig, device: Device) -> Result<TokenOutputs> {
    crate::exec::perception(&batch.validate(cfg)?, device)
}

/// Pass 1 through a deliberately wrong build of the perception kernel (every exp times 1.001), on
/// the SIMT executor: it shows that the tests' tolerances catch a wrong kernel.
pub fn mutant_perception(
    batch: &Batch,
    cfg: &VppoConfig,
    order: LaneOrder,
) -> Result<TokenOutputs> {
    crate::exec::mutant_perception(&batch.validate(cfg)?, order)
}

/// Pass 2a alone: the top-k mask, k_b and Sbar of the given finite `scores` over `cu_seqlens`.
pub fn select(
    scores: &[f32],
    cu_seqlens: &[i32],
    top_fraction: f64,
    device: Device,
) -> Result<(Vec<u8>, Vec<u32>, Vec<f32>)> {
    crate::exec::select(scores, cu_seqlens, top_fraction, device)
}

/// Pass 3 alone on `device`, from the `out` it is given (which may come from another device's
/// forward): dloss/dlogits into `grad`, of any dtype the kernels have (f32, or the logits dtype).
pub fn backward_into(
    batch: &Batch,
    cfg: &VppoConfig,
    out: &VppoOutput,
    grad: GradMut,
    device: Device,
) -> Result<()> {
    crate::exec::backward_into(&batch.validate(cfg)?, out, grad, device)
}

/// The SIMT entry point of the kernel called `name` in the fatbins (`vppo_perception_bf16`, ...),
/// for the fake CUDA driver of the tests (tests/fake_cuda/); None for an unknown name.
pub fn simt_entry(name: &str) -> Option<SimtEntry> {
    crate::exec::simt_entry(name)
}

/// [`simt_entry`] as the fake CUDA driver's resolver (`vppo_fake_cuda_install`): the kernel named
/// by a NUL-terminated C string; None for a null pointer, a name that is not UTF-8, or an unknown
/// kernel.
///
/// # Safety
/// `name` must be null or point to a NUL-terminated string.
pub unsafe extern "C" fn simt_entry_of_c_name(name: *const std::ffi::c_char) -> Option<SimtEntry> {
    if name.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_str().ok()?;
    simt_entry(name)
}

/// The byte offsets of the pointer fields of each params struct (kernels/vppo_params.h), which the
/// fake driver checks against its live allocations at every launch.
mod pointer_fields {
    use crate::params::{
        VppoBackwardParams, VppoKlDivBackwardParams, VppoLossParams, VppoPerceptionParams,
        VppoSelectParams,
    };
    use std::mem::offset_of;

    type P = VppoPerceptionParams;
    pub static PERCEPTION: [usize; 13] = [
        offset_of!(P, logits),
        offset_of!(P, logits_masked),
        offset_of!(P, targets),
        offset_of!(P, old_logp),
        offset_of!(P, lse),
        offset_of!(P, lse_masked),
        offset_of!(P, logp),
        offset_of!(P, logp_masked),
        offset_of!(P, kl),
        offset_of!(P, k3),
        offset_of!(P, entropy),
        offset_of!(P, score),
        offset_of!(P, status),
    ];
    type S = VppoSelectParams;
    pub static SELECT: [usize; 10] = [
        offset_of!(S, score),
        offset_of!(S, cu_seqlens),
        offset_of!(S, mask),
        offset_of!(S, k),
        offset_of!(S, sbar),
        offset_of!(S, token_response),
        offset_of!(S, logp),
        offset_of!(S, old_logp),
        offset_of!(S, seq_log_ratio),
        offset_of!(S, seq_selected),
    ];
    type L = VppoLossParams;
    pub static LOSS: [usize; 15] = [
        offset_of!(L, logp),
        offset_of!(L, old_logp),
        offset_of!(L, mask),
        offset_of!(L, sbar),
        offset_of!(L, cu_seqlens),
        offset_of!(L, advantages),
        offset_of!(L, alpha),
        offset_of!(L, dlogp),
        offset_of!(L, totals),
        offset_of!(L, token_response),
        offset_of!(L, responses),
        offset_of!(L, partials),
        offset_of!(L, seq_log_ratio),
        offset_of!(L, seq_selected),
        offset_of!(L, ref_logp),
    ];
    type B = VppoBackwardParams;
    pub static BACKWARD: [usize; 9] = [
        offset_of!(B, logits),
        offset_of!(B, lse),
        offset_of!(B, dlogp),
        offset_of!(B, targets),
        offset_of!(B, grad),
        offset_of!(B, ref_logits),
        offset_of!(B, lse_ref),
        offset_of!(B, ref_kl),
        offset_of!(B, dref_kl),
    ];
    type K = VppoKlDivBackwardParams;
    pub static KL_DIV_BACKWARD: [usize; 10] = [
        offset_of!(K, p_logits),
        offset_of!(K, q_logits),
        offset_of!(K, lse_p),
        offset_of!(K, lse_q),
        offset_of!(K, kl),
        offset_of!(K, grad_kl),
        offset_of!(K, grad_p),
        offset_of!(K, grad_q),
        offset_of!(K, p_rows),
        offset_of!(K, q_rows),
    ];

    /// The pointer offsets and the size of the params struct of `kernel`.
    pub fn of(kernel: &str) -> (&'static [usize], usize) {
        use std::mem::size_of;
        if kernel.starts_with("vppo_perception_") {
            (&PERCEPTION, size_of::<P>())
        } else if kernel == "vppo_select" {
            (&SELECT, size_of::<S>())
        } else if kernel.starts_with("vppo_loss") {
            (&LOSS, size_of::<L>())
        } else if kernel.starts_with("vppo_backward_") {
            (&BACKWARD, size_of::<B>())
        } else if kernel.starts_with("vppo_kl_div_backward_") {
            (&KL_DIV_BACKWARD, size_of::<K>())
        } else {
            (&[], 0)
        }
    }
}

/// The pointer fields of the params struct of the kernel named `name` (a NUL-terminated C string),
/// for the fake CUDA driver (`vppo_fake_cuda_install`, tests/fake_cuda/libcuda.c), which checks
/// each against its live allocations at every launch: writes the offsets' address to `out` and the
/// struct's size to `params_bytes`, and returns the count (0 for an unknown kernel or a null pointer).
///
/// # Safety
/// `name` must be null or NUL-terminated; `out` and `params_bytes` null or valid for one write.
pub unsafe extern "C" fn kernel_pointer_fields(
    name: *const std::ffi::c_char,
    out: *mut *const usize,
    params_bytes: *mut usize,
) -> usize {
    if name.is_null() || out.is_null() || params_bytes.is_null() {
        return 0;
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    let name = unsafe { std::ffi::CStr::from_ptr(name) }
        .to_str()
        .unwrap_or("");
    let (fields, size) = pointer_fields::of(name);
    // SAFETY: both are valid for one write (the caller's contract); the slice is a static.
    unsafe {
        *out = fields.as_ptr();
        *params_bytes = size;
    }
    fields.len()
}
