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
