//! Sampling one response ([`Rollout`]): G = 8 per problem at temperature 1 from the policy given the
//! real image, keeping every token's forward cache and log-prob, then the same tokens teacher-forced
//! given a freshly masked image I' (the `logits_masked` of the loss).

use rand::Rng;

use super::model::{softmax, Cache, Context};
use super::task::{self, Kind, Problem};
use super::trainer::Trainer;

/// One sampled response and what the loss and the backward need of it.
pub(super) struct Rollout {
    pub(super) tokens: Vec<u32>,
    pub(super) caches: Vec<Cache>,
    pub(super) logits: Vec<f32>,
    pub(super) logits_masked: Vec<f32>,
    pub(super) logp: Vec<f32>,
    pub(super) reward: f32,
    pub(super) answer_at: Option<usize>,
    pub(super) kind: Kind,
}

fn sample_index(p: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (i, &pi) in p.iter().enumerate() {
        acc += pi;
        if u < acc {
            return i;
        }
    }
    // u is within rounding of 1: the last token with any probability.
    p.iter().rposition(|&pi| pi > 0.0).unwrap_or(p.len() - 1)
}

impl Trainer {
    pub(super) fn rollout(&mut self, problem: &Problem, image: &[f32]) -> Rollout {
        let v = self.task.vocab.size();
        let eos = self.task.vocab.eos();
        let (mut tokens, mut caches, mut logits, mut logp) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut row = vec![0.0f32; v];
        let mut prev = task::Vocab::PAD;
        for pos in 0..self.config.max_len {
            let glimpse = self.task.glimpse(&problem.prompt, prev, image);
            let cache = self.model.forward(
                &Context {
                    prompt: &problem.prompt,
                    prev,
                    pos,
                    image,
                    glimpse: &glimpse,
                },
                &mut row,
            );
            let (lse, p) = softmax(&row);
            let y = sample_index(&p, self.rng.gen::<f64>());
            tokens.push(y as u32);
            logp.push((row[y] as f64 - lse) as f32);
            logits.extend_from_slice(&row);
            caches.push(cache);
            prev = y as u32;
            if y as u32 == eos {
                break;
            }
        }
        // The masked image I', drawn afresh for this rollout, and the same tokens teacher-forced.
        let masked = self.task.masked_image(image, &mut self.rng);
        let mut logits_masked = Vec::with_capacity(logits.len());
        let mut prev = task::Vocab::PAD;
        for (pos, &y) in tokens.iter().enumerate() {
            let glimpse = self.task.glimpse(&problem.prompt, prev, &masked);
            self.model.forward(
                &Context {
                    prompt: &problem.prompt,
                    prev,
                    pos,
                    image: &masked,
                    glimpse: &glimpse,
                },
                &mut row,
            );
            logits_masked.extend_from_slice(&row);
            prev = y;
        }
        let reward = self.task.reward(problem, &tokens);
        let answer_at = self.task.answer_position(&tokens);
        Rollout {
            tokens,
            caches,
            logits,
            logits_masked,
            logp,
            reward,
            answer_at,
            kind: problem.kind,
        }
    }
}
