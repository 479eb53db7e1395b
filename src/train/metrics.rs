//! What one RL step logs: [`StepMetrics`], one line of metrics.jsonl.

use serde::{Deserialize, Serialize};

/// What one RL step logs (one line of metrics.jsonl).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step, from 1.
    pub step: usize,
    /// Mean reward of the step's samples: the fraction answered right.
    pub reward: f64,
    /// Mean reward per question kind (colour-at, count, same; NaN-free: absent kinds are -1).
    pub reward_by_kind: [f64; 3],
    /// The loss.
    pub loss: f64,
    /// Its clipped-surrogate part.
    pub pg_loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Fraction of masked-in tokens where a clip is active.
    pub clip_fraction: f64,
    /// Fraction of tokens that carry gradient.
    pub selected_fraction: f64,
    /// Mean score of answer tokens.
    pub score_answer: f64,
    /// Mean score of the other tokens.
    pub score_other: f64,
    /// Mean score of the chain's read colours (0 when there are none).
    #[serde(default)]
    pub score_read: f64,
    /// Mean score of the filler words (0 when there are none).
    #[serde(default)]
    pub score_filler: f64,
    /// Mean Sbar over the non-empty responses.
    #[serde(default)]
    pub sbar_mean: f64,
    /// Spread of Sbar across responses: its standard deviation over its mean (0 when the mean is 0).
    #[serde(default)]
    pub sbar_cv: f64,
    /// Fraction of answer tokens inside the gradient mask.
    pub answer_in_mask: f64,
    /// Mean entropy of the policy per token.
    pub entropy: f64,
    /// Mean response length.
    pub mean_len: f64,
    /// Smallest and largest TAS factor alpha.
    pub alpha_range: [f64; 2],
    /// Mean score of the tokens that are neither answers nor reads (template words and fillers).
    #[serde(default)]
    pub score_nonvisual: f64,
    /// Held-out greedy accuracy after this step (every `eval_every` steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_acc: Option<f64>,
}

/// How many recent steps' token scores the histogram shows.
pub(super) const HISTOGRAM_STEPS: usize = 10;
