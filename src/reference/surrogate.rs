//! The clipped surrogate (SPEC section 5) and its gradient dloss/dlogp (SPEC section 6).
//!
//! The kernel: `vppo_loss` of kernels/select_loss.cu, launched by src/exec/select_loss.rs, tested
//! against this file by tests/kernels.rs.
//!
//! Gradient convention (what autograd does on the official code, written out):
//! - r = exp(clamp(logp - old_logp, -20, 20)); the clamp is active only strictly outside [-20, 20],
//!   where dr/dlogp = 0; elsewhere dr/dlogp = r.
//! - When r lies within [1 - eps_low, 1 + eps_high] (inclusive), both branches agree and the unclipped
//!   branch's gradient -A' r applies. Outside, the max picks the larger branch: gradient -A' r when the
//!   unclipped branch -A' r is strictly larger than -A' r_clip, else 0 (the clipped branch is constant).
//! - Dual clip (A' < 0 only): active when l_t > -A' * dual_clip strictly; then l_t = -A' * dual_clip and
//!   the gradient is 0.
//! - clip_fraction counts masked tokens where the PPO clip branch is strictly larger or the dual clip is
//!   active, over the masked tokens (0 when none is masked).
//! - The logp penalty adds -logp_penalty / Z to dloss/dlogp of every token, masked or not.
//!
//! Loss types (SPEC section 12), with s_b = mean over response b of (logp_t - old_logp_t):
//! - `gspo`: the log-ratio of every token of b is s_b; its clamp and clips as above, and the gradient
//!   of each token's loss flows through s_b: d s_b / d logp_u = 1 / L_b for every u of b (masked or
//!   not, as autograd does on the official `masked_mean`).
//! - `gspo-token`: the value of s_b, but d(log-ratio_t) / d logp_t = 1 and 0 to the other tokens.
//! - `cispo`: l_t = -A' logp_t c_t, c_t = clamp(r_t, 1 - eps_low, 1 + eps_high) held constant, so
//!   dl_t/dlogp_t = -A' c_t; no max and no dual clip. A token counts as clipped when r_t lies outside
//!   the clip range (c_t != r_t).
//! - mean_ratio is the mean over tokens of the ratio the loss uses (exp(clamp(s_b)) in the GSPO modes).
//!
//! The KL penalty (SPEC section 12, [`surrogate_kl`]): kl_t of every response token, masked or not
//! (the official `average_loss(kld, response_mask)`), aggregated with the weight of pg without the
//! mask: kl_loss = sum_t w_t kl_t, w_t = 1 / Z, 1 / (B' L_b) or 1 / B'; loss += kl_coef * kl_loss and
//! dloss/dlogp_t += kl_coef * w_t * d kl_t / d logp_t (src/reference/kl.rs).

use crate::batch::validate_cu_seqlens;
use crate::config::{Aggregation, LossType, VppoConfig};
use crate::error::Location;
use crate::error::{Result, Tensor, VppoError};
use crate::output::Stats;

/// The log-ratio clamp of r and of k3: [-20, 20]. Shared with the kernels: `VPPO_LOG_RATIO_CLAMP` of
/// kernels/vppo_params.h.
pub const LOG_RATIO_CLAMP: f64 = crate::params::VPPO_LOG_RATIO_CLAMP;

/// The loss of a batch and its gradient with respect to logp, in f64.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SurrogateF64 {
    /// loss = pg + kl_coef * kl_loss + logp_penalty * (-sum_t logp_t) / Z.
    pub loss: f64,
    /// The clipped-surrogate part pg.
    pub pg_loss: f64,
    /// The aggregated KL penalty before kl_coef (0 with `kl_penalty = none`).
    pub kl_loss: f64,
    /// Z: `cfg.token_normalizer`, or N.
    pub token_normalizer: f64,
    /// dloss/dlogp_t, `[N]`.
    pub dlogp: Vec<f64>,
    /// clip fraction, mean ratio, selected fraction.
    pub stats: Stats,
}

fn shape_err(tensor: Tensor, len: usize, what: &str, want: usize) -> VppoError {
    VppoError::Shape {
        tensor,
        detail: format!("has {len} elements, expected {what} = {want}"),
    }
}

