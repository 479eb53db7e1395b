//! The built-in trainer: VPPO end to end on a synthetic multimodal task, using the crate's loss exactly
//! as a user would (`Vppo::loss_and_grad` on the policy's logits for the real and the masked image).
//!
//! One RL step:
//! 1. draw `prompts` problems (a grid image and a question, [`task`]); for each, sample G = 8 responses
//!    at temperature 1 from the policy given the real image, keeping every token's forward cache and
//!    log-prob (the rollout policy is the current policy: one update per batch, on-policy);
//! 2. run the policy again, teacher-forced on the same tokens, given a masked image I' (each cell
//!    blackened with probability 0.5, fresh per rollout): these are `logits_masked`;
//! 3. reward 1 for a right answer, GRPO advantages per group ([`crate::grpo_advantages`]);
//! 4. the loss and dloss/dlogits from [`crate::Vppo::loss_and_grad`] (the CPU reference, the SIMT
//!    executor or the GPU, as `--device` says), backpropagated by hand through the policy;
//! 5. global-norm clipping and AdamW.
//!
//! Before RL, the freshly initialised policy is taught the response format by a short supervised
//! warm-up in which 30% of the answers are right and the rest are uniform guesses among the valid
//! answers: it plays the part of the base model, which knows the format and looks at the image a little
//! (the paper's base model scores 38%). A base model taught only guesses collapsed onto one
//! image-blind answer within a dozen RL steps (entropy 0.11 to 0.016) and never learned to look.
//! It is the same for every algorithm of a seed, so compared runs start from one base model.
//!
//! Algorithms (`--algo`): `vppo` is [`VppoConfig::default`] (the official setting); `dapo` is
//! [`VppoConfig::dapo`] (every token, no shaping, same clipping); `grpo` is the plain GRPO surrogate:
//! symmetric clip 0.2 / 0.2, no dual clip, no logp penalty, every token, no shaping (and, as in DAPO and
//! the official VPPO recipe, no KL-to-reference term); `gspo` is GRPO with the sequence-level ratio of
//! GSPO (loss type gspo) and its clip 3e-4 / 4e-4.
//!
//! Random streams (ChaCha8, from `--seed`): stream 0 initialises and warms up the model, stream 1 drives
//! RL (problems, masks, sampling), stream 2 draws the held-out evaluation problems. Everything runs on
//! one thread in a fixed order, so a run is a function of its seed; a checkpoint stores stream 1's
//! position, and a resumed run is bit-identical to an uninterrupted one.

pub mod chain;
pub mod checkpoint;
pub mod error;
pub mod lock;
pub mod model;
pub mod optim;
pub mod plot;
pub mod report;
pub mod task;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::options::DeviceArg;
use crate::{grpo_advantages, Batch, Logits, Vppo, VppoConfig};
use checkpoint::{from_bits, to_bits, Checkpoint, RngState};
use error::io_err;
pub use error::{Result, TrainError};
use model::{softmax, Cache, Context, Model, ModelConfig};
use optim::{clip_global_norm, AdamW, AdamWConfig};
use task::{Family, Kind, Problem, Task, TaskConfig};

/// The policy-gradient algorithm, i.e. which loss configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Algo {
    /// VPPO, the official setting ([`VppoConfig::default`]).
    Vppo,
    /// DAPO: the same loss with top_fraction 1 and no shaping ([`VppoConfig::dapo`]).
    Dapo,
    /// GRPO: clip 0.2/0.2, no dual clip, no logp penalty, every token, no shaping.
    Grpo,
    /// VPPO's token mask (TGF, top_fraction 0.4) without its advantage shaping.
    TgfOnly,
    /// VPPO's advantage shaping (TAS, mean-preserving) without its token mask.
    TasOnly,
    /// GSPO: the sequence-level ratio (loss type gspo, SPEC section 12) with the GSPO paper's clip
    /// 3e-4 / 4e-4, no dual clip, no logp penalty, every token, no shaping.
    Gspo,
}

impl Algo {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Vppo => "vppo",
            Algo::Dapo => "dapo",
            Algo::Grpo => "grpo",
            Algo::TgfOnly => "tgf-only",
            Algo::TasOnly => "tas-only",
            Algo::Gspo => "gspo",
        }
    }

    /// The loss configuration for groups of `group_size`.
    pub fn loss_config(self, group_size: usize) -> VppoConfig {
        let base = match self {
            Algo::Vppo => VppoConfig::default(),
            Algo::Dapo => VppoConfig::dapo(),
            Algo::Grpo => VppoConfig {
                eps_high: 0.2,
                dual_clip: None,
                logp_penalty: 0.0,
                ..VppoConfig::dapo()
            },
            Algo::TgfOnly => VppoConfig {
                shaping: crate::Shaping::None,
                ..VppoConfig::default()
            },
            Algo::TasOnly => VppoConfig {
                top_fraction: 1.0,
                ..VppoConfig::default()
            },
            Algo::Gspo => VppoConfig {
                loss_type: crate::LossType::Gspo,
                eps_low: 3e-4,
                eps_high: 4e-4,
                dual_clip: None,
                logp_penalty: 0.0,
                ..VppoConfig::dapo()
            },
        };
        VppoConfig { group_size, ..base }
    }
}

