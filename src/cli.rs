//! The logic of the `vppo` command line, kept in the library so that it can be tested; the binary
//! (src/bin/vppo.rs) only parses the arguments and prints.
//!
//! `vppo loss --input IN.safetensors --output OUT.safetensors [options]` (SPEC section 9): reads the
//! batch, computes the loss, dloss/dlogits and every output, writes them to OUT (only once everything
//! has succeeded) and returns a one-line JSON summary.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::api::{Device, LaneOrder, Vppo};
use crate::config::{Aggregation, Perception, Shaping, TasScope, VppoConfig};
use crate::error::Result;
use crate::io;

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

/// The arguments of `vppo loss`: the files, and the loss options shared with `vppo bench`.
#[derive(Debug, Clone, Args)]
pub struct LossArgs {
    /// Input safetensors file with `logits`, `logits_masked` (`[N, V]`, f32/f16/bf16), `targets` (`[N]`,
    /// i32), `old_logp` (`[N]`, f32), `advantages` (`[B]`, f32) and `cu_seqlens` (`[B+1]`, i32).
    #[arg(long, value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Output safetensors file: `loss`, `score`, `kl`, `k3`, `entropy`, `logp`, `mask` (u8), `sbar`,
    /// `alpha`, `grad_logits` ([N, V], f32) and also `lse`, `logp_masked`, `dlogp`, `k`. Written only on
    /// success.
    #[arg(long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// The loss options and the device.
    #[command(flatten)]
    pub options: LossOptions,
}

impl LossArgs {
    /// The loss configuration these options describe (not yet validated).
    pub fn config(&self) -> VppoConfig {
        self.options.config()
    }
}

/// The loss options of `vppo loss` and `vppo bench`. Every default is [`VppoConfig::default`], the
/// official VPPO setting (a unit test checks that parsing no options gives exactly that config).
#[derive(Debug, Clone, Args)]
pub struct LossOptions {
    /// G: responses g*G .. (g+1)*G-1 answer the same prompt (B must be a multiple of G for the group
    /// scope).
    #[arg(long, value_name = "G", default_value_t = VppoConfig::default().group_size)]
    pub group_size: usize,
    /// The token score: the exact KL (the paper) or k3 (the official code's estimate).
    #[arg(long, value_enum, default_value_t = PerceptionArg::FullKl)]
    pub perception: PerceptionArg,
    /// Upper clamp of the score.
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().score_clamp)]
    pub score_clamp: f64,
    /// Fraction of each response's tokens that carry gradient: k_b = ceil(X * L_b), exact, in (0, 1].
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().top_fraction)]
    pub top_fraction: f64,
    /// Trajectory-level advantage shaping: mean-preserving (the official code), linear (the paper's
    /// text) or none.
    #[arg(long, value_enum, default_value_t = ShapingArg::MeanPreserving)]
    pub shaping: ShapingArg,
    /// beta_min of the shaping, in [0, 1].
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().beta_min)]
    pub beta_min: f64,
    /// beta_max of linear shaping (mean-preserving derives its own), >= beta_min.
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().beta_max)]
    pub beta_max: f64,
    /// Over which responses min and max Sbar are taken [default: batch for mean-preserving, group for
    /// linear].
    #[arg(long, value_enum)]
    pub tas_scope: Option<ScopeArg>,
    /// Lower PPO clip: r_clip >= 1 - X.
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().eps_low)]
    pub eps_low: f64,
    /// Upper PPO clip: r_clip <= 1 + X (DAPO's clip-higher).
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().eps_high)]
    pub eps_high: f64,
    /// Dual clip for negative advantages (> 1), or `none` to turn it off.
    #[arg(long, value_name = "X|none", value_parser = parse_dual_clip, default_value = "3")]
    pub dual_clip: DualClipArg,
    /// How the masked per-token losses are reduced.
    #[arg(long, value_enum, default_value_t = AggregationArg::TokenMean)]
    pub aggregation: AggregationArg,
    /// Z, the token normalizer of token-mean and of the logp penalty [default: N, the number of
    /// response tokens in the file].
    #[arg(long, value_name = "Z")]
    pub token_normalizer: Option<f64>,
    /// Weight of the -logp term over all response tokens.
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().logp_penalty)]
    pub logp_penalty: f64,
    /// Sampling temperature tau; logits are divided by it.
    #[arg(long, value_name = "X", default_value_t = VppoConfig::default().temperature)]
    pub temperature: f64,
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
            logp_penalty: self.logp_penalty,
            temperature: self.temperature,
        }
    }
}

/// Runs `vppo loss`: validates the config, reads the input, computes everything, and only then writes
/// the output file (atomically). Returns the one-line JSON summary: `loss`, `pg_loss`,
/// `token_normalizer`, `clip_fraction`, `mean_ratio`, `selected_fraction`, `n_tokens`, `n_responses`,
/// `vocab`, `dtype`, `device`.
pub fn run_loss(args: &LossArgs) -> Result<serde_json::Value> {
    let vppo = Vppo::new(args.config(), args.options.device.device())?;
    let owned = io::read_batch(&args.input)?;
    let batch = owned.batch();
    let (out, grad) = vppo.loss_and_grad(&batch)?;
    // The API checks every output and bounds the gradient; this checks what is written, all of it.
    if let Some(i) = grad.iter().position(|g| !g.is_finite()) {
        return Err(crate::error::VppoError::Overflow {
            what: "grad_logits",
            location: Some(crate::error::Location::Row(i / batch.vocab.max(1))),
            value: grad[i] as f64,
        });
    }
    io::write_outputs(&args.output, &out, Some(&grad), batch.vocab)?;
    Ok(serde_json::json!({
        "loss": out.loss,
        "pg_loss": out.pg_loss,
        "token_normalizer": out.token_normalizer,
        "clip_fraction": out.stats.clip_fraction,
        "mean_ratio": out.stats.mean_ratio,
        "selected_fraction": out.stats.selected_fraction,
        "n_tokens": batch.n_tokens(),
        "n_responses": batch.n_responses(),
        "vocab": batch.vocab,
        "dtype": batch.logits.dtype().name(),
        "device": args.options.device.name(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: LossArgs,
    }

    #[test]
    fn defaults_are_the_official_config() {
        let w = Wrap::try_parse_from(["x", "--input", "a", "--output", "b"]).unwrap();
        assert_eq!(w.args.config(), VppoConfig::default());
        assert_eq!(w.args.options.device, DeviceArg::Cpu);
    }

    #[test]
    fn options_reach_the_config() {
        let w = Wrap::try_parse_from([
            "x",
            "--input",
            "a",
            "--output",
            "b",
            "--dual-clip",
            "none",
            "--shaping",
            "linear",
            "--tas-scope",
            "batch",
            "--perception",
            "k3",
            "--token-normalizer",
            "100",
            "--aggregation",
            "seq-mean-token-sum",
            "--group-size",
            "4",
            "--top-fraction",
            "0.25",
        ])
        .unwrap();
        let c = w.args.config();
        assert_eq!(c.dual_clip, None);
        assert_eq!(c.shaping, Shaping::Linear);
        assert_eq!(c.scope(), TasScope::Batch);
        assert_eq!(c.perception, Perception::K3);
        assert_eq!(c.token_normalizer, Some(100.0));
        assert_eq!(c.aggregation, Aggregation::SeqMeanTokenSum);
        assert_eq!(c.group_size, 4);
        assert_eq!(c.top_fraction, 0.25);
        assert!(
            Wrap::try_parse_from(["x", "--input", "a", "--output", "b", "--dual-clip", "x"])
                .is_err()
        );
    }
}