/// The clipped surrogate over a packed batch.
///
/// `logp`, `old_logp`, `mask` have N entries, `alpha` and `advantages` B, `cu_seqlens` B + 1. With
/// `A'_b = alpha_b * advantages[b]` and, for token t of response b,
/// r = exp(clamp(logp - old_logp, -20, 20)), r_clip = clamp(r, 1 - eps_low, 1 + eps_high):
///
/// ```text
/// l_t  = max(-A' r, -A' r_clip);   if A' < 0 and dual_clip = c: l_t = min(l_t, -A' c)
/// pg   = sum_t w_t l_t,   w_t = mask_t / Z              (token-mean)
///                         w_t = mask_t / (B' L_b)       (seq-mean-token-mean)
///                         w_t = mask_t / B'             (seq-mean-token-sum)
/// loss = pg + logp_penalty * (-sum_t logp_t) / Z
/// ```
///
/// B' is the number of responses with L_b > 0; Z is `cfg.token_normalizer` or N. With N = 0 the loss is
/// 0, the statistics are 0 and Z is reported as the configured value or 0. See the module docs for the
/// gradient convention at the clip boundaries. The config and every length are checked first.
/// A config with a KL penalty needs [`surrogate_kl`] (its `ref_logp`); here it is an error.
pub fn surrogate(
    logp: &[f64],
    old_logp: &[f32],
    mask: &[u8],
    alpha: &[f64],
    advantages: &[f32],
    cu_seqlens: &[i32],
    cfg: &VppoConfig,
) -> Result<SurrogateF64> {
    surrogate_kl(
        logp, old_logp, None, mask, alpha, advantages, cu_seqlens, cfg,
    )
}

