//! A packed batch (SPEC section 1): borrowed host tensors with their dtype, and the shape checks that
//! run before any computation.

use crate::config::VppoConfig;
use crate::error::{Location, Result, Tensor, VppoError};
use crate::output::VppoOutput;
use crate::tensor::GradMut;
pub use crate::tensor::{Dtype, Logits};

/// A packed batch of B responses with N tokens in all over a vocabulary of V (SPEC section 1).
///
/// Response b owns tokens `cu_seqlens[b] .. cu_seqlens[b+1]`. Nothing is copied: the batch borrows.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// [N, V] logits given the real image.
    pub logits: Logits<'a>,
    /// [N, V] logits given the masked image; same dtype as `logits`.
    pub logits_masked: Logits<'a>,
    /// [N] sampled token ids.
    pub targets: &'a [i32],
    /// [N] log-prob of each target under the rollout (old) policy.
    pub old_logp: &'a [f32],
    /// [B] one advantage per response.
    pub advantages: &'a [f32],
    /// [B+1] response boundaries.
    pub cu_seqlens: &'a [i32],
    /// V, the vocabulary size (the row length of the logits).
    pub vocab: usize,
}

impl<'a> Batch<'a> {
    /// N, the number of response tokens.
    pub fn n_tokens(&self) -> usize {
        self.targets.len()
    }

    /// B, the number of responses.
    pub fn n_responses(&self) -> usize {
        self.advantages.len()
    }

    /// The token range of response `b` (valid after `validate_shapes`).
    pub fn response(&self, b: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[b] as usize..self.cu_seqlens[b + 1] as usize
    }

    /// N * V, the element count of each logits tensor; an error naming `logits` when it overflows.
    pub fn n_elements(&self) -> Result<usize> {
        elements(self.n_tokens(), self.vocab)
    }

    /// Checks `config` ([`VppoConfig::validate`]) and everything about the batch that is O(N + B)
    /// for it ([`Batch::validate_small`]), and returns the batch as a [`ValidBatch`]: the only way
    /// to make one.
    pub fn validate<'c>(&self, config: &'c VppoConfig) -> Result<ValidBatch<'c>>
    where
        'a: 'c,
    {
        config.validate()?;
        self.validate_small(config.group_size, config.needs_groups())?;
        Ok(ValidBatch {
            batch: *self,
            config,
        })
    }

    /// Checks everything about the batch that is O(N + B): lengths and dtypes agree, cu_seqlens is
    /// well formed, B is a multiple of `group_size` when `need_groups`, targets lie in [0, V), and
    /// old_logp and advantages are finite. The O(N V) checks of the logits rows are done by the pass
    /// that reads them (the reference or the perception kernel).
    pub fn validate_small(&self, group_size: usize, need_groups: bool) -> Result<()> {
        SmallTensors {
            logits: (self.logits.dtype(), self.logits.len()),
            logits_masked: (self.logits_masked.dtype(), self.logits_masked.len()),
            targets: self.targets,
            old_logp: self.old_logp,
            advantages: self.advantages,
            cu_seqlens: self.cu_seqlens,
            vocab: self.vocab,
        }
        .validate(group_size, need_groups)
    }
}

/// A [`Batch`] together with the [`VppoConfig`] it was checked against: [`Batch::validate`] is the
/// only constructor. Code that launches kernels takes one, so the lengths, boundaries and target ids
/// every kernel indexes with are known to be in range for that config (B a whole number of groups
/// where the config's shaping reads groups). The O(N V) checks of the logits rows are still made by
/// the first pass that reads them.
#[derive(Debug, Clone, Copy)]
pub struct ValidBatch<'a> {
    batch: Batch<'a>,
    config: &'a VppoConfig,
}

impl<'a> ValidBatch<'a> {
    /// The batch.
    pub fn batch(&self) -> &Batch<'a> {
        &self.batch
    }

    /// The configuration the batch was checked against.
    pub fn config(&self) -> &'a VppoConfig {
        self.config
    }
}

/// N * V, or an error naming `logits` when the product overflows.
pub fn elements(n: usize, vocab: usize) -> Result<usize> {
    n.checked_mul(vocab).ok_or_else(|| VppoError::Shape {
        tensor: Tensor::Logits,
        detail: format!("N * V = {n} * {vocab} overflows"),
    })
}

/// Checks that `tensor` has `len` = N * V elements (the product checked); returns N * V.
pub fn check_elements(tensor: Tensor, len: usize, n: usize, vocab: usize) -> Result<usize> {
    let nv = elements(n, vocab)?;
    if len != nv {
        return Err(VppoError::Shape {
            tensor,
            detail: format!("has {len} elements, expected N * V = {n} * {vocab} = {nv}"),
        });
    }
    Ok(nv)
}

/// Checks that every target id lies in [0, V).
pub fn check_targets(targets: &[i32], vocab: usize) -> Result<()> {
    match targets
        .iter()
        .enumerate()
        .find(|(_, &y)| y < 0 || y as usize >= vocab)
    {
        Some((row, &target)) => Err(VppoError::TargetOutOfRange { row, target, vocab }),
        None => Ok(()),
    }
}

