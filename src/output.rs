//! What the loss returns (SPEC section 8).

use crate::error::{Location, Result, Tensor, VppoError};

/// Per-token outputs, each of length N.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenOutputs {
    /// The visual-dependency score that drives the mask and the shaping (clamped to [0, score_clamp]).
    pub score: Vec<f32>,
    /// Exact KL(softmax(a) || softmax(b)) over the full vocabulary; +inf where p_v > 0 and b_v = -inf.
    pub kl: Vec<f32>,
    /// exp(d) - d - 1 with d = clamp(logp_masked - old_logp, -20, 20).
    pub k3: Vec<f32>,
    /// Entropy of softmax(a).
    pub entropy: Vec<f32>,
    /// log softmax(a)[y]: the target's log-prob under the policy, real image.
    pub logp: Vec<f32>,
    /// log softmax(b)[y]: the target's log-prob given the masked image (may be -inf).
    pub logp_masked: Vec<f32>,
    /// logsumexp(a), kept for the backward.
    pub lse: Vec<f32>,
    /// logsumexp(b).
    pub lse_masked: Vec<f32>,
    /// 1 for the tokens that carry gradient (top-k of each response), else 0.
    pub mask: Vec<u8>,
    /// dloss/dlogp_t.
    pub dlogp: Vec<f32>,
    /// `kl_penalty = full` only (else empty): kl_t = KL(pi || pi_ref) of each token (SPEC section 12).
    pub ref_kl: Vec<f32>,
    /// `kl_penalty = full` only: logsumexp(ref_logits[row] / tau), for the backward.
    pub lse_ref: Vec<f32>,
    /// `kl_penalty = full` only: dloss/dkl_t = kl_coef w_t, the weight of the token's KL in the loss.
    pub dref_kl: Vec<f32>,
}

/// Per-response outputs, each of length B.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseOutputs {
    /// Mean score over the response's tokens (0 for an empty response).
    pub sbar: Vec<f32>,
    /// k_b = ceil(top_fraction * L_b), the number of masked-in tokens.
    pub k: Vec<u32>,
    /// The TAS factor alpha_b; the shaped advantage is alpha_b * advantages[b].
    pub alpha: Vec<f32>,
}

/// Statistics a trainer logs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Among masked-in tokens, the fraction where a clip (PPO or dual) is active.
    pub clip_fraction: f64,
    /// Mean of the ratio r = exp(clamp(logp - old_logp, -20, 20)) over all tokens.
    pub mean_ratio: f64,
    /// sum(mask) / N.
    pub selected_fraction: f64,
}

/// Everything one evaluation of the VPPO loss produces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VppoOutput {
    /// The loss: pg + kl_coef * kl_loss + logp_penalty * (-sum_t logp_t) / Z.
    pub loss: f64,
    /// The clipped-surrogate part of the loss.
    pub pg_loss: f64,
    /// The KL penalty to the reference policy before kl_coef, aggregated as pg over every response
    /// token (SPEC section 12; the official `actor/kl_loss`); 0 with `kl_penalty = none`.
    pub kl_loss: f64,
    /// The normalizer Z that was used (N, or the caller's token_normalizer).
    pub token_normalizer: f64,
    /// Per-token outputs.
    pub tokens: TokenOutputs,
    /// Per-response outputs.
    pub responses: ResponseOutputs,
    /// Logged statistics.
    pub stats: Stats,
}

impl VppoOutput {
    /// Checks that every output that must be finite is finite in f32, the dtype it is returned and
    /// written in: the loss, pg_loss, kl_loss and Z, and per token score, k3, entropy, logp, lse,
    /// lse_masked and dlogp, per response Sbar and alpha. `kl` may be +inf and `logp_masked` -inf by definition
    /// (SPEC section 2). The first value that is not is reported as an overflow naming the output and
    /// its row or response: valid inputs whose result does not fit (a tiny token normalizer, a huge
    /// logp penalty) never come back as a silent inf or NaN.
    pub fn check_finite(&self) -> Result<()> {
        let fits = |x: f64| x.is_finite() && x.abs() <= f32::MAX as f64;
        for (what, x) in [
            ("loss", self.loss),
            ("pg_loss", self.pg_loss),
            ("kl_loss", self.kl_loss),
            ("token_normalizer", self.token_normalizer),
        ] {
            if !fits(x) {
                return Err(VppoError::Overflow {
                    what,
                    location: None,
                    value: x,
                });
            }
        }
        let t = &self.tokens;
        let r = &self.responses;
        let per_token = [
            ("score", &t.score),
            ("k3", &t.k3),
            ("entropy", &t.entropy),
            ("logp", &t.logp),
            ("lse", &t.lse),
            ("lse_masked", &t.lse_masked),
            ("dlogp", &t.dlogp),
        ];
        let per_response = [("sbar", &r.sbar), ("alpha", &r.alpha)];
        for (list, at) in [
            (&per_token[..], Location::Row as fn(usize) -> Location),
            (
                &per_response[..],
                Location::Response as fn(usize) -> Location,
            ),
        ] {
            for &(what, xs) in list {
                if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
                    return Err(VppoError::Overflow {
                        what,
                        location: Some(at(i)),
                        value: xs[i] as f64,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks what a backward over N tokens (and, when given, B responses) reads from this output:
    /// the per-token and per-response vectors have the batch's lengths, and `lse` and `dlogp` (the
    /// two the backward kernel reads) are finite. A forward never returns a non-finite value there;
    /// one that is edited or comes from another batch would give a NaN gradient, so it is an error.
    pub fn check_for_backward(&self, n_tokens: usize, n_responses: Option<usize>) -> Result<()> {
        let t = &self.tokens;
        let r = &self.responses;
        let n = n_tokens;
        let mut lengths = vec![
            (Tensor::Lse, "lse", t.lse.len(), n),
            (Tensor::Dlogp, "dlogp", t.dlogp.len(), n),
        ];
        if let Some(b) = n_responses {
            lengths.extend([
                (Tensor::Targets, "logp", t.logp.len(), n),
                (Tensor::Targets, "mask", t.mask.len(), n),
                (Tensor::Advantages, "sbar", r.sbar.len(), b),
                (Tensor::Advantages, "alpha", r.alpha.len(), b),
                (Tensor::Advantages, "k", r.k.len(), b),
            ]);
        }
        for (tensor, what, len, want) in lengths {
            if len != want {
                return Err(VppoError::Shape {
                    tensor,
                    detail: format!(
                        "the forward output given to the backward is for another batch: its {what} \
                         has {len} entries, the batch has {want}"
                    ),
                });
            }
        }
        for (tensor, values) in [(Tensor::Lse, &t.lse), (Tensor::Dlogp, &t.dlogp)] {
            if let Some((row, &x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(VppoError::NonFinite {
                    tensor,
                    location: Location::Row(row),
                    value: x as f64,
                });
            }
        }
        Ok(())
    }
}
