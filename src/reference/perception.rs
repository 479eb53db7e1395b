//! Pass 1 of the reference: per token, both logits rows -> lse, logp, kl, k3, entropy, score
//! (SPEC section 2), with the row checks of SPEC section 7.
//!
//! Written for clarity, not speed: every row is widened to f64 and read several times (a check pass,
//! a max pass, a sum pass, a kl pass). The kernel (kernels/perception.cu) reads each element once with
//! an online softmax; this file is what it is tested against.

use crate::batch::{Batch, Logits};
use crate::config::{Perception, VppoConfig};
use crate::error::{Location, Result, Tensor, VppoError};

/// The per-token results of the perception pass, in f64, each of length N.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerceptionF64 {
    /// lse_a = logsumexp(logits[t] / tau).
    pub lse: Vec<f64>,
    /// lse_b = logsumexp(logits_masked[t] / tau).
    pub lse_masked: Vec<f64>,
    /// logp = a[y] - lse_a (always finite: a[y] = -inf is an error).
    pub logp: Vec<f64>,
    /// logp_masked = b[y] - lse_b (may be -inf).
    pub logp_masked: Vec<f64>,
    /// Exact KL(softmax(a) || softmax(b)) over the full vocabulary; +inf where some a_v > -inf has
    /// b_v = -inf. Never negative: rounding can leave a sum of order -1e-16 where the two
    /// distributions agree, and the reference reports max(0, sum).
    pub kl: Vec<f64>,
    /// k3 = exp(d) - d - 1 with d = clamp(logp_masked - old_logp, -20, 20).
    pub k3: Vec<f64>,
    /// entropy = -sum_v p_v (a_v - lse_a).
    pub entropy: Vec<f64>,
    /// The visual-dependency score: clamp(kl or k3, 0, score_clamp). Never -0.0 (a zero is +0.0, so a
    /// radix select on the float bits and this reference order ties the same way).
    pub score: Vec<f64>,
}

/// Checks the lengths of the tensors the perception pass reads (O(1)), so that no index can panic.
fn check_lengths(batch: &Batch) -> Result<()> {
    let n = batch.n_tokens();
    let v = batch.vocab;
    if batch.logits.dtype() != batch.logits_masked.dtype() {
        return Err(VppoError::Shape {
            tensor: Tensor::LogitsMasked,
            detail: format!(
                "dtype {} differs from logits dtype {}",
                batch.logits_masked.dtype().name(),
                batch.logits.dtype().name()
            ),
        });
    }
    let nv = n.checked_mul(v).ok_or_else(|| VppoError::Shape {
        tensor: Tensor::Logits,
        detail: format!("N * V = {n} * {v} overflows"),
    })?;
    for (tensor, len) in [
        (Tensor::Logits, batch.logits.len()),
        (Tensor::LogitsMasked, batch.logits_masked.len()),
    ] {
        if len != nv {
            return Err(VppoError::Shape {
                tensor,
                detail: format!("has {len} elements, expected N * V = {n} * {v} = {nv}"),
            });
        }
    }
    if batch.old_logp.len() != n {
        return Err(VppoError::Shape {
            tensor: Tensor::OldLogp,
            detail: format!("has {} elements, expected N = {n}", batch.old_logp.len()),
        });
    }
    Ok(())
}

/// The checks of one token row, in the order of the kernel's error codes (kernels/vppo_params.h):
/// target out of range, NaN/+inf in logits, logits all -inf, logits[t, y] = -inf, NaN/+inf in
/// logits_masked, logits_masked all -inf.
fn check_row(batch: &Batch, t: usize) -> Result<()> {
    let v = batch.vocab;
    let y = batch.targets[t];
    if y < 0 || y as usize >= v {
        return Err(VppoError::TargetOutOfRange {
            row: t,
            target: y,
            vocab: v,
        });
    }
    let row_checks = |logits: &Logits, tensor: Tensor| -> Result<()> {
        let mut all_neg_inf = true;
        for i in t * v..(t + 1) * v {
            let x = logits.get(i);
            if x.is_nan() || x == f64::INFINITY {
                return Err(VppoError::NonFinite {
                    tensor,
                    location: Location::Row(t),
                    value: x,
                });
            }
            if x != f64::NEG_INFINITY {
                all_neg_inf = false;
            }
        }
        if all_neg_inf {
            return Err(VppoError::AllNegInf { tensor, row: t });
        }
        Ok(())
    };
    row_checks(&batch.logits, Tensor::Logits)?;
    if batch.logits.get(t * v + y as usize) == f64::NEG_INFINITY {
        return Err(VppoError::TargetNegInf { row: t, target: y });
    }
    row_checks(&batch.logits_masked, Tensor::LogitsMasked)?;
    Ok(())
}