/// Everything that determines a run (the output folder and the progress display aside).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The algorithm.
    pub algo: Algo,
    /// Where the loss runs.
    #[serde(with = "device_serde")]
    pub device: DeviceArg,
    /// Number of RL steps.
    pub steps: usize,
    /// The seed of every random stream.
    pub seed: u64,
    /// Prompts per step.
    pub prompts: usize,
    /// G, responses per prompt.
    pub group_size: usize,
    /// The task.
    pub task: TaskConfig,
    /// Token embedding width.
    pub d_tok: usize,
    /// Position embedding width.
    pub d_pos: usize,
    /// Image encoding width.
    pub d_img: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Longest sampled response.
    pub max_len: usize,
    /// AdamW for RL.
    pub optim: AdamWConfig,
    /// Global gradient-norm bound.
    pub clip_norm: f64,
    /// Supervised warm-up steps (the base model).
    pub warmup_steps: usize,
    /// Sequences per warm-up step.
    pub warmup_batch: usize,
    /// Fraction of warm-up answers that are right (the rest are uniform guesses among the valid
    /// answers): how perceptive the base model is taught to be.
    pub base_skill: f64,
    /// Held-out problems for the greedy accuracy.
    pub eval_problems: usize,
    /// A checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// The held-out accuracy every this many steps, into metrics.jsonl (0: only at the end). It does not
    /// change the run (the held-out problems have their own random stream).
    #[serde(default)]
    pub eval_every: usize,
}

mod device_serde {
    use super::DeviceArg;
    pub fn serialize<S: serde::Serializer>(d: &DeviceArg, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.name())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DeviceArg, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        match s.as_str() {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda),
            "simt" => Ok(DeviceArg::Simt),
            other => Err(serde::de::Error::custom(format!("unknown device {other}"))),
        }
    }
}

impl Default for TrainConfig {
    /// The embedded default: the main job.
    fn default() -> Self {
        TrainConfig {
            algo: Algo::Vppo,
            device: DeviceArg::Cpu,
            steps: 300,
            seed: 1,
            prompts: 16,
            group_size: 8,
            task: TaskConfig::default(),
            d_tok: 16,
            d_pos: 8,
            d_img: 64,
            hidden: 96,
            max_len: 10,
            optim: AdamWConfig::default(),
            clip_norm: 1.0,
            warmup_steps: 150,
            warmup_batch: 64,
            base_skill: 0.3,
            eval_problems: 600,
            checkpoint_every: 25,
            eval_every: 0,
        }
    }
}

impl TrainConfig {
    /// A small, easy configuration (2x2 grid, two colours, colour-at questions only) for tests and demos.
    pub fn easy() -> Self {
        TrainConfig {
            steps: 120,
            prompts: 8,
            task: TaskConfig {
                rows: 2,
                cols: 2,
                colours: 2,
                kinds: vec![Kind::ColourAt],
                ..TaskConfig::default()
            },
            d_img: 16,
            hidden: 32,
            warmup_steps: 60,
            warmup_batch: 32,
            eval_problems: 200,
            ..TrainConfig::default()
        }
    }

