//! Pass 1 of the reference: per token, both logits rows -> lse, logp, kl, k3, entropy, score
//! (SPEC section 2), with the row checks of SPEC section 7.
//!
//! Written for clarity, not speed: every row is widened to f64 and read several times (a check pass,
//! a max pass, a sum pass, a kl pass). The kernel (kernels/perception.cu) reads each element once with
//! an online softmax, launched by src/exec/perception.rs; this file is what it is tested against
//! (tests/kernels.rs, tests/errors.rs; the reference alone: tests/reference_unit.rs, reference_props.rs).

use crate::batch::{Batch, Logits};
use crate::config::{Perception, VppoConfig};
use crate::error::{Location, Result, Tensor, VppoError};
use crate::reference::surrogate::LOG_RATIO_CLAMP;

/// The per-token results of the perception pass, in f64, each of length N.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerceptionF64 {
    /// `lse_a = logsumexp(logits[t] / tau)`.
    pub lse: Vec<f64>,
    /// `lse_b = logsumexp(logits_masked[t] / tau)`.
    pub lse_masked: Vec<f64>,
    /// `m_a = max_v logits[t, v] / tau`, the centre of row t: `lse = m_a + lse_centred`.
    pub row_max: Vec<f64>,
    /// `logsumexp(logits[t] / tau - m_a)`: with [`Self::row_max`], what the backward forms
    /// log-probabilities from (`(a_v - m_a) - lse_centred`) without the rounding of `m_a + lse_centred`.
    pub lse_centred: Vec<f64>,
    /// `logp = a[y] - lse_a`, computed as `(a[y] - m_a) - lse_centred` (always finite: `a[y] = -inf`
    /// is an error).
    pub logp: Vec<f64>,
    /// `logp_masked = b[y] - lse_b` (may be -inf).
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

/// Checks the lengths of the tensors the perception pass reads and the row indices (O(N)), so that
/// no index can panic.
fn check_lengths(batch: &Batch) -> Result<()> {
    batch.validate_logits_shapes()?;
    let n = batch.n_tokens();
    if batch.old_logp.len() != n {
        return Err(VppoError::Shape {
            tensor: Tensor::OldLogp,
            detail: format!("has {} elements, expected N = {n}", batch.old_logp.len()),
        });
    }
    Ok(())
}

/// The first finite entry of `row` whose quotient by `tau` overflows f32, if any.
fn first_too_large(row: &[f64], tau: f64) -> Option<f64> {
    row.iter()
        .copied()
        .find(|x| x.is_finite() && (x / tau).abs() > f32::MAX as f64)
}

