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

use crate::batch::validate_cu_seqlens;
use crate::config::{Aggregation, VppoConfig};
use crate::error::{Result, Tensor, VppoError};
use crate::output::Stats;

/// The log-ratio clamp of r and of k3: [-20, 20]. Shared with the kernels: `VPPO_LOG_RATIO_CLAMP` of
/// kernels/vppo_params.h.
pub const LOG_RATIO_CLAMP: f64 = crate::params::VPPO_LOG_RATIO_CLAMP;

/// The loss of a batch and its gradient with respect to logp, in f64.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SurrogateF64 {
    /// loss = pg + logp_penalty * (-sum_t logp_t) / Z.
    pub loss: f64,
    /// The clipped-surrogate part pg.
    pub pg_loss: f64,
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
pub fn surrogate(
    logp: &[f64],
    old_logp: &[f32],
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
    let b_nonempty = cu_seqlens.windows(2).filter(|w| w[1] > w[0]).count() as f64;

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
        for t in start..end {
            // r = exp(clamp(logp - old_logp, -20, 20)); dr/dlogp = r inside the clamp, 0 outside
            let delta = logp[t] - old_logp[t] as f64;
            let r = delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp();
            let dr_dlogp = if delta.abs() <= LOG_RATIO_CLAMP {
                r
            } else {
                0.0
            };
            ratio_sum += r;
            logp_sum += logp[t];

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

            // the token's weight in pg
            let w = match cfg.aggregation {
                Aggregation::TokenMean => 1.0 / z,
                Aggregation::SeqMeanTokenMean => 1.0 / (b_nonempty * len),
                Aggregation::SeqMeanTokenSum => 1.0 / b_nonempty,
            };
            if mask[t] != 0 {
                pg += w * l;
                n_selected += 1;
                n_clipped += clip_active as usize;
                out.dlogp[t] += w * dl_dr * dr_dlogp;
            }
            // d/dlogp_t of logp_penalty * (-sum logp) / Z
            out.dlogp[t] -= cfg.logp_penalty / z;
        }
    }
    out.pg_loss = pg;
    // loss = pg + logp_penalty * (-sum_t logp_t) / Z
    out.loss = pg + cfg.logp_penalty * (-logp_sum) / z;
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
