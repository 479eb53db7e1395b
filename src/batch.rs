//! A packed batch (SPEC section 1): borrowed host tensors with their dtype, and the shape checks that
//! run before any computation.

use crate::config::VppoConfig;
use crate::error::{Location, Result, Tensor, VppoError};
use crate::output::VppoOutput;
use crate::tensor::GradMut;
pub use crate::tensor::{Dtype, Logits};

mod kl_div;
pub use kl_div::KlBatch;
pub(crate) use kl_div::KlShape;

/// A packed batch of B responses with N tokens in all over a vocabulary of V (SPEC section 1).
///
/// Response b owns tokens `cu_seqlens[b] .. cu_seqlens[b+1]`. Nothing is copied: the batch borrows.
///
/// Rows (SPEC section 10): with `rows`, `logits` is [R, V] (R >= N, e.g. a trainer's whole packed
/// forward, prompt rows included) and token t reads row `rows[t]` (strictly increasing, in [0, R)).
/// With `masked_rows`, `logits_masked` is [R', V] and token t reads row `masked_rows[t]` (any order,
/// in [0, R')). Without `masked_rows`, `logits_masked` is [N, V], or, when `rows` is given and it has
/// as many elements as `logits`, it is read through `rows` too. The gradient has the shape of
/// `logits` ([R, V]); rows that no token reads are zero.
///
/// The optional tensors (`rows`, `masked_rows`, `ref_logp`) default to None: a literal may end with
/// `..Default::default()` ([`Batch::default`] is the empty batch, N = B = 0).
///
/// Speed: a token's rows are read with 16-byte loads only when its two rows start at the same address
/// modulo 16 bytes (the `logits` and `logits_masked` rows in pass 1; the `logits` row and its gradient
/// row in pass 3). A row pair out of that phase is read one element at a time, correctly but with 4
/// (f32) or 8 (bf16, f16) times the load instructions per element, far slower on a GPU: a view that
/// starts a few elements into its storage (`x[..., 1:]`), or, when V times the element size is not a
/// multiple of 16 bytes, a token whose two rows have different indices (`rows[t]` against
/// `masked_rows[t]`, or against t for an [N, V] `logits_masked`) whose byte offsets differ modulo 16.
/// Whole [*, V] allocations with V times the element size a multiple of 16 (V = 151,936 in bf16) and
/// the same row index in both always share the phase.
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
    /// [N] optional: the row of `logits` each token reads (None: row t, `logits` is [N, V]).
    pub rows: Option<&'a [i64]>,
    /// [N] optional: the row of `logits_masked` each token reads (see the type's docs).
    pub masked_rows: Option<&'a [i64]>,
    /// [N] optional: the reference policy's log-prob of each target, read by the KL penalty
    /// (SPEC section 12); required when `kl_penalty` is not none, and finite.
    pub ref_logp: Option<&'a [f32]>,
    /// Optional: the reference policy's logits, read by `kl_penalty = full` (SPEC section 12). The
    /// shape and dtype of `logits` ([N, V], or [R, V] read through `rows`).
    pub ref_logits: Option<Logits<'a>>,
}

impl Default for Batch<'_> {
    /// The empty batch: no tokens, no responses (`cu_seqlens = [0]`), V = 0, no optional tensor.
    fn default() -> Self {
        Batch {
            logits: Logits::F32(&[]),
            logits_masked: Logits::F32(&[]),
            targets: &[],
            old_logp: &[],
            advantages: &[],
            cu_seqlens: &[0],
            vocab: 0,
            rows: None,
            masked_rows: None,
            ref_logp: None,
            ref_logits: None,
        }
    }
}

impl<'a> Batch<'a> {
    /// The row of `logits` token `t` reads (valid after validation).
    #[inline]
    pub fn logits_row(&self, t: usize) -> usize {
        self.rows.map_or(t, |r| r[t] as usize)
    }

    /// The effective row index of `logits_masked`: `masked_rows`, or `rows` when `logits_masked` is
    /// read through them, or None (row t).
    pub fn masked_index(&self) -> Option<&'a [i64]> {
        effective_masked_rows(
            self.rows,
            self.masked_rows,
            self.logits.len(),
            self.logits_masked.len(),
        )
    }

    /// The row of `logits_masked` token `t` reads (valid after validation).
    #[inline]
    pub fn masked_row(&self, t: usize) -> usize {
        self.masked_index().map_or(t, |r| r[t] as usize)
    }

    /// Checks the shapes of the two logits tensors against N, V and the row indices (O(N)): what
    /// every pass that indexes the logits needs first. Part of [`Batch::validate_small`].
    pub fn validate_logits_shapes(&self) -> Result<()> {
        validate_logits_shapes(
            (self.logits.dtype(), self.logits.len()),
            (self.logits_masked.dtype(), self.logits_masked.len()),
            self.targets.len(),
            self.vocab,
            self.rows,
            self.masked_rows,
        )
    }
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
        check_ref_logp_given(config, self.ref_logp.is_some())?;
        check_ref_logits(config, self.logits, self.ref_logits)?;
        Ok(ValidBatch {
            batch: *self,
            config,
        })
    }

    /// Checks everything about the batch that is O(N + B): lengths and dtypes agree, cu_seqlens is
    /// well formed, B is a multiple of `group_size` when `need_groups`, targets lie in [0, V), and
    /// old_logp, advantages and (when given) ref_logp are finite. The O(N V) checks of the logits rows are done by the pass
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
            rows: self.rows,
            masked_rows: self.masked_rows,
            ref_logp: self.ref_logp,
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