/// The error of a row the kernels' f32 state overflowed on (code `VPPO_ERR_LOGITS_OVERFLOW`), from
/// the two rows (widened to f64): a logit whose quotient by the temperature overflows f32 is a
/// [`VppoError::TemperatureOverflow`]; otherwise the row spans more than f32 holds, and the error
/// names the tensor whose finite entries span the wider range.
pub fn overflow_error(logits: &[f64], logits_masked: &[f64], row: usize, tau: f64) -> VppoError {
    for (tensor, r) in [
        (Tensor::Logits, logits),
        (Tensor::LogitsMasked, logits_masked),
    ] {
        if let Some(value) = first_too_large(r, tau) {
            return VppoError::TemperatureOverflow {
                tensor,
                row,
                value,
                temperature: tau,
            };
        }
    }
    let spread = |r: &[f64]| {
        let finite = r.iter().copied().filter(|x| x.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        hi - lo
    };
    let tensor = if spread(logits_masked) > spread(logits) {
        Tensor::LogitsMasked
    } else {
        Tensor::Logits
    };
    VppoError::RowOverflow { tensor, row }
}

/// The row checks of SPEC section 7 over every row of `batch`, first bad row first (see
/// [`perception`]), without computing anything; `batch`'s lengths must agree (they are checked).
/// The API runs them on the host before a kernel device when the temperature is below 1, the only
/// case in which a finite logit divided by it can overflow f32, so that every device reports the
/// same [`VppoError::TemperatureOverflow`] for the same row.
pub fn check_rows(batch: &Batch, cfg: &VppoConfig) -> Result<()> {
    check_lengths(batch)?;
    (0..batch.n_tokens()).try_for_each(|t| check_row(batch, t, cfg.temperature))
}

/// The checks of one token row, in the order of the kernel's error codes (kernels/vppo_params.h):
/// target out of range, NaN/+inf in logits, logits all -inf, logits[t, y] = -inf, NaN/+inf in
/// logits_masked, logits_masked all -inf, then a finite logit of either row whose quotient by the
/// temperature overflows f32 (the temperature is too small for it).
fn check_row(batch: &Batch, t: usize, tau: f64) -> Result<()> {
    let v = batch.vocab;
    let y = batch.targets[t];
    if y < 0 || y as usize >= v {
        return Err(VppoError::TargetOutOfRange {
            row: t,
            target: y,
            vocab: v,
        });
    }
    // Token t reads row `row` of the tensor (SPEC section 10); errors name the token.
    let row_checks = |logits: &Logits, row: usize, tensor: Tensor| -> Result<()> {
        let mut all_neg_inf = true;
        for i in row * v..(row + 1) * v {
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
    let (row_a, row_b) = (batch.logits_row(t), batch.masked_row(t));
    row_checks(&batch.logits, row_a, Tensor::Logits)?;
    if batch.logits.get(row_a * v + y as usize) == f64::NEG_INFINITY {
        return Err(VppoError::TargetNegInf { row: t, target: y });
    }
    row_checks(&batch.logits_masked, row_b, Tensor::LogitsMasked)?;
    if tau < 1.0 {
        for (tensor, logits, row) in [
            (Tensor::Logits, &batch.logits, row_a),
            (Tensor::LogitsMasked, &batch.logits_masked, row_b),
        ] {
            if let Some(value) = first_too_large(&logits.row_f64(row, v), tau) {
                return Err(VppoError::TemperatureOverflow {
                    tensor,
                    row: t,
                    value,
                    temperature: tau,
                });
            }
        }
    }
    Ok(())
}

/// A row centred on its maximum: `x_v - m` with m = max_v x_v (at least one finite entry, no NaN or
/// +inf), and `ln sum_v exp(x_v - m)`, the logsumexp of the centred row (exp(-inf) = 0). So
/// logsumexp(x) = m + lse, but every log-probability is formed as `(x_v - m) - lse` without passing
/// through m + lse: with every logit c = 1e17 that sum rounds to c and x_y - lse to 0, where the exact
/// log-probability is -ln V.
fn centred(row: &[f64]) -> (Vec<f64>, f64, f64) {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let c: Vec<f64> = row.iter().map(|&x| x - m).collect();
    let s: f64 = c.iter().map(|&x| x.exp()).sum();
    (c, m, s.ln())
}

/// Runs pass 1 of the reference over every token row of `batch`.
///
/// Checks, before computing anything: the config ([`VppoConfig::validate`]), the lengths of logits, logits_masked and old_logp and the
/// dtypes; then for each row t ascending the row checks of SPEC section 7 in the order of the kernel's
/// error codes (`VppoErrorCode` in kernels/vppo_params.h), reporting the first bad row; then that old_logp
/// is finite. `cu_seqlens` and `advantages` are not read here.
///
/// Per row, with `a = logits[t] / tau`, `b = logits_masked[t] / tau`, `y = targets[t]`:
/// a term with a_v = -inf has p_v = 0 exactly and contributes 0 to kl and entropy (never 0 * inf);
/// kl = +inf when some v has a_v > -inf (so p_v > 0 in exact arithmetic) and b_v = -inf.
pub fn perception(batch: &Batch, cfg: &VppoConfig) -> Result<PerceptionF64> {
    cfg.validate()?;
    check_lengths(batch)?;
    let n = batch.n_tokens();
    let v = batch.vocab;
    for t in 0..n {
        check_row(batch, t, cfg.temperature)?;
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
        // Token t reads rows logits_row(t) and masked_row(t) (t itself without row indices).
        let a: Vec<f64> = batch
            .logits
            .row_f64(batch.logits_row(t), v)
            .iter()
            .map(|x| x / tau)
            .collect();
        let b: Vec<f64> = batch
            .logits_masked
            .row_f64(batch.masked_row(t), v)
            .iter()
            .map(|x| x / tau)
            .collect();

        // Centred on the row maxima: ca_v = a_v - m_a, la = logsumexp(ca), so lse_a = m_a + la (and
        // the same for b). Every log-probability below is ca_v - la, never a_v - lse_a.
        let (a, m_a, la) = centred(&a);
        let (b, m_b, lb) = centred(&b);
        let lse_a = m_a + la;
        let lse_b = m_b + lb;

        // logp = a[y] - lse_a;  logp_masked = b[y] - lse_b   (centred)
        let logp = a[y] - la;
        let logp_masked = b[y] - lb;

        // kl = sum_v p_v ((a_v - lse_a) - (b_v - lse_b)),  p_v = exp(a_v - lse_a)
        // entropy = -sum_v p_v (a_v - lse_a)
        let mut kl = 0.0f64;
        let mut entropy = 0.0f64;
        let mut kl_infinite = false;
        for i in 0..v {
            if a[i] == f64::NEG_INFINITY {
                continue; // p_v = 0: the term is 0
            }
            let log_p = a[i] - la;
            let p = log_p.exp();
            entropy -= p * log_p;
            if b[i] == f64::NEG_INFINITY {
                kl_infinite = true; // p_v > 0 where q_v = 0
                continue;
            }
            let log_q = b[i] - lb;
            kl += p * (log_p - log_q);
        }
        let kl = if kl_infinite {
            f64::INFINITY
        } else {
            kl.max(0.0)
        };

        // d = clamp(logp_masked - old_logp, -20, 20);  k3 = exp(d) - d - 1
        let d = (logp_masked - batch.old_logp[t] as f64).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
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
        out.row_max.push(m_a);
        out.lse_centred.push(la);
        out.logp.push(logp);
        out.logp_masked.push(logp_masked);
        out.kl.push(kl);
        out.k3.push(k3);
        out.entropy.push(entropy);
        out.score.push(score);
    }
    Ok(out)
}
