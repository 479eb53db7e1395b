//! vppo: Visually-Perceptive Policy Optimization loss, as fused CUDA kernels with a CPU reference.
//!
//! ```
//! use vppo::{Batch, Device, Logits, Vppo, VppoConfig};
//!
//! // Two responses of 2 and 1 tokens over a vocabulary of 3, f32 logits.
//! let logits = [0.5f32, -1.0, 2.0, 0.0, 0.0, 1.0, 1.5, -0.5, 0.25];
//! let logits_masked = [0.0f32, 0.0, 1.0, 0.5, 0.0, 1.0, 1.5, 0.0, 0.0];
//! let batch = Batch {
//!     logits: Logits::F32(&logits),
//!     logits_masked: Logits::F32(&logits_masked),
//!     targets: &[2, 0, 0],
//!     old_logp: &[-0.3, -1.2, -0.6],
//!     advantages: &[1.0, -1.0],
//!     cu_seqlens: &[0, 2, 3],
//!     vocab: 3,
//!     // token t reads row t (SPEC section 10 lets it read a larger [R, V] tensor), no KL penalty
//!     ..Default::default()
//! };
//! // The official VPPO setting; the paper's text is `VppoConfig::paper(group_size)`.
//! let vppo = Vppo::new(VppoConfig::default(), Device::Reference)?;
//! let out = vppo.forward(&batch)?;
//! assert_eq!(out.responses.k, vec![1, 1]); // ceil(0.4 * 2) and ceil(0.4 * 1)
//! let (out2, grad) = vppo.loss_and_grad(&batch)?;
//! assert_eq!(out.loss, out2.loss);
//! assert_eq!(grad.len(), 3 * 3); // dloss/dlogits, f32 [N, V]
//! # Ok::<(), vppo::VppoError>(())
//! ```
//!
//! The contract, cited across the crate as "SPEC section N", is docs/SPEC.md.
#![warn(missing_docs)]

pub mod api;
pub mod batch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod cuda;
pub mod device;
pub mod error;
mod exec;
pub mod grpo;
#[doc(hidden)]
pub mod hooks;
pub mod io;
pub mod kl_div;
pub mod options;
pub mod output;
pub mod parallel;
pub mod params;
pub mod reference;
pub mod simt;
pub mod tensor;
pub mod train;

pub use api::{Device, GradMut, LaneOrder, Vppo};
pub use batch::{Batch, Dtype, KlBatch, Logits, ValidBatch};
pub use config::{
    Aggregation, KlPenalty, LossType, MaskBy, Perception, Shaping, TasScope, TopFraction,
    VppoConfig,
};
pub use error::{Location, Result, Tensor, VppoError};
pub use exec::{
    DeviceBatch, DeviceForward, DeviceFullKlSaved, DeviceSaved, FullKlSaved, SavedForward,
};
pub use grpo::grpo_advantages;
pub use io::{OwnedBatch, OwnedLogits};
pub use kl_div::{DeviceKlBatch, DeviceKlSaved, KlDiv, KlOutput, KlSaved};
pub use output::{ResponseOutputs, Stats, TokenOutputs, VppoOutput};
pub use parallel::{Collective, NcclGroup, NcclId, ReduceOp, ThreadGroup, VocabShard};
pub use tensor::{ByDtype, DeviceLogits, DeviceLogitsMut};

/// The README's code blocks, compiled and run as doctests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
