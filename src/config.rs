//! The loss configuration. `VppoConfig::default()` is the official VPPO setting (the EasyR1 fork
//! whose defaults produced the paper's results); `VppoConfig::paper()` is the variant the paper's text
//! describes (linear shaping per group). Every field is documented with where its default comes from.

use crate::error::{Result, VppoError};

/// Which per-token visual-dependency score drives the mask and the shaping (SPEC section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Perception {
    /// `clamp(kl, 0, score_clamp)`, the exact full-vocabulary KL(p || p_masked): the paper's definition.
    #[default]
    FullKl,
    /// `clamp(k3, 0, score_clamp)`, the single-sample estimate of the official code.
    K3,
}

/// Trajectory-level advantage shaping (SPEC section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shaping {
    /// beta_max chosen so the mean alpha over the scope is 1 (the official code).
    #[default]
    MeanPreserving,
    /// Fixed beta_min and beta_max (the paper's text).
    Linear,
    /// alpha = 1 for every response.
    None,
}

/// Over which responses lo = min Sbar and hi = max Sbar are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TasScope {
    /// The whole batch (the official code; the default of mean-preserving shaping).
    Batch,
    /// Each group of G responses to one prompt (the paper's text; the default of linear shaping).
    Group,
}

/// How the masked per-token losses are reduced (SPEC section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// sum_t mask l_t / Z (the official code).
    #[default]
    TokenMean,
    /// Mean over responses of (sum_t mask l_t) / L_b (verl).
    SeqMeanTokenMean,
    /// Mean over responses of sum_t mask l_t (verl).
    SeqMeanTokenSum,
}

/// The per-token policy loss of the official `compute_policy_loss` (SPEC section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossType {
    /// The clipped surrogate of SPEC section 5 on the token ratio (the official `default`).
    #[default]
    Ppo,
    /// GSPO: every token of response b uses the sequence log-ratio s_b = mean over b of
    /// (logp - old_logp); the gradient flows through s_b to every logp of b.
    Gspo,
    /// GSPO-token: the value of s_b, but each token's gradient only through its own logp.
    GspoToken,
    /// CISPO: l_t = -A' logp_t c_t, c_t the clipped token ratio held constant; no max, no dual clip.
    Cispo,
}

/// Which per-token key picks the mask (SPEC section 12, official `use_vppo_on_entropy`). TAS always uses
/// the perception scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskBy {
    /// The top `top_fraction` of each response by perception score (SPEC section 3).
    #[default]
    Perception,
    /// The top `entropy_top_fraction` of each response by entropy.
    Entropy,
    /// The union, per token, of the perception mask and the entropy mask (the official combination).
    PerceptionOrEntropy,
}

/// The KL penalty to a reference policy (SPEC section 12, official `use_kl_loss` / `kl_penalty`), from
/// the reference policy's log-prob of each target, `ref_logp` [N], with k1 = logp - ref_logp. It applies
/// to every response token (the official `average_loss(kld, response_mask)`), not only the masked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KlPenalty {
    /// No KL term (the default; the official recipe runs without a reference policy).
    #[default]
    None,
    /// k1 = logp - ref_logp (the official `kl`).
    K1,
    /// |k1| (the official `abs`).
    Abs,
    /// k1^2 / 2 (the official `mse`).
    Mse,
    /// clamp(exp(x) - x - 1, -10, 10), x = clamp(ref_logp - logp, -20, 20) (the official `low_var_kl`).
    K3,
    /// The exact KL(pi || pi_ref) of each token over the whole vocabulary, from the reference
    /// policy's logits `ref_logits` (the official code accepts "full" but cannot compute it).
    Full,
}

impl KlPenalty {
    /// The name the command line and the Python op take (`--kl-penalty`).
    pub fn name(self) -> &'static str {
        match self {
            KlPenalty::None => "none",
            KlPenalty::K1 => "k1",
            KlPenalty::Abs => "abs",
            KlPenalty::Mse => "mse",
            KlPenalty::K3 => "k3",
            KlPenalty::Full => "full",
        }
    }
}