/// The checks of `ref_logits` (SPEC section 12): required by `kl_penalty = full` (a missing-tensor
/// error naming it otherwise), and, when given, of the dtype and shape of `logits` (it is read
/// through the same `rows`). Its rows' values are checked by the pass that reads them.
pub(crate) fn check_ref_logits(
    config: &VppoConfig,
    logits: Logits,
    ref_logits: Option<Logits>,
) -> Result<()> {
    check_ref_logits_shape(
        config,
        (logits.dtype(), logits.len()),
        ref_logits.map(|r| (r.dtype(), r.len())),
    )
}

/// [`check_ref_logits`] on (dtype, element count) pairs, wherever the tensors live.
pub(crate) fn check_ref_logits_shape(
    config: &VppoConfig,
    logits: (Dtype, usize),
    ref_logits: Option<(Dtype, usize)>,
) -> Result<()> {
    match ref_logits {
        None if config.needs_ref_logits() => Err(VppoError::MissingTensor {
            tensor: Tensor::RefLogits,
            needed_by:
                "kl_penalty = full needs the reference policy's logits (the shape and dtype \
                        of logits)"
                    .into(),
        }),
        None => Ok(()),
        Some(r) if r.0 != logits.0 => Err(VppoError::Shape {
            tensor: Tensor::RefLogits,
            detail: format!(
                "dtype {} differs from logits dtype {}",
                r.0.name(),
                logits.0.name()
            ),
        }),
        Some(r) if r.1 != logits.1 => Err(VppoError::Shape {
            tensor: Tensor::RefLogits,
            detail: format!(
                "has {} elements, logits {}: ref_logits has the shape of logits (read through \
                 the same rows)",
                r.1, logits.1
            ),
        }),
        Some(_) => Ok(()),
    }
}

/// The error of a config whose KL penalty needs `ref_logp` (SPEC section 12) when the batch has none.
pub(crate) fn check_ref_logp_given(config: &VppoConfig, given: bool) -> Result<()> {
    if config.needs_ref_logp() && !given {
        return Err(VppoError::MissingTensor {
            tensor: Tensor::RefLogp,
            needed_by: format!(
                "kl_penalty = {} needs the reference policy's log-prob of each target ([N] f32)",
                config.kl_penalty.name()
            ),
        });
    }
    Ok(())
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
    /// [N] optional row index of `logits` (SPEC section 10).
    pub rows: Option<&'a [i64]>,
    /// [N] optional row index of `logits_masked`.
    pub masked_rows: Option<&'a [i64]>,
    /// [N] optional reference log-probs of the KL penalty.
    pub ref_logp: Option<&'a [f32]>,
}