/// logsumexp of a row with at least one finite entry and no NaN/+inf, in two passes:
/// m = max_v x_v;  lse = m + ln sum_v exp(x_v - m)   (exp(-inf) = 0).
fn logsumexp(row: &[f64]) -> f64 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = row.iter().map(|&x| (x - m).exp()).sum();
    m + s.ln()
}

/// Runs pass 1 of the reference over every token row of `batch`.
///
/// Checks, before computing anything: the lengths of logits, logits_masked and old_logp and the
/// dtypes; then for each row t ascending the row checks of SPEC section 7 in the order of the kernel's
/// error codes (`VppoErrorCode` in kernels/vppo_params.h), reporting the first bad row; then that old_logp
/// is finite. `cu_seqlens` and `advantages` are not read here.
///
/// Per row, with a = logits[t] / tau, b = logits_masked[t] / tau, y = targets[t]:
/// a term with a_v = -inf has p_v = 0 exactly and contributes 0 to kl and entropy (never 0 * inf);
/// kl = +inf when some v has a_v > -inf (so p_v > 0 in exact arithmetic) and b_v = -inf.
pub fn perception(batch: &Batch, cfg: &VppoConfig) -> Result<PerceptionF64> {
    check_lengths(batch)?;
    let n = batch.n_tokens();
    let v = batch.vocab;
    for t in 0..n {
        check_row(batch, t)?;
    }
    for (row, &x) in batch.old_logp.iter().enumerate() {
        if !x.is_finite() {
            return Err(VppoError::NonFinite {
                tensor: Tensor::OldLogp,
                location: Location::Row(row),
                value: x as f64,
            });
        }
    }

    let tau = cfg.temperature;
    let mut out = PerceptionF64::default();
    for t in 0..n {
        let y = batch.targets[t] as usize;
        // a = logits[t] / tau, b = logits_masked[t] / tau, widened exactly to f64 before the division.
        let a: Vec<f64> = batch.logits.row_f64(t, v).iter().map(|x| x / tau).collect();
        let b: Vec<f64> = batch
            .logits_masked
            .row_f64(t, v)
            .iter()
            .map(|x| x / tau)
            .collect();

        // lse_a = logsumexp(a), lse_b = logsumexp(b)
        let lse_a = logsumexp(&a);
        let lse_b = logsumexp(&b);

        // logp = a[y] - lse_a;  logp_masked = b[y] - lse_b
        let logp = a[y] - lse_a;
        let logp_masked = b[y] - lse_b;

        // kl = sum_v p_v ((a_v - lse_a) - (b_v - lse_b)),  p_v = exp(a_v - lse_a)
        // entropy = -sum_v p_v (a_v - lse_a)
        let mut kl = 0.0f64;
        let mut entropy = 0.0f64;
        let mut kl_infinite = false;
        for i in 0..v {
            if a[i] == f64::NEG_INFINITY {
                continue; // p_v = 0: the term is 0
            }
            let log_p = a[i] - lse_a;
            let p = log_p.exp();
            entropy -= p * log_p;
            if b[i] == f64::NEG_INFINITY {
                kl_infinite = true; // p_v > 0 where q_v = 0
                continue;
            }
            let log_q = b[i] - lse_b;
            kl += p * (log_p - log_q);
        }
        let kl = if kl_infinite {
            f64::INFINITY
        } else {
            kl.max(0.0)
        };

        // d = clamp(logp_masked - old_logp, -20, 20);  k3 = exp(d) - d - 1
        let d = (logp_masked - batch.old_logp[t] as f64).clamp(-20.0, 20.0);
        let k3 = d.exp() - d - 1.0;

        // score = clamp(kl or k3, 0, score_clamp), with +0.0 for zero
        let raw = match cfg.perception {
            Perception::FullKl => kl,
            Perception::K3 => k3,
        };
        let score = if raw > 0.0 {
            raw.min(cfg.score_clamp)
        } else {
            0.0
        };

        out.lse.push(lse_a);
        out.lse_masked.push(lse_b);
        out.logp.push(logp);
        out.logp_masked.push(logp_masked);
        out.kl.push(kl);
        out.k3.push(k3);
        out.entropy.push(entropy);
        out.score.push(score);
    }
    Ok(out)
}
