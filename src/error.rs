//! The one error type of the crate. Every variant names the tensor and, where there is one, the row
//! (token) or response, so a caller can find the bad value without a debugger (SPEC section 7).

use std::fmt;

/// The input and output tensors of the VPPO loss, by their SPEC names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tensor {
    /// `logits` [N, V]: policy logits given the real image.
    Logits,
    /// `logits_masked` [N, V]: logits given the masked image.
    LogitsMasked,
    /// `targets` [N]: the sampled tokens.
    Targets,
    /// `old_logp` [N]: log-probs under the rollout policy.
    OldLogp,
    /// `advantages` [B]: one advantage per response.
    Advantages,
    /// `cu_seqlens` [B+1]: response boundaries.
    CuSeqlens,
    /// `rewards` [B]: input of the GRPO advantage helper.
    Rewards,
    /// `scores` [N]: per-token scores given to the top-k selection directly.
    Scores,
    /// The caller's buffer for dloss/dlogits [N, V].
    GradLogits,
    /// `lse` [N]: logsumexp of each logits row, an output of the forward that the backward reads.
    Lse,
    /// `dlogp` [N]: dloss/dlogp of each token, an output of the forward that the backward reads.
    Dlogp,
    /// `rows` [N]: the row of `logits` each token reads (SPEC section 10).
    Rows,
    /// `masked_rows` [N]: the row of `logits_masked` each token reads.
    MaskedRows,
    /// `ref_logp` [N]: the reference policy's log-prob of each target, read by the KL penalty
    /// (SPEC section 12).
    RefLogp,
    /// `p_logits` [N, V] (or [R, V] through `p_rows`): the first distribution of the KL op
    /// (`vppo.torch.kl`, SPEC section 13), KL(p || q).
    PLogits,
    /// `q_logits` [N, V] (or [R', V] through `q_rows`): the second distribution of the KL op.
    QLogits,
    /// `p_rows` [N]: the row of `p_logits` each token reads.
    PRows,
    /// `q_rows` [N]: the row of `q_logits` each token reads.
    QRows,
    /// `lse_p` [N]: logsumexp of each `p_logits` row, saved by the KL op's forward.
    LseP,
    /// `lse_q` [N]: logsumexp of each `q_logits` row, saved by the KL op's forward.
    LseQ,
    /// `kl` [N]: the KL op's output, saved for its backward.
    Kl,
    /// `grad_kl` [N]: the upstream gradient of the KL op's output.
    GradKl,
    /// The KL op's gradient with respect to `p_logits`.
    GradP,
    /// The KL op's gradient with respect to `q_logits`.
    GradQ,
    /// `ref_logits` [N, V] (or [R, V] through `rows`): the reference policy's logits, read by the
    /// `full` KL penalty (SPEC section 12).
    RefLogits,
}

