//! The inputs of the general KL op (`vppo.torch.kl`, SPEC section 13): two logits tensors whose
//! per-token KL(softmax(p / tau) || softmax(q / tau)) is computed, read in place through optional
//! row indices as SPEC section 10 reads `logits` and `logits_masked`.
//!
//! The op itself: src/kl_div.rs (API), src/reference/kl_div.rs (f64 reference),
//! src/exec/kl_div.rs (kernels), tests/kl_div.rs.

use crate::error::{Result, Tensor, VppoError};
use crate::tensor::{Dtype, Logits};

/// The two logits tensors of the KL op, borrowed.
///
/// Without `p_rows`, `p_logits` is [N, V] and token t reads row t; with `p_rows` [N] (strictly
/// increasing, in [0, R)) it is [R, V] and token t reads row `p_rows[t]`. `q_logits` is read
/// through `q_rows` [N] (strictly increasing, in [0, R')) when given; without it, through `p_rows`
/// when it has as many elements as `p_logits`, else it is [N, V]. Both indices must be strictly
/// increasing (not only `p_rows`, as `rows` must be for the loss): each gradient row is then written
/// by at most one token.
#[derive(Debug, Clone, Copy)]
pub struct KlBatch<'a> {
    /// [N, V] or [R, V]: the logits of p.
    pub p_logits: Logits<'a>,
    /// [N, V] or [R', V], the dtype of `p_logits`: the logits of q.
    pub q_logits: Logits<'a>,
    /// V.
    pub vocab: usize,
    /// [N] or None.
    pub p_rows: Option<&'a [i64]>,
    /// [N] or None.
    pub q_rows: Option<&'a [i64]>,
}

impl<'a> KlBatch<'a> {
    /// The shapes of the batch (dtypes and lengths of the logits, the indices), which every check
    /// reads: the same type describes a batch whose logits live on the GPU
    /// ([`crate::kl_div::DeviceKlBatch`]).
    pub(crate) fn shape(&self) -> KlShape<'a> {
        KlShape {
            p: (self.p_logits.dtype(), self.p_logits.len()),
            q: (self.q_logits.dtype(), self.q_logits.len()),
            vocab: self.vocab,
            p_rows: self.p_rows,
            q_rows: self.q_rows,
        }
    }

    /// N, the number of tokens (valid after [`KlBatch::validate`]).
    pub fn n_tokens(&self) -> usize {
        self.shape().n_tokens()
    }

    /// R, the rows of `p_logits` (and of its gradient).
    pub fn n_p_rows(&self) -> usize {
        self.shape().n_p_rows()
    }

    /// R', the rows of `q_logits` (and of its gradient).
    pub fn n_q_rows(&self) -> usize {
        self.shape().n_q_rows()
    }

    /// The index `q_logits` is read through: `q_rows`, or `p_rows` when `q_logits` has the shape of
    /// `p_logits`, or None (row t).
    pub fn q_index(&self) -> Option<&'a [i64]> {
        self.shape().q_index()
    }

    /// The row of `p_logits` token t reads.
    pub fn p_row(&self, t: usize) -> usize {
        self.shape().p_row(t)
    }

    /// The row of `q_logits` token t reads.
    pub fn q_row(&self, t: usize) -> usize {
        self.shape().q_row(t)
    }

    /// Checks the shapes (O(N)): equal dtypes, whole rows of V, N * V elements without an index,
    /// both indices of length N, strictly increasing and in range. Errors name `p_logits`,
    /// `q_logits`, `p_rows` or `q_rows` (and the position in an index).
    pub fn validate(&self) -> Result<()> {
        self.shape().validate()
    }
}

/// The shapes of a KL batch, wherever its logits live: (dtype, element count) of each logits
/// tensor, V and the indices (host copies). [`KlBatch`]'s checks and row arithmetic, written once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KlShape<'a> {
    pub(crate) p: (Dtype, usize),
    pub(crate) q: (Dtype, usize),
    pub(crate) vocab: usize,
    pub(crate) p_rows: Option<&'a [i64]>,
    pub(crate) q_rows: Option<&'a [i64]>,
}