/// The checks of an in-place backward over `logits_len` = N * V logits, N = `targets.len()`: the
/// product, the targets' range, and what the backward reads from `out` (N finite lse and dlogp).
pub fn check_in_place(
    logits_len: usize,
    vocab: usize,
    targets: &[i32],
    out: &VppoOutput,
) -> Result<()> {
    check_elements(Tensor::Logits, logits_len, targets.len(), vocab)?;
    check_targets(targets, vocab)?;
    out.check_for_backward(targets.len(), None)
}

/// The O(N + B) part of a batch, with only the dtype and length of the logits: what is checked
/// before any pass, for host batches and for GPU-resident ones (whose small tensors are copied back
/// for the check).
#[derive(Debug, Clone, Copy)]
pub struct SmallTensors<'a> {
    /// dtype and element count of `logits`.
    pub logits: (Dtype, usize),
    /// dtype and element count of `logits_masked`.
    pub logits_masked: (Dtype, usize),
    /// [N] sampled token ids.
    pub targets: &'a [i32],
    /// [N] old log-probs.
    pub old_logp: &'a [f32],
    /// [B] advantages.
    pub advantages: &'a [f32],
    /// [B+1] response boundaries.
    pub cu_seqlens: &'a [i32],
    /// V.
    pub vocab: usize,
}

impl SmallTensors<'_> {
    /// See [`Batch::validate_small`].
    pub fn validate(&self, group_size: usize, need_groups: bool) -> Result<()> {
        let n = self.targets.len();
        let b = self.advantages.len();
        let v = self.vocab;
        if self.logits.0 != self.logits_masked.0 {
            return Err(VppoError::Shape {
                tensor: Tensor::LogitsMasked,
                detail: format!(
                    "dtype {} differs from logits dtype {}",
                    self.logits_masked.0.name(),
                    self.logits.0.name()
                ),
            });
        }
        elements(n, v)?;
        if n > 0 && v == 0 {
            return Err(VppoError::Shape {
                tensor: Tensor::Logits,
                detail: "vocabulary size V is 0".into(),
            });
        }
        check_elements(Tensor::Logits, self.logits.1, n, v)?;
        check_elements(Tensor::LogitsMasked, self.logits_masked.1, n, v)?;
        if self.old_logp.len() != n {
            return Err(VppoError::Shape {
                tensor: Tensor::OldLogp,
                detail: format!(
                    "has {} elements, expected N = {n} (the length of targets)",
                    self.old_logp.len()
                ),
            });
        }
        if self.cu_seqlens.len() != b + 1 {
            return Err(VppoError::Shape {
                tensor: Tensor::CuSeqlens,
                detail: format!(
                    "has {} elements, expected B + 1 = {} (B = {b} advantages)",
                    self.cu_seqlens.len(),
                    b + 1
                ),
            });
        }
        if n > i32::MAX as usize {
            return Err(VppoError::Shape {
                tensor: Tensor::Targets,
                detail: format!("N = {n} exceeds the i32 range of cu_seqlens"),
            });
        }
        validate_cu_seqlens(self.cu_seqlens, n)?;
        if need_groups && b % group_size != 0 {
            return Err(VppoError::GroupSize {
                tensor: Tensor::Advantages,
                n_responses: b,
                group_size,
            });
        }
        check_targets(self.targets, v)?;
        for (row, &x) in self.old_logp.iter().enumerate() {
            if !x.is_finite() {
                return Err(VppoError::NonFinite {
                    tensor: Tensor::OldLogp,
                    location: Location::Row(row),
                    value: x as f64,
                });
            }
        }
        for (resp, &x) in self.advantages.iter().enumerate() {
            if !x.is_finite() {
                return Err(VppoError::NonFinite {
                    tensor: Tensor::Advantages,
                    location: Location::Response(resp),
                    value: x as f64,
                });
            }
        }
        Ok(())
    }
}

/// cu_seqlens starts at 0, never decreases, and ends at N.
pub fn validate_cu_seqlens(cu_seqlens: &[i32], n_tokens: usize) -> Result<()> {
    let Some(&first) = cu_seqlens.first() else {
        return Err(VppoError::CuSeqlens {
            detail: "is empty; it needs B + 1 >= 1 entries".into(),
        });
    };
    if first != 0 {
        return Err(VppoError::CuSeqlens {
            detail: format!("starts at {first}, expected 0"),
        });
    }
    for (b, w) in cu_seqlens.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(VppoError::CuSeqlens {
                detail: format!("decreases at response {b}: {} then {}", w[0], w[1]),
            });
        }
    }
    let last = *cu_seqlens.last().unwrap_or(&0);
    if last as i64 != n_tokens as i64 {
        return Err(VppoError::CuSeqlens {
            detail: format!("ends at {last}, expected N = {n_tokens}"),
        });
    }
    Ok(())
}

impl GradMut<'_> {
    /// Checks the buffer holds N * V elements (the product checked) and is f32 or the logits dtype.
    pub(crate) fn check(&self, batch: &Batch) -> Result<()> {
        check_elements(
            Tensor::GradLogits,
            self.len(),
            batch.n_tokens(),
            batch.vocab,
        )?;
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
