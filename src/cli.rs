//! The logic of the `vppo` command line, kept in the library so that it can be tested; the binary
//! (src/bin/vppo.rs) only parses the arguments and prints.
//!
//! `vppo loss --input IN.safetensors --output OUT.safetensors [options]` (SPEC section 9): reads the
//! batch, computes the loss, dloss/dlogits and every output, writes them to OUT (only once everything
//! has succeeded) and returns a one-line JSON summary.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::api::Vppo;
use crate::batch::Dtype;
use crate::config::VppoConfig;
use crate::error::{Location, Result, VppoError};
use crate::io::{self, OwnedLogits};
use crate::options::LossOptions;

/// `--grad-dtype`: the dtype `grad_logits` is computed and written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GradDtypeArg {
    /// f32 (SPEC section 9).
    F32,
    /// The dtype of the logits (half the memory and the file size for f16 and bf16 logits).
    Logits,
}

/// The arguments of `vppo loss`: the files, and the loss options shared with `vppo bench`.
#[derive(Debug, Clone, Args)]
pub struct LossArgs {
    /// Input safetensors file with `logits`, `logits_masked` (`[N, V]`, f32/f16/bf16), `targets` (`[N]`,
    /// i32), `old_logp` (`[N]`, f32), `advantages` (`[B]`, f32) and `cu_seqlens` (`[B+1]`, i32).
    #[arg(long, value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Output safetensors file: `loss`, `score`, `kl`, `k3`, `entropy`, `logp`, `mask` (u8), `sbar`,
    /// `alpha`, `grad_logits` ([N, V], f32 or the logits dtype, see --grad-dtype) and also `lse`,
    /// `logp_masked`, `dlogp`, `k`. Written only on success; never the input file itself.
    #[arg(long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// The dtype of `grad_logits`: f32, or the logits dtype (half the memory for f16/bf16 logits).
    #[arg(long, value_enum, default_value_t = GradDtypeArg::F32)]
    pub grad_dtype: GradDtypeArg,
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

/// Whether `a` and `b` name one existing file (the same path, another path to it, or a hard link).
fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let _ = (&ma, &mb);
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
    }
}

/// Runs `vppo loss`: validates the config, refuses an `--output` that is the input file, reads the
/// input, computes everything, checks every output (the gradient too) is finite, and only then writes
/// the output file (atomically, streamed from the buffers: no copy of the gradient is made to write
/// it). Returns the one-line JSON summary: `loss`, `pg_loss`, `kl_loss`, `token_normalizer`, `clip_fraction`,
/// `mean_ratio`, `selected_fraction`, `n_tokens`, `n_responses`, `vocab`, `dtype`, `grad_dtype`,
/// `device`.
///
/// Peak memory: the file while it is parsed, then the inputs, one gradient buffer and O(N) outputs.
pub fn run_loss(args: &LossArgs) -> Result<serde_json::Value> {
    let vppo = Vppo::new(args.config(), args.options.device.device())?;
    if same_file(&args.input, &args.output) {
        return Err(VppoError::Config {
            field: "output",
            value: args.output.display().to_string(),
            expected: "a file other than --input (it would be replaced by the outputs)",
        });
    }
    let owned = io::read_batch(&args.input)?;
    let batch = owned.batch();
    let out = vppo.forward(&batch)?;
    let nv = batch.n_tokens() * batch.vocab; // validated by the forward
    let grad_dtype = match args.grad_dtype {
        GradDtypeArg::F32 => Dtype::F32,
        GradDtypeArg::Logits => batch.logits.dtype(),
    };
    let mut grad = OwnedLogits::zeros(grad_dtype, nv)?;
    vppo.backward_into(&batch, &out, grad.as_grad_mut())?;
    // The API checks every output and bounds the gradient; this checks what is written, all of it.
    let view = grad.view();
    if let Some(i) = (0..nv).find(|&i| !view.get(i).is_finite()) {
        return Err(VppoError::Overflow {
            what: "grad_logits",
            location: Some(Location::Row(i / batch.vocab.max(1))),
            value: view.get(i),
        });
    }
    io::write_outputs(&args.output, &out, Some(view), batch.vocab)?;
    Ok(serde_json::json!({
        "loss": out.loss,
        "pg_loss": out.pg_loss,
        "kl_loss": out.kl_loss,
        "token_normalizer": out.token_normalizer,
        "clip_fraction": out.stats.clip_fraction,
        "mean_ratio": out.stats.mean_ratio,
        "selected_fraction": out.stats.selected_fraction,
        "n_tokens": batch.n_tokens(),
        "n_responses": batch.n_responses(),
        "vocab": batch.vocab,
        "dtype": batch.logits.dtype().name(),
        "grad_dtype": grad_dtype.name(),
        "device": args.options.device.name(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Aggregation, Perception, Shaping, TasScope};
    use crate::options::DeviceArg;
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