/// [`surrogate`] with the KL penalty of `cfg.kl_penalty` (SPEC section 12) from `ref_logp` [N]
/// (required, finite, when the penalty is not none; ignored otherwise):
///
/// ```text
/// kl_loss = sum over every response token t of w_t kl_t,   w_t = 1 / Z, 1 / (B' L_b) or 1 / B'
/// loss    = pg + kl_coef * kl_loss + logp_penalty * (-sum_t logp_t) / Z
/// ```
#[allow(clippy::too_many_arguments)]
pub fn surrogate_kl(
    logp: &[f64],
    old_logp: &[f32],
    ref_logp: Option<&[f32]>,
    mask: &[u8],
    alpha: &[f64],
    advantages: &[f32],
    cu_seqlens: &[i32],
    cfg: &VppoConfig,
) -> Result<SurrogateF64> {
    cfg.validate()?;
    let n = logp.len();
    let b_count = advantages.len();
    if old_logp.len() != n {
        return Err(shape_err(Tensor::OldLogp, old_logp.len(), "N", n));
    }
    crate::batch::check_ref_logp_given(cfg, ref_logp.is_some())?;
    let ref_logp = if cfg.needs_ref_logp() { ref_logp } else { None };
    if let Some(r) = ref_logp {
        if r.len() != n {
            return Err(shape_err(Tensor::RefLogp, r.len(), "N", n));
        }
        if let Some((row, &x)) = r.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(VppoError::NonFinite {
                tensor: Tensor::RefLogp,
                location: Location::Row(row),
                value: x as f64,
            });
        }
    }
    if mask.len() != n {
        return Err(VppoError::Shape {
            tensor: Tensor::Scores,
            detail: format!("mask has {} elements, expected N = {n}", mask.len()),
        });
    }
    if alpha.len() != b_count {
        return Err(VppoError::Shape {
            tensor: Tensor::Advantages,
            detail: format!("alpha has {} elements, expected B = {b_count}", alpha.len()),
        });
    }
    if cu_seqlens.len() != b_count + 1 {
        return Err(shape_err(
            Tensor::CuSeqlens,
            cu_seqlens.len(),
            "B + 1",
            b_count + 1,
        ));
    }
    validate_cu_seqlens(cu_seqlens, n)?;

    let z = cfg.token_normalizer.unwrap_or(n as f64);
    let mut out = SurrogateF64 {
        token_normalizer: z,
        dlogp: vec![0.0; n],
        ..Default::default()
    };
    if n == 0 {
        return Ok(out);
    }
    // B' = responses with L_b > 0
    // (or the caller's B': data parallel gives the count over every rank)
    let b_nonempty = cfg
        .response_normalizer
        .unwrap_or_else(|| cu_seqlens.windows(2).filter(|w| w[1] > w[0]).count() as f64);

    let (lo_clip, hi_clip) = (1.0 - cfg.eps_low, 1.0 + cfg.eps_high);
    let mut pg = 0.0f64;
    let mut logp_sum = 0.0f64;
    let mut ratio_sum = 0.0f64;
    let mut n_selected = 0usize;
    let mut n_clipped = 0usize;
    for b in 0..b_count {
        let (start, end) = (cu_seqlens[b] as usize, cu_seqlens[b + 1] as usize);
        let len = (end - start) as f64;
        // A'_b = alpha_b * A_b
        let adv = alpha[b] * advantages[b] as f64;
        // s_b = mean over b of (logp - old_logp) (unused when L_b = 0: the loop below is empty)
        let seq_log_ratio = (start..end)
            .map(|t| logp[t] - old_logp[t] as f64)
            .sum::<f64>()
            / len;
        // gspo: the sum over the tokens of b of dloss/d s_b, spread as 1 / L_b to every token of b
        let mut dloss_dseq = 0.0f64;
        for t in start..end {
            // the log-ratio x: per token, or s_b in the GSPO modes
            let x = match cfg.loss_type {
                LossType::Ppo | LossType::Cispo => logp[t] - old_logp[t] as f64,
                LossType::Gspo | LossType::GspoToken => seq_log_ratio,
            };
            // r = exp(clamp(x, -20, 20)); dr/dx = r inside the clamp, 0 outside
            let r = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp();
            let dr_dlogp = if x.abs() <= LOG_RATIO_CLAMP { r } else { 0.0 };
            ratio_sum += r;
            logp_sum += logp[t];

            // the token's weight in pg
            let w = match cfg.aggregation {
                Aggregation::TokenMean => 1.0 / z,
                Aggregation::SeqMeanTokenMean => 1.0 / (b_nonempty * len),
                Aggregation::SeqMeanTokenSum => 1.0 / b_nonempty,
            };
            if cfg.loss_type == LossType::Cispo {
                // l = -A' logp c, c = clamp(r, 1 - eps_low, 1 + eps_high) a constant
                let c = r.clamp(lo_clip, hi_clip);
                if mask[t] != 0 {
                    pg += w * (-adv * logp[t] * c);
                    n_selected += 1;
                    n_clipped += !(r >= lo_clip && r <= hi_clip) as usize;
                    out.dlogp[t] += w * (-adv * c);
                }
                out.dlogp[t] -= cfg.logp_penalty / z;
                continue;
            }

            // l = max(-A' r, -A' r_clip); dl/dr = -A' when the unclipped branch applies, else 0
            let r_clip = r.clamp(lo_clip, hi_clip);
            let unclipped = -adv * r;
            let clipped = -adv * r_clip;
            let inside = r >= lo_clip && r <= hi_clip;
            let (mut l, mut dl_dr, mut clip_active) = if inside || unclipped > clipped {
                (unclipped, -adv, false)
            } else {
                (clipped, 0.0, clipped > unclipped)
            };
            // dual clip, A' < 0 only: l = min(l, -A' c), active when l > -A' c strictly
            if let Some(c) = cfg.dual_clip {
                if adv < 0.0 && l > -adv * c {
                    l = -adv * c;
                    dl_dr = 0.0;
                    clip_active = true;
                }
            }

            if mask[t] != 0 {
                pg += w * l;
                n_selected += 1;
                n_clipped += clip_active as usize;
                if cfg.loss_type == LossType::Gspo {
                    dloss_dseq += w * dl_dr * dr_dlogp;
                } else {
                    out.dlogp[t] += w * dl_dr * dr_dlogp;
                }
            }
            // d/dlogp_t of logp_penalty * (-sum logp) / Z
            out.dlogp[t] -= cfg.logp_penalty / z;
        }
        // gspo: d s_b / d logp_u = 1 / L_b for every token u of b
        for t in start..end {
            out.dlogp[t] += dloss_dseq / len;
        }
        // the KL penalty: every token of b, with the weight of pg (no mask)
        if let Some(r) = ref_logp {
            let w = match cfg.aggregation {
                Aggregation::TokenMean => 1.0 / z,
                Aggregation::SeqMeanTokenMean => 1.0 / (b_nonempty * len),
                Aggregation::SeqMeanTokenSum => 1.0 / b_nonempty,
            };
            for t in start..end {
                let (kl, dkl) = super::kl::kl_term(cfg.kl_penalty, logp[t], r[t] as f64);
                out.kl_loss += w * kl;
                out.dlogp[t] += cfg.kl_coef * w * dkl;
            }
        }
    }
    out.pg_loss = pg;
    // loss = pg + kl_coef * kl_loss + logp_penalty * (-sum_t logp_t) / Z
    out.loss = pg + cfg.kl_coef * out.kl_loss + cfg.logp_penalty * (-logp_sum) / z;
    out.stats = Stats {
        clip_fraction: if n_selected > 0 {
            n_clipped as f64 / n_selected as f64
        } else {
            0.0
        },
        mean_ratio: ratio_sum / n as f64,
        selected_fraction: n_selected as f64 / n as f64,
    };
    Ok(out)
}
