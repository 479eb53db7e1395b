//! Trajectory-level Advantage Shaping (SPEC section 4): Sbar per response, then alpha per response.
//!
//! The kernels: Sbar in `vppo_select`, alpha in `vppo_loss` (kernels/select_loss.cu, launched by
//! src/exec/select_loss.rs), tested against this file by tests/kernels.rs.

use crate::batch::validate_cu_seqlens;
use crate::config::{Shaping, TasScope, VppoConfig};
use crate::error::{Result, Tensor, VppoError};

/// Below this spread of Sbar over a scope (hi - lo <= 1e-6), every alpha of the scope is 1. Shared with
/// the kernels: `VPPO_TAS_MIN_SPREAD` of kernels/vppo_params.h.
pub const TAS_MIN_SPREAD: f64 = crate::params::VPPO_TAS_MIN_SPREAD;

/// Added to the mean of n_b in mean-preserving shaping (the official code's 1e-8). Shared with the
/// kernels: `VPPO_TAS_MEAN_EPS` of kernels/vppo_params.h.
pub const TAS_MEAN_EPS: f64 = crate::params::VPPO_TAS_MEAN_EPS;

/// `Sbar_b = (1 / L_b) sum_{t in b} score[t]`; 0 for an empty response (which takes no part in TAS).
///
/// Errors when `cu_seqlens` is malformed for N = `score.len()`.
pub fn sbar(score: &[f64], cu_seqlens: &[i32]) -> Result<Vec<f64>> {
    validate_cu_seqlens(cu_seqlens, score.len())?;
    Ok(cu_seqlens
        .windows(2)
        .map(|w| {
            let (start, end) = (w[0] as usize, w[1] as usize);
            if end == start {
                0.0
            } else {
                score[start..end].iter().sum::<f64>() / (end - start) as f64
            }
        })
        .collect())
}

/// alpha_b for every response (SPEC section 4).
///
/// - Responses with L_b = 0 take no part and get alpha_b = 1.
/// - The scope is [`VppoConfig::scope`]: the whole batch, or each group of G = `cfg.group_size`
///   consecutive responses (then B % G must be 0, else [`VppoError::GroupSize`]).
/// - Over the participating responses P of a scope: lo = min Sbar, hi = max Sbar, or the caller's
///   `cfg.tas_range` in their place. If P is empty or hi - lo <= 1e-6, alpha = 1 for the scope.
///   Otherwise n_b = clamp((Sbar_b - lo) / (hi - lo), 0, 1) and
///   * mean-preserving: beta_max = beta_min + (1 - beta_min) / (mean_{b in P} n_b + 1e-8);
///   * linear: beta_max = `cfg.beta_max`;
///
///   alpha_b = beta_min + n_b (beta_max - beta_min).
/// - Shaping `None`: alpha = 1 everywhere.
///
/// `sbar` has B entries and `cu_seqlens` B + 1 (only the lengths L_b are read from it). The config is
/// validated first.
pub fn alpha(sbar: &[f64], cu_seqlens: &[i32], cfg: &VppoConfig) -> Result<Vec<f64>> {
    cfg.validate()?;
    let b_count = sbar.len();
    if cu_seqlens.len() != b_count + 1 {
        return Err(VppoError::Shape {
            tensor: Tensor::CuSeqlens,
            detail: format!(
                "has {} elements, expected B + 1 = {} (B = {b_count} Sbar values)",
                cu_seqlens.len(),
                b_count + 1
            ),
        });
    }
    let last = *cu_seqlens.last().unwrap_or(&0);
    validate_cu_seqlens(cu_seqlens, last.max(0) as usize)?;
    let mut alpha = vec![1.0f64; b_count];
    if cfg.shaping == Shaping::None {
        return Ok(alpha);
    }
    let scope_len = match cfg.scope() {
        TasScope::Batch => b_count.max(1),
        TasScope::Group => {
            let g = cfg.group_size;
            if g == 0 || b_count % g != 0 {
                return Err(VppoError::GroupSize {
                    tensor: Tensor::Advantages,
                    n_responses: b_count,
                    group_size: g,
                });
            }
            g
        }
    };
    for scope_start in (0..b_count).step_by(scope_len) {
        let scope_end = (scope_start + scope_len).min(b_count);
        // P: the responses of the scope with L_b > 0
        let members: Vec<usize> = (scope_start..scope_end)
            .filter(|&b| cu_seqlens[b + 1] > cu_seqlens[b])
            .collect();
        if members.is_empty() {
            continue;
        }
        // lo = min_P Sbar, hi = max_P Sbar (or the caller's range)
        let (lo, hi) = cfg.tas_range.unwrap_or_else(|| {
            let lo = members
                .iter()
                .map(|&b| sbar[b])
                .fold(f64::INFINITY, f64::min);
            let hi = members
                .iter()
                .map(|&b| sbar[b])
                .fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        });
        if hi - lo <= TAS_MIN_SPREAD {
            continue; // alpha = 1 for the scope
        }
        // n_b = clamp((Sbar_b - lo) / (hi - lo), 0, 1)
        let n: Vec<f64> = members
            .iter()
            .map(|&b| ((sbar[b] - lo) / (hi - lo)).clamp(0.0, 1.0))
            .collect();
        let beta_min = cfg.beta_min;
        let beta_max = match cfg.shaping {
            // beta_max = beta_min + (1 - beta_min) / (mean n + 1e-8)
            Shaping::MeanPreserving => {
                let mean_n = n.iter().sum::<f64>() / n.len() as f64;
                beta_min + (1.0 - beta_min) / (mean_n + TAS_MEAN_EPS)
            }
            // (shaping None returned above)
            Shaping::Linear | Shaping::None => cfg.beta_max,
        };
        // alpha_b = beta_min + n_b (beta_max - beta_min)
        for (&b, &n_b) in members.iter().zip(&n) {
            alpha[b] = beta_min + n_b * (beta_max - beta_min);
        }
    }
    Ok(alpha)
}