    /// The chain task ([`chain`]): a 3x3 grid, cell reads with free fillers; the main job's task.
    pub fn chain() -> Self {
        let task = TaskConfig::chain();
        let max_len = Task::new(task.clone()).map_or(17, |t| t.max_response_len());
        TrainConfig {
            task,
            max_len,
            steps: 80,
            d_img: 32,
            hidden: 64,
            eval_problems: 400,
            ..TrainConfig::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, value: String, expected| TrainError::Config {
            field,
            value,
            expected,
        };
        if self.prompts == 0 {
            return Err(bad("prompts", "0".into(), "at least 1 prompt per step"));
        }
        if self.group_size < 2 {
            return Err(bad(
                "group-size",
                self.group_size.to_string(),
                "G >= 2 (GRPO needs a group)",
            ));
        }
        let longest = Task::new(self.task.clone())?.max_response_len();
        if self.max_len < longest {
            return Err(bad(
                "max-len",
                self.max_len.to_string(),
                ">= the task's longest correct response (8 for the template task)",
            ));
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return Err(bad("lr", self.optim.lr.to_string(), "a finite value > 0"));
        }
        if !(0.0..=1.0).contains(&self.base_skill) {
            return Err(bad(
                "base-skill",
                self.base_skill.to_string(),
                "0 <= base_skill <= 1",
            ));
        }
        #[allow(clippy::neg_cmp_op_on_partial_ord)] // also rejects NaN
        if !(self.clip_norm > 0.0) {
            return Err(bad("clip-norm", self.clip_norm.to_string(), "a value > 0"));
        }
        Ok(())
    }

    fn model_config(&self, task: &Task) -> ModelConfig {
        ModelConfig {
            vocab: task.vocab.size(),
            prompt_len: 3,
            image_dim: task.image_dim(),
            glimpse_dim: task.glimpse_dim(),
            max_len: self.max_len,
            d_tok: self.d_tok,
            d_pos: self.d_pos,
            d_img: self.d_img,
            hidden: self.hidden,
        }
    }

    /// The configuration as JSON with `steps` left out: what a checkpoint must agree with to be resumed.
    fn identity(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self).map_err(|e| TrainError::Config {
            field: "config",
            value: e.to_string(),
            expected: "a configuration that serializes to JSON",
        })?;
        if let Some(o) = v.as_object_mut() {
            o.remove("steps");
            o.remove("checkpoint_every");
            o.remove("eval_every");
        }
        Ok(v)
    }
}

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

/// One sampled response and what the loss and the backward need of it.
struct Rollout {
    tokens: Vec<u32>,
    caches: Vec<Cache>,
    logits: Vec<f32>,
    logits_masked: Vec<f32>,
    logp: Vec<f32>,
    reward: f32,
    answer_at: Option<usize>,
    kind: Kind,
}

/// A run in progress: model, optimizer, random stream and step.
pub struct Trainer {
    /// The configuration.
    pub config: TrainConfig,
    /// The task.
    pub task: Task,
    /// The policy.
    pub model: Model,
    /// AdamW state.
    pub opt: AdamW,
    /// Steps done.
    pub step: usize,
    /// Greedy held-out accuracy of the base model (before RL).
    pub base_eval_acc: f64,
    rng: ChaCha8Rng,
    vppo: Vppo,
    recent_scores: Vec<(f32, bool)>,
}

fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
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

/// How many recent steps' token scores the histogram shows.
const HISTOGRAM_STEPS: usize = 10;

impl Trainer {
    /// A fresh run: the model initialised and warmed up from the seed, fresh AdamW, step 0.
    pub fn new(config: TrainConfig) -> Result<Trainer> {
        config.validate()?;
        let vppo = open_vppo(&config)?;
        let task = Task::new(config.task.clone())?;
        let mut init = stream(config.seed, 0);
        let mut model = Model::new(config.model_config(&task), &mut init);
        warm_up(&config, &task, &mut model, &mut init);
        let opt = AdamW::new(config.optim, model.n_params());
        let base_eval_acc = evaluate(&model, &task, &config).0;
        let rng = stream(config.seed, 1);
        Ok(Trainer {
            config,
            task,
            model,
            opt,
            step: 0,
            base_eval_acc,
            rng,
            vppo,
            recent_scores: Vec::new(),
        })
    }

    /// Continues the run saved in `path`; its configuration must equal `config` (the step count aside).
    pub fn resume(config: TrainConfig, path: &Path) -> Result<Trainer> {
        config.validate()?;
        let ck = Checkpoint::load(path)?;
        let bad = |detail: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            detail,
        };
        // Compare through the same text round trip, so float printing and parsing cannot differ.
        let ours: serde_json::Value = serde_json::from_str(&config.identity()?.to_string())
            .map_err(|e| bad(e.to_string()))?;
        if ck.config != ours {
            return Err(bad(
                "written by another configuration (algo, seed, task or model differ); remove it or drop --resume".into(),
            ));
        }
        let vppo = open_vppo(&config)?;
        let task = Task::new(config.task.clone())?;
        let mcfg = config.model_config(&task);
        let mut model = Model::new(mcfg, &mut stream(config.seed, 0));
        if ck.params.len() != model.n_params() {
            return Err(bad(format!(
                "{} parameters, the model has {}",
                ck.params.len(),
                model.n_params()
            )));
        }
        model.params = from_bits(&ck.params);
        let mut opt = AdamW::new(config.optim, model.n_params());
        opt.m = from_bits(&ck.adam_m);
        opt.v = from_bits(&ck.adam_v);
        opt.t = ck.adam_t;
        let rng = ck.rng.restore().map_err(bad)?;
        Ok(Trainer {
            config,
            task,
            model,
            opt,
            step: ck.step,
            base_eval_acc: ck.base_eval_acc,
            rng,
            vppo,
            recent_scores: ck.recent_scores,
        })
    }

    /// The state to save.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            version: 1,
            config: self.config.identity()?,
            step: self.step,
            params: to_bits(&self.model.params),
            adam_m: to_bits(&self.opt.m),
            adam_v: to_bits(&self.opt.v),
            adam_t: self.opt.t,
            rng: RngState::of(&self.rng),
            base_eval_acc: self.base_eval_acc,
            recent_scores: self.recent_scores.clone(),
        })
    }

    /// Scores of the last few steps' tokens, each with whether it is an answer token.
    pub fn recent_scores(&self) -> &[(f32, bool)] {
        &self.recent_scores
    }

    fn rollout(&mut self, problem: &Problem, image: &[f32]) -> Rollout {
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
            rows: None,
            masked_rows: None,
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

    /// Greedy accuracy on the held-out problems (and per kind; -1 for a kind not asked).
    pub fn evaluate(&self) -> (f64, [f64; 3]) {
        evaluate(&self.model, &self.task, &self.config)
    }
}

