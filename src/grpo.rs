//! GRPO advantages from rewards, as the official code (EasyR1) computes them.

use crate::error::{Location, Result, Tensor, VppoError};

/// Added to the group's standard deviation (EasyR1's eps).
pub const GRPO_EPS: f64 = 1e-6;

/// advantages[i] = (r_i - mean_g) / (std_g + 1e-6) over each group g of `group_size` consecutive
/// rewards, with the unbiased standard deviation (divisor G - 1), computed in f64.
///
/// As EasyR1's `compute_grpo_outcome_advantage`: a group of one gets mean 0 and std 1, so its advantage
/// is r / (1 + 1e-6). A group of equal rewards gets advantage 0.
///
/// Errors: `group_size` = 0 ([`VppoError::Config`]), `rewards.len() % group_size != 0`
/// ([`VppoError::GroupSize`]), a NaN or infinite reward ([`VppoError::NonFinite`], naming the response).
pub fn grpo_advantages(rewards: &[f32], group_size: usize) -> Result<Vec<f32>> {
    if group_size == 0 {
        return Err(VppoError::Config {
            field: "group-size",
            value: "0".into(),
            expected: "G >= 1",
        });
    }
    if rewards.len() % group_size != 0 {
        return Err(VppoError::GroupSize {
            tensor: Tensor::Rewards,
            n_responses: rewards.len(),
            group_size,
        });
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(VppoError::NonFinite {
            tensor: Tensor::Rewards,
            location: Location::Response(i),
            value: rewards[i] as f64,
        });
    }
    let mut adv = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let g = group.len() as f64;
        let (mean, std) = if group.len() == 1 {
            (0.0, 1.0)
        } else {
            // mean = sum r / G;  std = sqrt(sum (r - mean)^2 / (G - 1))
            let mean = group.iter().map(|&r| r as f64).sum::<f64>() / g;
            let var = group
                .iter()
                .map(|&r| (r as f64 - mean).powi(2))
                .sum::<f64>()
                / (g - 1.0);
            (mean, var.sqrt())
        };
        adv.extend(
            group
                .iter()
                .map(|&r| ((r as f64 - mean) / (std + GRPO_EPS)) as f32),
        );
    }
    Ok(adv)
}