impl Tensor {
    /// The SPEC name of the tensor, as it appears in safetensors files.
    pub fn name(self) -> &'static str {
        match self {
            Tensor::Logits => "logits",
            Tensor::LogitsMasked => "logits_masked",
            Tensor::Targets => "targets",
            Tensor::OldLogp => "old_logp",
            Tensor::Advantages => "advantages",
            Tensor::CuSeqlens => "cu_seqlens",
            Tensor::Rewards => "rewards",
            Tensor::Scores => "scores",
            Tensor::GradLogits => "grad_logits",
            Tensor::Lse => "lse",
            Tensor::Dlogp => "dlogp",
            Tensor::Rows => "rows",
            Tensor::MaskedRows => "masked_rows",
            Tensor::RefLogp => "ref_logp",
            Tensor::PLogits => "p_logits",
            Tensor::QLogits => "q_logits",
            Tensor::PRows => "p_rows",
            Tensor::QRows => "q_rows",
            Tensor::LseP => "lse_p",
            Tensor::LseQ => "lse_q",
            Tensor::Kl => "kl",
            Tensor::GradKl => "grad_kl",
            Tensor::GradP => "grad_p",
            Tensor::GradQ => "grad_q",
            Tensor::RefLogits => "ref_logits",
        }
    }
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong, on every executor (CPU reference, SIMT executor, CUDA).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VppoError {
    /// A tensor's length or dtype does not agree with the others.
    #[error("shape mismatch in {tensor}: {detail}")]
    Shape {
        /// The tensor whose shape is wrong.
        tensor: Tensor,
        /// What was expected and what was found.
        detail: String,
    },
    /// A NaN or +inf (or, where only finite values make sense, -inf) in a tensor.
    #[error("{tensor} has a non-finite value ({value}) at {location}")]
    NonFinite {
        /// The tensor holding the value.
        tensor: Tensor,
        /// Row (token), response, or element.
        location: Location,
        /// The offending value.
        value: f64,
    },
    /// A logits row in which every entry is -inf: no distribution.
    #[error("{tensor} row {row} is all -inf")]
    AllNegInf {
        /// `logits` or `logits_masked`.
        tensor: Tensor,
        /// The token row.
        row: usize,
    },
    /// `logits[t, targets[t]] = -inf`: the sampled token cannot have probability 0.
    #[error("logits row {row}: the target token {target} has logit -inf (probability 0)")]
    TargetNegInf {
        /// The token row.
        row: usize,
        /// The target token id.
        target: i32,
    },
    /// KL(p || q) is +inf: in this row, `q` (the tensor named) is -inf at a column where `p` has a
    /// probability above 0. The KL op (SPEC section 13) reports it rather than return an inf.
    #[error(
        "KL(p || q) is +inf at row {row}: {tensor} is -inf at column {column}, where p has \
         probability > 0"
    )]
    KlInfinite {
        /// The tensor at -inf (`q_logits`, or `ref_logits` for the full KL penalty).
        tensor: Tensor,
        /// The token row.
        row: usize,
        /// The first such column.
        column: usize,
    },
    /// A row index (`rows`, `masked_rows`) out of range or out of order.
    #[error("{tensor} position {position}: {detail}")]
    RowIndex {
        /// `rows` or `masked_rows`.
        tensor: Tensor,
        /// The token position in the index.
        position: usize,
        /// What is wrong.
        detail: String,
    },
    /// A target token id outside [0, V).
    #[error("targets row {row}: token id {target} is outside [0, {vocab})")]
    TargetOutOfRange {
        /// The token row.
        row: usize,
        /// The bad token id.
        target: i32,
        /// The vocabulary size V.
        vocab: usize,
    },
    /// `cu_seqlens` is malformed.
    #[error("cu_seqlens: {detail}")]
    CuSeqlens {
        /// What is wrong, naming the response.
        detail: String,
    },
    /// The number of responses is not a multiple of the group size where a group is needed.
    #[error("{tensor}: {n_responses} responses are not a whole number of groups of {group_size}")]
    GroupSize {
        /// The tensor whose length must be a multiple of G.
        tensor: Tensor,
        /// B.
        n_responses: usize,
        /// G.
        group_size: usize,
    },
    /// An optional tensor that the configuration needs is not in the batch.
    #[error("{tensor} is missing: {needed_by}")]
    MissingTensor {
        /// The tensor the batch lacks.
        tensor: Tensor,
        /// Which setting needs it, and what it holds.
        needed_by: String,
    },
    /// A configuration value outside its range.
    #[error("config: {field} = {value} is out of range: {expected}")]
    Config {
        /// The config field (as the CLI option names it).
        field: &'static str,
        /// The value given.
        value: String,
        /// The valid range.
        expected: &'static str,
    },
    /// A finite logit divided by the temperature does not fit in f32: the temperature is too small
    /// for these logits. A config error, found on the data (the row names where).
    #[error(
        "config: temperature = {temperature:e} is too small for {tensor} row {row}: the logit {value} \
         divided by it overflows f32 (|logit| / temperature must stay below 3.4e38)"
    )]
    TemperatureOverflow {
        /// `logits` or `logits_masked`.
        tensor: Tensor,
        /// The token row.
        row: usize,
        /// The logit.
        value: f64,
        /// The temperature.
        temperature: f64,
    },
    /// Finite logits of one row spread so widely that the kernels' f32 sums overflow: the sum over
    /// the row of e^(a_v - m_a) (b_v - m_b) is bounded by V times the spread of the row (after
    /// dividing by the temperature), so a spread from about 3.4e38 / V can overflow. The f64
    /// reference computes such rows.
    #[error(
        "{tensor} row {row}: finite logits spread so widely (after dividing by the temperature) \
         that the kernels' f32 sums overflow; the f64 reference (Device::Reference, --device cpu) \
         computes this row"
    )]
    RowOverflow {
        /// `logits` or `logits_masked`: the tensor whose row spans the wider range.
        tensor: Tensor,
        /// The token row.
        row: usize,
    },
    /// A result computed from a valid batch and config is not finite (or not finite in f32, the
    /// dtype of the outputs): it overflowed. Nothing is written.
    #[error(
        "overflow: {what} is {value:e}{} (valid inputs, but the result does not fit in f32; a tiny \
         token-normalizer or temperature, or a huge logp-penalty or advantage, does this)",
        at(location)
    )]
    Overflow {
        /// The output that overflowed (`loss`, `dlogp`, `grad_logits`, ...).
        what: &'static str,
        /// Its row or response, for a per-token or per-response output.
        location: Option<Location>,
        /// The value computed.
        value: f64,
    },
    /// Data parallel (SPEC section 11): another rank of the group had an error (bad input), so this
    /// rank's forward is an error too, agreed on before any collective that could wait on it.
    #[error(
        "data parallel: {failed} rank(s) of the group reported an error (this is rank {rank}, whose \
         own input was valid); see their errors"
    )]
    GroupFailed {
        /// This rank.
        rank: usize,
        /// How many ranks failed.
        failed: usize,
    },
    /// Data parallel: the ranks of the group were given different loss configs.
    #[error("data parallel: the ranks of the group have different loss configs (this is rank {rank}); every rank must use the same")]
    GroupConfig {
        /// This rank.
        rank: usize,
    },
    /// The GPU was asked for, but the kernels were not compiled (no nvcc at build time).
    #[error("kernels not built: this build of vppo found no nvcc; install the CUDA toolkit or the nvidia-cuda-nvcc wheels and rebuild (see README)")]
    KernelsNotBuilt,
    /// The GPU was asked for, but there is no CUDA driver library on this machine.
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoCudaDriver,
    /// An NCCL group was asked for, but the NCCL library cannot be loaded (see README, "Beyond one
    /// GPU": cudarc opens `libnccl.so`).
    #[error("no NCCL: {0}")]
    NoNccl(String),
    /// An NCCL call failed: what was being done, NCCL's result code and its last error text.
    #[error("NCCL error: {0}")]
    Nccl(String),
    /// The CUDA driver is present but reports no usable GPU.
    #[error("no GPU: {0}")]
    NoGpu(String),
    /// An error from the CUDA driver during a launch or a copy, or one found on the driver's behalf
    /// before a call (a launch shape over the hardware limits, a byte range that does not fit a buffer).
    /// Its source ([`std::error::Error::source`]) is the driver's own error, where there is one.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The SIMT executor stopped a kernel (deadlock, divergent barrier, bad warp intrinsic use).
    #[error("kernel error: {0}")]
    Kernel(String),
    /// A file could not be read or written, or is not a valid safetensors file.
    #[error("{0}")]
    Io(String),
}