/// The loss of a run on its device; a kernel device is probed first (see [`probe`]).
fn open_vppo(config: &TrainConfig) -> Result<Vppo> {
    let vppo = Vppo::new(
        config.algo.loss_config(config.group_size),
        config.device.device(),
    )?;
    if config.device != DeviceArg::Cpu {
        probe(&vppo)?;
    }
    Ok(vppo)
}

/// Fails early, with the loss's own error, when the chosen device cannot run (no GPU, no kernels).
fn probe(vppo: &Vppo) -> Result<()> {
    let logits = [0.0f32, 1.0];
    let batch = Batch {
        logits: Logits::F32(&logits),
        logits_masked: Logits::F32(&logits),
        targets: &[1],
        old_logp: &[-0.3],
        advantages: &[1.0, 0.0],
        cu_seqlens: &[0, 1, 1],
        vocab: 2,
        rows: None,
        masked_rows: None,
    };
    let probe = Vppo::new(
        VppoConfig {
            group_size: 1,
            ..vppo.config().clone()
        },
        vppo.device(),
    )?;
    probe.loss_and_grad(&batch)?;
    Ok(())
}

/// The base model: supervised steps on correct-format responses whose answer token is drawn
/// uniformly from the valid answers (so the model learns the format, not the image).
fn warm_up(config: &TrainConfig, task: &Task, model: &mut Model, rng: &mut ChaCha8Rng) {
    let v = task.vocab.size();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
        model.n_params(),
    );
    let mut row = vec![0.0f32; v];
    for _ in 0..config.warmup_steps {
        let mut grad = vec![0.0f32; model.n_params()];
        let mut seqs = Vec::with_capacity(config.warmup_batch);
        for _ in 0..config.warmup_batch {
            let p = task.sample(rng);
            let target = task.warmup_target(&p, rng, config.base_skill);
            seqs.push((p, target));
        }
        let n_tokens: usize = seqs.iter().map(|s| s.1.len()).sum();
        for (p, target) in &seqs {
            let image = task.image(p);
            let mut prev = task::Vocab::PAD;
            for (pos, &y) in target.iter().enumerate() {
                let glimpse = task.glimpse(&p.prompt, prev, &image);
                let cache = model.forward(
                    &Context {
                        prompt: &p.prompt,
                        prev,
                        pos,
                        image: &image,
                        glimpse: &glimpse,
                    },
                    &mut row,
                );
                let (_, probs) = softmax(&row);
                // d(mean cross-entropy)/dlogits = (softmax - onehot) / n_tokens.
                let d: Vec<f32> = probs
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| ((q - (i == y as usize) as u8 as f64) / n_tokens as f64) as f32)
                    .collect();
                model.backward(&cache, &d, &mut grad);
                prev = y;
            }
        }
        clip_global_norm(&mut grad, config.clip_norm);
        opt.step(&mut model.params, &grad);
    }
}

/// Greedy decoding on `eval_problems` problems drawn from stream 2 of the seed: (accuracy, per kind).
fn evaluate(model: &Model, task: &Task, config: &TrainConfig) -> (f64, [f64; 3]) {
    let mut rng = stream(config.seed, 2);
    let eos = task.vocab.eos();
    let mut row = vec![0.0f32; task.vocab.size()];
    let mut by_kind = [(0.0, 0usize); 3];
    for _ in 0..config.eval_problems {
        let p = task.sample(&mut rng);
        let image = task.image(&p);
        let mut tokens = Vec::new();
        let mut prev = task::Vocab::PAD;
        for pos in 0..config.max_len {
            let glimpse = task.glimpse(&p.prompt, prev, &image);
            model.forward(
                &Context {
                    prompt: &p.prompt,
                    prev,
                    pos,
                    image: &image,
                    glimpse: &glimpse,
                },
                &mut row,
            );
            let y = row
                .iter()
                .enumerate()
                .fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
                as u32;
            tokens.push(y);
            prev = y;
            if y == eos {
                break;
            }
        }
        let k = p.kind as usize;
        by_kind[k].0 += task.reward(&p, &tokens) as f64;
        by_kind[k].1 += 1;
    }
    let total: f64 = by_kind.iter().map(|x| x.0).sum();
    let count: usize = by_kind.iter().map(|x| x.1).sum();
    (
        total / count.max(1) as f64,
        by_kind.map(|(s, c)| if c == 0 { -1.0 } else { s / c as f64 }),
    )
}