/// The top-k fraction as an exact decimal: `num / den` with `den` a power of ten.
///
/// `k_b = ceil(top_fraction * L_b)` must be computed in exact arithmetic: 0.4 x 10 is 4, never 5.
/// The f64 nearest to 0.4 is slightly above 0.4, so a float product can land above an integer. We take
/// the shortest decimal that round-trips to the f64 (what a person typed) and compute with integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopFraction {
    num: u64,
    den: u64,
}

impl TopFraction {
    /// The exact decimal of `x`, which must lie in (0, 1].
    pub fn new(x: f64) -> Result<Self> {
        if !(x > 0.0 && x <= 1.0) {
            return Err(VppoError::Config {
                field: "top-fraction",
                value: x.to_string(),
                expected: "0 < top_fraction <= 1",
            });
        }
        // Display of f64 is the shortest decimal that parses back to the same f64, without exponent.
        let text = x.to_string();
        let (int_part, frac_part) = text.split_once('.').unwrap_or((text.as_str(), ""));
        // At most 17 significant digits after the point fit a u64 together with the integer part 0 or 1;
        // longer decimals (tiny fractions like 1e-30) are rounded up to the 18th place, which only makes
        // k_b larger by at most one token for a response of 10^18 tokens.
        let digits: String = frac_part.chars().take(18).collect();
        let den = 10u64.pow(digits.len() as u32);
        let frac: u64 = if digits.is_empty() {
            0
        } else {
            digits.parse().unwrap_or(0)
        };
        let whole: u64 = int_part.parse().unwrap_or(0);
        let mut num = whole * den + frac;
        if num == 0 {
            num = 1; // x > 0 but below 1e-18: the smallest representable positive fraction
        }
        let g = gcd(num, den);
        Ok(TopFraction {
            num: num / g,
            den: den / g,
        })
    }

    /// Numerator of the exact fraction.
    pub fn numerator(self) -> u64 {
        self.num
    }

    /// Denominator of the exact fraction.
    pub fn denominator(self) -> u64 {
        self.den
    }

