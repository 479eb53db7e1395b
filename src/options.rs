//! The options shared by the commands: the loss options of `vppo loss` and `vppo bench`
//! ([`LossOptions`]) and the device (`--device`, also `vppo train`'s). The commands themselves live
//! above this module: src/cli.rs (`vppo loss`), src/bench.rs and src/train/.
//!
//! Every numeric option takes a negative number as a separate word (`--logp-penalty -0.5`,
//! `--beta-min -0.1`): clap would otherwise read `-0.5` as an unknown flag. The value is then checked
//! by [`VppoConfig::validate`] like any other.

use clap::{Args, ValueEnum};

use crate::api::{Device, LaneOrder};
use crate::config::{
    Aggregation, KlPenalty, LossType, MaskBy, Perception, Shaping, TasScope, VppoConfig,
};

/// `--perception`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PerceptionArg {
    /// clamp(kl, 0, score_clamp): the exact full-vocabulary KL (the paper's definition).
    FullKl,
    /// clamp(k3, 0, score_clamp): the official code's single-sample estimate.
    K3,
}

/// `--shaping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShapingArg {
    /// beta_max chosen so the mean alpha of the scope is 1 (the official code).
    MeanPreserving,
    /// Fixed beta_min, beta_max (the paper's text).
    Linear,
    /// alpha = 1.
    None,
}

/// `--tas-scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// The whole batch.
    Batch,
    /// Each group of G responses.
    Group,
}

/// `--aggregation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AggregationArg {
    /// sum_t mask l_t / Z.
    TokenMean,
    /// Mean over responses of (sum_t mask l_t) / L_b.
    SeqMeanTokenMean,
    /// Mean over responses of sum_t mask l_t.
    SeqMeanTokenSum,
}

/// `--mask-by` (SPEC section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MaskByArg {
    /// The top top_fraction of each response by perception score (SPEC section 3).
    Perception,
    /// The top entropy_top_fraction of each response by entropy.
    Entropy,
    /// The union of the two masks, per token.
    PerceptionOrEntropy,
}

/// `--loss-type` (SPEC section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossTypeArg {
    /// The clipped surrogate on the token ratio (SPEC section 5).
    Ppo,
    /// The sequence-level ratio exp(s_b), s_b the mean log-ratio of the response; gradient through s_b.
    Gspo,
    /// The value of s_b, each token's gradient through its own logp.
    GspoToken,
    /// -A' logp c, c the clipped token ratio held constant.
    Cispo,
}

/// `--kl-penalty` (SPEC section 12); the official names `kl` and `low-var-kl` are aliases of k1 and k3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KlPenaltyArg {
    /// No KL term.
    None,
    /// k1 = logp - ref_logp (the official `kl`).
    #[value(alias = "kl")]
    K1,
    /// |k1|.
    Abs,
    /// k1^2 / 2.
    Mse,
    /// clamp(exp(x) - x - 1, -10, 10), x = clamp(ref_logp - logp, -20, 20) (the official `low_var_kl`).
    #[value(alias = "low-var-kl")]
    K3,
    /// The exact KL(pi || pi_ref) over the vocabulary, from `ref_logits` (SPEC section 12).
    Full,
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU reference (f64, the oracle).
    Cpu,
    /// The CUDA kernels on GPU 0.
    Cuda,
    /// The CUDA kernel sources run on the CPU by the SIMT executor.
    Simt,
}

impl DeviceArg {
    /// The library's device.
    pub fn device(self) -> Device {
        match self {
            DeviceArg::Cpu => Device::Reference,
            DeviceArg::Cuda => Device::Cuda(0),
            DeviceArg::Simt => Device::Simt(LaneOrder::Forward),
        }
    }

    /// The name printed in the summary.
    pub fn name(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
            DeviceArg::Simt => "simt",
        }
    }
}

/// The value of `--dual-clip`: a number, or `none` (the dual clip off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DualClipArg(pub Option<f64>);

/// Parses `--dual-clip`: a number, or `none` to turn the dual clip off.
pub fn parse_dual_clip(s: &str) -> std::result::Result<DualClipArg, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(DualClipArg(None));
    }
    s.parse::<f64>()
        .map(|c| DualClipArg(Some(c)))
        .map_err(|_| format!("`{s}` is neither a number nor `none`"))
}