/// How a run shows itself and where it writes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output folder: metrics.jsonl, checkpoint.json, reward.svg, scores.svg.
    pub out: PathBuf,
    /// Continue from `out/checkpoint.json` when it exists.
    pub resume: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Algorithm.
    pub algo: Algo,
    /// Seed.
    pub seed: u64,
    /// Steps done.
    pub steps: usize,
    /// Greedy held-out accuracy before RL.
    pub base_eval_acc: f64,
    /// Greedy held-out accuracy after RL.
    pub eval_acc: f64,
    /// The same per kind (colour-at, count, same; -1 when not asked).
    pub eval_acc_by_kind: [f64; 3],
    /// Mean sampled reward over the last 10 steps.
    pub final_reward: f64,
    /// Mean reward at every step (for the plots).
    pub rewards: Vec<f64>,
    /// (step, held-out accuracy): step 0 (the base model), every `eval_every` steps, and the end.
    pub eval_curve: Vec<(usize, f64)>,
    /// Means over the run's steps of the step's mean score of answer tokens, read tokens, the others,
    /// and of the spread of Sbar across responses (std / mean).
    pub score_answer: f64,
    /// See `score_answer`.
    pub score_read: f64,
    /// See `score_answer`.
    pub score_nonvisual: f64,
    /// See `score_answer`.
    pub sbar_cv: f64,
    /// The token scores of the last steps (answer or not), for the histogram.
    #[serde(skip)]
    pub recent_scores: Vec<(f32, bool)>,
    /// Wall time in seconds.
    pub wall_s: f64,
    /// Output folder.
    pub out: PathBuf,
}

/// Runs one training run to `config.steps`, writing metrics, checkpoints and pictures under `opts.out`.
pub fn run(
    config: &TrainConfig,
    opts: &RunOptions,
    bar: Option<indicatif::ProgressBar>,
) -> Result<RunSummary> {
    let start = Instant::now();
    let _lock = lock::OutLock::acquire(&opts.out)?;
    let ck_path = opts.out.join("checkpoint.json");
    let metrics_path = opts.out.join("metrics.jsonl");
    let mut trainer = if opts.resume && ck_path.exists() {
        Trainer::resume(config.clone(), &ck_path)?
    } else {
        Trainer::new(config.clone())?
    };
    // Keep the metrics of the steps the checkpoint covers, verbatim; drop any written after it.
    let mut rewards = Vec::new();
    let mut all = Vec::new();
    let mut kept = String::new();
    if trainer.step > 0 {
        let text = std::fs::read_to_string(&metrics_path).unwrap_or_default();
        for line in text.lines() {
            match serde_json::from_str::<StepMetrics>(line) {
                Ok(m) if m.step <= trainer.step && m.step == rewards.len() + 1 => {
                    rewards.push(m.reward);
                    all.push(m);
                    kept.push_str(line);
                    kept.push('\n');
                }
                _ => break,
            }
        }
    }
    std::fs::write(&metrics_path, kept).map_err(io_err(&metrics_path))?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(io_err(&metrics_path))?;

    let bar = bar.unwrap_or_else(|| progress_bar(opts.progress, config));
    bar.set_length(config.steps as u64);
    bar.set_position(trainer.step.min(config.steps) as u64);
    while trainer.step < config.steps {
        let mut m = trainer.step()?;
        if config.eval_every > 0 && m.step % config.eval_every == 0 {
            m.eval_acc = Some(trainer.evaluate().0);
        }
        let line = serde_json::to_string(&m).map_err(io_err(&metrics_path))?;
        writeln!(metrics_file, "{line}").map_err(io_err(&metrics_path))?;
        rewards.push(m.reward);
        let recent = &rewards[rewards.len().saturating_sub(10)..];
        bar.set_position(m.step as u64);
        bar.set_message(format!(
            "reward {:.3} (10-step {:.3})  loss {:+.4}  answer score {:.2} vs other {:.3}",
            m.reward,
            recent.iter().sum::<f64>() / recent.len() as f64,
            m.loss,
            m.score_answer,
            m.score_other
        ));
        if trainer.step % config.checkpoint_every.max(1) == 0 || trainer.step == config.steps {
            trainer.checkpoint()?.save(&ck_path)?;
        }
        all.push(m);
    }
    if trainer.step == 0 {
        trainer.checkpoint()?.save(&ck_path)?;
    }
    bar.finish();
    let name = format!("{} seed {}", config.algo.name(), config.seed);
    plot::reward_plot(
        &opts.out.join("reward.svg"),
        &format!("Mean reward per step ({name})"),
        &[plot::RewardSeries {
            label: config.algo.name().into(),
            runs: vec![rewards.clone()],
        }],
    )?;
    plot::score_histogram(
        &opts.out.join("scores.svg"),
        &format!("{name}, last {HISTOGRAM_STEPS} steps"),
        trainer.recent_scores(),
    )?;
    let (eval_acc, eval_acc_by_kind) = trainer.evaluate();
    let tail = &rewards[rewards.len().saturating_sub(10)..];
    let mut eval_curve = vec![(0, trainer.base_eval_acc)];
    eval_curve.extend(all.iter().filter_map(|m| m.eval_acc.map(|a| (m.step, a))));
    if eval_curve.last().map(|p| p.0) != Some(trainer.step) {
        eval_curve.push((trainer.step, eval_acc));
    }
    let over_steps =
        |f: &dyn Fn(&StepMetrics) -> f64| all.iter().map(f).sum::<f64>() / all.len().max(1) as f64;
    Ok(RunSummary {
        algo: config.algo,
        seed: config.seed,
        steps: trainer.step,
        base_eval_acc: trainer.base_eval_acc,
        eval_acc,
        eval_acc_by_kind,
        final_reward: if tail.is_empty() {
            0.0
        } else {
            tail.iter().sum::<f64>() / tail.len() as f64
        },
        rewards,
        eval_curve,
        score_answer: over_steps(&|m| m.score_answer),
        score_read: over_steps(&|m| m.score_read),
        score_nonvisual: over_steps(&|m| m.score_nonvisual),
        sbar_cv: over_steps(&|m| m.sbar_cv),
        recent_scores: trainer.recent_scores().to_vec(),
        wall_s: start.elapsed().as_secs_f64(),
        out: opts.out.clone(),
    })
}

