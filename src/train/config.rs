//! What determines a run: the algorithm ([`Algo`], i.e. which loss configuration) and the
//! [`TrainConfig`] (task, model widths, optimizer, warm-up, evaluation, checkpoints), its presets
//! (the main job, [`TrainConfig::easy`], [`TrainConfig::chain`]) and its validation.

use serde::{Deserialize, Serialize};

use super::error::{Result, TrainError};
use super::model::ModelConfig;
use super::optim::AdamWConfig;
use super::task::{Kind, Task, TaskConfig};
use crate::options::DeviceArg;
use crate::VppoConfig;

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
    /// CISPO: -A' logp times the clipped ratio held constant (loss type cispo, SPEC section 12), DAPO's
    /// clip bounds, no dual clip, no logp penalty, every token, no shaping.
    Cispo,
    /// VPPO with the official entropy option (`use_vppo_on_entropy`): a token carries gradient when it
    /// is among the top 40% of its response by perception or the top 20% by entropy (mask_by
    /// perception-or-entropy).
    VppoEntropy,
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
            Algo::Cispo => "cispo",
            Algo::VppoEntropy => "vppo-entropy",
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
            Algo::Cispo => VppoConfig {
                loss_type: crate::LossType::Cispo,
                dual_clip: None,
                logp_penalty: 0.0,
                ..VppoConfig::dapo()
            },
            Algo::VppoEntropy => VppoConfig {
                mask_by: crate::MaskBy::PerceptionOrEntropy,
                ..VppoConfig::default()
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

    /// The chain task ([`super::chain`]): a 3x3 grid, cell reads with free fillers; the main job's task.
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

    pub(super) fn validate(&self) -> Result<()> {
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

    pub(super) fn model_config(&self, task: &Task) -> ModelConfig {
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
    pub(super) fn identity(&self) -> Result<serde_json::Value> {
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