impl SmallTensors<'_> {
    /// See [`Batch::validate_small`].
    pub fn validate(&self, group_size: usize, need_groups: bool) -> Result<()> {
        let n = self.targets.len();
        let b = self.advantages.len();
        validate_logits_shapes(
            self.logits,
            self.logits_masked,
            n,
            self.vocab,
            self.rows,
            self.masked_rows,
        )?;
        let v = self.vocab;
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
        if let Some(r) = self.ref_logp {
            if r.len() != n {
                return Err(VppoError::Shape {
                    tensor: Tensor::RefLogp,
                    detail: format!(
                        "has {} elements, expected N = {n} (the length of targets)",
                        r.len()
                    ),
                });
            }
            if let Some((row, &x)) = r.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(VppoError::NonFinite {
                    tensor: Tensor::RefLogp,
                    location: Location::Row(row),
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
    /// Checks the buffer has the shape of the logits (N * V elements, or R * V with rows) and is
    /// f32 or the logits dtype.
    pub(crate) fn check(&self, batch: &Batch) -> Result<()> {
        let nv = batch.logits.len();
        if self.len() != nv {
            let what = if batch.rows.is_some() {
                "R * V"
            } else {
                "N * V"
            };
            return Err(VppoError::Shape {
                tensor: Tensor::GradLogits,
                detail: format!(
                    "has {} elements, expected the shape of logits, {what} = {nv}",
                    self.len()
                ),
            });
        }
        check_grad_dtype(batch.logits.dtype(), self.dtype())
    }
}

/// A gradient buffer has the logits dtype or f32.
pub(crate) fn check_grad_dtype(logits: Dtype, grad: Dtype) -> Result<()> {
    if grad != Dtype::F32 && grad != logits {
        return Err(VppoError::Shape {
            tensor: Tensor::GradLogits,
            detail: format!(
                "dtype {} is neither f32 nor the logits dtype {}",
                grad.name(),
                logits.name()
            ),
        });
    }
    Ok(())
}

/// See [`Batch::masked_index`].
pub(crate) fn effective_masked_rows<'a>(
    rows: Option<&'a [i64]>,
    masked_rows: Option<&'a [i64]>,
    logits_len: usize,
    masked_len: usize,
) -> Option<&'a [i64]> {
    match (masked_rows, rows) {
        (Some(m), _) => Some(m),
        (None, Some(r)) if masked_len == logits_len => Some(r),
        _ => None,
    }
}

/// The shape rules of SPEC sections 1 and 10 for `logits` and `logits_masked` (dtype, length) over N
/// tokens of V: equal dtypes; without `rows`, N * V elements; with `rows`, a whole number R of rows
/// and `rows` of length N, strictly increasing, in [0, R); `logits_masked` likewise through
/// `masked_rows` (any order), or read through `rows`, or [N, V].
pub fn validate_logits_shapes(
    logits: (Dtype, usize),
    logits_masked: (Dtype, usize),
    n: usize,
    v: usize,
    rows: Option<&[i64]>,
    masked_rows: Option<&[i64]>,
) -> Result<()> {
    if logits.0 != logits_masked.0 {
        return Err(VppoError::Shape {
            tensor: Tensor::LogitsMasked,
            detail: format!(
                "dtype {} differs from logits dtype {}",
                logits_masked.0.name(),
                logits.0.name()
            ),
        });
    }
    let nv = n.checked_mul(v).ok_or_else(|| VppoError::Shape {
        tensor: Tensor::Logits,
        detail: format!("N * V = {n} * {v} overflows"),
    })?;
    if n > 0 && v == 0 {
        return Err(VppoError::Shape {
            tensor: Tensor::Logits,
            detail: "vocabulary size V is 0".into(),
        });
    }
    // The number of rows of a tensor read through an index: its length must be a whole number of rows.
    let whole_rows = |tensor: Tensor, len: usize, index: Tensor| -> Result<usize> {
        if v == 0 {
            return Ok(0);
        }
        if len % v != 0 {
            return Err(VppoError::Shape {
                tensor,
                detail: format!(
                    "has {len} elements, not a whole number of rows of V = {v} (it is read \
                     through {index})"
                ),
            });
        }
        Ok(len / v)
    };
    let index_len = |index: Tensor, r: &[i64]| -> Result<()> {
        if r.len() != n {
            return Err(VppoError::Shape {
                tensor: index,
                detail: format!(
                    "has {} elements, expected N = {n} (the length of targets)",
                    r.len()
                ),
            });
        }
        Ok(())
    };
    let in_range = |index: Tensor, pos: usize, row: i64, nrows: usize| -> Result<()> {
        if row < 0 || row as u64 >= nrows as u64 {
            return Err(VppoError::RowIndex {
                tensor: index,
                position: pos,
                detail: format!("row {row} is outside [0, {nrows})"),
            });
        }
        Ok(())
    };
    match rows {
        None => {
            if logits.1 != nv {
                return Err(VppoError::Shape {
                    tensor: Tensor::Logits,
                    detail: format!(
                        "has {} elements, expected N * V = {n} * {v} = {nv}",
                        logits.1
                    ),
                });
            }
        }
        Some(r) => {
            index_len(Tensor::Rows, r)?;
            let nrows = whole_rows(Tensor::Logits, logits.1, Tensor::Rows)?;
            for (pos, &row) in r.iter().enumerate() {
                in_range(Tensor::Rows, pos, row, nrows)?;
                if pos > 0 && row <= r[pos - 1] {
                    return Err(VppoError::RowIndex {
                        tensor: Tensor::Rows,
                        position: pos,
                        detail: format!(
                            "row {row} is not above the previous row {} (rows must be strictly \
                             increasing)",
                            r[pos - 1]
                        ),
                    });
                }
            }
        }
    }
    match (
        masked_rows,
        effective_masked_rows(rows, masked_rows, logits.1, logits_masked.1),
    ) {
        (Some(m), _) => {
            index_len(Tensor::MaskedRows, m)?;
            let nrows = whole_rows(Tensor::LogitsMasked, logits_masked.1, Tensor::MaskedRows)?;
            for (pos, &row) in m.iter().enumerate() {
                in_range(Tensor::MaskedRows, pos, row, nrows)?;
            }
        }
        (None, Some(_)) => {} // read through rows, checked above, same length as logits
        (None, None) => {
            if logits_masked.1 != nv {
                let through = if rows.is_some() {
                    format!(" (or {} elements, to be read through rows)", logits.1)
                } else {
                    String::new()
                };
                return Err(VppoError::Shape {
                    tensor: Tensor::LogitsMasked,
                    detail: format!(
                        "has {} elements, expected N * V = {n} * {v} = {nv}{through}",
                        logits_masked.1
                    ),
                });
            }
        }
    }
    Ok(())
}