fn progress_bar(show: bool, config: &TrainConfig) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(config.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {pos:>4}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} s{}", config.algo.name(), config.seed));
    bar
}

/// Runs every (algorithm, seed) pair, up to `threads` at a time (each run is single-threaded and
/// deterministic, so the results do not depend on the thread count), under `out/<algo>-seed<seed>/`, and
/// draws all mean-reward curves on one picture `out/reward.svg`.
pub fn compare(
    base: &TrainConfig,
    algos: &[Algo],
    seeds: &[u64],
    out: &Path,
    resume: bool,
    progress: bool,
    threads: usize,
) -> Result<Vec<RunSummary>> {
    // Two runs of one (algorithm, seed) would share a folder and race on its files.
    for (i, s) in seeds.iter().enumerate() {
        if seeds[..i].contains(s) {
            return Err(TrainError::Config {
                field: "seeds",
                value: format!("{seeds:?}"),
                expected: "distinct seeds (seed repeated)",
            });
        }
    }
    let _lock = lock::OutLock::acquire(out)?;
    let jobs: Vec<(Algo, u64)> = seeds
        .iter()
        .flat_map(|&s| algos.iter().map(move |&a| (a, s)))
        .collect();
    let multi = indicatif::MultiProgress::new();
    if !progress {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<Result<RunSummary>>>> =
        std::sync::Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&(algo, seed)) = jobs.get(i) else {
                    break;
                };
                let cfg = TrainConfig {
                    algo,
                    seed,
                    ..base.clone()
                };
                let opts = RunOptions {
                    out: out.join(format!("{}-seed{seed}", algo.name())),
                    resume,
                    progress,
                };
                let bar = multi.add(progress_bar(progress, &cfg));
                let r = run(&cfg, &opts, Some(bar));
                results.lock().expect("no poisoned lock")[i] = Some(r);
            });
        }
    });
    let results: Vec<RunSummary> = results
        .into_inner()
        .expect("no poisoned lock")
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect::<Result<_>>()?;
    let series: Vec<plot::RewardSeries> = algos
        .iter()
        .map(|&a| plot::RewardSeries {
            label: a.name().into(),
            runs: results
                .iter()
                .filter(|r| r.algo == a)
                .map(|r| r.rewards.clone())
                .collect(),
        })
        .collect();
    let names: Vec<&str> = algos.iter().map(|a| a.name()).collect();
    plot::reward_plot(
        &out.join("reward.svg"),
        &format!(
            "Mean reward per step: {}, seeds {seeds:?}",
            names.join(" vs ")
        ),
        &series,
    )?;
    let bands: Vec<plot::BandSeries> = algos
        .iter()
        .map(|&a| {
            let curves: Vec<&Vec<(usize, f64)>> = results
                .iter()
                .filter(|r| r.algo == a)
                .map(|r| &r.eval_curve)
                .collect();
            let len = curves.iter().map(|c| c.len()).min().unwrap_or(0);
            let points = (0..len)
                .map(|i| {
                    let xs: Vec<f64> = curves.iter().map(|c| c[i].1).collect();
                    let m = report::MeanCi::of(&xs);
                    (curves[0][i].0 as f64, m.mean, m.half.unwrap_or(0.0))
                })
                .collect();
            plot::BandSeries {
                label: format!("{} ({} seeds, 95% CI band)", a.name(), curves.len()),
                points,
            }
        })
        .collect();
    plot::accuracy_band_plot(
        &out.join("accuracy.svg"),
        &format!("Held-out accuracy, seeds {seeds:?}"),
        &bands,
    )?;
    let shown = if algos.contains(&Algo::Vppo) {
        Algo::Vppo
    } else {
        algos[0]
    };
    let pooled: Vec<(f32, bool)> = results
        .iter()
        .filter(|r| r.algo == shown)
        .flat_map(|r| r.recent_scores.iter().copied())
        .collect();
    plot::score_histogram(
        &out.join("scores.svg"),
        &format!(
            "{}, {} seeds, last {HISTOGRAM_STEPS} steps",
            shown.name(),
            seeds.len()
        ),
        &pooled,
    )?;
    Ok(results)
}

