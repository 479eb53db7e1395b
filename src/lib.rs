//! vppo: Visually-Perceptive Policy Optimization loss, as fused CUDA kernels with a CPU reference.
#![warn(missing_docs)]

pub mod batch;
pub mod config;
pub mod cuda;
pub mod error;
pub mod params;

pub use batch::{Batch, Dtype, Logits};
pub use config::{Aggregation, Perception, Shaping, TasScope, TopFraction, VppoConfig};
pub use error::{Location, Result, Tensor, VppoError};
pub mod api;
pub mod output;

pub use api::{Device, GradMut, LaneOrder};
pub use output::{ResponseOutputs, Stats, TokenOutputs, VppoOutput};