/// The loss options of `vppo loss` and `vppo bench`. Every default is [`VppoConfig::default`], the
/// official VPPO setting (a unit test checks that parsing no options gives exactly that config).
#[derive(Debug, Clone, Args)]
pub struct LossOptions {
    /// G: responses g*G .. (g+1)*G-1 answer the same prompt (B must be a multiple of G for the group
    /// scope).
    #[arg(long, value_name = "G", allow_negative_numbers = true, default_value_t = VppoConfig::default().group_size)]
    pub group_size: usize,
    /// The token score: the exact KL (the paper) or k3 (the official code's estimate).
    #[arg(long, value_enum, default_value_t = PerceptionArg::FullKl)]
    pub perception: PerceptionArg,
    /// Upper clamp of the score.
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().score_clamp)]
    pub score_clamp: f64,
    /// Fraction of each response's tokens that carry gradient: k_b = ceil(X * L_b), exact, in (0, 1].
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().top_fraction)]
    pub top_fraction: f64,
    /// Trajectory-level advantage shaping: mean-preserving (the official code), linear (the paper's
    /// text) or none.
    #[arg(long, value_enum, default_value_t = ShapingArg::MeanPreserving)]
    pub shaping: ShapingArg,
    /// beta_min of the shaping, in [0, 1].
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().beta_min)]
    pub beta_min: f64,
    /// beta_max of linear shaping (mean-preserving derives its own), >= beta_min.
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().beta_max)]
    pub beta_max: f64,
    /// Over which responses min and max Sbar are taken [default: batch for mean-preserving, group for
    /// linear].
    #[arg(long, value_enum)]
    pub tas_scope: Option<ScopeArg>,
    /// Lower PPO clip: r_clip >= 1 - X.
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().eps_low)]
    pub eps_low: f64,
    /// Upper PPO clip: r_clip <= 1 + X (DAPO's clip-higher).
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().eps_high)]
    pub eps_high: f64,
    /// Dual clip for negative advantages (> 1), or `none` to turn it off.
    #[arg(
        long,
        value_name = "X|none",
        allow_negative_numbers = true,
        value_parser = parse_dual_clip,
        default_value = "3"
    )]
    pub dual_clip: DualClipArg,
    /// How the masked per-token losses are reduced.
    #[arg(long, value_enum, default_value_t = AggregationArg::TokenMean)]
    pub aggregation: AggregationArg,
    /// Z, the token normalizer of token-mean and of the logp penalty [default: N, the number of
    /// response tokens in the file].
    #[arg(long, value_name = "Z", allow_negative_numbers = true)]
    pub token_normalizer: Option<f64>,
    /// B', the response normalizer of the seq-mean aggregations [default: the number of non-empty
    /// responses in the file]; data parallel gives the count over every rank (SPEC section 11).
    #[arg(long, value_name = "B", allow_negative_numbers = true)]
    pub response_normalizer: Option<f64>,
    /// Weight of the -logp term over all response tokens.
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().logp_penalty)]
    pub logp_penalty: f64,
    /// Sampling temperature tau; logits are divided by it.
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = VppoConfig::default().temperature)]
    pub temperature: f64,
    /// The per-token policy loss (SPEC section 12): ppo, gspo, gspo-token or cispo.
    #[arg(long, value_enum, default_value_t = LossTypeArg::Ppo)]
    pub loss_type: LossTypeArg,
    /// Which key picks the mask (SPEC section 12): perception, entropy or perception-or-entropy.
    #[arg(long, value_enum, default_value_t = MaskByArg::Perception)]
    pub mask_by: MaskByArg,
    /// Fraction of each response's tokens of highest entropy in the entropy mask, 0 < q <= 1.
    #[arg(long, value_name = "Q", allow_negative_numbers = true, default_value_t = VppoConfig::default().entropy_top_fraction)]
    pub entropy_top_fraction: f64,
    /// The KL penalty to a reference policy (SPEC section 12): none, k1, abs, mse or k3; any but none
    /// needs `ref_logp` [N] (F32) in the input.
    #[arg(long, value_enum, default_value_t = KlPenaltyArg::None)]
    pub kl_penalty: KlPenaltyArg,
    /// beta >= 0, the weight of the KL penalty.
    #[arg(long, value_name = "BETA", allow_negative_numbers = true, default_value_t = VppoConfig::default().kl_coef)]
    pub kl_coef: f64,
    /// Where to compute: cpu (the f64 reference), cuda (GPU 0) or simt (the kernels run on the CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

impl LossOptions {
    /// The loss configuration these options describe (not yet validated).
    pub fn config(&self) -> VppoConfig {
        VppoConfig {
            group_size: self.group_size,
            perception: match self.perception {
                PerceptionArg::FullKl => Perception::FullKl,
                PerceptionArg::K3 => Perception::K3,
            },
            score_clamp: self.score_clamp,
            top_fraction: self.top_fraction,
            shaping: match self.shaping {
                ShapingArg::MeanPreserving => Shaping::MeanPreserving,
                ShapingArg::Linear => Shaping::Linear,
                ShapingArg::None => Shaping::None,
            },
            beta_min: self.beta_min,
            beta_max: self.beta_max,
            tas_scope: self.tas_scope.map(|s| match s {
                ScopeArg::Batch => TasScope::Batch,
                ScopeArg::Group => TasScope::Group,
            }),
            tas_range: None,
            eps_low: self.eps_low,
            eps_high: self.eps_high,
            dual_clip: self.dual_clip.0,
            aggregation: match self.aggregation {
                AggregationArg::TokenMean => Aggregation::TokenMean,
                AggregationArg::SeqMeanTokenMean => Aggregation::SeqMeanTokenMean,
                AggregationArg::SeqMeanTokenSum => Aggregation::SeqMeanTokenSum,
            },
            token_normalizer: self.token_normalizer,
            response_normalizer: self.response_normalizer,
            logp_penalty: self.logp_penalty,
            temperature: self.temperature,
            loss_type: match self.loss_type {
                LossTypeArg::Ppo => LossType::Ppo,
                LossTypeArg::Gspo => LossType::Gspo,
                LossTypeArg::GspoToken => LossType::GspoToken,
                LossTypeArg::Cispo => LossType::Cispo,
            },
            mask_by: match self.mask_by {
                MaskByArg::Perception => MaskBy::Perception,
                MaskByArg::Entropy => MaskBy::Entropy,
                MaskByArg::PerceptionOrEntropy => MaskBy::PerceptionOrEntropy,
            },
            entropy_top_fraction: self.entropy_top_fraction,
            kl_penalty: match self.kl_penalty {
                KlPenaltyArg::None => KlPenalty::None,
                KlPenaltyArg::K1 => KlPenalty::K1,
                KlPenaltyArg::Abs => KlPenalty::Abs,
                KlPenaltyArg::Mse => KlPenalty::Mse,
                KlPenaltyArg::K3 => KlPenalty::K3,
                KlPenaltyArg::Full => KlPenalty::Full,
            },
            kl_coef: self.kl_coef,
        }
    }
}
