//! The trainer's own error: what went wrong in a run, named as the trainer knows it (a parameter,
//! a checkpoint field, a file, an option), with the loss's error kept whole as its source.

use std::path::PathBuf;

use crate::error::VppoError;

/// Everything that can stop a training run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// A training option outside its range.
    #[error("config: {field} = {value} is out of range: {expected}")]
    Config {
        /// The option, as the CLI names it.
        field: &'static str,
        /// The value given.
        value: String,
        /// The valid range.
        expected: &'static str,
    },
    /// The loss refused the batch or failed on its device (its own error, unchanged).
    #[error(transparent)]
    Loss(#[from] VppoError),
    /// A parameter of the policy became NaN or infinite (the run diverged). Checked before each
    /// rollout, so it is reported as itself and not as the non-finite log-probs it would cause.
    #[error(
        "policy parameter {index} is not finite ({value}) after step {step}: the run diverged"
    )]
    NonFiniteParameter {
        /// The parameter's index in the flat parameter vector.
        index: usize,
        /// Its value.
        value: f32,
        /// Steps done.
        step: usize,
    },
    /// The gradient of a parameter is NaN or infinite (backpropagated from a finite dloss/dlogits).
    #[error("the gradient of policy parameter {index} is not finite ({value}) at step {step}")]
    NonFiniteGradient {
        /// The parameter's index.
        index: usize,
        /// The gradient value.
        value: f32,
        /// The step being taken.
        step: usize,
    },
    /// A checkpoint that cannot be read back or does not belong to this run.
    #[error("checkpoint {}: {detail}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Another run holds the output folder.
    #[error(
        "{} is in use by another vppo train (process {pid}, lock file {}); wait for it, choose \
         another --out, or remove the lock file if that process is gone",
        dir.display(), lock.display()
    )]
    Busy {
        /// The output folder.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The process holding it, as written in the lock file.
        pid: String,
    },
    /// A file could not be read, written or drawn.
    #[error("{}: {detail}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        detail: String,
    },
}

/// The trainer's result type.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// An I/O error of `path`, as a closure for `map_err`.
pub(crate) fn io_err<E: std::fmt::Display>(
    path: &std::path::Path,
) -> impl Fn(E) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}