impl<'a> KlShape<'a> {
    /// N, the number of tokens (valid after [`KlShape::validate`]).
    pub(crate) fn n_tokens(&self) -> usize {
        match self.p_rows {
            Some(r) => r.len(),
            None if self.vocab == 0 => 0,
            None => self.p.1 / self.vocab,
        }
    }

    /// R, the rows of `p_logits`.
    pub(crate) fn n_p_rows(&self) -> usize {
        self.p.1.checked_div(self.vocab).unwrap_or(0)
    }

    /// R', the rows of `q_logits`.
    pub(crate) fn n_q_rows(&self) -> usize {
        self.q.1.checked_div(self.vocab).unwrap_or(0)
    }

    /// As [`KlBatch::q_index`].
    pub(crate) fn q_index(&self) -> Option<&'a [i64]> {
        match (self.q_rows, self.p_rows) {
            (Some(q), _) => Some(q),
            (None, Some(p)) if self.q.1 == self.p.1 => Some(p),
            _ => None,
        }
    }

    /// As [`KlBatch::p_row`].
    pub(crate) fn p_row(&self, t: usize) -> usize {
        self.p_rows.map_or(t, |r| r[t] as usize)
    }

    /// As [`KlBatch::q_row`].
    pub(crate) fn q_row(&self, t: usize) -> usize {
        self.q_index().map_or(t, |r| r[t] as usize)
    }

    /// As [`KlBatch::validate`].
    pub(crate) fn validate(&self) -> Result<()> {
        let ((p_dtype, p_len), (q_dtype, q_len), v) = (self.p, self.q, self.vocab);
        if p_dtype != q_dtype {
            return Err(VppoError::Shape {
                tensor: Tensor::QLogits,
                detail: format!(
                    "dtype {} differs from p_logits dtype {}",
                    q_dtype.name(),
                    p_dtype.name()
                ),
            });
        }
        if v == 0 {
            let rows = self.p_rows.map_or(0, |r| r.len()) | self.q_rows.map_or(0, |r| r.len());
            if p_len | q_len | rows != 0 {
                return Err(VppoError::Shape {
                    tensor: Tensor::PLogits,
                    detail: "vocabulary size V is 0".into(),
                });
            }
            return Ok(());
        }
        for (tensor, len) in [(Tensor::PLogits, p_len), (Tensor::QLogits, q_len)] {
            if len % v != 0 {
                return Err(VppoError::Shape {
                    tensor,
                    detail: format!("has {len} elements, not a whole number of rows of V = {v}"),
                });
            }
        }
        let n = self.n_tokens();
        let index = |tensor: Tensor, r: &[i64], nrows: usize| -> Result<()> {
            if r.len() != n {
                return Err(VppoError::Shape {
                    tensor,
                    detail: format!("has {} elements, expected N = {n} (of p_rows)", r.len()),
                });
            }
            for (pos, &row) in r.iter().enumerate() {
                let detail = if row < 0 || row as u64 >= nrows as u64 {
                    format!("row {row} is outside [0, {nrows})")
                } else if pos > 0 && row <= r[pos - 1] {
                    format!(
                        "row {row} is not above the previous row {} (the KL op's row indices must \
                         be strictly increasing)",
                        r[pos - 1]
                    )
                } else {
                    continue;
                };
                return Err(VppoError::RowIndex {
                    tensor,
                    position: pos,
                    detail,
                });
            }
            Ok(())
        };
        if let Some(r) = self.p_rows {
            index(Tensor::PRows, r, self.n_p_rows())?;
        }
        match (self.q_rows, self.q_index()) {
            (Some(r), _) => index(Tensor::QRows, r, self.n_q_rows())?,
            (None, Some(_)) => {} // through p_rows, checked above; q has the shape of p
            (None, None) => {
                let nv = n.checked_mul(v).ok_or_else(|| VppoError::Shape {
                    tensor: Tensor::QLogits,
                    detail: format!("N * V = {n} * {v} overflows"),
                })?;
                if q_len != nv {
                    let through = if self.p_rows.is_some() {
                        format!(" (or {} elements, to be read through p_rows)", p_len)
                    } else {
                        String::new()
                    };
                    return Err(VppoError::Shape {
                        tensor: Tensor::QLogits,
                        detail: format!(
                            "has {} elements, expected N * V = {n} * {v} = {nv}{through}",
                            q_len
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}
