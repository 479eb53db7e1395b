//! The public entry point: a `Vppo` bound to a configuration and an executor.

use half::{bf16, f16};

use crate::batch::{Batch, Dtype};
use crate::config::VppoConfig;
use crate::error::{Result, Tensor, VppoError};
use crate::output::VppoOutput;

/// Order in which the SIMT executor runs the lanes of a block (see kernels/simt/).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaneOrder {
    /// Thread 0 first.
    Forward,
    /// The last thread first: code that is right only by luck of scheduling fails in one order.
    Reverse,
}

/// Where the loss is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU reference (the oracle: plain loops, f64).
    Reference,
    /// The CUDA kernels, run on the CPU by the SIMT executor.
    Simt(LaneOrder),
    /// The CUDA kernels on GPU `ordinal`.
    Cuda(usize),
}

/// A caller's buffer for dloss/dlogits [N, V], in f32 or in the logits dtype.
#[derive(Debug)]
pub enum GradMut<'a> {
    /// f32 gradient.
    F32(&'a mut [f32]),
    /// f16 gradient.
    F16(&'a mut [f16]),
    /// bf16 gradient.
    Bf16(&'a mut [bf16]),
}

impl GradMut<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GradMut::F32(g) => g.len(),
            GradMut::F16(g) => g.len(),
            GradMut::Bf16(g) => g.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            GradMut::F32(_) => Dtype::F32,
            GradMut::F16(_) => Dtype::F16,
            GradMut::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Checks the buffer holds N * V elements and is f32 or the logits dtype.
    pub(crate) fn check(&self, batch: &Batch) -> Result<()> {
        let nv = batch.n_tokens() * batch.vocab;
        if self.len() != nv {
            return Err(VppoError::Shape {
                tensor: Tensor::GradLogits,
                detail: format!("has {} elements, expected N * V = {nv}", self.len()),
            });
        }
        if self.dtype() != Dtype::F32 && self.dtype() != batch.logits.dtype() {
            return Err(VppoError::Shape {
                tensor: Tensor::GradLogits,
                detail: format!(
                    "dtype {} is neither f32 nor the logits dtype {}",
                    self.dtype().name(),
                    batch.logits.dtype().name()
                ),
            });
        }
        Ok(())
    }
}

/// The VPPO loss bound to a validated configuration and an executor.
///
/// Every call validates the batch (shapes, cu_seqlens, targets, finite old_logp and advantages, and
/// B % G where group-scope shaping needs G) before dispatching to the executor, for every device; the
/// O(N V) checks of the logits rows are made by the executor's first pass before anything is computed.
/// A batch with N = 0 is not an error: the loss is 0, the per-token outputs are empty and there is no
/// gradient (it is answered on the CPU for every device).
#[derive(Debug, Clone, PartialEq)]
pub struct Vppo {
    config: VppoConfig,
    device: Device,
}

impl Vppo {
    /// Checks `config` ([`VppoConfig::validate`]) and binds it to `device`.
    pub fn new(config: VppoConfig, device: Device) -> Result<Vppo> {
        config.validate()?;
        Ok(Vppo { config, device })
    }

    /// The configuration.
    pub fn config(&self) -> &VppoConfig {
        &self.config
    }

    /// The executor.
    pub fn device(&self) -> Device {
        self.device
    }

    fn validate(&self, batch: &Batch) -> Result<()> {
        batch.validate_small(
            self.config.group_size,
            crate::reference::needs_groups(&self.config),
        )
    }

    /// The loss and every output of SPEC section 8 except dloss/dlogits.
    pub fn forward(&self, batch: &Batch) -> Result<VppoOutput> {
        self.validate(batch)?;
        match self.device {
            Device::Reference => crate::reference::forward(batch, &self.config),
            _ if batch.n_tokens() == 0 => crate::reference::forward(batch, &self.config),
            Device::Simt(_) | Device::Cuda(_) => {
                crate::kernels::forward(batch, &self.config, self.device)
            }
        }
    }

    /// dloss/dlogits into the caller's buffer `grad` ([N, V], f32 or the logits dtype), given `out`,
    /// the output of [`Vppo::forward`] on the same batch.
    pub fn backward_into(&self, batch: &Batch, out: &VppoOutput, grad: GradMut) -> Result<()> {
        self.validate(batch)?;
        grad.check(batch)?;
        crate::reference::check_output(batch, out)?;
        if batch.n_tokens() == 0 {
            return Ok(());
        }
        match self.device {
            Device::Reference => crate::reference::backward_into(batch, &self.config, out, grad),
            Device::Simt(_) | Device::Cuda(_) => {
                crate::kernels::backward_into(batch, &self.config, out, grad, self.device)
            }
        }
    }

    /// The forward outputs and dloss/dlogits as a new f32 [N, V] vector.
    pub fn loss_and_grad(&self, batch: &Batch) -> Result<(VppoOutput, Vec<f32>)> {
        let out = self.forward(batch)?;
        let mut grad = vec![0.0f32; batch.n_tokens() * batch.vocab];
        self.backward_into(batch, &out, GradMut::F32(&mut grad))?;
        Ok((out, grad))
    }
}
