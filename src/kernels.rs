//! The kernel pipeline (SIMT executor and CUDA).
// Replaced by the kernel pipeline (lead).

use crate::api::{Device, GradMut};
use crate::batch::Batch;
use crate::config::VppoConfig;
use crate::error::{Result, VppoError};
use crate::output::VppoOutput;

/// Runs the forward kernels on `device` (not built in this build).
pub fn forward(_batch: &Batch, _cfg: &VppoConfig, _device: Device) -> Result<VppoOutput> {
    Err(VppoError::KernelsNotBuilt)
}

/// Runs the backward kernel on `device` (not built in this build).
pub fn backward_into(
    _batch: &Batch,
    _cfg: &VppoConfig,
    _out: &VppoOutput,
    _grad: GradMut,
    _device: Device,
) -> Result<()> {
    Err(VppoError::KernelsNotBuilt)
}