/// `vppo train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The algorithm: vppo (the official VPPO setting), dapo (every token, no shaping), grpo, tgf-only
    /// (VPPO's mask, no shaping) or tas-only (VPPO's shaping, every token).
    #[arg(long, value_enum, default_value = "vppo")]
    pub algo: Algo,
    /// Where the loss runs: cpu (the reference), simt (the kernels on the CPU) or cuda (GPU 0).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// RL steps (default 80 on the chain task, 300 on the template task, 120 with --easy).
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Seed of every random stream.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub seed: u64,
    /// Seeds for --compare, comma-separated (default 1,2,3,4,5).
    #[arg(long, allow_negative_numbers = true, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Run several algorithms (--algos) on the same seeds (--seeds, default 1,2,3,4,5) and report
    /// held-out accuracy with 95% intervals, steps to --threshold, token scores and the Sbar spread.
    #[arg(long)]
    pub compare: bool,
    /// Algorithms for --compare, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "grpo,dapo,vppo,tgf-only,tas-only"
    )]
    pub algos: Vec<Algo>,
    /// Held-out accuracy whose first reaching --compare reports (steps to threshold).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.6)]
    pub threshold: f64,
    /// Held-out accuracy every this many steps (0: only at the end).
    #[arg(long, allow_negative_numbers = true, default_value_t = 10)]
    pub eval_every: usize,
    /// Output folder (default runs/<algo>-seed<seed>, or runs/compare).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the folder's checkpoint.json when there is one.
    #[arg(long)]
    pub resume: bool,
    /// The task family: chain (cell reads with free filler tokens the verifier ignores) or template
    /// (every token but the answer fixed by the question).
    #[arg(long, value_enum, default_value = "chain")]
    pub task: Family,
    /// The small easy task (2x2 grid, 2 colours, colour-at questions, template family) instead.
    #[arg(long)]
    pub easy: bool,
    /// Prompts per step (each with G = 8 responses).
    #[arg(long, allow_negative_numbers = true)]
    pub prompts: Option<usize>,
    /// AdamW learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Supervised warm-up steps of the base model.
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_steps: Option<usize>,
    /// Fraction of the warm-up's image-dependent tokens that are right (the rest are guesses).
    #[arg(long, allow_negative_numbers = true)]
    pub base_skill: Option<f64>,
    /// Chain task: most fillers in a base-model response (sets max_len to fit).
    #[arg(long, allow_negative_numbers = true)]
    pub max_fillers: Option<usize>,
    /// Runs at a time for --compare (default: the machine's cores).
    #[arg(long, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `vppo train`; returns the one-line JSON summary to print.