impl VppoError {
    /// A [`VppoError::Cuda`] for a check made on the driver's behalf ([`CudaError::new`]).
    pub(crate) fn cuda(what: impl Into<String>) -> VppoError {
        VppoError::Cuda(CudaError::new(what))
    }
}

/// What went wrong on the way to the CUDA driver: what was being done, and the driver's error.
///
/// Displays as `CUDA error: <what>: <CUresult name> (<driver's text>)<hint>`, or `CUDA error: <what>`
/// for a check made before any driver call.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaError {
    what: String,
    driver: Option<cudarc::driver::DriverError>,
    hint: String,
}

impl CudaError {
    /// A failed driver call: `what` says what was being done ("launching vppo_select").
    pub fn driver(what: impl Into<String>, e: cudarc::driver::DriverError) -> CudaError {
        CudaError {
            what: what.into(),
            driver: Some(e),
            hint: String::new(),
        }
    }

    /// A check made on the driver's behalf, with no driver error behind it.
    pub fn new(what: impl Into<String>) -> CudaError {
        CudaError {
            what: what.into(),
            driver: None,
            hint: String::new(),
        }
    }

    /// The same error with `hint` (what to do about it) at the end of its message.
    pub fn with_hint(mut self, hint: impl Into<String>) -> CudaError {
        self.hint = hint.into();
        self
    }

    /// What was being done.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The driver's result code, when a driver call failed.
    pub fn code(&self) -> Option<cudarc::driver::sys::CUresult> {
        self.driver.map(|e| e.0)
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CUDA error: {}", self.what)?;
        if let Some(e) = &self.driver {
            match (e.error_name(), e.error_string()) {
                (Ok(name), Ok(text)) => write!(
                    f,
                    ": {} ({})",
                    name.to_string_lossy(),
                    text.to_string_lossy()
                )?,
                _ => write!(f, ": {:?}", e.0)?,
            }
        }
        f.write_str(&self.hint)
    }
}

impl std::error::Error for CudaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.driver
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Where in a tensor a bad value sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A token row of an [N] or [N, V] tensor.
    Row(usize),
    /// A response of a [B] tensor.
    Response(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Row(r) => write!(f, "row {r}"),
            Location::Response(b) => write!(f, "response {b}"),
        }
    }
}

fn at(location: &Option<Location>) -> String {
    location.map(|l| format!(" at {l}")).unwrap_or_default()
}

/// The crate's result type.
pub type Result<T, E = VppoError> = std::result::Result<T, E>;
