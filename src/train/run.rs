//! One training run ([`run`]): resume or start, step to `config.steps` writing metrics.jsonl and
//! checkpoints under the output folder, draw its pictures, and return its [`RunSummary`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::config::{Algo, TrainConfig};
use super::error::{io_err, Result};
use super::lock;
use super::metrics::{StepMetrics, HISTOGRAM_STEPS};
use super::plot;
use super::trainer::Trainer;

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

pub(super) fn progress_bar(show: bool, config: &TrainConfig) -> indicatif::ProgressBar {
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