    /// k = ceil(num * len / den), in 128-bit integers.
    pub fn k_for(self, len: usize) -> usize {
        let p = self.num as u128 * len as u128;
        let d = self.den as u128;
        p.div_ceil(d) as usize
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// All the knobs of the VPPO loss. `Default` is the official VPPO setting.
#[derive(Debug, Clone, PartialEq)]
pub struct VppoConfig {
    /// G: responses g*G .. (g+1)*G - 1 answer the same prompt. Default 1.
    pub group_size: usize,
    /// Which score: exact KL (default, the paper's definition) or k3 (the official code's estimate).
    pub perception: Perception,
    /// Upper clamp of the score. Default 10.
    pub score_clamp: f64,
    /// Fraction of each response's tokens that carry gradient (TGF). Default 0.4.
    pub top_fraction: f64,
    /// TAS variant. Default mean-preserving (the official code).
    pub shaping: Shaping,
    /// beta_min of TAS. Default 0.9.
    pub beta_min: f64,
    /// beta_max of linear TAS. Default 1.1 (unused by mean-preserving shaping, which derives it).
    pub beta_max: f64,
    /// The TAS scope; `None` takes the shaping's own: batch for mean-preserving, group for linear.
    pub tas_scope: Option<TasScope>,
    /// A caller-given (lo, hi) range of Sbar used in place of the scope's own min and max (the
    /// official code takes them over the whole mini-batch and computes the loss per micro-batch).
    pub tas_range: Option<(f64, f64)>,
    /// Lower PPO clip. Default 0.2.
    pub eps_low: f64,
    /// Upper PPO clip (DAPO's clip-higher). Default 0.28.
    pub eps_high: f64,
    /// Dual clip for negative advantages. Default Some(3.0); `None` turns it off.
    pub dual_clip: Option<f64>,
    /// Loss reduction. Default token-mean.
    pub aggregation: Aggregation,
    /// Z, the token normalizer. `None` (default) is N, the number of response tokens in the batch.
    pub token_normalizer: Option<f64>,
    /// B', the response normalizer of the seq-mean aggregations. `None` (default) is the number of
    /// non-empty responses in the batch; data parallel gives the count over every rank (SPEC 11).
    pub response_normalizer: Option<f64>,
    /// Weight of the -logp term over all response tokens. Default 0.06.
    pub logp_penalty: f64,
    /// Sampling temperature tau; logits are divided by it. Default 1.
    pub temperature: f64,
    /// The per-token policy loss (SPEC section 12). Default PPO (the clipped surrogate of section 5).
    pub loss_type: LossType,
    /// Which key picks the mask (SPEC section 12). Default perception.
    pub mask_by: MaskBy,
    /// Fraction of each response's tokens of highest entropy in the entropy mask, exact as
    /// `top_fraction` is. Default 0.2 (the official `top_p_entropy_tokens`); unused with
    /// `mask_by = perception`, but always validated.
    pub entropy_top_fraction: f64,
    /// The KL penalty to a reference policy (SPEC section 12). Default none; any other needs the
    /// batch's `ref_logp`.
    pub kl_penalty: KlPenalty,
    /// beta >= 0, the weight of the KL term. Default 1e-3 (the official `kl_coef`); unused with
    /// `kl_penalty = none`, but always validated.
    pub kl_coef: f64,
}

impl Default for VppoConfig {
    fn default() -> Self {
        VppoConfig {
            group_size: 1,
            perception: Perception::FullKl,
            score_clamp: 10.0,
            top_fraction: 0.4,
            shaping: Shaping::MeanPreserving,
            beta_min: 0.9,
            beta_max: 1.1,
            tas_scope: None,
            tas_range: None,
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: Some(3.0),
            aggregation: Aggregation::TokenMean,
            token_normalizer: None,
            response_normalizer: None,
            logp_penalty: 0.06,
            temperature: 1.0,
            loss_type: LossType::Ppo,
            mask_by: MaskBy::Perception,
            entropy_top_fraction: 0.2,
            kl_penalty: KlPenalty::None,
            kl_coef: 1e-3,
        }
    }
}

impl VppoConfig {
    /// The variant the paper's text describes: linear shaping with beta in [0.9, 1.1] per group of G.
    pub fn paper(group_size: usize) -> Self {
        VppoConfig {
            group_size,
            shaping: Shaping::Linear,
            ..Self::default()
        }
    }

    /// DAPO with the same clipping: every token carries gradient, no advantage shaping.
    pub fn dapo() -> Self {
        VppoConfig {
            top_fraction: 1.0,
            shaping: Shaping::None,
            ..Self::default()
        }
    }

    /// The scope in force: the configured one, or the shaping's own default.
    pub fn scope(&self) -> TasScope {
        self.tas_scope.unwrap_or(match self.shaping {
            Shaping::Linear => TasScope::Group,
            Shaping::MeanPreserving | Shaping::None => TasScope::Batch,
        })
    }

    /// Whether B must be a whole number of groups of G: group-scope shaping reads its responses a
    /// group at a time.
    pub fn needs_groups(&self) -> bool {
        self.scope() == TasScope::Group && self.shaping != Shaping::None
    }

    /// Whether the loss reads the batch's `ref_logp`: any KL penalty but none and full.
    pub fn needs_ref_logp(&self) -> bool {
        !matches!(self.kl_penalty, KlPenalty::None | KlPenalty::Full)
    }

    /// Whether the loss reads the batch's `ref_logits`: the full KL penalty.
    pub fn needs_ref_logits(&self) -> bool {
        self.kl_penalty == KlPenalty::Full
    }

    /// The exact top-k fraction (errors when outside (0, 1]).
    pub fn top_fraction_exact(&self) -> Result<TopFraction> {
        TopFraction::new(self.top_fraction)
    }

    /// The exact entropy top-k fraction (errors, naming `entropy-top-fraction`, when outside (0, 1]).
    pub fn entropy_top_fraction_exact(&self) -> Result<TopFraction> {
        TopFraction::new(self.entropy_top_fraction).map_err(|_| VppoError::Config {
            field: "entropy-top-fraction",
            value: self.entropy_top_fraction.to_string(),
            expected: "0 < entropy_top_fraction <= 1",
        })
    }

    /// Checks every field's range (SPEC section 7). Called before any computation.
    pub fn validate(&self) -> Result<()> {
        fn bad(field: &'static str, value: impl ToString, expected: &'static str) -> VppoError {
            VppoError::Config {
                field,
                value: value.to_string(),
                expected,
            }
        }
        if self.group_size == 0 {
            return Err(bad("group-size", 0, "G >= 1"));
        }
        if !(self.score_clamp.is_finite() && self.score_clamp > 0.0) {
            return Err(bad("score-clamp", self.score_clamp, "a finite value > 0"));
        }
        self.top_fraction_exact()?;
        self.entropy_top_fraction_exact()?;
        if !(self.beta_min >= 0.0 && self.beta_min <= 1.0) {
            return Err(bad("beta-min", self.beta_min, "0 <= beta_min <= 1"));
        }
        if !(self.beta_max.is_finite() && self.beta_max >= self.beta_min) {
            return Err(bad("beta-max", self.beta_max, "a finite value >= beta_min"));
        }
        if let Some((lo, hi)) = self.tas_range {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(bad("tas-range", format!("({lo}, {hi})"), "finite lo <= hi"));
            }
        }
        if !(self.eps_low.is_finite() && self.eps_low >= 0.0) {
            return Err(bad("eps-low", self.eps_low, "a finite value >= 0"));
        }
        if !(self.eps_high.is_finite() && self.eps_high >= 0.0) {
            return Err(bad("eps-high", self.eps_high, "a finite value >= 0"));
        }
        if let Some(c) = self.dual_clip {
            if !(c.is_finite() && c > 1.0) {
                return Err(bad("dual-clip", c, "a finite value > 1, or none"));
            }
        }
        if let Some(z) = self.token_normalizer {
            if !(z.is_finite() && z > 0.0) {
                return Err(bad("token-normalizer", z, "a finite value > 0"));
            }
        }
        if let Some(b) = self.response_normalizer {
            if !(b.is_finite() && b > 0.0) {
                return Err(bad("response-normalizer", b, "a finite value > 0"));
            }
        }
        if !(self.kl_coef.is_finite() && self.kl_coef >= 0.0) {
            return Err(bad("kl-coef", self.kl_coef, "a finite value >= 0"));
        }
        if !self.logp_penalty.is_finite() {
            return Err(bad("logp-penalty", self.logp_penalty, "a finite value"));
        }
        // The kernels scale by 1 / tau and log2(e) / tau in f32: both must be finite, normal f32
        // numbers (5e-324 passes `> 0` but its inverse is inf even in f64).
        let inv = 1.0 / self.temperature;
        let fits = |x: f64| {
            x.is_finite() && x.abs() >= f32::MIN_POSITIVE as f64 && x.abs() <= f32::MAX as f64
        };
        if !(self.temperature.is_finite()
            && self.temperature > 0.0
            && fits(inv)
            && fits(inv * std::f64::consts::LOG2_E))
        {
            return Err(bad(
                "temperature",
                self.temperature,
                "a finite value > 0 whose inverse (and log2(e) / temperature) is a normal f32: \
                 4.3e-39 < temperature < 8.5e37",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_fraction_is_exact() {
        // 0.4 * 10 = 4 exactly; the f64 0.4 is 0.400000000000000022..., whose product ceils to 5.
        let f = TopFraction::new(0.4).unwrap();
        assert_eq!((f.numerator(), f.denominator()), (2, 5));
        assert_eq!(f.k_for(10), 4);
        assert_eq!(f.k_for(11), 5); // 4.4 -> 5
        assert_eq!(f.k_for(0), 0);
        assert_eq!(f.k_for(1), 1);
        // 0.7 * 10 is 7.000000000000001 in f64: still 7.
        assert_eq!(TopFraction::new(0.7).unwrap().k_for(10), 7);
        assert_eq!(TopFraction::new(1.0).unwrap().k_for(123), 123);
        assert!(TopFraction::new(0.0).is_err());
        assert!(TopFraction::new(1.5).is_err());
        assert!(TopFraction::new(f64::NAN).is_err());
    }
}
