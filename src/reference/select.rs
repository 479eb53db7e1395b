//! Token-level Gradient Filtering (SPEC section 3): the per-response top-k mask.
//!
//! The kernel: `vppo_select` of kernels/select_loss.cu, launched by src/exec/select_loss.rs, tested
//! against this file by tests/kernels.rs (mask_equals_reference); the reference alone by
//! tests/reference_unit.rs and tests/reference_props.rs.

use std::cmp::Ordering;

use crate::batch::validate_cu_seqlens;
use crate::config::{MaskBy, TopFraction, VppoConfig};
use crate::error::Result;

/// The rank order of two scores: higher first; NaN (which the perception pass never produces) ranks
/// below every number; -0.0 and +0.0 are equal.
fn higher_first(x: f64, y: f64) -> Ordering {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
    }
}

/// The top-k mask of each response and its k.
///
/// For response b (tokens `cu_seqlens[b] .. cu_seqlens[b+1]`, length L_b):
/// k_b = ceil(top_fraction * L_b) in exact integer arithmetic ([`TopFraction::k_for`]: 0.4 x 10 is 4),
/// and `mask[t] = 1` for exactly the k_b tokens of b with the highest score, else 0. Ties go to the lower
/// token index: the tokens are sorted by score descending with a stable sort, so equal scores keep their
/// index order, and the first k_b are taken.
///
/// Returns `(mask [N], k [B])`. Errors when `cu_seqlens` is malformed for N = `score.len()`.
pub fn topk_mask(
    score: &[f64],
    cu_seqlens: &[i32],
    frac: TopFraction,
) -> Result<(Vec<u8>, Vec<u32>)> {
    validate_cu_seqlens(cu_seqlens, score.len())?;
    let mut mask = vec![0u8; score.len()];
    let mut ks = Vec::with_capacity(cu_seqlens.len() - 1);
    for w in cu_seqlens.windows(2) {
        let (start, end) = (w[0] as usize, w[1] as usize);
        // k_b = ceil(top_fraction * L_b), exact
        let k = frac.k_for(end - start);
        // indices of response b, highest score first, ties in index order (stable sort)
        let mut order: Vec<usize> = (start..end).collect();
        order.sort_by(|&i, &j| higher_first(score[i], score[j]));
        for &t in &order[..k] {
            mask[t] = 1;
        }
        ks.push(k as u32);
    }
    Ok((mask, ks))
}

/// The mask of SPEC section 12's `mask_by` and the perception k_b.
///
/// `perception`: [`topk_mask`] on `score` with `top_fraction`. `entropy`: [`topk_mask`] on `entropy`
/// with `entropy_top_fraction` (the ceil(q L_b) tokens of highest entropy, ties to the lower index).
/// `perception-or-entropy`: the union of the two, per token. The returned k is always the perception
/// k_b = ceil(top_fraction L_b) (SPEC section 8's `k`), whatever picks the mask.
///
/// Returns `(mask [N], k [B])`. Errors when `cu_seqlens` is malformed, `entropy` is not of the
/// length of `score`, or a fraction is outside (0, 1].
pub fn mask_for(
    score: &[f64],
    entropy: &[f64],
    cu_seqlens: &[i32],
    cfg: &VppoConfig,
) -> Result<(Vec<u8>, Vec<u32>)> {
    let (mask, k) = topk_mask(score, cu_seqlens, cfg.top_fraction_exact()?)?;
    if cfg.mask_by == MaskBy::Perception {
        return Ok((mask, k));
    }
    if entropy.len() != score.len() {
        return Err(crate::error::VppoError::Shape {
            tensor: crate::error::Tensor::Scores,
            detail: format!(
                "entropy has {} values, expected one per token ({})",
                entropy.len(),
                score.len()
            ),
        });
    }
    let (by_entropy, _) = topk_mask(entropy, cu_seqlens, cfg.entropy_top_fraction_exact()?)?;
    let mask = match cfg.mask_by {
        MaskBy::Entropy => by_entropy,
        _ => mask.iter().zip(&by_entropy).map(|(&a, &b)| a | b).collect(),
    };
    Ok((mask, k))
}
