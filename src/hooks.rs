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
