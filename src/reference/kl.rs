//! The KL penalty to a reference policy (SPEC section 12), one token at a time, from the reference
//! policy's log-prob of the target (`ref_logp`).
//!
//! The kernel: the KL lines of `vppo_loss` in kernels/select_loss.cu; the aggregation over the batch is
//! in [`super::surrogate::surrogate_kl`]; tests: tests/variants.rs (against an eager port of the
//! official `compute_kl` and `average_loss`).
//!
//! With k1 = logp - ref_logp:
//!
//! | penalty | kl_t | d kl_t / d logp_t |
//! | --- | --- | --- |
//! | k1 | k1 | 1 |
//! | abs | \|k1\| | sign(k1), 0 at k1 = 0 (as autograd's abs) |
//! | mse | k1^2 / 2 | k1 |
//! | k3 | clamp(e^x - x - 1, -10, 10), x = clamp(ref_logp - logp, -20, 20) | 1 - e^x, 0 through an active clamp |
//!
//! A clamp is active strictly outside its bounds (torch.clamp passes the gradient on them). k3's
//! e^x - x - 1 is computed as expm1(x) - x, which has no cancellation against the 1 for small x.

use crate::batch::Batch;
use crate::config::{Aggregation, KlPenalty, VppoConfig};
use crate::error::{Location, Result, Tensor, VppoError};

use super::surrogate::LOG_RATIO_CLAMP;

/// The clamp of k3's value: [-10, 10] (the official `low_var_kl`). Shared with the kernel:
/// `VPPO_KL_K3_CLAMP` of kernels/vppo_params.h.
pub const K3_CLAMP: f64 = crate::params::VPPO_KL_K3_CLAMP;

/// kl_t and d kl_t / d logp_t of one token, in f64 (both 0 for `KlPenalty::None`, and for
/// `KlPenalty::Full`, which is not a function of logp: [`full_kl`]).
pub fn kl_term(penalty: KlPenalty, logp: f64, ref_logp: f64) -> (f64, f64) {
    let k1 = logp - ref_logp;
    match penalty {
        KlPenalty::None | KlPenalty::Full => (0.0, 0.0),
        KlPenalty::K1 => (k1, 1.0),
        KlPenalty::Abs => {
            let sign = if k1 > 0.0 {
                1.0
            } else if k1 < 0.0 {
                -1.0
            } else {
                0.0
            };
            (k1.abs(), sign)
        }
        KlPenalty::Mse => (0.5 * k1 * k1, k1),
        KlPenalty::K3 => {
            // x = clamp(ref_logp - logp, -20, 20); dx/dlogp = -1 inside, 0 through the clamp
            let raw = ref_logp - logp;
            let x = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
            let dx = if raw.abs() <= LOG_RATIO_CLAMP {
                -1.0
            } else {
                0.0
            };
            // e = exp(x) - x - 1, de/dx = exp(x) - 1
            let e = x.exp_m1() - x;
            if e.abs() > K3_CLAMP {
                (e.clamp(-K3_CLAMP, K3_CLAMP), 0.0)
            } else {
                (e, x.exp_m1() * dx)
            }
        }
    }
}

/// The `full` KL penalty's per-token values (SPEC section 12), in f64, each [N].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FullKlF64 {
    /// kl_t = KL(pi || pi_ref) = sum_v p_v ((a_v - lse_a) - (c_v - lse_c)) over the whole vocabulary,
    /// a = logits / tau, c = ref_logits / tau (terms with p_v = 0 add nothing).
    pub kl: Vec<f64>,
    /// lse_c = logsumexp(c), for the backward.
    pub lse_ref: Vec<f64>,
    /// dloss / dkl_t = kl_coef w_t, w_t the token's weight in the aggregation (as pg's, no mask).
    pub dkl: Vec<f64>,
}

/// kl_t and lse_c of every token from the logits and ref_logits rows it reads (through `rows`),
/// with the checks of the ref_logits row: a NaN or +inf, all -inf, a logit that overflows f32 divided
/// by tau, then KL = +inf (c_v = -inf where p_v > 0): errors naming `ref_logits` and the token.
/// `dkl` is left empty ([`full_kl_loss`] fills it).
pub fn full_kl(batch: &Batch, tau: f64) -> Result<FullKlF64> {
    let reference = batch.ref_logits.ok_or_else(|| VppoError::MissingTensor {
        tensor: Tensor::RefLogits,
        needed_by: "kl_penalty = full needs the reference policy's logits".into(),
    })?;
    let v = batch.vocab;
    let mut out = FullKlF64::default();
    for t in 0..batch.n_tokens() {
        let r = batch.logits_row(t);
        let a = batch.logits.row_f64(r, v);
        let c = reference.row_f64(r, v);
        if let Some(&value) = c.iter().find(|x| x.is_nan() || **x == f64::INFINITY) {
            return Err(VppoError::NonFinite {
                tensor: Tensor::RefLogits,
                location: Location::Row(t),
                value,
            });
        }
        if c.iter().all(|&x| x == f64::NEG_INFINITY) {
            return Err(VppoError::AllNegInf {
                tensor: Tensor::RefLogits,
                row: t,
            });
        }
        if let Some(&value) = c
            .iter()
            .find(|x| x.is_finite() && (*x / tau).abs() > f32::MAX as f64)
        {
            return Err(VppoError::TemperatureOverflow {
                tensor: Tensor::RefLogits,
                row: t,
                value,
                temperature: tau,
            });
        }
        if let Some(column) = super::kl_div::kl_infinite_column(&a, &c) {
            return Err(VppoError::KlInfinite {
                tensor: Tensor::RefLogits,
                row: t,
                column,
            });
        }
        let scaled = |x: Vec<f64>| x.into_iter().map(|x| x / tau).collect::<Vec<f64>>();
        let (_, lse_c, kl) = super::kl_div::token(&scaled(a), &scaled(c));
        out.kl.push(kl);
        out.lse_ref.push(lse_c);
    }
    Ok(out)
}

/// The aggregated full KL before kl_coef and each token's dloss / dkl_t = kl_coef w_t, with the
/// weights of the other penalties (every response token, no mask): w_t = 1 / Z in token-mean,
/// 1 / (B' L_b) in seq-mean-token-mean, 1 / B' in seq-mean-token-sum (B' the non-empty responses,
/// or `response_normalizer`). `cu_seqlens` is validated ([N] = its last entry).
pub fn full_kl_loss(kl: &[f64], cu_seqlens: &[i32], cfg: &VppoConfig) -> (f64, Vec<f64>) {
    let n = kl.len();
    let z = cfg.token_normalizer.unwrap_or(n as f64);
    let b_nonempty = cfg
        .response_normalizer
        .unwrap_or_else(|| cu_seqlens.windows(2).filter(|w| w[1] > w[0]).count() as f64);
    let mut loss = 0.0;
    let mut dkl = vec![0.0; n];
    for w in cu_seqlens.windows(2) {
        let (start, end) = (w[0] as usize, w[1] as usize);
        let len = (end - start) as f64;
        let weight = match cfg.aggregation {
            Aggregation::TokenMean => 1.0 / z,
            Aggregation::SeqMeanTokenMean => 1.0 / (b_nonempty * len),
            Aggregation::SeqMeanTokenSum => 1.0 / b_nonempty,
        };
        for t in start..end {
            loss += weight * kl[t];
            dkl[t] = cfg.kl_coef * weight;
        }
    }
    (loss, dkl)
}
