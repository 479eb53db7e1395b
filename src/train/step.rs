//! One RL step ([`Trainer::step`]): rollouts, GRPO advantages, the loss and dloss/dlogits from
//! [`crate::Vppo::loss_and_grad`], the hand-written backward through the policy, clipping and AdamW,
//! and the step's [`StepMetrics`].

use super::error::{Result, TrainError};
use super::metrics::{StepMetrics, HISTOGRAM_STEPS};
use super::optim::clip_global_norm;
use super::task;
use super::trainer::Trainer;
use crate::{grpo_advantages, Batch, Logits};

impl Trainer {
    /// One RL step; returns its metrics.
    pub fn step(&mut self) -> Result<StepMetrics> {
        // Diverged weights would show up as non-finite log-probs (old_logp) in the loss: name them.
        if let Some(index) = self.model.params.iter().position(|x| !x.is_finite()) {
            return Err(TrainError::NonFiniteParameter {
                index,
                value: self.model.params[index],
                step: self.step,
            });
        }
        let g = self.config.group_size;
        let v = self.task.vocab.size();
        let mut rollouts = Vec::with_capacity(self.config.prompts * g);
        for _ in 0..self.config.prompts {
            let problem = self.task.sample(&mut self.rng);
            let image = self.task.image(&problem);
            for _ in 0..g {
                let r = self.rollout(&problem, &image);
                rollouts.push(r);
            }
        }
        let rewards: Vec<f32> = rollouts.iter().map(|r| r.reward).collect();
        let advantages = grpo_advantages(&rewards, g)?;
        let mut cu = vec![0i32];
        let (mut logits, mut logits_masked, mut targets, mut old_logp) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in &rollouts {
            logits.extend_from_slice(&r.logits);
            logits_masked.extend_from_slice(&r.logits_masked);
            targets.extend(r.tokens.iter().map(|&t| t as i32));
            old_logp.extend_from_slice(&r.logp);
            cu.push(targets.len() as i32);
        }
        let batch = Batch {
            logits: Logits::F32(&logits),
            logits_masked: Logits::F32(&logits_masked),
            targets: &targets,
            old_logp: &old_logp,
            advantages: &advantages,
            cu_seqlens: &cu,
            vocab: v,
            ..Default::default()
        };
        let (out, dlogits) = self.vppo.loss_and_grad(&batch)?;

        // Backpropagate dloss/dlogits through the policy, token by token in batch order.
        let mut grad = vec![0.0f32; self.model.n_params()];
        let mut t = 0;
        for r in &rollouts {
            for cache in &r.caches {
                let row = &dlogits[t * v..(t + 1) * v];
                if row.iter().any(|&x| x != 0.0) {
                    self.model.backward(cache, row, &mut grad);
                }
                t += 1;
            }
        }
        if let Some(index) = grad.iter().position(|x| !x.is_finite()) {
            return Err(TrainError::NonFiniteGradient {
                index,
                value: grad[index],
                step: self.step + 1,
            });
        }
        let grad_norm = clip_global_norm(&mut grad, self.config.clip_norm);
        self.opt.step(&mut self.model.params, &grad);
        self.step += 1;

        // Metrics.
        let n = targets.len().max(1) as f64;
        let (mut sa, mut na, mut so, mut no, mut in_mask) = (0.0, 0usize, 0.0, 0usize, 0usize);
        let (mut sr, mut nr, mut sf, mut nf) = (0.0, 0usize, 0.0, 0usize);
        let mut scores = Vec::with_capacity(targets.len());
        for (b, r) in rollouts.iter().enumerate() {
            for (i, t) in (cu[b] as usize..cu[b + 1] as usize).enumerate() {
                let s = out.tokens.score[t];
                match self.task.token_class(&r.tokens, i, r.answer_at) {
                    task::TokenClass::Read => (sr, nr) = (sr + s as f64, nr + 1),
                    task::TokenClass::Filler => (sf, nf) = (sf + s as f64, nf + 1),
                    _ => {}
                }
                let is_answer = r.answer_at == Some(i);
                scores.push((s, is_answer));
                if is_answer {
                    sa += s as f64;
                    na += 1;
                    in_mask += out.tokens.mask[t] as usize;
                } else {
                    so += s as f64;
                    no += 1;
                }
            }
        }
        let keep = HISTOGRAM_STEPS.saturating_sub(1) * scores.len();
        if self.recent_scores.len() > keep {
            self.recent_scores.drain(..self.recent_scores.len() - keep);
        }
        self.recent_scores.extend(scores);
        let mut by_kind = [(0.0, 0usize); 3];
        for r in &rollouts {
            let k = r.kind as usize;
            by_kind[k].0 += r.reward as f64;
            by_kind[k].1 += 1;
        }
        let alpha = &out.responses.alpha;
        let sbar: Vec<f64> = (0..rollouts.len())
            .filter(|&b| cu[b + 1] > cu[b])
            .map(|b| out.responses.sbar[b] as f64)
            .collect();
        let sbar_mean = sbar.iter().sum::<f64>() / sbar.len().max(1) as f64;
        let sbar_sd = (sbar.iter().map(|x| (x - sbar_mean).powi(2)).sum::<f64>()
            / sbar.len().max(1) as f64)
            .sqrt();
        let mean_of = |s: f64, n: usize| if n == 0 { 0.0 } else { s / n as f64 };
        Ok(StepMetrics {
            step: self.step,
            reward: rewards.iter().map(|&r| r as f64).sum::<f64>() / rewards.len() as f64,
            reward_by_kind: by_kind.map(|(s, c)| if c == 0 { -1.0 } else { s / c as f64 }),
            loss: out.loss,
            pg_loss: out.pg_loss,
            grad_norm,
            clip_fraction: out.stats.clip_fraction,
            selected_fraction: out.stats.selected_fraction,
            score_answer: if na == 0 { 0.0 } else { sa / na as f64 },
            score_other: if no == 0 { 0.0 } else { so / no as f64 },
            score_read: mean_of(sr, nr),
            score_nonvisual: mean_of(so - sr, no - nr),
            eval_acc: None,
            score_filler: mean_of(sf, nf),
            sbar_mean,
            sbar_cv: if sbar_mean > 0.0 {
                sbar_sd / sbar_mean
            } else {
                0.0
            },
            answer_in_mask: if na == 0 {
                0.0
            } else {
                in_mask as f64 / na as f64
            },
            entropy: out.tokens.entropy.iter().map(|&e| e as f64).sum::<f64>() / n,
            mean_len: targets.len() as f64 / rollouts.len() as f64,
            alpha_range: [
                alpha.iter().fold(f64::INFINITY, |m, &a| m.min(a as f64)),
                alpha
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &a| m.max(a as f64)),
            ],
        })
    }
}