pub fn run_cli(args: &TrainArgs) -> Result<serde_json::Value> {
    let start = Instant::now();
    let mut cfg = if args.easy {
        TrainConfig::easy()
    } else {
        match args.task {
            Family::Template => TrainConfig::default(),
            Family::Chain => TrainConfig::chain(),
        }
    };
    cfg.algo = args.algo;
    cfg.device = args.device;
    if let Some(steps) = args.steps {
        cfg.steps = steps;
    }
    cfg.seed = args.seed;
    if let Some(p) = args.prompts {
        cfg.prompts = p;
    }
    if let Some(lr) = args.lr {
        cfg.optim.lr = lr;
    }
    cfg.eval_every = args.eval_every;
    if !(0.0..=1.0).contains(&args.threshold) {
        return Err(TrainError::Config {
            field: "threshold",
            value: args.threshold.to_string(),
            expected: "an accuracy in [0, 1]",
        });
    }
    if let Some(w) = args.warmup_steps {
        cfg.warmup_steps = w;
    }
    if let Some(b) = args.base_skill {
        cfg.base_skill = b;
    }
    if let Some(f) = args.max_fillers {
        cfg.task.max_fillers = f;
        cfg.max_len = Task::new(cfg.task.clone())?.max_response_len().max(8);
    }
    cfg.validate()?;
    let progress = !args.quiet;
    if args.compare {
        let seeds = if args.seeds.is_empty() {
            vec![1, 2, 3, 4, 5]
        } else {
            args.seeds.clone()
        };
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs/compare"));
        let threads = args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let mut algos: Vec<Algo> = Vec::new();
        for &a in &args.algos {
            if !algos.contains(&a) {
                algos.push(a);
            }
        }
        let runs = compare(&cfg, &algos, &seeds, &out, args.resume, progress, threads)?;
        let names: Vec<&str> = algos.iter().map(|a| a.name()).collect();
        let stats: Vec<Vec<report::RunStats>> = algos
            .iter()
            .map(|&a| {
                runs.iter()
                    .filter(|r| r.algo == a)
                    .map(|r| report::RunStats {
                        seed: r.seed,
                        eval_acc: r.eval_acc,
                        curve: r.eval_curve.clone(),
                        score_answer: r.score_answer,
                        score_read: r.score_read,
                        score_nonvisual: r.score_nonvisual,
                        sbar_cv: r.sbar_cv,
                    })
                    .collect()
            })
            .collect();
        let rows = report::rows(&names, &stats, args.threshold);
        let table = report::markdown(&rows, args.threshold);
        let header = format!(
            "task {}, {} steps, seeds {seeds:?}, device {}\n\n",
            cfg.task.family.name(),
            cfg.steps,
            cfg.device.name()
        );
        std::fs::write(out.join("report.md"), format!("{header}{table}")).map_err(io_err(&out))?;
        if progress {
            eprintln!("\n{header}{table}");
        }
        let mean = |a: Algo, f: &dyn Fn(&RunSummary) -> f64| {
            let xs: Vec<f64> = runs.iter().filter(|r| r.algo == a).map(f).collect();
            xs.iter().sum::<f64>() / xs.len().max(1) as f64
        };
        let per_run: Vec<serde_json::Value> = runs.iter().map(run_json).collect();
        let mut by_algo = serde_json::Map::new();
        for &a in &algos {
            by_algo.insert(
                a.name().into(),
                serde_json::json!({
                    "eval_acc": round4(mean(a, &|r| r.eval_acc)),
                    "final_reward": round4(mean(a, &|r| r.final_reward)),
                    "base_eval_acc": round4(mean(a, &|r| r.base_eval_acc)),
                }),
            );
        }
        let summary = serde_json::json!({
            "mode": "compare", "task": cfg.task.family.name(), "seeds": seeds, "steps": cfg.steps, "device": cfg.device.name(),
            "mean": by_algo, "table": rows, "threshold": args.threshold, "runs": per_run, "out": out, "wall_s": round4(start.elapsed().as_secs_f64()),
        });
        std::fs::write(out.join("summary.json"), summary.to_string()).map_err(io_err(&out))?;
        Ok(summary)
    } else {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("runs/{}-seed{}", cfg.algo.name(), cfg.seed)));
        let r = run(
            &cfg,
            &RunOptions {
                out,
                resume: args.resume,
                progress,
            },
            None,
        )?;
        let mut v = run_json(&r);
        v["device"] = cfg.device.name().into();
        v["mode"] = "train".into();
        Ok(v)
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn run_json(r: &RunSummary) -> serde_json::Value {
    serde_json::json!({
        "algo": r.algo.name(), "seed": r.seed, "steps": r.steps,
        "base_eval_acc": round4(r.base_eval_acc), "eval_acc": round4(r.eval_acc),
        "eval_acc_by_kind": {"colour_at": round4(r.eval_acc_by_kind[0]), "count": round4(r.eval_acc_by_kind[1]), "same": round4(r.eval_acc_by_kind[2])},
        "final_reward": round4(r.final_reward), "wall_s": round4(r.wall_s), "out": r.out,
    })
}
