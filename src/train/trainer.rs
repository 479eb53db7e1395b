//! A run in progress, [`Trainer`]: created fresh (model initialised and warmed up from the seed) or
//! resumed from a checkpoint, saved to one, evaluated; its loss opened on the run's device (probed
//! first). The RL step itself is in [`super::step`], its sampling in [`super::rollout`].

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{from_bits, to_bits, Checkpoint, RngState};
use super::config::TrainConfig;
use super::error::{Result, TrainError};
use super::eval::evaluate;
use super::model::Model;
use super::optim::AdamW;
use super::task::Task;
use super::warmup::warm_up;
use crate::options::DeviceArg;
use crate::{Batch, Logits, Vppo, VppoConfig};

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
    pub(super) rng: ChaCha8Rng,
    pub(super) vppo: Vppo,
    pub(super) recent_scores: Vec<(f32, bool)>,
}

pub(super) fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

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
        ..Default::default()
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
